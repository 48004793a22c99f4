"""Wires the controller together: informers → event handlers → work queues → reconcilers.

Informers run on every replica (a standby has a warm cache); workers run only on the leader.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter, Histogram

from opensandbox_platform.api import labels
from opensandbox_platform.api.resources import BATCHSANDBOXES, POOLS
from opensandbox_platform.controller.batchsandbox import BatchSandboxReconciler
from opensandbox_platform.controller.events import EventRecorder
from opensandbox_platform.controller.pods import PodInfo, slim_pod
from opensandbox_platform.controller.pool import PoolReconciler
from opensandbox_platform.controller.state import (
    BY_BATCHSANDBOX,
    BY_POOL,
    BY_POOL_REF,
    REFILL_DELAY,
    CachedObject,
    Settings,
    Shared,
    slim_object,
)
from opensandbox_platform.kube.client import PODS, KubeClient
from opensandbox_platform.kube.informer import Informer
from opensandbox_platform.kube.leaderelection import LeaderElector
from opensandbox_platform.kube.workqueue import WorkQueue

log = logging.getLogger(__name__)

RECONCILE_TOTAL = Counter(
    "controller_runtime_reconcile_total",
    "Reconciliations per controller and result.",
    ["controller", "result"],
)
RECONCILE_ERRORS = Counter("controller_runtime_reconcile_errors_total", "Failed reconciliations.", ["controller"])
RECONCILE_TIME = Histogram(
    "controller_runtime_reconcile_time_seconds",
    "Time per reconciliation.",
    ["controller"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


@dataclass
class Options:
    namespace: str | None = None
    concurrency: int = 16
    leader_elect: bool = False
    leader_election_id: str = "opensandbox-controller"
    leader_election_namespace: str = "default"
    settings: Settings | None = None


def _ns_key(namespace: str, name: str | None) -> str | None:
    return f"{namespace}/{name}" if name else None


class Manager:
    def __init__(self, client: KubeClient, options: Options) -> None:
        self.client = client
        self.options = options
        self.identity = f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
        ns = options.namespace
        pods = Informer(
            client,
            PODS,
            slim_pod,
            namespace=ns,
            label_selector=f"{labels.MANAGED_BY}={labels.MANAGED_BY_VALUE}",
        )
        self.shared = Shared(
            client=client,
            pools=Informer(client, POOLS, slim_object, namespace=ns),
            batchsandboxes=Informer(client, BATCHSANDBOXES, slim_object, namespace=ns),
            pods=pods,
            pool_queue=WorkQueue("pool"),
            batchsandbox_queue=WorkQueue("batchsandbox"),
            events=EventRecorder(client, socket.gethostname()),
            settings=options.settings or Settings(),
        )
        self.pool_reconciler = PoolReconciler(self.shared)
        self.batchsandbox_reconciler = BatchSandboxReconciler(self.shared)
        self.elector = (
            LeaderElector(client, options.leader_election_namespace, options.leader_election_id, self.identity)
            if options.leader_elect
            else None
        )
        self._setup_indexes_and_handlers()

    @property
    def synced(self) -> bool:
        s = self.shared
        return s.pools.synced.is_set() and s.batchsandboxes.synced.is_set() and s.pods.synced.is_set()

    @property
    def leading(self) -> bool:
        return self.elector is None or self.elector.is_leader

    # --- wiring -----------------------------------------------------------------------------------
    def _setup_indexes_and_handlers(self) -> None:
        s = self.shared
        s.pods.add_index(BY_POOL, lambda p: [f"{p.namespace}/{p.pool}"] if p.pool else [])
        s.pods.add_index(BY_BATCHSANDBOX, lambda p: [f"{p.namespace}/{p.batchsandbox}"] if p.batchsandbox else [])
        s.batchsandboxes.add_index(
            BY_POOL_REF,
            lambda b: (
                [f"{b.raw['metadata']['namespace']}/{b.raw['spec']['poolRef']}"] if b.raw["spec"].get("poolRef") else []
            ),
        )
        s.pods.add_handler(self._on_pod)
        s.batchsandboxes.add_handler(self._on_batchsandbox)
        s.pools.add_handler(self._on_pool)

    def _on_pod(self, old: PodInfo | None, new: PodInfo | None) -> None:
        s = self.shared
        pod = new or old
        assert pod is not None
        pool_key = _ns_key(pod.namespace, pod.pool)
        if pool_key:
            if new is not None and old is None:
                s.creating.observe(pool_key, pod.key)
            if new is None or new.deleting:
                s.deleting.observe(pool_key, pod.key)
            if new is not None and new.claimed:
                # A claim (or a change to a claimed pod): refill after the claim's status is out.
                s.pool_queue.add_after(pool_key, REFILL_DELAY)
            else:
                s.pool_queue.add(pool_key)
            became_idle_ready = (
                new is not None and new.ready and not new.claimed and not (old and old.ready and not old.claimed)
            )
            if became_idle_ready:  # wake BatchSandboxes waiting on this pool
                for waiting in s.waiting.get(pool_key, ()):
                    s.batchsandbox_queue.add(waiting)
        owner_key = _ns_key(pod.namespace, (new.batchsandbox if new else None) or (old.batchsandbox if old else None))
        if owner_key:
            if new is None and old is not None and s.pods.synced.is_set():
                self._note_lost(owner_key, old)
            s.batchsandbox_queue.add(owner_key)

    def _note_lost(self, bs_key: str, pod: PodInfo) -> None:
        bs = self.shared.batchsandboxes.get(bs_key)
        if bs is None or bs.deleting or pod.owner_uid != bs.raw["metadata"]["uid"] or pod.lost:
            return
        if pod.index is not None and pod.index >= int(bs.raw["spec"].get("replicas", 1)):
            return  # scaled down
        self.shared.lost_notes.setdefault(bs_key, []).append(f"sandbox {pod.index}: pod {pod.name} deleted, replaced")
        if self.leading:
            self.shared.events.record(
                bs.raw,
                "Warning",
                "SandboxLost",
                f"Pod {pod.name} (sandbox {pod.index}) was deleted; replacing it",
            )

    def _on_batchsandbox(self, old: CachedObject | None, new: CachedObject | None) -> None:
        obj = new or old
        assert obj is not None
        # The Pool hears about demand from the claim itself (after it, so the refill does not compete
        # with the claim) and about released pods from their events.
        self.shared.batchsandbox_queue.add(obj.key)

    def _on_pool(self, old: CachedObject | None, new: CachedObject | None) -> None:
        obj = new or old
        assert obj is not None
        self.shared.pool_queue.add(obj.key)
        if old is None or new is None:  # a pool appeared or vanished: its BatchSandboxes care
            for bs in self.shared.batchsandboxes.by_index(BY_POOL_REF, obj.key):
                self.shared.batchsandbox_queue.add(bs.key)

    # --- running ----------------------------------------------------------------------------------
    def _on_result(self, controller: str) -> Callable[[str, str, float], None]:
        def record(key: str, result: str, seconds: float) -> None:
            log.debug(
                "reconciled",
                extra={"controller": controller, "key": key, "result": result, "ms": round(seconds * 1000, 2)},
            )
            RECONCILE_TOTAL.labels(controller, result).inc()
            RECONCILE_TIME.labels(controller).observe(seconds)
            if result == "error":
                RECONCILE_ERRORS.labels(controller).inc()

        return record

    async def _work(self) -> None:
        s = self.shared
        await asyncio.gather(s.pools.synced.wait(), s.batchsandboxes.synced.wait(), s.pods.synced.wait())
        log.info(
            "caches synced; reconciling",
            extra={
                "pools": len(s.pools.store),
                "batchsandboxes": len(s.batchsandboxes.store),
                "pods": len(s.pods.store),
            },
        )
        n = self.options.concurrency
        await asyncio.gather(
            s.pool_queue.run_workers(max(1, n // 2), self.pool_reconciler.reconcile, self._on_result("pool")),
            s.batchsandbox_queue.run_workers(
                n, self.batchsandbox_reconciler.reconcile, self._on_result("batchsandbox")
            ),
        )

    async def run(self) -> None:
        s = self.shared
        informers = [asyncio.create_task(i.run()) for i in (s.pools, s.batchsandboxes, s.pods)]
        try:
            if self.elector is None:
                await self._work()
            else:
                try:
                    await self.elector.run(self._work)
                finally:
                    await self.elector.release()
        finally:
            await self.batchsandbox_reconciler.close()  # stops following tasks
            for task in informers:
                task.cancel()
            await asyncio.gather(*informers, return_exceptions=True)


def pod_namespace() -> str:
    """The namespace we run in (for the leader-election Lease), from the service account when in a pod."""
    path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    if os.path.exists(path):
        with open(path) as f:
            return f.read().strip()
    return os.environ.get("POD_NAMESPACE", "default")
