# opensandbox/server: the server the OpenSandbox SDK talks to, a self-contained executable.
#
#   make docker-build-server SERVER_IMG=opensandbox/server:v0.1.0   (tools/build-image.sh server IMG)
#
# Built like images/controller.Dockerfile: PyInstaller one-dir (build/server/) plus the system
# libraries it links, FROM scratch. Runs as 65532:65532; give it its file with --config
# (the Helm chart mounts one at /etc/opensandbox/config.toml). Port 8080 by default.
FROM scratch
COPY build/server/syslibs/ /
COPY build/server/opensandbox-server/ /opensandbox/
COPY images/passwd /etc/passwd
COPY images/group /etc/group
USER 65532:65532
ENV HOME=/tmp
EXPOSE 8080
ENTRYPOINT ["/opensandbox/opensandbox-server"]
