"""The kubernetes runtime's BatchSandboxes: built from a create request, read back as sandboxes.

Pure functions (no I/O), so the mapping is unit-tested on its own:

- `build_batchsandbox` turns a `SandboxSpec` into one BatchSandbox (replicas 1): direct mode carries
  the image, entrypoint, env, limits and requests in `sandboxTemplate`; pooled mode (`extensions.poolRef`)
  carries only the entrypoint and env, which the controller applies through execd.
- `read_entry` turns a BatchSandbox (as the watch delivers it) into an `Entry`: the API's view of
  the sandbox (`SandboxInfo`), the pod IP for endpoints, and what a waiting create needs to know.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

from opensandbox_platform.api import conditions, labels
from opensandbox_platform.api.crds import SandboxSpec as SandboxSpecModel
from opensandbox_platform.daemon import times
from opensandbox_platform.kube.client import JSON
from opensandbox_platform.server.runtimes.base import SandboxInfo, SandboxSpec, State
from opensandbox_platform.server.validation import is_reserved_key
from opensandbox_platform.server.volumes import HostBackend, PvcBackend, VolumeSpec, allowed_root

STOPPING = "Stopping"  # a state the SDK knows; base.State has no use for it elsewhere
PAUSING = "Pausing"  # the SDK's, while a pause's snapshot is taken (kubernetes only)
# What the SDK sends when the caller gives no entrypoint: it only keeps a container up. A pooled pod
# stays up on its own (execd), so starting it would only cost a round trip to execd per create.
KEEP_ALIVE_ENTRYPOINT = ("tail", "-f", "/dev/null")


def new_sandbox_id() -> str:
    """A random UUID: a valid BatchSandbox name, and `<id>-<index>` a valid pod name."""
    return str(uuid.uuid4())


# --- building ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """The parts of `[kubernetes]` config a BatchSandbox is built from."""

    image_pull_policy: str = "IfNotPresent"
    default_pod_spec: JSON | None = None
    allowed_host_paths: tuple[str, ...] = ()  # server.allowedHostPaths: the nodes' directories `host` volumes use
    default_volume_storage: str = "1Gi"  # a created PVC's request when the volume names no storage
    egress_upstream_dns: tuple[str, ...] = ()  # egress.upstreamDns: where the sidecar forwards allowed lookups
    snapshot_pull_secret: str = ""  # kubernetes.snapshotRegistrySecret: what a pod from a snapshot image pulls with


def build_batchsandbox(
    sandbox_id: str,
    spec: SandboxSpec,
    settings: Settings,
    now: dt.datetime,
    pool_image: str | None = None,
    pending_for: float | None = None,
    pool_egress: bool = False,
) -> JSON:
    """The BatchSandbox for a create request; `pool_image` (the Pool's image) selects pooled mode;
    `pool_egress`: the Pool's pods have the egress sidecar (the sandbox has a policy, the Pool's or its own).

    With `pending_for` (seconds), it is marked as a create that has not answered yet, and expires
    that long after `now` unless `finish_create` says otherwise (see labels.CREATE_PENDING)."""
    pool = spec.extensions.get(labels.EXTENSION_POOL_REF)
    request = {
        "image": pool_image if pool else spec.image,
        "entrypoint": spec.entrypoint,
        "extensions": spec.extensions,
        "createdAt": times.rfc3339(now, digits=6),
        **({"secureAccess": True} if spec.secure_access else {}),
        **({"poolEgress": True} if pool and pool_egress else {}),
    }
    body: JSON = {"replicas": 1}
    expiry = requested_expiry(spec, now)
    if pending_for is not None:
        expiry = now + dt.timedelta(seconds=pending_for)
    if expiry is not None:
        body["expireTime"] = times.rfc3339(expiry, digits=6)
    if pool:
        body["poolRef"] = pool
        template = _pooled_template(spec)
        if template:
            body["sandboxTemplate"] = {"spec": template}
    else:
        body["sandboxTemplate"] = {"spec": _direct_pod_spec(sandbox_id, spec, settings)}
    return {
        "apiVersion": labels.API_VERSION,
        "kind": "BatchSandbox",
        "metadata": {
            "name": sandbox_id,
            "labels": {
                **spec.metadata,
                labels.CREATED_BY: labels.CREATED_BY_SERVER,
                **({labels.RESTORED_FROM: spec.snapshot_id} if spec.snapshot_id else {}),
            },
            "annotations": {
                labels.SANDBOX_REQUEST: json.dumps(request, separators=(",", ":")),
                **({labels.CREATE_PENDING: times.rfc3339(now)} if pending_for is not None else {}),
                **_network_policy(spec, settings),
            },
        },
        "spec": body,
    }


def _network_policy(spec: SandboxSpec, settings: Settings) -> dict[str, str]:
    """The annotation that makes the controller inject the egress sidecar (direct mode) or PUT the
    policy into the claimed pod's sidecar (pooled mode: the Pool's `upstreamDns` applies there)."""
    if spec.network_policy is None:
        return {}
    value = {"policy": spec.network_policy, "upstreamDns": list(settings.egress_upstream_dns)}
    return {labels.NETWORK_POLICY: json.dumps(value, separators=(",", ":"))}


def paused_patch(batchsandbox: JSON, snapshot_id: str, image: str, pull_secret: str) -> JSON:
    """The merge patch that ends a pause: no pod (replicas 0), and the template runs the snapshot's
    image from now on, so a resume is a new pod with the files (resourceVersion: a precondition)."""
    meta = batchsandbox["metadata"]
    template = json.loads(json.dumps((batchsandbox["spec"].get("sandboxTemplate") or {}).get("spec") or {}))
    for container in template.get("containers") or []:
        if container.get("name") == labels.SANDBOX_CONTAINER:
            container["image"], container["imagePullPolicy"] = image, "IfNotPresent"
            # a resume starts the entrypoint at once: the create's preStart hook ran, its files are kept
            container["env"] = [e for e in container.get("env") or [] if e.get("name") != labels.START_GATE_ENV]
    secrets = template.get("imagePullSecrets") or []
    if pull_secret and {"name": pull_secret} not in secrets:
        template["imagePullSecrets"] = [*secrets, {"name": pull_secret}]
    return {
        "metadata": {
            "resourceVersion": meta["resourceVersion"],
            "labels": {labels.RESTORED_FROM: snapshot_id},
            "annotations": {labels.PAUSING: None, labels.PAUSED: snapshot_id},
        },
        "spec": {"replicas": 0, "sandboxTemplate": {"spec": template}},
    }


def left_pool_template(pool: JSON, batchsandbox: JSON) -> JSON:
    """The direct-mode template a paused pooled sandbox resumes from: the Pool's pod template (its
    containers with their env, resources and mounts, its volumes, nodeSelector, tolerations, ...) with
    the entrypoint, env and working directory the BatchSandbox asked for applied to container `sandbox`,
    as the controller applied them in the claimed pod. ValueError when the Pool has no such container
    (a snapshot is taken of container `sandbox`)."""
    template = json.loads(json.dumps((pool.get("spec") or {}).get("sandboxTemplate") or {}))  # a deep copy
    spec: JSON = template.get("spec") or {}
    short = {k: spec.pop(k) for k in SandboxSpecModel.SHORT_FORM if k in spec}
    if "containers" not in spec:
        spec["containers"] = [{"name": labels.SANDBOX_CONTAINER, **short}]
    main = next((c for c in spec["containers"] if c.get("name") == labels.SANDBOX_CONTAINER), None)
    if main is None:
        raise ValueError(f"the Pool's template has no container named {labels.SANDBOX_CONTAINER!r}")
    claim = ((batchsandbox.get("spec") or {}).get("sandboxTemplate") or {}).get("spec") or {}
    if claim.get("command"):
        main["command"] = claim["command"]
        main.pop("args", None)
    if claim.get("args"):
        main["args"] = claim["args"]
    if claim.get("workingDir"):
        main["workingDir"] = claim["workingDir"]
    asked = {e.get("name") for e in claim.get("env") or []}
    env = [e for e in main.get("env") or [] if e.get("name") not in asked] + list(claim.get("env") or [])
    if env:
        main["env"] = env
    # As for any server sandbox: its files live in its container, so an exited entrypoint ends it
    # instead of restarting into an empty container; what the Pool's template says wins.
    spec.setdefault("restartPolicy", "Never")
    return {**({"metadata": template["metadata"]} if template.get("metadata") else {}), "spec": spec}


def left_pool_patch(batchsandbox: JSON, pool: JSON, snapshot_id: str, image: str, pull_secret: str) -> JSON:
    """The merge patch that ends the pause of a pooled sandbox: as `paused_patch`, and it leaves its Pool
    (poolRef removed with replicas 0, which the CRD allows) for a template built from the Pool's
    (`left_pool_template`), so that a resume is a fresh pod from the snapshot image, never a warm pod
    of the Pool. The controller deletes the claimed pod (docs/controller.md). A sandbox that ran under
    the Pool's egress policy keeps it: the Pool's default policy becomes its own."""
    template = left_pool_template(pool, batchsandbox)
    direct = {**batchsandbox, "spec": {**batchsandbox["spec"], "sandboxTemplate": template}}
    patch = paused_patch(direct, snapshot_id, image, pull_secret)
    old_spec = ((batchsandbox["spec"].get("sandboxTemplate") or {}).get("spec")) or {}
    new_spec = patch["spec"]["sandboxTemplate"]["spec"]
    new_spec.update({k: None for k in old_spec if k not in new_spec})  # the claim's short form goes
    if template.get("metadata"):
        patch["spec"]["sandboxTemplate"]["metadata"] = template["metadata"]
    patch["spec"]["poolRef"] = None
    policy = _pool_policy(pool, (batchsandbox["metadata"].get("annotations") or {}).get(labels.NETWORK_POLICY))
    if policy is not None:
        patch["metadata"]["annotations"][labels.NETWORK_POLICY] = policy
    return patch


def _pool_policy(pool: JSON, claimed: str | None) -> str | None:
    """The network-policy annotation of a sandbox leaving an egress Pool: the claim's policy, or the
    Pool's default one (no rules); the Pool's resolvers either way (its sidecar used them). None: no egress."""
    egress = (pool.get("spec") or {}).get("egress")
    if not isinstance(egress, dict):
        return None
    policy: JSON = {"defaultAction": egress.get("defaultAction") or "deny", "egress": []}
    if claimed:
        policy = json.loads(claimed)["policy"]
    value = {"policy": policy, "upstreamDns": list(egress.get("upstreamDns") or [])}
    return json.dumps(value, separators=(",", ":"))


RESUME_PATCH: JSON = {"metadata": {"annotations": {labels.PAUSED: None}}, "spec": {"replicas": 1}}


def requested_expiry(spec: SandboxSpec, created: dt.datetime) -> dt.datetime | None:
    return None if spec.timeout_seconds is None else created + dt.timedelta(seconds=spec.timeout_seconds)


def finish_create(spec: SandboxSpec, created: dt.datetime) -> JSON:
    """The merge patch that makes a pending create a sandbox its client holds: the pending mark goes,
    the requested expiry (or none) replaces the provisional one."""
    expiry = requested_expiry(spec, created)
    return {
        "metadata": {"annotations": {labels.CREATE_PENDING: None}},
        "spec": {"expireTime": times.rfc3339(expiry, digits=6) if expiry else None},
    }


def _env_list(env: dict[str, str]) -> list[JSON]:
    return [{"name": k, "value": v} for k, v in env.items()]


def _pooled_template(spec: SandboxSpec) -> JSON:
    """Only entrypoint and env apply to a claimed pod; nothing at all when there is nothing to start."""
    template: JSON = {}
    if tuple(spec.entrypoint) != KEEP_ALIVE_ENTRYPOINT:
        template["command"] = list(spec.entrypoint)
    if spec.env:
        template["env"] = _env_list(spec.env)
    return template


def _direct_pod_spec(sandbox_id: str, spec: SandboxSpec, settings: Settings) -> JSON:
    container: JSON = {
        "name": labels.SANDBOX_CONTAINER,
        "image": spec.image,
        # a snapshot's image is only ever in the snapshot registry (and named by digest: never stale)
        "imagePullPolicy": "IfNotPresent" if spec.snapshot_id else settings.image_pull_policy,
        "command": list(spec.entrypoint),
    }
    env = dict(spec.env)
    if spec.lifecycle:  # the bootstrap script holds the entrypoint back until preStart succeeded
        env[labels.START_GATE_ENV] = labels.START_GATE
    if env:
        container["env"] = _env_list(env)
    pod_volumes, mounts = volume_mounts(spec.volumes, settings.allowed_host_paths)
    if mounts:
        container["volumeMounts"] = mounts
    resources = {
        kind: quantities
        for kind, quantities in (
            ("limits", _quantities(spec.cpu_millis, spec.memory_bytes)),
            ("requests", _quantities(spec.cpu_request_millis, spec.memory_request_bytes)),
        )
        if quantities
    }
    if resources:
        container["resources"] = resources
    # A sandbox's files live in its container: restarting it would lose them, so an exited
    # entrypoint ends the sandbox (Terminated/Failed) as in the other runtimes. Untrusted code gets
    # no service account token. The configured defaults may change both.
    pod: JSON = {"restartPolicy": "Never", "automountServiceAccountToken": False}
    pod.update(json.loads(json.dumps(settings.default_pod_spec or {})))  # a deep copy
    pod["containers"] = [container]
    if pod_volumes:
        pod["volumes"] = [*(pod.get("volumes") or []), *pod_volumes]
    if spec.image_auth:
        pod["imagePullSecrets"] = [*(pod.get("imagePullSecrets") or []), {"name": pull_secret_name(sandbox_id)}]
    if spec.snapshot_id and settings.snapshot_pull_secret:
        pod["imagePullSecrets"] = [*(pod.get("imagePullSecrets") or []), {"name": settings.snapshot_pull_secret}]
    return pod


# --- volumes and image pull secrets ----------------------------------------------------------------------
def volume_mounts(volumes: list[VolumeSpec], allowed_host_paths: tuple[str, ...]) -> tuple[list[JSON], list[JSON]]:
    """The pod's volumes and the sandbox container's volumeMounts.

    A `host` volume mounts the allowed directory it is under (`hostPath`, type Directory) with the
    rest of its path as the mount's subPath: the kubelet opens a subPath without following symlinks
    out of its volume (and refuses one that leads out), whereas a hostPath itself is followed
    wherever a symlink points, and a sandbox sharing the directory could have made one.

    One pod volume per claim or root, however many mounts use it: the kubelet waits forever for the
    second of two pod volumes of one claim."""
    pod_volumes: dict[tuple[str, str], JSON] = {}
    mounts: list[JSON] = []
    for volume in volumes:
        sub_path = volume.sub_path
        source: JSON
        if isinstance(volume.backend, HostBackend):
            root = allowed_root(volume.backend.path, list(allowed_host_paths))
            assert root is not None, "volumes.parse checked the path against the same list"
            sub_path = _join(posixpath.relpath(volume.backend.path, root), sub_path)
            key, source = ("host", root), {"hostPath": {"path": root, "type": "Directory"}}
        else:
            claim = volume.backend.claim_name
            key, source = ("pvc", claim), {"persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        # Named by position: the user's names could collide with the platform's own volumes.
        pod_volume = pod_volumes.setdefault(key, {"name": f"volume-{len(pod_volumes)}", **source})
        if not volume.read_only and "persistentVolumeClaim" in pod_volume:
            pod_volume["persistentVolumeClaim"].pop("readOnly", None)  # read-only only if every mount is
        mount: JSON = {"name": pod_volume["name"], "mountPath": volume.mount_path}
        if volume.read_only:
            mount["readOnly"] = True
        if sub_path:
            mount["subPath"] = sub_path
        mounts.append(mount)
    return list(pod_volumes.values()), mounts


def _join(relative: str, sub_path: str) -> str:
    return "/".join(part for part in (relative, sub_path) if part and part != ".")


def claim_manifest(sandbox_id: str, backend: PvcBackend, default_storage: str) -> JSON:
    """The PersistentVolumeClaim a create makes for a missing `pvc` volume (createIfNotExists)."""
    spec: JSON = {
        "accessModes": list(backend.access_modes) or ["ReadWriteOnce"],
        "resources": {"requests": {"storage": backend.storage or default_storage}},
    }
    if backend.storage_class:
        spec["storageClassName"] = backend.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": backend.claim_name,
            "labels": {labels.CREATED_BY: labels.CREATED_BY_SERVER},
            "annotations": {labels.CREATED_FOR_SANDBOX: sandbox_id},
        },
        "spec": spec,
    }


def pull_secret_name(sandbox_id: str) -> str:
    return f"{sandbox_id}-pull"


DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"  # the key docker login writes for Docker Hub


def registry_of(image: str) -> str:
    """The registry an image reference names (Docker's rule: a first component with '.' or ':', or
    `localhost`); Docker Hub otherwise."""
    first, slash, _ = image.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return first
    return DOCKER_HUB_AUTH_KEY


def pull_secret_manifest(sandbox_id: str, image: str, auth: dict[str, str]) -> JSON:
    """The sandbox's own kubernetes.io/dockerconfigjson Secret for `image.auth` (owned by its BatchSandbox)."""
    user, password = auth["username"], auth["password"]
    entry = {"username": user, "password": password, "auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
    config = json.dumps({"auths": {registry_of(image): entry}}, separators=(",", ":"))
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": pull_secret_name(sandbox_id),
            "labels": {labels.CREATED_BY: labels.CREATED_BY_SERVER},
            "annotations": {labels.CREATED_FOR_SANDBOX: sandbox_id},
        },
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": base64.b64encode(config.encode()).decode()},
    }


def owner_reference(batchsandbox: JSON) -> JSON:
    """Makes an object the BatchSandbox's: the garbage collector deletes it with the BatchSandbox."""
    meta = batchsandbox["metadata"]
    return {"apiVersion": labels.API_VERSION, "kind": "BatchSandbox", "name": meta["name"], "uid": meta["uid"]}


def _quantities(cpu_millis: int | None, memory_bytes: int | None) -> dict[str, str]:
    """Kubernetes quantities (`500m`, bytes) of what is set."""
    quantities = {}
    if cpu_millis is not None:
        quantities["cpu"] = f"{cpu_millis}m"
    if memory_bytes is not None:
        quantities["memory"] = str(memory_bytes)
    return quantities


def pool_egress(pool: JSON) -> bool:
    """Whether a Pool's pods carry the egress sidecar (its `spec.egress`)."""
    return isinstance((pool.get("spec") or {}).get("egress"), dict)


def pool_image(pool: JSON) -> str:
    """The image a Pool's pods run (the short form's, else the first container's)."""
    template_spec = ((pool.get("spec") or {}).get("sandboxTemplate") or {}).get("spec") or {}
    if template_spec.get("image"):
        return str(template_spec["image"])
    containers = template_spec.get("containers") or [{}]
    return str(containers[0].get("image") or "")


# What a mount is, whatever form it was written in: (mountPath, source, readOnly); a source is
# ("pvc", claim, subPath) or ("host", the host directory mounted).
Mount = tuple[str, tuple[str, str, str], bool]


def pool_mounts(pool: JSON) -> frozenset[Mount]:
    """The mounts of a Pool's sandbox container (the one named `sandbox`, else the first): what a
    pooled create's volumes must already be, since a warm pod's mounts cannot change."""
    template_spec = ((pool.get("spec") or {}).get("sandboxTemplate") or {}).get("spec") or {}
    sources = {str(v.get("name")): v for v in template_spec.get("volumes") or [] if isinstance(v, dict)}
    containers = [c for c in template_spec.get("containers") or [] if isinstance(c, dict)]
    named = [c for c in containers if c.get("name") == labels.SANDBOX_CONTAINER]
    sandbox = (named or containers or [{}])[0]
    found = set()
    for mount in sandbox.get("volumeMounts") or []:
        volume = sources.get(str(mount.get("name")))
        source = _source(volume or {}, str(mount.get("subPath") or ""))
        if source is not None:
            found.add((posixpath.normpath(str(mount.get("mountPath"))), source, bool(mount.get("readOnly"))))
    return frozenset(found)


def _source(volume: JSON, sub_path: str) -> tuple[str, str, str] | None:
    if "persistentVolumeClaim" in volume:
        return ("pvc", str(volume["persistentVolumeClaim"].get("claimName")), _relative(sub_path))
    if "hostPath" in volume:
        return ("host", posixpath.normpath(posixpath.join(str(volume["hostPath"].get("path")), sub_path)), "")
    return None


def _relative(sub_path: str) -> str:
    return "" if sub_path in ("", ".") else posixpath.normpath(sub_path)


def volumes_not_in_pool(volumes: list[VolumeSpec], mounts: frozenset[Mount]) -> list[str]:
    """Names of the requested volumes the Pool's pods do not mount exactly so."""
    missing = []
    for volume in volumes:
        if isinstance(volume.backend, HostBackend):
            source = ("host", posixpath.normpath(posixpath.join(volume.backend.path, volume.sub_path)), "")
        else:
            source = ("pvc", volume.backend.claim_name, _relative(volume.sub_path))
        if (posixpath.normpath(volume.mount_path), source, volume.read_only) not in mounts:
            missing.append(volume.name)
    return missing


# --- reading ----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Entry:
    """One sandbox as cached: the API's view plus what endpoints, writes and creates need."""

    namespace: str
    name: str
    uid: str
    resource_version: str
    info: SandboxInfo
    pod_ip: str | None
    pod_name: str | None  # its pod's token is derived from it (api/tokens.py)
    # For a waiting create: None while it may still become Running, else why it never will.
    failure: tuple[str, str] | None
    pending_since: dt.datetime | None = None  # a create that has not answered yet (labels.CREATE_PENDING)
    has_policy: bool = False  # its pod has the egress sidecar: created with a networkPolicy, or from an egress Pool
    pausing: str = ""  # the snapshot a pause is taking (labels.PAUSING)
    paused_into: str = ""  # paused: the snapshot it resumes from (labels.PAUSED)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def running(self) -> bool:
        return self.info.state == State.RUNNING and bool(self.pod_ip)

    def abandoned(self, now: dt.datetime, older_than: float) -> bool:
        """A create that has not answered for longer than any live create waits: its server is gone."""
        return self.pending_since is not None and (now - self.pending_since).total_seconds() > older_than

    def newer_than(self, other: Entry) -> bool:
        """Whether this is a later version of the same object (resourceVersions are etcd revisions)."""
        if self.uid != other.uid:
            return True
        mine, theirs = self.resource_version, other.resource_version
        if mine.isdigit() and theirs.isdigit():
            return int(mine) >= int(theirs)
        return True


def read_entry(raw: JSON) -> Entry:
    meta = raw["metadata"]
    spec = raw.get("spec") or {}
    status = raw.get("status") or {}
    request = _request(meta)
    created = (
        times.parse_optional(request.get("createdAt"))
        or times.parse_optional(meta.get("creationTimestamp"))
        or _epoch()
    )
    sandboxes = status.get("sandboxes") or []
    pod_ip = sandboxes[0].get("podIP") if sandboxes else None
    pod_name = sandboxes[0].get("podName") if sandboxes else None
    annotations = meta.get("annotations") or {}
    paused_into = str(annotations.get(labels.PAUSED) or "") if spec.get("replicas", 1) == 0 else ""
    pausing = str(annotations.get(labels.PAUSING) or "")
    state, reason, message, since, failure = _state(meta, status, bool(pod_ip))
    if paused_into and state != STOPPING:
        state, reason, message, pod_ip = State.PAUSED, "PAUSED", f"its files are in snapshot {paused_into}", None
    elif pausing and state == State.RUNNING:
        state, reason, message = PAUSING, "PAUSING", f"snapshot {pausing} is being taken"
    template_spec = (spec.get("sandboxTemplate") or {}).get("spec") or {}
    info = SandboxInfo(
        id=meta["name"],
        image=str(request.get("image") or _template_image(template_spec)),
        entrypoint=list(request.get("entrypoint") or template_spec.get("command") or []),
        # Labels under the reserved prefixes are the platform's; every other label is metadata.
        metadata={k: v for k, v in (meta.get("labels") or {}).items() if not is_reserved_key(k)},
        extensions=dict(request.get("extensions") or {}),
        created_at=created,
        expires_at=times.parse_optional(spec.get("expireTime")),
        state=state,
        reason=reason,
        message=message,
        last_transition_at=since or created,
        secure_access=request.get("secureAccess") is True,
        snapshot_id=(meta.get("labels") or {}).get(labels.RESTORED_FROM, ""),
    )
    return Entry(
        namespace=meta.get("namespace", ""),
        name=meta["name"],
        uid=meta.get("uid", ""),
        resource_version=meta.get("resourceVersion", ""),
        info=info,
        pod_ip=pod_ip,
        pod_name=pod_name,
        failure=failure,
        pending_since=times.parse_optional(annotations.get(labels.CREATE_PENDING)),
        has_policy=labels.NETWORK_POLICY in annotations or request.get("poolEgress") is True,
        pausing=pausing,
        paused_into=paused_into,
    )


def _request(meta: JSON) -> dict[str, Any]:
    try:
        value = json.loads((meta.get("annotations") or {}).get(labels.SANDBOX_REQUEST) or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _template_image(template_spec: JSON) -> str:
    return str(template_spec.get("image") or ((template_spec.get("containers") or [{}])[0]).get("image") or "")


def _epoch() -> dt.datetime:
    return dt.datetime.fromtimestamp(0, dt.UTC)


# Ready-condition reasons of the controller, and what they mean for the API.
_PENDING_REASONS = {
    conditions.WAITING_FOR_POOL: "POOL_EXHAUSTED",
    conditions.SANDBOXES_NOT_READY: "POD_STARTING",
    conditions.FAILED_CREATE: "POD_CREATE_FAILED",
    conditions.POOL_NOT_FOUND: "POOL_NOT_FOUND",
    conditions.POOL_WITHOUT_EGRESS: "POOL_WITHOUT_EGRESS",
    conditions.EGRESS_POLICY_FAILED: "EGRESS_POLICY_FAILED",
}
# Reasons a waiting create gives up on at once (with the status code it answers).
_HOPELESS = {
    conditions.FAILED_CREATE,
    conditions.POOL_NOT_FOUND,
    conditions.POOL_WITHOUT_EGRESS,
    conditions.EGRESS_POLICY_FAILED,
}


def _state(meta: JSON, status: JSON, has_ip: bool) -> tuple[str, str, str, dt.datetime | None, tuple[str, str] | None]:
    """(state, reason, message, last transition, failure) from the BatchSandbox's status."""
    found = {c.get("type"): c for c in status.get("conditions") or []}
    ready: JSON = found.get(conditions.READY) or {}
    pod_failed: JSON = found.get(conditions.POD_FAILED) or {}
    since = times.parse_optional(ready.get("lastTransitionTime"))
    message = str(ready.get("message") or "")
    if meta.get("deletionTimestamp"):
        return (
            STOPPING,
            "DELETING",
            "the sandbox is being deleted",
            times.parse_optional(meta["deletionTimestamp"]),
            (
                "DELETING",
                "the sandbox was deleted while it started",
            ),
        )
    phase = status.get("phase") or "Pending"
    if phase == "Succeeded":
        return State.TERMINATED, "SANDBOX_EXITED", "the entrypoint exited", since, ("EXITED", "the entrypoint exited")
    if phase == "Failed" and pod_failed.get("status") == "True":
        why = f"the sandbox's pod cannot run: {pod_failed.get('message', '')}"
        return State.FAILED, "POD_FAILED", why, since, (conditions.POD_FAILED, why)
    if phase == "Failed":
        why = "the entrypoint exited with an error"
        return State.FAILED, "SANDBOX_EXITED_ERROR", why, since, ("EXITED", why)
    if phase == "Running" and has_ip:
        return State.RUNNING, "SANDBOX_READY", message, since, None
    reason = str(ready.get("reason") or "")
    failure = (reason, message) if reason in _HOPELESS else None
    return State.PENDING, _PENDING_REASONS.get(reason, "CREATING"), message, since, failure
