# opensandbox/task-executor: the self-contained task-executor (a one-dir build: the executable beside its
# libraries, nothing unpacked at start), run as a sidecar.
#
# Build it first (it is copied in, not built here): tools/build-task-executor.sh
#   podman build -f images/task-executor.Dockerfile -t opensandbox/task-executor:dev .
# (`make docker-build-task-executor` does both.)
#
# The controller injects it into Pool pods (spec.taskExecutor.enabled) and into direct-mode pods of a
# BatchSandbox with a taskTemplate: shareProcessNamespace on the pod, CAP_SYS_ADMIN on this
# container (setns into the main container's mount namespace), an emptyDir at
# /var/lib/opensandbox-tasks for task state. See docs/task-executor.md.
#
# The base needs nothing but glibc no older than the build machine's; no Python.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

COPY build/task-executor/opensandbox-task-executor/ /opt/opensandbox-task-executor/

USER 0
EXPOSE 5758
ENTRYPOINT ["/opt/opensandbox-task-executor/opensandbox-task-executor"]
