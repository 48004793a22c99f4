"""The controller's cache: informers of Pools, BatchSandboxes and the pods we manage, with their indexes.

Every replica runs them (a standby has a warm cache); reconcilers read only from here and declare
in their `setup` which changes wake them. Pools and BatchSandboxes are small and cached whole; pods
as `PodInfo`, a few hundred bytes each.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TypeVar

from opensandbox_platform.api import labels
from opensandbox_platform.api.crds import BatchSandboxSpec
from opensandbox_platform.api.resources import BATCHSANDBOXES, POOLS
from opensandbox_platform.controller.allocation import Holding, departing, holding, ledger_uids
from opensandbox_platform.controller.pods import PodInfo, slim_pod
from opensandbox_platform.kube.client import JSON, PODS, KubeClient
from opensandbox_platform.kube.informer import Informer

T = TypeVar("T")

# Index names
BY_POOL = "pool"  # pods by "<namespace>/<pool>"
BY_BATCHSANDBOX = "batchsandbox"  # pods by "<namespace>/<batchsandbox>" (their claim label)
BY_POOL_REF = "poolRef"  # BatchSandboxes by "<namespace>/<poolRef>"
BY_ALLOCATED_POD = "allocatedPod"  # BatchSandboxes by the uid of each pod their allocation ledger names


@dataclass(slots=True)
class CachedObject:
    """A Pool or BatchSandbox as cached: the object itself (they are small), minus managedFields."""

    raw: JSON

    @property
    def key(self) -> str:
        meta = self.raw["metadata"]
        return f"{meta['namespace']}/{meta['name']}"

    @property
    def namespace(self) -> str:
        return str(self.raw["metadata"]["namespace"])

    @property
    def name(self) -> str:
        return str(self.raw["metadata"]["name"])

    @property
    def uid(self) -> str:
        return str(self.raw["metadata"].get("uid", ""))

    @property
    def deleting(self) -> bool:
        return self.raw["metadata"].get("deletionTimestamp") is not None


def slim_object(raw: JSON) -> CachedObject:
    raw["metadata"].pop("managedFields", None)
    return CachedObject(raw)


def namespaced(namespace: str, name: str | None) -> str | None:
    return f"{namespace}/{name}" if name else None


def changed(old: T | None, new: T | None) -> T:
    """The object an informer event is about (its new version, or the deleted one)."""
    obj = new if new is not None else old
    assert obj is not None
    return obj


def pool_key_of(obj: PodInfo | CachedObject) -> str | None:
    """The key of the Pool a pod belongs to, or that a BatchSandbox claims from."""
    if isinstance(obj, PodInfo):
        return namespaced(obj.namespace, obj.pool)
    return namespaced(obj.namespace, obj.raw["spec"].get("poolRef"))


class Cache:
    def __init__(self, client: KubeClient, namespace: str | None) -> None:
        self.pools: Informer[CachedObject] = Informer(client, POOLS, slim_object, namespace=namespace)
        self.batchsandboxes: Informer[CachedObject] = Informer(client, BATCHSANDBOXES, slim_object, namespace=namespace)
        self.pods: Informer[PodInfo] = Informer(
            client,
            PODS,
            slim_pod,
            namespace=namespace,
            label_selector=f"{labels.MANAGED_BY}={labels.MANAGED_BY_VALUE}",
        )
        self.pods.add_index(BY_POOL, lambda p: [f"{p.namespace}/{p.pool}"] if p.pool else [])
        self.pods.add_index(BY_BATCHSANDBOX, lambda p: [f"{p.namespace}/{p.batchsandbox}"] if p.batchsandbox else [])
        self.batchsandboxes.add_index(
            BY_POOL_REF, lambda b: [f"{b.namespace}/{b.raw['spec']['poolRef']}"] if b.raw["spec"].get("poolRef") else []
        )
        self.batchsandboxes.add_index(BY_ALLOCATED_POD, lambda b: ledger_uids(b.raw))

    @property
    def informers(self) -> tuple[Informer[CachedObject], Informer[CachedObject], Informer[PodInfo]]:
        return self.pools, self.batchsandboxes, self.pods

    @property
    def synced(self) -> bool:
        return all(i.synced.is_set() for i in self.informers)

    async def wait_synced(self) -> None:
        await asyncio.gather(*(i.synced.wait() for i in self.informers))

    def holding(self, bs: CachedObject, spec: BatchSandboxSpec) -> Holding:
        """A pooled BatchSandbox's ledger resolved against the cached pods (allocation.holding)."""

        def pod_named(name: str) -> PodInfo | None:
            return self.pods.get(f"{bs.namespace}/{name}")

        return holding(spec, bs.raw, pod_named, self.pods.by_index(BY_BATCHSANDBOX, bs.key))

    def departing(self, bs: CachedObject) -> list[PodInfo]:
        """The pool pods a BatchSandbox that left its Pool still holds (allocation.departing)."""

        def pod_named(name: str) -> PodInfo | None:
            return self.pods.get(f"{bs.namespace}/{name}")

        return departing(bs.raw, pod_named, self.pods.by_index(BY_BATCHSANDBOX, bs.key))

    def allocated_to(self, pod: PodInfo) -> CachedObject | None:
        """The BatchSandbox whose ledger names this pod, if any."""
        holders = self.batchsandboxes.by_index(BY_ALLOCATED_POD, pod.uid)
        return holders[0] if holders else None
