"""The allocator: hands a Pool's idle Ready pods to the BatchSandboxes that reference the Pool.

One allocator per Pool (the Pool is the work-queue key, so a pool's allocations are serial). A
pass reads the pool's pods and BatchSandboxes from the cache, resolves each BatchSandbox's ledger
(allocation.py), assigns free pods to the sandboxes still wanted, oldest BatchSandbox first, and
writes each changed BatchSandbox's status once: the ledger together with readiness, so a sandbox
is allocated and Ready in one write. The same write drops lost pods (deleted, evicted, failed)
and sandboxes above `replicas` from the ledger; their pods are deleted after it.

Why no pod is handed out twice is argued in docs/controller.md; in short: one writer per pool, the
cache holds our own writes at once and never goes back (kube/informer.py), a write whose outcome
is unknown stops the pool until a fresh read tells, and a new leader reads everything again first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp
from prometheus_client import Histogram

from opensandbox_platform.api import conditions, labels
from opensandbox_platform.api.crds import BatchSandboxSpec, BatchSandboxStatus, PoolSpec
from opensandbox_platform.api.resources import BATCHSANDBOXES
from opensandbox_platform.controller import status as statuses
from opensandbox_platform.controller.allocation import Holding, assign, is_free, released_indices, written_tasks
from opensandbox_platform.controller.batchsandbox import report_transition
from opensandbox_platform.controller.cache import (
    BY_POOL,
    BY_POOL_REF,
    CachedObject,
    changed,
    pool_key_of,
)
from opensandbox_platform.controller.inflight import InFlight
from opensandbox_platform.controller.manager import Manager
from opensandbox_platform.controller.pods import PodInfo, delete_pod, pool_revision
from opensandbox_platform.daemon import times
from opensandbox_platform.kube.client import KubeError
from opensandbox_platform.kube.controller import Controller

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
CLAIM_LATENCY = Histogram(
    "opensandbox_claim_duration_seconds",
    "Pooled sandboxes: BatchSandbox created → its pod allocated.",
    buckets=LATENCY_BUCKETS,
)


class UnknownOutcome(Exception):
    """A ledger write that may or may not have happened (timeout, broken connection, 5xx)."""


@dataclass
class Change:
    """One BatchSandbox's ledger change in a pass."""

    bs: CachedObject
    spec: BatchSandboxSpec
    held: Holding
    new: dict[int, PodInfo]  # pods allocated now, by index
    surplus: dict[int, PodInfo]  # allocated pods above replicas (or released), to drop
    released: frozenset[int]
    old: BatchSandboxStatus | None = None  # the status before and after, once computed
    status: BatchSandboxStatus | None = None

    @property
    def pods(self) -> dict[int, PodInfo]:
        kept = {i: p for i, p in self.held.pods.items() if i not in self.surplus}
        return {**kept, **self.new}


def _asks(bs: CachedObject) -> tuple[object, ...]:
    """What a BatchSandbox asks of its pool (a change means a pass)."""
    meta = bs.raw["metadata"]
    return meta.get("generation"), bs.deleting, (meta.get("annotations") or {}).get(labels.RELEASE)


class Allocator:
    name = "allocator"

    def __init__(self, manager: Manager, inflight: InFlight) -> None:
        self.manager = manager
        self.inflight = inflight
        self.controller = Controller(self.name, self.reconcile, max(1, manager.options.concurrency // 2))

    def setup(self) -> Controller:
        """Wake on a pool's pods (one turning Ready and idle, one allocated going away), its
        BatchSandboxes (new, scaled, deleted) and the Pool itself."""
        cache = self.manager.cache
        cache.pools.add_handler(lambda old, new: self._wake(changed(old, new).key))
        cache.pods.add_handler(self._on_pod)
        cache.batchsandboxes.add_handler(self._on_batchsandbox)
        self.manager.add(self.controller)
        return self.controller

    def _wake(self, pool_key: str | None) -> None:
        if pool_key is not None:
            self.controller.queue.add(pool_key)

    def _on_pod(self, old: PodInfo | None, new: PodInfo | None) -> None:
        """Only what can change an allocation: a pod turning free (a pass may hand it out), or a
        pod that served a sandbox going away or failing (its sandbox gets a new one). A pool filling
        up sends thousands of other events."""
        freed = new is not None and is_free(new, new.revision or "") and not (old and is_free(old, old.revision or ""))
        gone = old is not None and (new is None or new.deleting or new.lost) and not (old.deleting or old.lost)
        if freed or gone:
            self._wake(pool_key_of(changed(old, new)))

    def _on_batchsandbox(self, old: CachedObject | None, new: CachedObject | None) -> None:
        """A BatchSandbox appeared, went, or changed what it asks for; not our own ledger writes."""
        if old is None or new is None or _asks(old) != _asks(new):
            for pool_key in {pool_key_of(b) for b in (old, new) if b is not None}:  # one that left its Pool too
                self._wake(pool_key)

    # --- a pass -----------------------------------------------------------------------------------
    async def reconcile(self, pool_key: str) -> float | None:
        cache = self.manager.cache
        pool = cache.pools.get(pool_key)
        if pool is None or pool.deleting:
            self.inflight.forget_pool(pool_key)
            return None  # BatchSandboxes report PoolNotFound themselves
        await self._resolve_uncertain(pool_key)
        revision = pool_revision(PoolSpec.model_validate(pool.raw["spec"]))
        started = time.perf_counter()
        changes = self._plan(pool_key, cache.pods.by_index(BY_POOL, pool_key), revision)
        if not changes:
            return None
        planned = time.perf_counter()
        # Marked before the first await: the Pool reconciler must not delete these meanwhile.
        chosen = [p.key for c in changes for p in c.new.values()]
        self.inflight.reserved.update(chosen)
        try:
            semaphore = asyncio.Semaphore(self.manager.settings.write_concurrency)

            async def write(change: Change) -> bool:
                async with semaphore:
                    return await self._write(pool, change)

            results = await asyncio.gather(*(write(c) for c in changes), return_exceptions=True)
        finally:
            self.inflight.reserved.difference_update(chosen)
        log.debug(
            "allocation pass",
            extra={
                "pool": pool_key,
                "batchsandboxes": len(changes),
                "pods": len(chosen),
                "plan_ms": round((planned - started) * 1000, 2),
                "write_ms": round((time.perf_counter() - planned) * 1000, 2),
            },
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise failures[0]
        return 0.01 if not all(results) else None  # a 409: look again once the cache has the news

    def _plan(self, pool_key: str, pods: list[PodInfo], revision: str) -> list[Change]:
        cache = self.manager.cache
        batchsandboxes = sorted(
            (b for b in cache.batchsandboxes.by_index(BY_POOL_REF, pool_key) if not b.deleting),
            key=lambda b: (b.raw["metadata"].get("creationTimestamp", ""), b.name),
        )
        allocated: set[str] = set()
        plans: list[Change] = []
        for bs in batchsandboxes:
            spec = BatchSandboxSpec.model_validate(bs.raw["spec"])
            held = cache.holding(bs, spec)
            released = frozenset(released_indices(bs.raw))
            surplus = {i: p for i, p in held.pods.items() if i >= spec.replicas or i in released}
            allocated.update(p.uid for p in held.pods.values())
            allocated.update(p.uid for _, p in held.conflicts)
            plans.append(Change(bs, spec, held, {}, surplus, released))
        free = sorted(
            (
                p
                for p in pods
                if is_free(p, revision)
                and p.uid not in allocated
                and not self.inflight.busy(p.key)
                and cache.allocated_to(p) is None
            ),
            key=lambda p: (p.created, p.name),
        )
        assignments = assign([(c.bs.key, c.held.wanted) for c in plans if c.held.wanted], free)
        changes = []
        for change in plans:
            change.new = assignments.get(change.bs.key, {})
            if not (change.new or change.surplus or change.held.changed or change.held.wanted):
                continue  # nothing to write: the BatchSandbox reconciler follows readiness
            change.old, change.status = self._status(change)
            # A BatchSandbox still short of pods is written when its status would say something new
            # (its first WaitingForPool), not on every pass.
            if change.new or change.surplus or change.held.changed or change.old != change.status:
                changes.append(change)
        return changes

    def _status(self, change: Change) -> tuple[BatchSandboxStatus, BatchSandboxStatus]:
        """(old, new) status of a BatchSandbox after the change."""
        bs, spec, held = change.bs, change.spec, change.held
        old = BatchSandboxStatus.model_validate(bs.raw.get("status") or {})
        pool = self.manager.cache.pools.get(f"{bs.namespace}/{spec.poolRef}")
        short = sum(1 for i in held.wanted if i not in change.new)
        policy = statuses.pooled_policy(bs.raw, spec)
        lost = [f"sandbox {x.index}: pod {x.pod_name} {x.why}, replaced" for x in held.lost]
        lost += [f"sandbox {i}: pod {p.name} is claimed by BatchSandbox {p.batchsandbox}" for i, p in held.conflicts]
        view = statuses.BatchSandboxView(
            spec=spec,
            generation=int(bs.raw["metadata"].get("generation", 0)),
            old=old,
            pods=change.pods,
            problem=statuses.pooled_problem(spec, bs.namespace, pool, short, policy),
            tasks=written_tasks(bs.raw) if spec.taskTemplate is not None else None,
            lost=lost or None,
            released=change.released,
            policy=policy,
        )
        return old, statuses.batchsandbox_status(view, datetime.now(UTC))

    async def _write(self, pool: CachedObject, change: Change) -> bool:
        """Write one BatchSandbox's ledger; False when it changed meanwhile (409: the next pass redoes it)."""
        bs, old, new = change.bs, change.old, change.status
        assert old is not None and new is not None  # computed by _plan
        body = {"metadata": {"resourceVersion": bs.raw["metadata"]["resourceVersion"]}, "status": statuses.dump(new)}
        try:
            result = await self.manager.client.patch(BATCHSANDBOXES, bs.name, body, bs.namespace, "status")
        except KubeError as err:
            if err.conflict or err.not_found:
                return False
            if err.status < 500:
                raise
            self._uncertain(pool.key, bs.key)
            raise UnknownOutcome(f"ledger write of {bs.key}: {err}") from err
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            self._uncertain(pool.key, bs.key)
            raise UnknownOutcome(f"ledger write of {bs.key}: {err!r}") from err
        self.manager.cache.batchsandboxes.assume(result)
        self._report(change, old, new)
        doomed = [*change.surplus.values(), *(x.pod for x in change.held.lost if x.pod is not None)]
        await asyncio.gather(*(delete_pod(self.manager.client, p) for p in doomed))
        return True

    def _report(self, change: Change, old: BatchSandboxStatus, new: BatchSandboxStatus) -> None:
        bs = change.bs.raw
        events = self.manager.events
        if change.new:
            events.record(bs, "Normal", conditions.EVENT_ALLOCATED, f"Allocated {len(change.new)} pod(s) of the Pool")
            created = times.parse_optional(change.bs.raw["metadata"].get("creationTimestamp"))
            if created:
                elapsed = (datetime.now(UTC) - created).total_seconds()
                for _ in change.new:
                    CLAIM_LATENCY.observe(elapsed)
        for lost in change.held.lost:
            events.record(
                bs,
                "Warning",
                conditions.EVENT_SANDBOX_LOST,
                f"Pod {lost.pod_name} (sandbox {lost.index}) was {lost.why}; replacing it",
            )
        for index, pod in change.held.conflicts:
            events.record(
                bs,
                "Warning",
                conditions.EVENT_ALLOCATION_CONFLICT,
                f"Pod {pod.name} (sandbox {index}) is claimed by BatchSandbox {pod.batchsandbox}; replacing it",
            )
        if change.surplus:
            message = f"Deleted {len(change.surplus)} sandbox(es) above replicas or released"
            events.record(bs, "Normal", conditions.EVENT_SCALED_DOWN, message)
        report_transition(events, bs, change.spec, old, new)

    # --- unknown outcomes -------------------------------------------------------------------------
    def _uncertain(self, pool_key: str, bs_key: str) -> None:
        self.inflight.uncertain.setdefault(pool_key, set()).add(bs_key)

    async def _resolve_uncertain(self, pool_key: str) -> None:
        """Read each BatchSandbox whose ledger write has an unknown outcome (a GET is a consistent read)
        into the cache; until that worked the pool allocates nothing (the exception retries)."""
        pending = self.inflight.uncertain.get(pool_key)
        while pending:
            key = next(iter(pending))
            namespace, name = key.split("/", 1)
            try:
                self.manager.cache.batchsandboxes.assume(await self.manager.client.get(BATCHSANDBOXES, name, namespace))
            except KubeError as err:
                if not err.not_found:
                    raise
            pending.discard(key)
