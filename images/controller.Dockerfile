# opensandbox/controller: the Pool and BatchSandbox controller, a self-contained executable.
#
#   make docker-build IMG=opensandbox/controller:dev      (tools/build-image.sh controller IMG)
#
# The executable and its libraries are built outside (PyInstaller, one-dir: build/controller/); this
# file only assembles them FROM scratch with the system libraries they link
# (build/controller/syslibs: glibc, copied from the build machine, whose glibc the build needs).
# No shell, no package manager, no Python.
# Runs as 65532:65532 with a read-only root file system; ports 8081 (probes) and 8443 (metrics).
FROM scratch
COPY build/controller/syslibs/ /
COPY build/controller/opensandbox-controller/ /opensandbox/
COPY images/passwd /etc/passwd
COPY images/group /etc/group
USER 65532:65532
EXPOSE 8081 8443
ENTRYPOINT ["/opensandbox/opensandbox-controller"]
