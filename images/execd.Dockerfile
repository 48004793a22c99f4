# opensandbox/execd: execd (a self-contained one-dir build: the executable `execd` and its libraries in
# `execd-lib/`) and the sandbox bootstrap script, in /opensandbox/.
#
# Build execd first (it is copied in, not built here): tools/build-execd.sh, which assembles
# build/execd/opensandbox/ (execd, execd-lib/, bootstrap.sh), then
#   podman build -f images/execd.Dockerfile -t opensandbox/execd:dev .
#
# Used like upstream's execd image: the directory is copied into a volume shared with the sandbox
# container (the controller's init container; the docker runtime makes one read-only volume of it for
# all sandboxes), whose command becomes the bootstrap script followed by the entrypoint:
#   init:    cp -a /opensandbox/. /opt/opensandbox/
#   sandbox: /opt/opensandbox/bootstrap.sh <entrypoint...>      (env EXECD=/opt/opensandbox/execd)
# Nothing is unpacked when execd starts: it listens within tens of milliseconds, and charges the
# sandbox no unpacked copy of itself.
# Run on its own, the image starts execd as its main process (port 44772).
#
# The base only needs `sh` and `cp` for the init container; the executable needs glibc no older
# than the machine it was built on.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

COPY build/execd/opensandbox/ /opensandbox/
WORKDIR /opensandbox

ENV EXECD=/opensandbox/execd
EXPOSE 44772
ENTRYPOINT ["/opensandbox/bootstrap.sh"]
