"""The Pool reconciler: keeps idle, Ready pods between minBufferSize and maxBufferSize, within capacity.

Per pass, from the cache:
1. idle pods that are broken (failed, finished, or not Ready past the deadline) or that a person
   marked with the evict label are deleted;
2. idle pods of an older template revision are rolled: deleted once enough current ones are Ready
   (or at once when they are not Ready, or when capacity leaves no room for their replacement,
   then at most `updateStrategy.maxUnavailable` of the wanted Ready pods at a time);
3. enough pods are created for minBufferSize plus the demand of BatchSandboxes waiting on the pool,
   never above capacity, with at most `scaleStrategy.maxUnavailable` starting at once;
4. idle pods above max(maxBufferSize, demand) are deleted, oldest first;
5. status is written when it changed (at most every STATUS_INTERVAL).
Allocated pods (named by a BatchSandbox's ledger or carrying a claim label) are never touched here;
handing pods to BatchSandboxes is the allocator's (allocator.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from prometheus_client import Gauge

from opensandbox_platform.api import conditions, labels
from opensandbox_platform.api.crds import BatchSandboxSpec, PoolSpec, PoolStatus, RateStrategy
from opensandbox_platform.api.resources import POOLS
from opensandbox_platform.controller import status as statuses
from opensandbox_platform.controller.cache import (
    BY_POOL,
    BY_POOL_REF,
    CachedObject,
    changed,
    pool_key_of,
)
from opensandbox_platform.controller.inflight import InFlight
from opensandbox_platform.controller.manager import Manager
from opensandbox_platform.controller.pods import PodCreateError, PodInfo, build_pod, pool_egress, pool_revision
from opensandbox_platform.controller.tasks import pool_sidecar
from opensandbox_platform.daemon import times
from opensandbox_platform.kube.client import JSON, PODS, KubeError
from opensandbox_platform.kube.controller import Controller

log = logging.getLogger(__name__)
T = TypeVar("T")

POOL_PODS = Gauge("opensandbox_pool_pods", "Pods of a Pool by state.", ["namespace", "pool", "state"])
# A pass creates at most this many pods (then the next pass, once their events arrived, goes on): a pool
# of 10,000 must not hold 10,000 requests in memory.
MAX_CREATES_PER_PASS = 500
STATUS_INTERVAL = 0.5  # seconds between two status writes of one Pool
# After an allocation the refill waits this long, so that pod creation does not slow the claim's status.
REFILL_DELAY = 0.1
# Pod events of a pool are taken in batches this long: a pool of thousands filling or draining sends an
# event per pod, and a pass per event would keep a CPU busy while the cache falls behind the API server.
POD_EVENT_BATCH = 0.05
_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # Kubernetes' generateName alphabet (no vowels)
_DELETE_EVENTS = {  # why -> (Event reason, Event type, what the message says)
    "broken": (conditions.EVENT_POD_REPLACED, "Warning", "failed or not Ready within the deadline"),
    "evicted": (conditions.EVENT_POD_EVICTED, "Normal", f"marked with the {labels.EVICT} label"),
    "rolled": (conditions.EVENT_POD_ROLLED, "Normal", "from an older template revision"),
    "surplus": (conditions.EVENT_SURPLUS_DELETED, "Normal", "above maxBufferSize"),
    "over capacity": (conditions.EVENT_SURPLUS_DELETED, "Normal", "above capacity"),
}


async def bounded_gather(coroutines: list[Coroutine[Any, Any, T]], limit: int) -> list[T]:
    """asyncio.gather with at most `limit` running at once."""
    semaphore = asyncio.Semaphore(limit)

    async def run(coroutine: Coroutine[Any, Any, T]) -> T:
        async with semaphore:
            return await coroutine

    return await asyncio.gather(*(run(c) for c in coroutines))


def random_suffix(n: int = 5) -> str:
    return "".join(secrets.choice(_NAME_CHARS) for _ in range(n))


def age_seconds(pod: PodInfo, now: datetime) -> float:
    created = times.parse_optional(pod.created)
    return (now - created).total_seconds() if created else 0.0


def scaled(strategy: RateStrategy | None, total: int) -> int | None:
    """`maxUnavailable` as a number of pods (a percentage of `total`, rounded up, at least 1); None: unset."""
    value = strategy.maxUnavailable if strategy else None
    if value is None:
        return None
    if isinstance(value, str):
        return max(1, math.ceil(int(value.rstrip("%")) * total / 100))
    return max(1, value)


@dataclass
class PoolPlan:
    create: int  # new pods to create
    delete: list[tuple[PodInfo, str]]  # idle pods to delete, with why: broken, evicted, rolled, surplus, over capacity
    claimed: list[PodInfo]
    idle: list[PodInfo]  # idle pods of the current revision that stay
    starting: list[PodInfo]  # healthy idle pods not Ready yet (watched for the deadline)
    postponed: bool  # a refill waits for allocations in flight


def plan_pool(
    spec: PoolSpec,
    revision: str,
    pods: list[PodInfo],
    reserved: set[str],
    wanted: int,
    now: datetime,
    deadline: float,
    allocated: frozenset[str] = frozenset(),
) -> PoolPlan:
    """What to create and delete, from the live (non-terminating) pods of a pool. Pure: no I/O.

    `allocated` are pods a BatchSandbox's ledger names; `reserved` are pods whose allocation is being
    written; `wanted` is the sandboxes BatchSandboxes still wait for (counting reserved pods as
    missing)."""
    claimed = [p for p in pods if p.claimed or p.key in allocated]
    idle = [p for p in pods if not (p.claimed or p.key in allocated or p.key in reserved)]
    broken = [p for p in idle if p.phase in ("Failed", "Succeeded") or (not p.ready and age_seconds(p, now) > deadline)]
    evicted = [p for p in idle if p.evicting and p not in broken]
    healthy = [p for p in idle if p not in broken and p not in evicted]
    current = sorted((p for p in healthy if p.revision == revision), key=lambda p: p.created)
    stale = sorted((p for p in healthy if p.revision != revision), key=lambda p: p.created)

    delete: list[tuple[PodInfo, str]] = [(p, "broken") for p in broken] + [(p, "evicted") for p in evicted]
    # Roll the old revision: pods not Ready go now, Ready ones once enough current pods are Ready.
    stale_ready = [p for p in stale if p.ready]
    delete += [(p, "rolled") for p in stale if not p.ready]
    if sum(1 for p in current if p.ready) >= spec.minBufferSize:
        delete += [(p, "rolled") for p in stale_ready]
        stale_ready = []

    # Pods being allocated right now already answer part of the demand.
    in_flight = sum(1 for p in pods if p.key in reserved)
    wanted = max(0, wanted - in_flight)
    target = spec.minBufferSize + wanted
    create = max(0, target - len(current))
    room = spec.capacity - (len(pods) - len(delete))
    # Make room for the new revision, within the update budget: of the `target` Ready pods wanted, at
    # most `budget` may be missing while old ones make way.
    budget = scaled(spec.updateStrategy, target)
    ready_now = sum(1 for p in current if p.ready) + len(stale_ready)
    while create > room and stale_ready and (budget is None or ready_now > target - budget):
        delete.append((stale_ready.pop(0), "rolled"))
        room += 1
        ready_now -= 1
    create = max(0, min(create, room, MAX_CREATES_PER_PASS))
    starting = [p for p in healthy if not p.ready]
    start_limit = scaled(spec.scaleStrategy, spec.capacity)
    if start_limit is not None:
        create = max(0, min(create, start_limit - len(starting)))
    postponed = in_flight > 0 and create > 0
    if postponed:
        create = 0  # allocations are being written: they go first, the refill follows right after

    # Pods made for waiting BatchSandboxes on top of minBufferSize are not surplus (else: create, delete, ...).
    surplus = len(current) - max(spec.maxBufferSize, target)
    if surplus > 0:
        delete += [(p, "surplus") for p in current[:surplus]]  # oldest first
        current = current[surplus:]
    over = len(pods) - len(delete) + create - spec.capacity  # capacity was lowered
    if over > 0:
        delete += [(p, "over capacity") for p in current[:over]]
        current = current[over:]
    return PoolPlan(create, delete, claimed, current, starting, postponed)


@dataclass
class Expectations:
    """Pods we created or deleted whose watch events have not arrived yet, per Pool.

    Without this a Pool reconciled twice in quick succession would create its pods twice. An entry
    expires after `timeout` so a lost event cannot block a Pool for ever; the reconcile that waits
    looks again when the oldest entry expires."""

    timeout: float = 30.0
    _pending: dict[str, dict[str, float]] = field(default_factory=dict)

    def expect(self, owner: str, pod_key: str) -> None:
        self._pending.setdefault(owner, {})[pod_key] = time.monotonic() + self.timeout

    def observe(self, owner: str, pod_key: str) -> None:
        pending = self._pending.get(owner)
        if pending is not None:
            pending.pop(pod_key, None)

    def wait(self, owner: str) -> float | None:
        """None when nothing is pending, else seconds until the oldest expectation expires."""
        pending = self._pending.get(owner)
        if not pending:
            return None
        now = time.monotonic()
        for pod_key in [k for k, deadline in pending.items() if deadline < now]:
            del pending[pod_key]
        return min(pending.values()) - now if pending else None

    def forget(self, owner: str) -> None:
        self._pending.pop(owner, None)


def demand(manager: Manager, pool_key: str) -> tuple[int, frozenset[str]]:
    """(sandboxes BatchSandboxes of this pool still wait for, pod keys their ledgers name)."""
    cache = manager.cache
    wanted = 0
    allocated: set[str] = set()
    for bs in cache.batchsandboxes.by_index(BY_POOL_REF, pool_key):
        if bs.deleting:
            continue
        spec = BatchSandboxSpec.model_validate(bs.raw["spec"])
        held = cache.holding(bs, spec)
        wanted += len(held.wanted)
        allocated.update(p.key for p in held.pods.values())
    # Pods a ledger names that no BatchSandbox of this pool holds any more: one that left the Pool
    # still names them until they are deleting (allocation.departing). Never idle meanwhile.
    allocated.update(p.key for p in cache.pods.by_index(BY_POOL, pool_key) if cache.allocated_to(p) is not None)
    return wanted, frozenset(allocated)


class PoolReconciler:
    name = "pool"

    def __init__(self, manager: Manager, inflight: InFlight) -> None:
        self.manager = manager
        self.inflight = inflight
        self.creating = Expectations()
        self.deleting = Expectations()
        self._status_written: dict[str, float] = {}  # pool key -> monotonic time of the last status write
        self.controller = Controller(self.name, self.reconcile, max(1, manager.options.concurrency // 2))

    def setup(self) -> Controller:
        """Wake on its Pools, their pods, and BatchSandboxes whose demand on a pool changes."""
        cache = self.manager.cache
        cache.pools.add_handler(lambda old, new: self.controller.queue.add(changed(old, new).key))
        cache.pods.add_handler(self._on_pod)
        cache.batchsandboxes.add_handler(self._on_batchsandbox)
        self.manager.add(self.controller)
        return self.controller

    def _on_pod(self, old: PodInfo | None, new: PodInfo | None) -> None:
        pod = changed(old, new)
        pool_key = pool_key_of(pod)
        if pool_key is None:
            return
        if new is not None and old is None:
            self.creating.observe(pool_key, pod.key)
        if new is None or new.deleting:
            self.deleting.observe(pool_key, pod.key)
        self.controller.queue.add_after(pool_key, POD_EVENT_BATCH)

    def _on_batchsandbox(self, old: CachedObject | None, new: CachedObject | None) -> None:
        # Demand (or the ledger) changed: refill a moment later, after the allocation's status is out.
        # Both pools: a BatchSandbox that left its Pool (poolRef removed) changes that Pool's demand.
        for pool_key in {pool_key_of(b) for b in (old, new) if b is not None}:
            if pool_key is not None:
                self.controller.queue.add_after(pool_key, REFILL_DELAY)

    async def reconcile(self, key: str) -> float | None:
        cached = self.manager.cache.pools.get(key)
        if cached is None or cached.deleting:
            self.creating.forget(key)
            self.deleting.forget(key)
            return None
        pending = [w for w in (self.creating.wait(key), self.deleting.wait(key)) if w is not None]
        if pending:
            return max(0.01, min(pending))  # the pod events we wait for enqueue the pool sooner
        pool = cached.raw
        spec = PoolSpec.model_validate(pool["spec"])
        revision = pool_revision(spec)
        now = datetime.now(UTC)
        deadline = self.manager.settings.pod_ready_deadline
        pods = [p for p in self.manager.cache.pods.by_index(BY_POOL, key) if not p.deleting]
        wanted, allocated = demand(self.manager, key)
        reserved = {p.key for p in pods if p.key in self.inflight.reserved}
        plan = plan_pool(spec, revision, pods, reserved, wanted, now, deadline, allocated)
        self.inflight.doomed.update(p.key for p, _ in plan.delete)  # before the first await: see inflight.py

        create_error, _ = await asyncio.gather(
            self._create(cached, spec, revision, plan.create),
            self._delete(cached, plan.delete),
        )
        if create_error:  # the status says why; look again with backoff (a fixed template fixes it)
            plan.create = 0
        written = await self._write_status(cached, spec, revision, pods, plan, create_error)
        if create_error:
            raise PodCreateError(create_error[1])
        # Look again when the first pod that is not Ready yet would pass the deadline, when a status
        # write held back by the rate limit is due, or when the postponed refill may go ahead.
        waits = [deadline - age_seconds(p, now) for p in plan.starting]
        if not written:
            waits.append(STATUS_INTERVAL)
        if plan.postponed:
            waits.append(REFILL_DELAY)
        return max(0.1, min(waits)) if waits else None

    async def _create(self, pool: CachedObject, spec: PoolSpec, revision: str, count: int) -> statuses.Problem | None:
        """Creates `count` pods; returns why when some could not be created (the API server's message)."""
        if count <= 0:
            return None
        settings = self.manager.settings
        try:
            sidecar = pool_sidecar(
                spec,
                settings.task_executor_image,
                settings.task_executor_resources(),
                settings.task_executor_pull_policy,
            )
        except ValueError as err:
            self.manager.events.record(pool.raw, "Warning", conditions.EVENT_FAILED_CREATE, str(err))
            return conditions.FAILED_CREATE, f"Pods cannot be created: {err}"
        try:
            egress = pool_egress(spec, settings)
        except ValueError as err:  # never pods without the sidecar the Pool asks for
            message = f"spec.egress: {err}"
            self.manager.events.record(pool.raw, "Warning", conditions.EVENT_EGRESS_NOT_CONFIGURED, message)
            return conditions.EGRESS_NOT_CONFIGURED, message

        async def one() -> str | None:
            pod_name = f"{pool.name}-{random_suffix()}"
            pod = build_pod(
                name=pod_name,
                namespace=pool.namespace,
                template=spec.sandboxTemplate,
                pod_labels={labels.POOL: pool.name, labels.POOL_REVISION: revision},
                owner=pool.raw,
                execd_image=settings.execd_image,
                task_executor=sidecar,
                token_key=settings.token_key,
                execd_install=settings.execd_install,
                egress=egress,
            )
            key = f"{pool.namespace}/{pod_name}"
            self.creating.expect(pool.key, key)
            try:
                await self.manager.client.create(PODS, pod, pool.namespace)
                return None
            except KubeError as err:
                self.creating.observe(pool.key, key)
                if err.transient:
                    raise  # the API server is unwell, not the template: retried with backoff
                return err.message
            except BaseException:
                # Unknown outcome (connection lost, timeout): forget it, or the pool would wait for an
                # event that may never come. Had the pod been created, the next pass counts it (and
                # deletes it as surplus if one too many).
                self.creating.observe(pool.key, key)
                raise

        results = await bounded_gather([one() for _ in range(count)], settings.write_concurrency)
        errors = [e for e in results if e]
        if len(errors) < count:
            self.manager.events.record(
                pool.raw, "Normal", conditions.EVENT_SUCCESSFUL_CREATE, f"Created {count - len(errors)} pool pod(s)"
            )
        if not errors:
            return None
        self.manager.events.record(
            pool.raw, "Warning", conditions.EVENT_FAILED_CREATE, f"Failed to create pool pod: {errors[0]}"
        )
        return conditions.FAILED_CREATE, f"Pods cannot be created: {errors[0]}"

    async def _delete(self, pool: CachedObject, doomed: list[tuple[PodInfo, str]]) -> None:
        if not doomed:
            return

        async def one(pod: PodInfo) -> None:
            self.deleting.expect(pool.key, pod.key)
            try:
                # The resourceVersion precondition loses to a claim label written in the meantime.
                await self.manager.client.request(
                    "DELETE",
                    PODS.path(pod.namespace, pod.name),
                    body={
                        "preconditions": {"uid": pod.uid, "resourceVersion": pod.resource_version},
                        "propagationPolicy": "Background",
                    },
                )
            except BaseException as err:
                self.deleting.observe(pool.key, pod.key)  # whatever happened, the next pass sees the pod or not
                if not (isinstance(err, KubeError) and (err.not_found or err.conflict)):
                    raise
            finally:
                self.inflight.doomed.discard(pod.key)

        await bounded_gather([one(p) for p, _ in doomed], self.manager.settings.write_concurrency)
        reasons: dict[str, int] = {}
        for _, why in doomed:
            reasons[why] = reasons.get(why, 0) + 1
        for why, n in reasons.items():
            reason, kind, what = _DELETE_EVENTS[why]
            self.manager.events.record(pool.raw, kind, reason, f"Deleted {n} idle pod(s) {what}")

    async def _write_status(
        self,
        pool: CachedObject,
        spec: PoolSpec,
        revision: str,
        pods: list[PodInfo],
        plan: PoolPlan,
        error: statuses.Problem | None = None,
    ) -> bool:
        """Writes the status if it changed; False when the write is held back by the rate limit."""
        available = sum(1 for p in plan.idle if p.ready)
        counts = statuses.PoolCounts(
            total=len(pods) - len(plan.delete) + plan.create,
            available=available,
            allocated=len(plan.claimed),
            starting=len(plan.idle) - available + plan.create,
        )
        for state in ("available", "allocated", "starting"):
            POOL_PODS.labels(pool.namespace, pool.name, state).set(getattr(counts, state))
        old = PoolStatus.model_validate(pool.raw.get("status") or {})
        generation = int(pool.raw["metadata"].get("generation", 0))
        new = statuses.pool_status(spec, generation, revision, counts, old, error, datetime.now(UTC))
        if new == old:
            return True
        if error:  # a failure is news: no rate limit
            self._status_written.pop(pool.key, None)
        # Pool status is for people and dashboards: write it at most every STATUS_INTERVAL, so that a
        # stream of claims and refills does not add a status write per pod event.
        last = self._status_written.get(pool.key, 0.0)
        if time.monotonic() - last < STATUS_INTERVAL:
            return False
        self._status_written[pool.key] = time.monotonic()
        body: JSON = {"status": statuses.dump(new)}
        result = await self.manager.client.patch(POOLS, pool.name, body, pool.namespace, "status")
        self.manager.cache.pools.assume(result)
        return True
