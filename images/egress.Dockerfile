# opensandbox/egress: the egress sidecar (network policy), the self-contained one-dir opensandbox-egress
# program with libnftables inside it. It runs in the sandbox's network namespace with
# CAP_NET_ADMIN (the only container of a sandbox that has it); see docs/network-policy.md.
#
# Build the executable first (it is copied in, not built here): tools/build-egress.sh
#   podman build -f images/egress.Dockerfile -t opensandbox/egress:dev .
# (`tools/build-image.sh egress IMAGE` does both.)
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

COPY build/egress/opensandbox-egress/ /opt/opensandbox-egress/

USER 0
EXPOSE 18080
ENTRYPOINT ["/opt/opensandbox-egress/opensandbox-egress"]
