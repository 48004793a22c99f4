"""The Pool reconciler: keeps idle, Ready pods between minBufferSize and maxBufferSize, within capacity.

Per pass, from the cache:
1. idle pods that are broken (failed, finished, or not Ready past the deadline) are replaced;
2. idle pods of an older template revision are rolled: deleted once enough current ones are Ready
   (or at once when they are not Ready, or when capacity leaves no room for their replacement);
3. enough pods are created for minBufferSize plus the demand of BatchSandboxes waiting on the pool,
   never above capacity;
4. idle pods above max(maxBufferSize, demand) are deleted, oldest first;
5. status is written when it changed.
Claimed pods belong to their BatchSandbox and are never touched here.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from prometheus_client import Gauge

from opensandbox_platform.api import labels
from opensandbox_platform.api.crds import PoolSpec
from opensandbox_platform.api.resources import POOLS
from opensandbox_platform.controller.conditions import same_status, set_condition
from opensandbox_platform.controller.pods import PodInfo, build_pod, pool_revision
from opensandbox_platform.controller.state import (
    BY_BATCHSANDBOX,
    BY_POOL,
    BY_POOL_REF,
    REFILL_DELAY,
    PodCreateError,
    Shared,
    slim_object,
)
from opensandbox_platform.controller.tasks import pool_sidecar
from opensandbox_platform.daemon import times
from opensandbox_platform.kube.client import JSON, PODS, KubeError

log = logging.getLogger(__name__)
T = TypeVar("T")

POOL_PODS = Gauge("opensandbox_pool_pods", "Pods of a Pool by state.", ["namespace", "pool", "state"])
# A pass creates at most this many pods (then the next pass, once their events arrived, goes on), with at
# most WRITE_CONCURRENCY requests in flight: a pool of 10,000 must not hold 10,000 requests in memory.
MAX_CREATES_PER_PASS = 500
STATUS_INTERVAL = 0.5  # seconds between two status writes of one Pool
WRITE_CONCURRENCY = 32
_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # Kubernetes' generateName alphabet (no vowels)


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


def demand(shared: Shared, pool_key: str) -> int:
    """Sandboxes that BatchSandboxes of this pool still wait for."""
    total = 0
    for bs in shared.batchsandboxes.by_index(BY_POOL_REF, pool_key):
        if bs.deleting:
            continue
        have = sum(1 for p in shared.pods.by_index(BY_BATCHSANDBOX, bs.key) if not p.deleting and not p.lost)
        total += max(0, int(bs.raw["spec"].get("replicas", 1)) - have)
    return total


@dataclass
class PoolPlan:
    create: int  # new pods to create
    delete: list[tuple[PodInfo, str]]  # idle pods to delete, with why: broken, rolled, surplus, over capacity
    claimed: list[PodInfo]
    idle: list[PodInfo]  # idle pods of the current revision that stay
    starting: list[PodInfo]  # healthy idle pods not Ready yet (watched for the deadline)
    postponed: bool  # a refill waits for claims in flight


def plan_pool(
    spec: PoolSpec,
    revision: str,
    pods: list[PodInfo],
    reserved: set[str],
    wanted: int,
    now: datetime,
    deadline: float,
) -> PoolPlan:
    """What to create and delete, from the live (non-terminating) pods of a pool. Pure: no I/O.

    `reserved` are pods whose claim is being written; `wanted` is the sandboxes BatchSandboxes still
    wait for (counting those reserved pods as missing)."""
    claimed = [p for p in pods if p.claimed]
    idle = [p for p in pods if not p.claimed and p.key not in reserved]
    broken = [p for p in idle if p.phase in ("Failed", "Succeeded") or (not p.ready and age_seconds(p, now) > deadline)]
    healthy = [p for p in idle if p not in broken]
    current = sorted((p for p in healthy if p.revision == revision), key=lambda p: p.created)
    stale = sorted((p for p in healthy if p.revision != revision), key=lambda p: p.created)

    delete: list[tuple[PodInfo, str]] = [(p, "broken") for p in broken]
    # Roll the old revision: pods not Ready go now, Ready ones once enough current pods are Ready.
    stale_ready = [p for p in stale if p.ready]
    delete += [(p, "rolled") for p in stale if not p.ready]
    if sum(1 for p in current if p.ready) >= spec.minBufferSize:
        delete += [(p, "rolled") for p in stale_ready]
        stale_ready = []

    # Pods being claimed right now already answer part of the demand.
    in_flight = sum(1 for p in pods if p.key in reserved)
    wanted = max(0, wanted - in_flight)
    create = max(0, spec.minBufferSize + wanted - len(current))
    room = spec.capacity - (len(pods) - len(delete))
    while create > room and stale_ready:  # make room for the new revision
        delete.append((stale_ready.pop(0), "rolled"))
        room += 1
    create = max(0, min(create, room, MAX_CREATES_PER_PASS))
    postponed = in_flight > 0 and create > 0
    if postponed:
        create = 0  # claims are being written: they go first, the refill follows right after

    # Pods made for waiting BatchSandboxes on top of minBufferSize are not surplus (else: create, delete, ...).
    surplus = len(current) - max(spec.maxBufferSize, spec.minBufferSize + wanted)
    if surplus > 0:
        delete += [(p, "surplus") for p in current[:surplus]]  # oldest first
        current = current[surplus:]
    over = len(pods) - len(delete) + create - spec.capacity  # capacity was lowered
    if over > 0:
        delete += [(p, "over capacity") for p in current[:over]]
        current = current[over:]
    starting = [p for p in healthy if not p.ready]
    return PoolPlan(create, delete, claimed, current, starting, postponed)


class PoolReconciler:
    name = "pool"

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self._status_written: dict[str, float] = {}  # pool key -> monotonic time of the last status write

    async def reconcile(self, key: str) -> float | None:
        cached = self.shared.pools.get(key)
        if cached is None or cached.deleting:
            self.shared.creating.forget(key)
            self.shared.deleting.forget(key)
            return None
        if not (self.shared.creating.satisfied(key) and self.shared.deleting.satisfied(key)):
            return None  # the pod events we wait for will enqueue the pool again
        pool = cached.raw
        spec = PoolSpec.model_validate(pool["spec"])
        revision = pool_revision(spec)
        now = datetime.now(UTC)
        deadline = self.shared.settings.pod_ready_deadline
        pods = [p for p in self.shared.pods.by_index(BY_POOL, key) if not p.deleting]
        plan = plan_pool(spec, revision, pods, self.shared.reserved, demand(self.shared, key), now, deadline)

        create_error, _ = await asyncio.gather(
            self._create(pool, spec, revision, plan.create),
            self._delete(pool, plan.delete),
        )
        if create_error:  # the status says why; look again with backoff (a fixed template fixes it)
            plan.create = 0
        written = await self._write_status(pool, spec, revision, pods, plan, create_error)
        if create_error:
            raise PodCreateError(create_error)
        # Look again when the first pod that is not Ready yet would pass the deadline, when a status
        # write held back by the rate limit is due, or when the postponed refill may go ahead.
        waits = [deadline - age_seconds(p, now) for p in plan.starting]
        if not written:
            waits.append(STATUS_INTERVAL)
        if plan.postponed:
            waits.append(REFILL_DELAY)
        return max(0.1, min(waits)) if waits else None

    async def _create(self, pool: JSON, spec: PoolSpec, revision: str, count: int) -> str | None:
        """Creates `count` pods; returns the API server's message when some could not be created."""
        if count <= 0:
            return None
        key = f"{pool['metadata']['namespace']}/{pool['metadata']['name']}"
        name = pool["metadata"]["name"]
        namespace = pool["metadata"]["namespace"]
        settings = self.shared.settings
        try:
            sidecar = pool_sidecar(
                spec,
                settings.task_executor_image,
                settings.task_executor_resources(),
                settings.task_executor_pull_policy,
            )
        except ValueError as err:
            self.shared.events.record(pool, "Warning", "FailedCreate", str(err))
            return str(err)

        async def one() -> str | None:
            pod_name = f"{name}-{random_suffix()}"
            pod = build_pod(
                name=pod_name,
                namespace=namespace,
                template=spec.sandboxTemplate,
                pod_labels={labels.POOL: name, labels.POOL_REVISION: revision},
                owner=pool,
                execd_image=self.shared.settings.execd_image,
                task_executor=sidecar,
            )
            self.shared.creating.expect(key, f"{namespace}/{pod_name}")
            try:
                await self.shared.client.create(PODS, pod, namespace)
                return None
            except KubeError as err:
                self.shared.creating.observe(key, f"{namespace}/{pod_name}")
                return err.message

        errors = [e for e in await bounded_gather([one() for _ in range(count)], WRITE_CONCURRENCY) if e]
        if len(errors) < count:
            self.shared.events.record(pool, "Normal", "SuccessfulCreate", f"Created {count - len(errors)} pool pod(s)")
        if not errors:
            return None
        self.shared.events.record(pool, "Warning", "FailedCreate", f"Failed to create pool pod: {errors[0]}")
        return errors[0]

    async def _delete(self, pool: JSON, doomed: list[tuple[PodInfo, str]]) -> None:
        if not doomed:
            return
        key = f"{pool['metadata']['namespace']}/{pool['metadata']['name']}"

        async def one(pod: PodInfo) -> None:
            self.shared.deleting.expect(key, pod.key)
            try:
                # The resourceVersion precondition loses to a claim written in the meantime.
                await self.shared.client.request(
                    "DELETE",
                    PODS.path(pod.namespace, pod.name),
                    body={
                        "preconditions": {"uid": pod.uid, "resourceVersion": pod.resource_version},
                        "propagationPolicy": "Background",
                    },
                )
            except KubeError as err:
                self.shared.deleting.observe(key, pod.key)
                if not (err.not_found or err.conflict):
                    raise

        await bounded_gather([one(p) for p, _ in doomed], WRITE_CONCURRENCY)
        reasons: dict[str, int] = {}
        for _, reason in doomed:
            reasons[reason] = reasons.get(reason, 0) + 1
        for reason, n in reasons.items():
            event = {
                "broken": "PodReplaced",
                "rolled": "PodRolled",
                "surplus": "SurplusDeleted",
                "over capacity": "SurplusDeleted",
            }[reason]
            kind = "Warning" if reason == "broken" else "Normal"
            what = {
                "broken": "failed or not Ready within the deadline",
                "rolled": "from an older template revision",
                "surplus": "above maxBufferSize",
                "over capacity": "above capacity",
            }[reason]
            self.shared.events.record(pool, kind, event, f"Deleted {n} idle pod(s) {what}")

    async def _write_status(
        self, pool: JSON, spec: PoolSpec, revision: str, pods: list[PodInfo], plan: PoolPlan, error: str | None = None
    ) -> bool:
        """Writes the status if it changed; False when the write is held back by the rate limit."""
        meta = pool["metadata"]
        available = sum(1 for p in plan.idle if p.ready)
        status: JSON = {
            "observedGeneration": meta.get("generation"),
            "total": len(pods) - len(plan.delete) + plan.create,
            "available": available,
            "allocated": len(plan.claimed),
            "starting": len(plan.idle) - available + plan.create,
            "revision": revision,
        }
        old = pool.get("status") or {}
        conditions = [dict(c) for c in old.get("conditions") or []]
        ready = available >= spec.minBufferSize
        if error:
            reason, message = "FailedCreate", f"Pods cannot be created: {error}"
        elif ready:
            reason, message = "BufferFilled", f"{available} idle Ready pod(s), minBufferSize {spec.minBufferSize}"
        else:
            reason, message = "Filling", f"{available} idle Ready pod(s), minBufferSize {spec.minBufferSize}"
        set_condition(conditions, "Ready", ready and not error, reason, message, meta.get("generation", 0))
        status["conditions"] = conditions
        for state, n in (
            ("available", available),
            ("allocated", len(plan.claimed)),
            ("starting", status["starting"]),
        ):
            POOL_PODS.labels(meta["namespace"], meta["name"], state).set(n)
        if same_status(old, status):
            return True
        if error:  # a failure is news: no rate limit
            self._status_written.pop(f"{meta['namespace']}/{meta['name']}", None)
        # Pool status is for people and dashboards: write it at most every STATUS_INTERVAL, so that a
        # stream of claims and refills does not add a status write per pod event.
        key = f"{meta['namespace']}/{meta['name']}"
        last = self._status_written.get(key, 0.0)
        if time.monotonic() - last < STATUS_INTERVAL:
            return False
        self._status_written[key] = time.monotonic()
        result = await self.shared.client.patch(POOLS, meta["name"], {"status": status}, meta["namespace"], "status")
        self.shared.pools.assume(slim_object(result))
        return True
