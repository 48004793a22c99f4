"""Every platform-wide name, in one place: labels, annotations, ports, the execd token header.

Plain constants, imported by the server, the controller and the in-sandbox executables alike.
Kubernetes names live under `sandbox.opensandbox.io/`, the docker runtime's under `opensandbox.io/`;
users may set metadata under neither (`RESERVED_PREFIXES`). Which pool pod serves which pooled
sandbox is recorded in the BatchSandbox's allocation ledger (`status.sandboxes[].podUID`); the pod's
`BATCHSANDBOX` label and controller ownerReference follow it (docs/controller.md).
"""

from typing import Final

GROUP: Final = "sandbox.opensandbox.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
PREFIX: Final = f"{GROUP}/"

# Labels
MANAGED_BY: Final = PREFIX + "managed-by"  # on every pod the controller creates
MANAGED_BY_VALUE: Final = "opensandbox-controller"
POOL: Final = PREFIX + "pool"  # pool pods: the Pool's name (kept after a claim, for capacity)
POOL_REVISION: Final = PREFIX + "pool-revision"  # pool pods: hash of the template that built them
EVICT: Final = PREFIX + "evict"  # set by a person on an idle pool pod: the Pool deletes it (claimed pods stay)
BATCHSANDBOX: Final = PREFIX + "batchsandbox"  # claimed or direct pods: the owning BatchSandbox
INDEX: Final = PREFIX + "index"  # claimed or direct pods: the sandbox index within the BatchSandbox
CREATED_BY: Final = PREFIX + "created-by"  # BatchSandboxes the server made for the lifecycle API
CREATED_BY_SERVER: Final = "opensandbox-server"
CREATED_FOR_SANDBOX: Final = PREFIX + "created-for-sandbox"  # a PVC or pull Secret a sandbox's create made

# The create extension that claims a warm pod of a Pool (kubernetes runtime's pooled mode).
EXTENSION_POOL_REF: Final = "poolRef"
# Upstream's create extension that turns on execd's bwrap isolation ("enable"): the local and docker
# runtimes then let that sandbox create user namespaces and mount in them (docs/isolated-sessions.md).
EXTENSION_EXECD_ISOLATION: Final = "bootstrap.execd.isolation"


def wants_isolation(extensions: dict[str, str]) -> bool:
    return extensions.get(EXTENSION_EXECD_ISOLATION, "").lower() == "enable"


# kubernetes snapshots (docs/snapshots.md): a snapshot's record (a ConfigMap named by its id) and its
# committer pod carry its id; a BatchSandbox restored from one, or paused into one, names it (in use).
SNAPSHOT_ID: Final = PREFIX + "snapshot-id"
RESTORED_FROM: Final = PREFIX + "restored-from"
SNAPSHOT_OF: Final = PREFIX + "snapshot-of"  # the record: the sandbox it was taken of
SNAPSHOT_COMMITTER: Final = PREFIX + "committer"  # the committer pod (value: the snapshot id)
# server BatchSandboxes being paused (annotation: the snapshot its committer takes), and paused
# (annotation: the snapshot whose image the template now runs; replicas 0 until the resume)
PAUSING: Final = PREFIX + "pausing"
PAUSED: Final = PREFIX + "paused"

# Annotations
ENTRYPOINT_APPLIED: Final = PREFIX + "entrypoint-applied"  # pooled pods: execd started the entrypoint
CLAIMED_AT: Final = PREFIX + "claimed-at"  # pooled pods: when the claim label was written (RFC 3339)
# BatchSandboxes: the sandboxes' pod IPs by index, as a JSON list ("" where none yet), as upstream writes it
ENDPOINTS: Final = PREFIX + "endpoints"
# BatchSandboxes, set by a person or client: pods to hand back (comma-separated pod names or indices);
# they are deleted (the Pool makes fresh ones) and their sandboxes are not replaced
RELEASE: Final = PREFIX + "release"
# server BatchSandboxes whose create has not answered yet (value: when it started, RFC 3339). The create
# clears it, and sets the requested expireTime, before its 202; a create that never answered (the
# server died) keeps it and a short provisional expireTime, so it is deleted (docs/kubernetes-runtime.md).
CREATE_PENDING: Final = PREFIX + "create-pending"
# server BatchSandboxes: what the lifecycle API reports that the spec does not hold (JSON: image,
# entrypoint, extensions, createdAt)
SANDBOX_REQUEST: Final = PREFIX + "sandbox-request"

# The capabilities a sandbox's root keeps on every runtime (Docker's default set minus NET_RAW and
# MKNOD): the local jail (within its own user namespace), docker's CapAdd after dropping ALL, and the
# sandbox container of every pod the controller builds. execd needs SETUID/SETGID/CHOWN to run commands
# as other users and manage their files; nothing here reaches outside the sandbox.
SANDBOX_CAPABILITIES: Final = (
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "SETFCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "AUDIT_WRITE",
)

# The execd port inside every sandbox, and the task-executor's.
EXECD_PORT: Final = 44772
# The header that carries a sandbox's execd token (local and docker runtimes; endpoints hand it out).
EXECD_TOKEN_HEADER: Final = "X-EXECD-ACCESS-TOKEN"
TASK_EXECUTOR_PORT: Final = 5758
# The egress API (network policy) inside every sandbox that has a policy, and its token's header
# (upstream's names); the sandbox itself never holds that token (docs/network-policy.md).
EGRESS_PORT: Final = 18080
EGRESS_TOKEN_HEADER: Final = "OPENSANDBOX-EGRESS-AUTH"
SANDBOX_CONTAINER: Final = "sandbox"

# execd injection: the init container copies the execd image's /opensandbox/ into a shared emptyDir
# mounted at EXECD_MOUNT in the sandbox container, whose command becomes the bootstrap script.
EXECD_IMAGE_DIR: Final = "/opensandbox"
EXECD_MOUNT: Final = "/opt/opensandbox"
EXECD_BOOTSTRAP: Final = EXECD_MOUNT + "/bootstrap.sh"
EXECD_VOLUME: Final = "opensandbox-execd"
EXECD_INSTALLER: Final = "execd-installer"  # the container (first in a pod) that copies execd into EXECD_VOLUME
EXECD_START_PATH: Final = "/bootstrap"  # execd route that starts the main process with an env (pooled mode)

# task-executor injection: a sidecar container sharing the pod's PID namespace; it finds the main
# container's processes by this env var (value: the container's name) and runs tasks inside it.
TASK_EXECUTOR_CONTAINER: Final = "task-executor"
TASK_TARGET_ENV: Final = "OPENSANDBOX_MAIN_CONTAINER"
TASK_DATA_VOLUME: Final = "opensandbox-tasks"
TASK_EXECUTOR_TOKEN_ENV: Final = "TASK_EXECUTOR_ACCESS_TOKEN"  # its access token (api/tokens.py)
TASK_EXECUTOR_TOKEN_HEADER: Final = "X-TASK-EXECUTOR-ACCESS-TOKEN"
TASK_DATA_DIR: Final = "/var/lib/opensandbox-tasks"  # in the sidecar: an emptyDir, so state survives its restarts

# Docker runtime: labels of sandbox containers. Upstream's `opensandbox.io/` names; user metadata
# cannot use that prefix, so nothing a user sets collides with them. Metadata and extensions get
# their own prefixes (a container also carries its image's labels). See docs/docker-runtime.md.
DOCKER_PREFIX: Final = "opensandbox.io/"
DOCKER_ID: Final = DOCKER_PREFIX + "id"  # the sandbox id; every container the runtime lists has it
DOCKER_IMAGE: Final = DOCKER_PREFIX + "image"  # image.uri as requested
DOCKER_ENTRYPOINT: Final = DOCKER_PREFIX + "entrypoint"  # the user's entrypoint (JSON list)
DOCKER_CREATED_AT: Final = DOCKER_PREFIX + "created-at"  # RFC 3339, microseconds
DOCKER_EXPIRES_AT: Final = DOCKER_PREFIX + "expires-at"  # expiry at create (renewals: the state dir)
DOCKER_MANUAL_CLEANUP: Final = DOCKER_PREFIX + "manual-cleanup"  # "true" when created with timeout null
DOCKER_METADATA_PREFIX: Final = DOCKER_PREFIX + "metadata."  # + key: user metadata at create
DOCKER_EXTENSIONS_PREFIX: Final = DOCKER_PREFIX + "extensions."  # + key: extensions
DOCKER_SECURE_ACCESS: Final = DOCKER_PREFIX + "secure-access"  # "true": endpoints need a signed token
DOCKER_OWNED_VOLUMES: Final = DOCKER_PREFIX + "owned-volumes"  # named volumes removed with it (JSON list)
DOCKER_VOLUME_CREATED_BY: Final = DOCKER_PREFIX + "created-by-sandbox"  # on a named volume a create made
DOCKER_EXECD_HELPER: Final = DOCKER_PREFIX + "execd-helper"  # the throwaway container execd is copied from
# Snapshot images (docker commit) carry their id and their record (base64 JSON); a container restored
# from one carries the id too, which makes the snapshot in use (docs/snapshots.md).
DOCKER_SNAPSHOT: Final = DOCKER_PREFIX + "snapshot-id"
DOCKER_SNAPSHOT_RECORD: Final = DOCKER_PREFIX + "snapshot"
# The label keys the runtime set on a container (JSON list): a container also carries its image's
# labels, and one from a snapshot image carries its source sandbox's, which must not count.
DOCKER_OWN_LABELS: Final = DOCKER_PREFIX + "own-labels"
DOCKER_EXECD_VOLUME: Final = DOCKER_PREFIX + "execd-volume"  # the volume holding execd (value: its content key)

# The egress sidecar of a kubernetes sandbox (a native sidecar: an init container that keeps running)
EGRESS_CONTAINER: Final = "egress"
EGRESS_STATE_VOLUME: Final = "opensandbox-egress"
EGRESS_STATE_DIR: Final = "/var/lib/opensandbox-egress"
# On a BatchSandbox: JSON {"policy": {defaultAction, egress}, "upstreamDns": [...]}; the controller
# injects the egress sidecar into its pods (controller/pods.py inject_egress), or in pooled mode PUTs
# the policy into the claimed pod's sidecar (a Pool with spec.egress; batchsandbox.py _prepare)
NETWORK_POLICY: Final = PREFIX + "network-policy"
# On a pooled pod: the controller replaced its sidecar's policy (the Pool's) with the BatchSandbox's
NETWORK_POLICY_APPLIED: Final = PREFIX + "network-policy-applied"
DOCKER_EGRESS_FOR: Final = DOCKER_PREFIX + "egress-for"  # docker: the egress sidecar of this sandbox id
DOCKER_EGRESS: Final = DOCKER_PREFIX + "egress"  # docker: "true" on a sandbox container with a network policy
# docker: the sandbox's bootstrap script waits on this FIFO before its entrypoint until the egress
# sidecar enforces the policy (images/execd-bootstrap.sh)
START_GATE_ENV: Final = "OPENSANDBOX_START_GATE"
START_GATE: Final = "/tmp/.opensandbox-start-gate"

# Metadata keys a user may never set, on any runtime: the platform's own labels live there.
RESERVED_PREFIXES: Final = (PREFIX, DOCKER_PREFIX)
