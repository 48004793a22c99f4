"""The Pool and BatchSandbox custom resources, as pydantic models.

These models are the single source of truth: the CRD manifests are generated from them
(`crdgen.py`, `opensandbox-controller print-crds`) and the controller parses objects with them.
Field names are the wire names (camelCase); validation rules that span fields are CEL rules
(`x-kubernetes-validations`) so that the API server rejects bad objects before we see them.
"""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict


def cel(rule: str, message: str, **extra: str) -> JsonDict:
    """A CEL validation rule, checked by the API server."""
    return {"rule": rule, "message": message, **extra}


class Model(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")


class PassThrough(Model):
    """An object whose unknown fields the API server keeps (Kubernetes types we do not re-model)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})


class EnvVar(PassThrough):
    name: str
    value: str | None = None


class ContainerPort(PassThrough):
    containerPort: int = Field(ge=1, le=65535)
    name: str | None = None
    protocol: str | None = None


class SandboxSpec(PassThrough):
    """The sandbox's pod. The short form builds one container named `sandbox`; every other PodSpec
    field (nodeSelector, tolerations, runtimeClassName, volumes, ...) passes through to the pod.
    If `containers` is given it wins over the short form."""

    # The fields of the short form (they build container `sandbox` when `containers` is not given).
    SHORT_FORM: ClassVar[tuple[str, ...]] = ("image", "command", "args", "env", "workingDir", "resources", "ports")

    image: str | None = Field(None, description="Image of the `sandbox` container.")
    command: list[str] | None = Field(None, description="Entrypoint of the `sandbox` container.")
    args: list[str] | None = None
    env: list[EnvVar] | None = None
    workingDir: str | None = None
    resources: PassThrough | None = Field(None, description="corev1.ResourceRequirements")
    ports: list[ContainerPort] | None = None
    containers: list[PassThrough] | None = Field(None, description="Full corev1.Container list.")


class TemplateMetadata(Model):
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class SandboxTemplate(Model):
    metadata: TemplateMetadata | None = None
    spec: SandboxSpec


class TaskExecutorSpec(Model):
    """The task-executor sidecar in every pod of the Pool, so that BatchSandboxes with a taskTemplate can
    claim them. The pods share their process namespace; the sidecar gets CAP_SYS_ADMIN."""

    enabled: bool = False
    image: str | None = Field(None, description="Defaults to the controller's --task-executor-image.")
    resources: PassThrough | None = Field(
        None, description="corev1.ResourceRequirements; defaults to the controller's --task-executor-* flags."
    )


class PoolEgressSpec(Model):
    """The egress sidecar in every pod of the Pool, so that pooled creates can carry a networkPolicy.
    A warm pod holds `defaultAction` (no rules) until it is claimed; a claim with a networkPolicy
    replaces it before the sandbox's entrypoint starts, a claim without one keeps it."""

    defaultAction: Literal["allow", "deny"] = Field(
        "deny", description="The policy of an idle pod, and of a sandbox claimed without a networkPolicy."
    )
    upstreamDns: list[str] | None = Field(
        None,
        max_length=8,
        description="Resolvers (host or host:port) the sidecar forwards allowed lookups to; unset: the pod's "
        "resolv.conf (cluster DNS).",
        json_schema_extra={"items": {"type": "string", "maxLength": 261, "pattern": r"^[0-9A-Za-z.:\[\]-]+$"}},
    )


class TaskTemplate(Model):
    """One task per replica, run inside the sandbox's main container by the task-executor sidecar."""

    command: list[str] = Field(min_length=1)
    args: list[str] | None = None
    env: list[EnvVar] | None = None
    workingDir: str | None = None
    timeoutSeconds: int | None = Field(None, ge=1, description="Kill the task's process group after this long.")


class Condition(Model):
    """metav1.Condition."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    lastTransitionTime: datetime
    observedGeneration: int | None = None


CONDITIONS_LIST: JsonDict = {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}


# --- Pool ------------------------------------------------------------------------------------------
INT_OR_PERCENT: JsonDict = {"x-kubernetes-int-or-string": True}


class RateStrategy(Model):
    """How much of a Pool may be in flux at once: a number of pods or a percentage ("25%")."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.maxUnavailable) || type(self.maxUnavailable) == int"
                    " || string(self.maxUnavailable).matches('^[0-9]+%$')",
                    "maxUnavailable is a number of pods or a percentage such as 25%",
                )
            ]
        }
    )

    maxUnavailable: int | str | None = Field(None, json_schema_extra=INT_OR_PERCENT)


class PoolSpec(Model):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("self.minBufferSize <= self.maxBufferSize", "minBufferSize must not exceed maxBufferSize"),
                cel("self.maxBufferSize <= self.capacity", "maxBufferSize must not exceed capacity"),
                cel(
                    "has(self.sandboxTemplate.spec.image) || has(self.sandboxTemplate.spec.containers)",
                    "sandboxTemplate.spec needs an image (or containers)",
                    fieldPath=".sandboxTemplate.spec",
                ),
            ]
        }
    )

    minBufferSize: int = Field(0, ge=0, description="Idle, Ready pods kept warm.")
    maxBufferSize: int = Field(ge=0, description="Idle pods above this are deleted, oldest first.")
    capacity: int = Field(ge=0, description="Hard cap on all pods of the pool (idle + claimed + starting).")
    sandboxTemplate: SandboxTemplate
    recycleStrategy: Literal["Delete"] = Field("Delete", description="What happens to a pod when its claim ends.")
    taskExecutor: TaskExecutorSpec | None = None
    egress: PoolEgressSpec | None = Field(
        None,
        description="Inject the egress sidecar (network policy) into the pods; needs the controller's "
        "--egress-image and --sandbox-token-key-file.",
    )
    scaleStrategy: RateStrategy | None = Field(
        None,
        description="maxUnavailable: at most this many pool pods start (are not Ready yet) at once; a percentage "
        "is of capacity. Unset: no limit beyond 500 creations per pass.",
    )
    updateStrategy: RateStrategy | None = Field(
        None,
        description="maxUnavailable: while a changed template rolls and capacity leaves no room for new pods, at "
        "most this many of the wanted idle Ready pods may be missing; a percentage is of minBufferSize plus the "
        "demand. Unset: old idle pods make room as fast as needed.",
    )


class PoolStatus(Model):
    observedGeneration: int | None = None
    total: int = 0
    available: int = Field(0, description="Idle, Ready pods.")
    allocated: int = Field(0, description="Pods claimed by a BatchSandbox.")
    starting: int = Field(0, description="Idle pods not Ready yet.")
    revision: str = ""
    conditions: list[Condition] | None = Field(None, json_schema_extra=CONDITIONS_LIST)


class Pool(Model):
    KIND: ClassVar[str] = "Pool"
    PLURAL: ClassVar[str] = "pools"
    SHORT_NAMES: ClassVar[list[str]] = ["sbxpool"]
    PRINTER_COLUMNS: ClassVar[list[dict[str, str | int]]] = [
        {"name": "MIN", "type": "integer", "jsonPath": ".spec.minBufferSize"},
        {"name": "MAX", "type": "integer", "jsonPath": ".spec.maxBufferSize"},
        {"name": "CAPACITY", "type": "integer", "jsonPath": ".spec.capacity"},
        {"name": "TOTAL", "type": "integer", "jsonPath": ".status.total"},
        {"name": "AVAILABLE", "type": "integer", "jsonPath": ".status.available"},
        {"name": "ALLOCATED", "type": "integer", "jsonPath": ".status.allocated"},
        {"name": "AGE", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    DESCRIPTION: ClassVar[str] = "A pool of warm, idle sandbox pods that BatchSandboxes claim."

    spec: PoolSpec
    status: PoolStatus | None = None


# --- BatchSandbox -----------------------------------------------------------------------------------
class BatchSandboxSpec(Model):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "has(self.poolRef) || has(self.sandboxTemplate)",
                    "sandboxTemplate is required unless poolRef is set",
                ),
                cel(
                    "has(self.poolRef) || !has(self.sandboxTemplate) || has(self.sandboxTemplate.spec.image)"
                    " || has(self.sandboxTemplate.spec.containers)",
                    "sandboxTemplate.spec needs an image (or containers) unless poolRef is set",
                ),
                # Leaving a Pool (the server's pause of a pooled sandbox) is the one change allowed: with
                # replicas 0, so that the controller deletes the pods it claimed before it builds any
                # from sandboxTemplate (docs/controller.md). A direct BatchSandbox never joins a Pool.
                cel(
                    "has(oldSelf.poolRef) == has(self.poolRef) || (has(oldSelf.poolRef) && self.replicas == 0)",
                    "poolRef is immutable: it can only be removed, together with replicas 0 (the BatchSandbox"
                    " leaves its Pool)",
                    reason="FieldValueForbidden",
                ),
            ]
        }
    )

    replicas: int = Field(1, ge=0, description="Number of sandboxes.")
    poolRef: str | None = Field(
        None,
        min_length=1,
        description="Claim pods from this Pool (same namespace). Immutable, except that it can be removed "
        "with replicas 0: the BatchSandbox leaves the Pool (its claimed pods are deleted, never handed back) and "
        "builds pods from sandboxTemplate from then on. In pooled mode only the entrypoint (command/args) and env "
        "of sandboxTemplate apply.",
        json_schema_extra={"x-kubernetes-validations": [cel("self == oldSelf", "poolRef is immutable")]},
    )
    sandboxTemplate: SandboxTemplate | None = None
    ttlSecondsAfterFinished: int | None = Field(
        None, ge=0, description="Delete this many seconds after every task completed or every sandbox exited."
    )
    expireTime: datetime | None = Field(None, description="Delete at this time.")
    taskTemplate: TaskTemplate | None = None
    taskResourcePolicyWhenCompleted: Literal["Retain", "Release"] = Field(
        "Retain",
        description="Retain: a sandbox's pod stays until the BatchSandbox is deleted. Release: it is deleted as "
        "soon as its task completed (the Pool makes a fresh one); its task result stays in status.",
    )


TaskState = Literal["pending", "running", "succeeded", "failed"]


class SandboxTaskStatus(Model):
    """The task of one sandbox, as its executor reported it."""

    state: TaskState = "pending"
    exitCode: int | None = Field(None, description="128+N when killed by signal N.")
    reason: str | None = Field(None, description="Completed, Error, Timeout, Cancelled, StartFailed, Interrupted.")
    message: str | None = None
    startedAt: datetime | None = None
    finishedAt: datetime | None = None


class SandboxStatus(Model):
    index: int
    podName: str
    podUID: str | None = Field(
        None, description="Pooled: the allocated pod. These entries are the allocation ledger (docs/controller.md)."
    )
    podIP: str | None = None
    nodeName: str | None = None
    ready: bool = False
    released: bool | None = Field(None, description="The pod was handed back (its task completed, or on request).")
    task: SandboxTaskStatus | None = None


class TaskCounts(Model):
    pending: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0


class BatchSandboxStatus(Model):
    observedGeneration: int | None = None
    phase: Literal["Pending", "Running", "Paused", "Succeeded", "Failed"] = Field(
        "Pending",
        description="Failed: a task failed, "
        "a sandbox's main process exited with an error, or a pod cannot run (condition PodFailed). "
        "Paused: replicas is 0 and no pod is left (the server's pause: the files are in a snapshot image).",
    )
    replicas: int = Field(0, description="Pods that exist for this BatchSandbox.")
    ready: int = 0
    allocated: int = Field(0, description="Pods bound to this BatchSandbox (claimed or scheduled).")
    tasks: TaskCounts | None = None
    sandboxes: list[SandboxStatus] | None = None
    finishedAt: datetime | None = None
    conditions: list[Condition] | None = Field(None, json_schema_extra=CONDITIONS_LIST)


class BatchSandbox(Model):
    KIND: ClassVar[str] = "BatchSandbox"
    PLURAL: ClassVar[str] = "batchsandboxes"
    SHORT_NAMES: ClassVar[list[str]] = ["bsbx"]
    PRINTER_COLUMNS: ClassVar[list[dict[str, str | int]]] = [
        {"name": "DESIRED", "type": "integer", "jsonPath": ".spec.replicas"},
        {"name": "READY", "type": "integer", "jsonPath": ".status.ready"},
        {"name": "POOL", "type": "string", "jsonPath": ".spec.poolRef"},
        {"name": "PHASE", "type": "string", "jsonPath": ".status.phase"},
        {"name": "EXPIRE", "type": "string", "jsonPath": ".spec.expireTime"},
        {"name": "AGE", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        {"name": "TASKS-SUCCEEDED", "type": "integer", "jsonPath": ".status.tasks.succeeded", "priority": 1},
        {"name": "TASKS-FAILED", "type": "integer", "jsonPath": ".status.tasks.failed", "priority": 1},
    ]
    DESCRIPTION: ClassVar[str] = "N sandboxes built from a template or claimed from a Pool."

    spec: BatchSandboxSpec
    status: BatchSandboxStatus | None = None


RESOURCES: tuple[type[Pool] | type[BatchSandbox], ...] = (Pool, BatchSandbox)
