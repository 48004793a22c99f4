"""What the reconcilers share: the caches, the queues, the pods being created, the pods being claimed."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from opensandbox_platform.controller.events import EventRecorder
from opensandbox_platform.controller.pods import PodInfo
from opensandbox_platform.kube.client import JSON, KubeClient
from opensandbox_platform.kube.informer import Informer
from opensandbox_platform.kube.workqueue import WorkQueue

# A Pool refills this long after a claim, so that background pod creation does not slow the claim's status.
REFILL_DELAY = 0.1  # seconds


class PodCreateError(Exception):
    """The API server refused pods built from a template (e.g. an invalid one); retried with backoff."""


# Index names
BY_POOL = "pool"  # pods by "<namespace>/<pool>"
BY_BATCHSANDBOX = "batchsandbox"  # pods by "<namespace>/<batchsandbox>"
BY_POOL_REF = "poolRef"  # BatchSandboxes by "<namespace>/<poolRef>"


@dataclass(slots=True)
class CachedObject:
    """A Pool or BatchSandbox as cached: the object itself (they are small), minus managedFields."""

    raw: JSON

    @property
    def key(self) -> str:
        meta = self.raw["metadata"]
        return f"{meta['namespace']}/{meta['name']}"

    @property
    def deleting(self) -> bool:
        return self.raw["metadata"].get("deletionTimestamp") is not None


def slim_object(raw: JSON) -> CachedObject:
    raw["metadata"].pop("managedFields", None)
    return CachedObject(raw)


@dataclass
class Expectations:
    """Pods we created or deleted whose watch events have not arrived yet, per Pool.

    Without this a Pool reconciled twice in quick succession would create its pods twice. An entry
    expires after `timeout` so a lost event cannot block a Pool for ever.
    """

    timeout: float = 30.0
    _pending: dict[str, dict[str, float]] = field(default_factory=dict)

    def expect(self, owner: str, pod_key: str) -> None:
        self._pending.setdefault(owner, {})[pod_key] = time.monotonic() + self.timeout

    def observe(self, owner: str, pod_key: str) -> None:
        pending = self._pending.get(owner)
        if pending is not None:
            pending.pop(pod_key, None)

    def satisfied(self, owner: str) -> bool:
        pending = self._pending.get(owner)
        if not pending:
            return True
        now = time.monotonic()
        for pod_key in [k for k, deadline in pending.items() if deadline < now]:
            del pending[pod_key]
        return not pending

    def forget(self, owner: str) -> None:
        self._pending.pop(owner, None)


@dataclass
class Settings:
    execd_image: str | None = None
    task_executor_image: str | None = None
    # The task-executor sidecar's resources when a Pool does not set them (the chart's taskExecutor.resources).
    task_executor_cpu_request: str = "100m"
    task_executor_memory_request: str = "128Mi"
    task_executor_cpu_limit: str = "500m"
    task_executor_memory_limit: str = "256Mi"
    task_executor_pull_policy: str = "IfNotPresent"  # the chart's taskExecutor.image.pullPolicy
    pod_ready_deadline: float = 300.0
    claim_concurrency: int = 16  # claim writes in flight per BatchSandbox (more only queue in the API server)

    def task_executor_resources(self) -> JSON:
        return {
            "requests": {"cpu": self.task_executor_cpu_request, "memory": self.task_executor_memory_request},
            "limits": {"cpu": self.task_executor_cpu_limit, "memory": self.task_executor_memory_limit},
        }


@dataclass
class Shared:
    client: KubeClient
    pools: Informer[CachedObject]
    batchsandboxes: Informer[CachedObject]
    pods: Informer[PodInfo]
    pool_queue: WorkQueue
    batchsandbox_queue: WorkQueue
    events: EventRecorder
    settings: Settings
    creating: Expectations = field(default_factory=Expectations)
    deleting: Expectations = field(default_factory=Expectations)
    reserved: set[str] = field(default_factory=set)  # pod keys a claim is being written for
    lost_notes: dict[str, list[str]] = field(default_factory=dict)  # BatchSandbox key -> pods lost since
    waiting: dict[str, set[str]] = field(default_factory=dict)  # Pool key -> BatchSandboxes short of pods
