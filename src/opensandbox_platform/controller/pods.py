"""Pods: the slim cached view the controller keeps, and building pods from a SandboxTemplate."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from typing import Any

from opensandbox_platform.api import conditions, labels, tokens
from opensandbox_platform.api.crds import PoolSpec, SandboxSpec, SandboxTemplate
from opensandbox_platform.controller.settings import Settings
from opensandbox_platform.kube.client import JSON, PODS, KubeClient, KubeError


class PodCreateError(Exception):
    """The API server refused pods built from a template (e.g. an invalid one); retried with backoff."""


SHORT_FORM = SandboxSpec.SHORT_FORM
# How execd gets into a pod (inject_execd): the controller's --execd-install.
EXECD_POST_START = "post-start"
EXECD_INIT_CONTAINER = "init-container"
EXECD_INSTALLER = labels.EXECD_INSTALLER
FAILURE_DETAIL_CHARS = 400
DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"
# Pod-level status reasons that mean the pod is gone for good (evicted, preempted, node lost).
LOST_REASONS = frozenset({"Evicted", "Preempting", "NodeLost", "Shutdown", "Terminated", "UnexpectedAdmissionError"})


@dataclass(slots=True)
class PodInfo:
    """The fields of a pod the controller uses (a full pod is ~10 KB; this is a few hundred bytes)."""

    namespace: str
    name: str
    uid: str
    resource_version: str
    created: str  # RFC 3339, sorts chronologically
    pool: str | None
    revision: str | None
    batchsandbox: str | None
    index: int | None
    owner_uid: str | None
    phase: str
    reason: str | None
    ready: bool
    ip: str | None
    node: str | None
    deleting: bool
    main_exit_code: int | None  # set when the sandbox container has terminated
    entrypoint_applied: bool
    policy_applied: bool = False  # pooled: the claim's network policy replaced the Pool's
    evicting: bool = False  # an idle pod a person marked for deletion (labels.EVICT)
    failure: str | None = None  # a container's waiting reason that means it cannot run (CrashLoopBackOff, ...)
    failure_detail: str = ""  # the kubelet's words with it (a registry's 401), cut to a condition's size
    restart_policy: str = "Always"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def lost(self) -> bool:
        """Gone for good: evicted, preempted, or failed at the pod level."""
        return self.phase == "Failed" and (self.reason in LOST_REASONS or self.main_exit_code is None)

    @property
    def finished(self) -> bool:
        """The sandbox's main container ran to completion (restartPolicy Never/OnFailure): the pod
        ended, or the sandbox container ended for good while execd's installer still idles beside it
        (the pod stays Running then)."""
        if self.phase in ("Succeeded", "Failed"):
            return not self.lost
        code = self.main_exit_code
        return code is not None and (
            self.restart_policy == "Never" or (self.restart_policy == "OnFailure" and code == 0)
        )

    @property
    def claimed(self) -> bool:
        return self.batchsandbox is not None


def slim_pod(raw: JSON) -> PodInfo:
    meta, spec, status = raw["metadata"], raw.get("spec", {}), raw.get("status", {})
    pod_labels = meta.get("labels") or {}
    owner = next((o for o in meta.get("ownerReferences") or [] if o.get("controller")), None)
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    exit_code = None
    failure = None
    failure_detail = ""
    for cs in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        state = cs.get("state") or {}
        if cs.get("name") == labels.SANDBOX_CONTAINER and state.get("terminated") is not None:
            exit_code = int(state["terminated"].get("exitCode", 0))
        waiting = (state.get("waiting") or {}).get("reason")
        if waiting in conditions.FAILED_POD_REASONS and failure is None:
            failure = f"{waiting} ({cs.get('name')})"
            failure_detail = str(state["waiting"].get("message") or "")[:FAILURE_DETAIL_CHARS]
    index = pod_labels.get(labels.INDEX)
    return PodInfo(
        namespace=meta["namespace"],
        name=meta["name"],
        uid=meta["uid"],
        resource_version=meta["resourceVersion"],
        created=meta.get("creationTimestamp", ""),
        pool=pod_labels.get(labels.POOL),
        revision=pod_labels.get(labels.POOL_REVISION),
        batchsandbox=pod_labels.get(labels.BATCHSANDBOX),
        index=int(index) if index is not None and index.isdigit() else None,
        owner_uid=owner.get("uid") if owner else None,
        phase=status.get("phase", "Pending"),
        reason=status.get("reason"),
        ready=ready and status.get("phase") == "Running" and not meta.get("deletionTimestamp"),
        ip=status.get("podIP"),
        node=spec.get("nodeName"),
        deleting=meta.get("deletionTimestamp") is not None,
        main_exit_code=exit_code,
        entrypoint_applied=labels.ENTRYPOINT_APPLIED in (meta.get("annotations") or {}),
        policy_applied=labels.NETWORK_POLICY_APPLIED in (meta.get("annotations") or {}),
        evicting=labels.EVICT in pod_labels,
        failure=failure,
        failure_detail=failure_detail,
        restart_policy=sys.intern(spec.get("restartPolicy") or "Always"),
    )


def template_revision(template: SandboxTemplate) -> str:
    """A short, stable hash of a pool's template: pods carry it so a changed template can roll them."""
    canonical = json.dumps(template.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def pool_revision(spec: PoolSpec) -> str:
    """The revision of a pool's pods: its template, plus the task-executor and egress sidecars when
    enabled (so enabling one rolls the pods; the allocator hands out current pods only)."""
    executor = spec.taskExecutor if spec.taskExecutor is not None and spec.taskExecutor.enabled else None
    if executor is None and spec.egress is None:
        return template_revision(spec.sandboxTemplate)  # unchanged for pools without a sidecar
    parts = {"template": spec.sandboxTemplate, "taskExecutor": executor, "egress": spec.egress}
    canonical = json.dumps(
        {k: v.model_dump(mode="json", by_alias=True, exclude_none=True) for k, v in parts.items() if v is not None},
        sort_keys=True,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class TaskExecutorSidecar:
    """What the injected task-executor container needs: its image, resources and pull policy."""

    image: str
    resources: JSON
    pull_policy: str = "IfNotPresent"


@dataclass(frozen=True, slots=True)
class EgressSidecar:
    """The network-policy sidecar of a pod (a BatchSandbox with labels.NETWORK_POLICY)."""

    image: str
    policy: JSON  # {defaultAction, egress}, as the server validated it
    upstream_dns: tuple[str, ...] = ()
    pull_policy: str = "IfNotPresent"


def egress_request(annotations: dict[str, str] | None) -> tuple[JSON, tuple[str, ...]] | None:
    """(policy, upstream resolvers) of a BatchSandbox's labels.NETWORK_POLICY annotation; None
    without one; ValueError when it is not what the server writes."""
    raw = (annotations or {}).get(labels.NETWORK_POLICY)
    if raw is None:
        return None
    value = json.loads(raw)
    if not isinstance(value, dict) or not isinstance(value.get("policy"), dict):
        raise ValueError(f"{labels.NETWORK_POLICY} must be a JSON object with a policy")
    return value["policy"], tuple(str(u) for u in value.get("upstreamDns") or [])


def egress_sidecar(settings: Settings, policy: JSON, upstream_dns: tuple[str, ...]) -> EgressSidecar:
    """The sidecar enforcing `policy`; ValueError when the controller was started without what it needs."""
    if not settings.egress_image or not settings.token_key:
        raise ValueError("a network policy needs the controller's --egress-image and --sandbox-token-key-file")
    return EgressSidecar(settings.egress_image, policy, upstream_dns, settings.egress_pull_policy)


def pool_egress(spec: PoolSpec, settings: Settings) -> EgressSidecar | None:
    """A Pool's sidecar (`spec.egress`): its pods hold `defaultAction` without rules until claimed."""
    if spec.egress is None:
        return None
    policy: JSON = {"defaultAction": spec.egress.defaultAction, "egress": []}
    return egress_sidecar(settings, policy, tuple(spec.egress.upstreamDns or ()))


def owner_reference(obj: JSON) -> JSON:
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def pod_spec(
    template: SandboxTemplate,
    execd_image: str | None,
    task_executor: TaskExecutorSidecar | None = None,
    token: str | None = None,
    execd_install: str = EXECD_POST_START,
    egress: EgressSidecar | None = None,
    egress_token: str | None = None,
) -> JSON:
    """The PodSpec for a template: the short form becomes container `sandbox`, the rest passes through.

    `token` (api/tokens.py): what execd and the task executor of this pod require of every caller;
    `egress_token`: what its egress sidecar requires (the sandbox never holds it)."""
    spec: dict[str, Any] = template.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    short = {k: spec.pop(k) for k in SHORT_FORM if k in spec}
    if "containers" not in spec:
        spec["containers"] = [{"name": labels.SANDBOX_CONTAINER, **short}]
    harden(spec)
    if execd_image:
        inject_execd(spec, execd_image, token, execd_install)
    if task_executor:
        inject_task_executor(spec, task_executor, token)
    if egress:
        inject_egress(spec, egress, egress_token)
    return spec


def _give_token(container: JSON, env: str, header: str, token: str | None) -> list[JSON]:
    """Puts the pod's token in the container's environment; returns the probe headers that carry it."""
    if token is None:
        return []
    container.setdefault("env", []).append({"name": env, "value": token})
    return [{"name": header, "value": token}]


def harden(spec: JSON) -> None:
    """Defaults for untrusted code, where the template does not say otherwise: no ServiceAccount token,
    the runtime's default seccomp profile, no privilege escalation (setuid binaries gain nothing), and
    only the capabilities a sandbox needs (labels.SANDBOX_CAPABILITIES). What a template sets wins,
    e.g. `runtimeClassName: gvisor` passes through."""
    spec.setdefault("automountServiceAccountToken", False)
    spec.setdefault("securityContext", {}).setdefault("seccompProfile", {"type": "RuntimeDefault"})
    for container in spec["containers"]:
        context = container.setdefault("securityContext", {})
        context.setdefault("allowPrivilegeEscalation", False)
        if "privileged" not in context:
            context.setdefault("capabilities", {"drop": ["ALL"], "add": list(labels.SANDBOX_CAPABILITIES)})


def main_container(spec: JSON) -> JSON:
    """The sandbox's own container: the first one, after execd's installer when that comes first."""
    return next(c for c in spec["containers"] if c.get("name") != EXECD_INSTALLER)


def inject_task_executor(spec: JSON, sidecar: TaskExecutorSidecar, token: str | None = None) -> None:
    """The task-executor as a sidecar that runs tasks inside the first (main) container.

    It sees the main container's processes through the pod's shared PID namespace, finds them by the
    marker env var, and enters their mount namespace with setns(2), which needs CAP_SYS_ADMIN (and
    root, to read another container's /proc entries). Task state lives in an emptyDir, so it survives
    a restart of the sidecar. Ready once its API answers, so a task is dispatched to a Ready pod."""
    spec["shareProcessNamespace"] = True
    main = main_container(spec)
    main.setdefault("env", []).append({"name": labels.TASK_TARGET_ENV, "value": main["name"]})
    spec.setdefault("volumes", []).append({"name": labels.TASK_DATA_VOLUME, "emptyDir": {}})
    port = labels.TASK_EXECUTOR_PORT
    executor: JSON = {}
    _give_token(executor, labels.TASK_EXECUTOR_TOKEN_ENV, labels.TASK_EXECUTOR_TOKEN_HEADER, token)
    spec["containers"].append(
        {
            **executor,
            "name": labels.TASK_EXECUTOR_CONTAINER,
            "image": sidecar.image,
            "imagePullPolicy": sidecar.pull_policy,
            "args": ["--main-container", main["name"], "--data-dir", labels.TASK_DATA_DIR, "--port", str(port)],
            "ports": [{"name": "task-executor", "containerPort": port}],
            "resources": sidecar.resources,
            "securityContext": {
                "runAsUser": 0,
                "runAsNonRoot": False,
                "capabilities": {"add": ["SYS_ADMIN"]},
            },
            "volumeMounts": [{"name": labels.TASK_DATA_VOLUME, "mountPath": labels.TASK_DATA_DIR}],
            "readinessProbe": {"httpGet": {"path": "/health", "port": port}, "periodSeconds": 1, "failureThreshold": 3},
        }
    )


def inject_egress(spec: JSON, sidecar: EgressSidecar, token: str | None) -> None:
    """The egress sidecar as a native sidecar (an init container with restartPolicy Always), first
    of all: the kubelet starts every other container only once its startup probe passed, and the
    sidecar's /health answers only once the policy is in the kernel, so nothing of the sandbox runs
    unguarded. It is the only container with NET_ADMIN (it loads the ruleset in the pod's network
    namespace); its state (the policy in force, resolved addresses) lives in an emptyDir, so a
    restarted sidecar enforces the same policy. The rules stay in the kernel while it restarts."""
    if token is None:
        raise ValueError("a network policy needs the pods' token key: the sandbox could change its own policy")
    env = {
        "OPENSANDBOX_EGRESS_TOKEN": token,
        "OPENSANDBOX_EGRESS_RULES": json.dumps(sidecar.policy, separators=(",", ":")),
        "EGRESS_STATE_FILE": f"{labels.EGRESS_STATE_DIR}/state.json",
    }
    if sidecar.upstream_dns:
        env["OPENSANDBOX_EGRESS_UPSTREAM"] = ",".join(sidecar.upstream_dns)
    spec.setdefault("volumes", []).append({"name": labels.EGRESS_STATE_VOLUME, "emptyDir": {}})
    port = labels.EGRESS_PORT
    spec.setdefault("initContainers", []).insert(
        0,
        {
            "name": labels.EGRESS_CONTAINER,
            "image": sidecar.image,
            "imagePullPolicy": sidecar.pull_policy,
            "restartPolicy": "Always",
            "env": [{"name": k, "value": v} for k, v in env.items()],
            "ports": [{"name": "egress", "containerPort": port}],
            "securityContext": {
                "runAsUser": 0,
                "runAsNonRoot": False,
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]},
            },
            "startupProbe": {"httpGet": {"path": "/health", "port": port}, "periodSeconds": 1, "failureThreshold": 60},
            "volumeMounts": [{"name": labels.EGRESS_STATE_VOLUME, "mountPath": labels.EGRESS_STATE_DIR}],
            "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
        },
    )


def _installer_security() -> JSON:
    """The installer only copies files (cp -a keeps owners and modes): no other capability."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"], "add": ["CHOWN", "DAC_OVERRIDE", "FOWNER"]},
    }


def inject_execd(spec: JSON, execd_image: str, token: str | None = None, install: str = EXECD_POST_START) -> None:
    """execd's directory is copied from its image into a shared emptyDir; the sandbox container starts
    through the bootstrap script, which runs execd beside the entrypoint (and keeps the sandbox up
    without one). The pod is Ready only when execd answers, so a claimed sandbox can always run commands.

    The copy (`install`):
    - EXECD_POST_START (default): by the postStart hook of an `execd-installer` container placed
      before the sandbox container. The kubelet starts a pod's containers one after the other and
      runs each one's postStart hook before it starts the next (the order Istio's
      holdApplicationUntilProxyStarts relies on), so the files are there when the sandbox container
      starts, in the same kubelet sync. The installer then waits, idle, until the pod goes (a
      container that ended would be restarted, or end the pod's Running phase).
    - EXECD_INIT_CONTAINER: by an init container, as upstream does. The kubelet only starts the
      sandbox container once it has seen the init container exit, at its next relist of the
      container runtime (every second): half a second more per cold start, on average.
    """
    mount = {"name": labels.EXECD_VOLUME, "mountPath": labels.EXECD_MOUNT}
    spec.setdefault("volumes", []).append({"name": labels.EXECD_VOLUME, "emptyDir": {}})
    copy = ["/bin/sh", "-c", f"cp -a {labels.EXECD_IMAGE_DIR}/. {labels.EXECD_MOUNT}/"]
    main = main_container(spec)
    if install == EXECD_INIT_CONTAINER:
        spec.setdefault("initContainers", []).insert(
            0,
            {
                "name": EXECD_INSTALLER,
                "image": execd_image,
                "imagePullPolicy": "IfNotPresent",
                "command": copy,
                "volumeMounts": [mount],
                "securityContext": _installer_security(),
            },
        )
    else:
        spec["containers"].insert(
            0,
            {
                "name": EXECD_INSTALLER,
                "image": execd_image,
                "imagePullPolicy": "IfNotPresent",
                # Idle until SIGTERM (then at once: `sleep` as PID 1 would ignore it until the grace ends).
                "command": ["/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 86400 & wait $!; done"],
                "lifecycle": {"postStart": {"exec": {"command": copy}}},
                "volumeMounts": [mount],
                "securityContext": _installer_security(),
                # Explicit, so that a namespace's LimitRange default does not add its own per container.
                "resources": {"requests": {"cpu": "1m", "memory": "4Mi"}},
            },
        )
    entrypoint = [*(main.pop("command", None) or []), *(main.pop("args", None) or [])]
    main["command"] = [labels.EXECD_BOOTSTRAP]
    if entrypoint:
        main["args"] = entrypoint
    main.setdefault("volumeMounts", []).append(mount)
    headers = _give_token(main, "EXECD_ACCESS_TOKEN", labels.EXECD_TOKEN_HEADER, token)
    probe: JSON = {"path": "/ping", "port": labels.EXECD_PORT, **({"httpHeaders": headers} if headers else {})}
    main.setdefault("readinessProbe", {"httpGet": probe, "periodSeconds": 1, "failureThreshold": 3})


def build_pod(
    *,
    name: str,
    namespace: str,
    template: SandboxTemplate,
    pod_labels: dict[str, str],
    owner: JSON,
    execd_image: str | None,
    annotations: dict[str, str] | None = None,
    task_executor: TaskExecutorSidecar | None = None,
    token_key: bytes | None = None,
    execd_install: str = EXECD_POST_START,
    egress: EgressSidecar | None = None,
) -> JSON:
    """A pod of a Pool or a BatchSandbox; with `token_key`, its execd and task executor require the
    pod's token (api/tokens.py), its egress sidecar (with `egress`) a token of its own."""
    meta = template.metadata
    token = tokens.pod_token(token_key, name) if token_key else None
    egress_token = tokens.egress_token(token_key, name) if token_key else None
    spec = pod_spec(template, execd_image, task_executor, token, execd_install, egress, egress_token)
    extra = dict(annotations or {})
    if spec["containers"][0].get("name") == EXECD_INSTALLER:  # kubectl logs/exec: the sandbox, not the installer
        extra[DEFAULT_CONTAINER] = main_container(spec)["name"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                **((meta.labels if meta else None) or {}),
                **pod_labels,
                labels.MANAGED_BY: labels.MANAGED_BY_VALUE,
            },
            "annotations": {**((meta.annotations if meta else None) or {}), **extra},
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": spec,
    }


async def delete_pod(client: KubeClient, pod: PodInfo, at_once: bool = False) -> None:
    """Delete this pod (by uid: never a namesake); gone or replaced already is fine. `at_once`: no grace
    period (a paused sandbox's pod: its snapshot holds all that is kept, and its resume reuses the name)."""
    try:
        await client.delete(
            PODS, pod.name, pod.namespace, precondition_uid=pod.uid, grace_period_seconds=0 if at_once else None
        )
    except KubeError as err:
        if not (err.not_found or err.conflict):
            raise
