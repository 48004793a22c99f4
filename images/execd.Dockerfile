# opensandbox/execd: the self-contained execd executable and the sandbox bootstrap script.
#
# Build the executable first (it is copied in, not built here): tools/build-execd.sh
#   podman build -f images/execd.Dockerfile -t opensandbox/execd:dev .
#
# Used like upstream's execd image: an init container copies both files into a volume shared with
# the sandbox container, whose command becomes the bootstrap script followed by the entrypoint:
#   init:    cp ./execd ./bootstrap.sh /opt/opensandbox/        (workdir /opensandbox)
#   sandbox: /opt/opensandbox/bootstrap.sh <entrypoint...>      (env EXECD=/opt/opensandbox/execd)
# Run on its own, the image starts execd as its main process (port 44772).
#
# The base only needs `sh` and `cp` for the init container; the executable needs glibc no older
# than the machine it was built on.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

WORKDIR /opensandbox
COPY --chmod=0755 build/execd/opensandbox-execd ./execd
COPY --chmod=0755 images/execd-bootstrap.sh ./bootstrap.sh

ENV EXECD=/opensandbox/execd
EXPOSE 44772
ENTRYPOINT ["/opensandbox/bootstrap.sh"]
