"""The BatchSandbox reconciler: N sandboxes, built from a template (direct) or claimed from a Pool.

Direct mode creates pods `<name>-<index>`. Pooled mode claims idle Ready pods of the Pool: the claim
is a merge patch on the pod that sets our labels and ownerReference and carries the pod's
resourceVersion, so of two claimers only one can win, and the truth survives a controller restart.
Lost pods (deleted, evicted, failed) are replaced; `expireTime` and `ttlSecondsAfterFinished`
delete the BatchSandbox; status lists every sandbox with its pod IP. With a `taskTemplate`, each
sandbox runs one task through the task-executor sidecar (tasks.py) and the tasks decide the phase.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import aiohttp
from prometheus_client import Histogram

from opensandbox_platform.api import labels
from opensandbox_platform.api.crds import BatchSandboxSpec, PoolSpec
from opensandbox_platform.api.resources import BATCHSANDBOXES
from opensandbox_platform.controller.conditions import same_status, set_condition
from opensandbox_platform.controller.pods import (
    PodInfo,
    TaskExecutorSidecar,
    build_pod,
    owner_reference,
    pool_revision,
    slim_pod,
)
from opensandbox_platform.controller.state import (
    BY_BATCHSANDBOX,
    BY_POOL,
    REFILL_DELAY,
    PodCreateError,
    Shared,
    slim_object,
)
from opensandbox_platform.controller.tasks import TERMINAL, TaskDispatcher, count
from opensandbox_platform.daemon import times
from opensandbox_platform.kube.client import JSON, PODS, KubeError

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
CLAIM_LATENCY = Histogram(
    "opensandbox_claim_duration_seconds",
    "Pod claims: BatchSandbox created → pod claimed.",
    buckets=LATENCY_BUCKETS,
)
READY_LATENCY = Histogram(
    "opensandbox_sandbox_ready_duration_seconds",
    "BatchSandbox created → every sandbox Ready.",
    ["mode"],
    buckets=LATENCY_BUCKETS,
)


EXECD_TIMEOUT = aiohttp.ClientTimeout(total=10)


def bootstrap_request(spec: BatchSandboxSpec) -> JSON | None:
    """The body of execd's `POST /bootstrap` for a pooled sandbox, or None when there is nothing to apply."""
    template = spec.sandboxTemplate
    if template is None:
        return None
    argv = [*(template.spec.command or []), *(template.spec.args or [])]
    env = {e.name: e.value or "" for e in template.spec.env or []}
    if not argv and not env:
        return None
    body: JSON = {"env": env}
    if argv:
        body["argv"] = argv
    if template.spec.workingDir:
        body["cwd"] = template.spec.workingDir
    return body


def sandbox_ready(spec: BatchSandboxSpec, pod: PodInfo) -> bool:
    """Ready, and in pooled mode with the requested entrypoint started."""
    needs_entrypoint = bool(spec.poolRef) and bootstrap_request(spec) is not None
    return pod.ready and (pod.entrypoint_applied or not needs_entrypoint)


class BatchSandboxReconciler:
    name = "batchsandbox"

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.tasks = TaskDispatcher(shared.batchsandbox_queue)

    async def close(self) -> None:
        await self.tasks.close()

    async def reconcile(self, key: str) -> float | None:
        cached = self.shared.batchsandboxes.get(key)
        if cached is None:
            self.tasks.forget(key)
            for waiting in self.shared.waiting.values():
                waiting.discard(key)
            # Its pods are owned by it, so the garbage collector removes them even while we are down;
            # deleting them here frees the pool's capacity without waiting for the collector. Pods the
            # collector orphaned (`--cascade=orphan`) have no owner any more and are left alone.
            owned = [p for p in self.shared.pods.by_index(BY_BATCHSANDBOX, key) if p.owner_uid and not p.deleting]
            await self._delete_pods(owned)
            return None
        if cached.deleting:
            return None  # foreground or orphan deletion: the garbage collector does what was asked
        bs = cached.raw
        spec = BatchSandboxSpec.model_validate(bs["spec"])
        now = datetime.now(UTC)
        if spec.expireTime is not None and spec.expireTime <= now:
            await self._delete(bs, "Expired", f"expireTime {times.rfc3339(spec.expireTime)} reached")
            return None
        finished_at = times.parse_optional((bs.get("status") or {}).get("finishedAt"))
        ttl = spec.ttlSecondsAfterFinished
        if finished_at and ttl is not None and finished_at + timedelta(seconds=ttl) <= now:
            await self._delete(bs, "TTLExpired", f"finished {ttl}s ago")
            return None

        pods, lost = await self._current_pods(bs, key)
        conditions = [dict(c) for c in (bs.get("status") or {}).get("conditions") or []]
        problem: tuple[str, str] | None = None
        tasks_done = spec.taskTemplate is not None and finished_at is not None  # a lost pod is not replaced
        if spec.poolRef:
            if not tasks_done:
                problem = await self._claim_missing(bs, spec, pods)
            await self._apply_entrypoints(bs, spec, pods)
        elif not tasks_done:
            problem = await self._create_missing(bs, spec, pods)
        await self._scale_down(bs, spec, pods)
        tasks: dict[int, JSON] | None = None
        if spec.taskTemplate is not None:
            missing_executor = self._task_executor_problem(spec, key)
            problem = problem or missing_executor
            ready = set() if missing_executor else {i for i, p in pods.items() if sandbox_ready(spec, p)}
            tasks = self.tasks.sync(key, bs, spec.taskTemplate, pods, ready)
        if lost:
            set_condition(
                conditions,
                "SandboxReplaced",
                True,
                "PodLost",
                "; ".join(lost),
                bs["metadata"].get("generation", 0),
            )
        await self._write_status(bs, spec, pods, conditions, problem, now, tasks)
        if problem and problem[0] == "FailedCreate":
            raise PodCreateError(problem[1])  # retried with backoff; the status already says why
        latest = self.shared.batchsandboxes.get(key)  # with the status just written
        return next_deadline(spec, (latest.raw if latest else bs).get("status") or {}, now)

    # --- pods -------------------------------------------------------------------------------------
    async def _current_pods(self, bs: JSON, key: str) -> tuple[dict[int, PodInfo], list[str]]:
        """Live pods by index; lost ones are deleted (and reported) so their index is filled again."""
        pods: dict[int, PodInfo] = {}
        lost = self.shared.lost_notes.pop(key, [])
        for pod in sorted(self.shared.pods.by_index(BY_BATCHSANDBOX, key), key=lambda p: p.created):
            if pod.owner_uid != bs["metadata"]["uid"]:
                await self._delete_pods([pod])  # left over from an earlier object of the same name
                continue
            if pod.lost:
                lost.append(f"sandbox {pod.index}: pod {pod.name} {pod.reason or 'failed'}, replaced")
                await self._delete_pod(pod)
                self.shared.events.record(
                    bs,
                    "Warning",
                    "SandboxLost",
                    f"Pod {pod.name} (sandbox {pod.index}) was {pod.reason or 'lost'}; replacing it",
                )
                continue
            if pod.deleting or pod.index is None:
                continue
            if pod.index in pods:  # never expected; keep the older one
                await self._delete_pod(pod)
                continue
            pods[pod.index] = pod
        return pods, lost

    async def _delete_pods(self, pods: Iterable[PodInfo]) -> None:
        await asyncio.gather(*(self._delete_pod(p) for p in pods))

    async def _delete_pod(self, pod: PodInfo) -> None:
        try:
            await self.shared.client.delete(PODS, pod.name, pod.namespace, precondition_uid=pod.uid)
        except KubeError as err:
            if not (err.not_found or err.conflict):
                raise

    async def _create_missing(
        self, bs: JSON, spec: BatchSandboxSpec, pods: dict[int, PodInfo]
    ) -> tuple[str, str] | None:
        """Direct mode: creates the pods of missing indices. Returns a (reason, message) problem, if any."""
        template = spec.sandboxTemplate
        assert template is not None  # the CRD's CEL rule guarantees it in direct mode
        meta = bs["metadata"]
        missing = [i for i in range(spec.replicas) if i not in pods]
        sidecar: TaskExecutorSidecar | None = None
        if spec.taskTemplate is not None and missing:
            settings = self.shared.settings
            if not settings.task_executor_image:
                return "FailedCreate", "taskTemplate needs the controller's --task-executor-image"
            sidecar = TaskExecutorSidecar(
                settings.task_executor_image, settings.task_executor_resources(), settings.task_executor_pull_policy
            )

        async def one(index: int) -> str | None:
            pod = build_pod(
                name=f"{meta['name']}-{index}",
                namespace=meta["namespace"],
                template=template,
                pod_labels={labels.BATCHSANDBOX: meta["name"], labels.INDEX: str(index)},
                owner=bs,
                execd_image=self.shared.settings.execd_image,
                task_executor=sidecar,
            )
            try:
                pods[index] = slim_pod(await self.shared.client.create(PODS, pod, meta["namespace"]))
            except KubeError as err:
                if not err.conflict:  # a conflict: the old pod of that name is still terminating
                    return err.message
            return None

        errors = [e for e in await asyncio.gather(*(one(i) for i in missing)) if e]
        if len(errors) < len(missing):
            self.shared.events.record(bs, "Normal", "SuccessfulCreate", f"Created {len(missing) - len(errors)} pod(s)")
        if not errors:
            return None
        self.shared.events.record(bs, "Warning", "FailedCreate", f"Failed to create pod: {errors[0]}")
        return "FailedCreate", f"Pods cannot be created: {errors[0]}"

    async def _claim_missing(
        self, bs: JSON, spec: BatchSandboxSpec, pods: dict[int, PodInfo]
    ) -> tuple[str, str] | None:
        """Claims idle Ready pods for every missing index. Returns a (reason, message) problem, if any."""
        meta = bs["metadata"]
        missing = [i for i in range(spec.replicas) if i not in pods]
        pool_key = f"{meta['namespace']}/{spec.poolRef}"
        if not missing:
            self.shared.waiting.get(pool_key, set()).discard(f"{meta['namespace']}/{meta['name']}")
            return None
        pool = self.shared.pools.get(pool_key)
        if pool is None or pool.deleting:
            return "PoolNotFound", f"Pool {spec.poolRef} does not exist in namespace {meta['namespace']}"
        revision = pool_revision(PoolSpec.model_validate(pool.raw["spec"]))
        reserved = self.shared.reserved
        candidates = [
            p
            for p in self.shared.pods.by_index(BY_POOL, pool_key)
            if p.ready and not p.claimed and not p.deleting and p.revision == revision and p.key not in reserved
        ]
        chosen = candidates[: len(missing)]
        reserved.update(p.key for p in chosen)
        try:
            semaphore = asyncio.Semaphore(self.shared.settings.claim_concurrency)

            async def one(index: int, pod: PodInfo) -> None:
                async with semaphore:
                    claimed = await self._claim(bs, pod, index)
                if claimed is not None:
                    pods[index] = claimed

            await asyncio.gather(*(one(i, p) for i, p in zip(missing, chosen, strict=False)))
        finally:
            reserved.difference_update(p.key for p in chosen)
        created = times.parse_optional(meta.get("creationTimestamp"))
        if chosen and created:
            elapsed = (datetime.now(UTC) - created).total_seconds()
            for _ in chosen:
                CLAIM_LATENCY.observe(elapsed)
        short = spec.replicas - len(pods)
        waiting = self.shared.waiting.setdefault(pool_key, set())
        if short > 0:
            waiting.add(f"{meta['namespace']}/{meta['name']}")  # a pod of the pool turning Ready wakes us
            self.shared.pool_queue.add(pool_key)  # the pool must make pods for us
            return "WaitingForPool", f"Waiting for {short} idle Ready pod(s) from Pool {spec.poolRef}"
        waiting.discard(f"{meta['namespace']}/{meta['name']}")
        # Refill a moment later, so that background pod creation does not slow this claim's status write.
        self.shared.pool_queue.add_after(pool_key, REFILL_DELAY)
        return None

    async def _claim(self, bs: JSON, pod: PodInfo, index: int) -> PodInfo | None:
        meta = bs["metadata"]
        patch = {
            "metadata": {
                "resourceVersion": pod.resource_version,  # the precondition: 409 if anyone wrote since
                "labels": {labels.BATCHSANDBOX: meta["name"], labels.INDEX: str(index)},
                "annotations": {labels.CLAIMED_AT: times.rfc3339(digits=6)},
                "ownerReferences": [owner_reference(bs)],
            }
        }
        try:
            result = await self.shared.client.patch(PODS, pod.name, patch, pod.namespace)
        except KubeError as err:
            if err.conflict or err.not_found:
                return None  # someone else changed it: pick another next time
            raise
        claimed = slim_pod(result)
        self.shared.pods.assume(claimed)
        return claimed

    async def _apply_entrypoints(self, bs: JSON, spec: BatchSandboxSpec, pods: dict[int, PodInfo]) -> None:
        """Pooled mode: start the requested entrypoint with its env through execd in each claimed pod."""
        body = bootstrap_request(spec)
        if body is None:
            return  # nothing to apply: a pooled sandbox without entrypoint or env needs no execd
        todo = [p for p in pods.values() if not p.entrypoint_applied and p.ip]
        await asyncio.gather(*(self._bootstrap(bs, p, body) for p in todo))

    async def _bootstrap(self, bs: JSON, pod: PodInfo, body: JSON) -> None:
        url = f"http://{pod.ip}:{labels.EXECD_PORT}{labels.EXECD_START_PATH}"
        try:
            async with self.shared.client.session.post(url, json=body, timeout=EXECD_TIMEOUT) as response:
                # 409: the main process already runs (an earlier attempt started it before we recorded it).
                if response.status != 409:
                    response.raise_for_status()
        except (aiohttp.ClientError, TimeoutError) as err:
            message = f"Could not start the entrypoint in pod {pod.name} through execd: {err}"
            self.shared.events.record(bs, "Warning", "EntrypointFailed", message)
            raise
        patch = {"metadata": {"annotations": {labels.ENTRYPOINT_APPLIED: times.rfc3339(digits=6)}}}
        self.shared.pods.assume(slim_pod(await self.shared.client.patch(PODS, pod.name, patch, pod.namespace)))

    async def _scale_down(self, bs: JSON, spec: BatchSandboxSpec, pods: dict[int, PodInfo]) -> None:
        extra = sorted((i for i in pods if i >= spec.replicas), reverse=True)
        for index in extra:
            await self._delete_pod(pods.pop(index))
        if extra:
            self.shared.events.record(bs, "Normal", "ScaledDown", f"Deleted {len(extra)} sandbox(es) above replicas")

    async def _delete(self, bs: JSON, reason: str, message: str) -> None:
        meta = bs["metadata"]
        self.shared.events.record(bs, "Normal", reason, f"Deleting: {message}")
        try:
            await self.shared.client.request(
                "DELETE",
                BATCHSANDBOXES.path(meta["namespace"], meta["name"]),
                body={"preconditions": {"uid": meta["uid"]}, "propagationPolicy": "Background"},
            )
        except KubeError as err:
            if not (err.not_found or err.conflict):
                raise

    # --- tasks ------------------------------------------------------------------------------------
    def _task_executor_problem(self, spec: BatchSandboxSpec, key: str) -> tuple[str, str] | None:
        """Pooled tasks need the pool's pods to carry the sidecar."""
        if not spec.poolRef:
            return None
        pool = self.shared.pools.get(f"{key.split('/', 1)[0]}/{spec.poolRef}")
        if pool is None:
            return None  # reported as PoolNotFound
        executor = PoolSpec.model_validate(pool.raw["spec"]).taskExecutor
        if executor is None or not executor.enabled:
            return "TaskExecutorMissing", f"Pool {spec.poolRef} has no taskExecutor.enabled: its pods cannot run tasks"
        return None

    # --- status -----------------------------------------------------------------------------------
    async def _write_status(
        self,
        bs: JSON,
        spec: BatchSandboxSpec,
        pods: dict[int, PodInfo],
        conditions: list[JSON],
        problem: tuple[str, str] | None,
        now: datetime,
        tasks: dict[int, JSON] | None = None,
    ) -> None:
        meta = bs["metadata"]
        generation = meta.get("generation", 0)
        sandboxes = []
        ready = 0
        for index in sorted(pods):
            pod = pods[index]
            is_ready = sandbox_ready(spec, pod)
            ready += is_ready
            sandbox: JSON = {
                "index": index,
                "podName": pod.name,
                "podIP": pod.ip,
                "nodeName": pod.node,
                "ready": is_ready,
            }
            if tasks is not None and index in tasks:
                sandbox["task"] = tasks[index]
            sandboxes.append(sandbox)
        old = bs.get("status") or {}
        if tasks is not None:
            sandboxes = with_finished_tasks(sandboxes, old, tasks, spec.replicas)
        if tasks is not None:
            finished, failed = tasks_finished(spec.replicas, tasks)
        else:
            finished = spec.replicas > 0 and len(pods) == spec.replicas and all(p.finished for p in pods.values())
            failed = any(p.main_exit_code for p in pods.values())
        finished_at = old.get("finishedAt")
        if finished and not finished_at:
            finished_at = times.rfc3339(now)
        if finished or (finished_at and tasks is not None):
            phase = "Failed" if failed else "Succeeded"
        elif ready == spec.replicas:
            phase = "Running"
        else:
            phase = "Pending"

        all_ready = ready == spec.replicas
        if problem is not None:
            set_condition(conditions, "Ready", False, problem[0], problem[1], generation)
        elif all_ready:
            set_condition(
                conditions,
                "Ready",
                True,
                "SandboxesReady",
                f"{ready}/{spec.replicas} sandboxes Ready",
                generation,
            )
        else:
            set_condition(
                conditions,
                "Ready",
                False,
                "SandboxesNotReady",
                f"{ready}/{spec.replicas} sandboxes Ready",
                generation,
            )
        status: JSON = {
            "observedGeneration": generation,
            "phase": phase,
            "replicas": len(pods),
            "ready": ready,
            "allocated": sum(1 for p in pods.values() if spec.poolRef or p.node),
            "sandboxes": sandboxes,
            "conditions": conditions,
        }
        if tasks is not None:
            status["tasks"] = count(tasks, spec.replicas)
        if finished_at:
            status["finishedAt"] = finished_at
        if same_status(old, status):
            return
        if problem and not _same_condition(old, "Ready", problem[0]):
            self.shared.events.record(
                bs, "Warning" if problem[0] == "PoolNotFound" else "Normal", problem[0], problem[1]
            )
        if all_ready and old.get("ready") != ready:
            created = times.parse_optional(meta.get("creationTimestamp"))
            if created:
                READY_LATENCY.labels("pooled" if spec.poolRef else "direct").observe((now - created).total_seconds())
        result = await self.shared.client.patch(
            BATCHSANDBOXES, meta["name"], {"status": status}, meta["namespace"], "status"
        )
        self.shared.batchsandboxes.assume(slim_object(result))


def next_deadline(spec: BatchSandboxSpec, status: JSON, now: datetime) -> float | None:
    """Seconds until the next time-based action: expiry, or deletion after the TTL once finished."""
    deadlines: list[datetime] = []
    if spec.expireTime is not None:
        deadlines.append(spec.expireTime)
    finished_at = times.parse_optional(status.get("finishedAt"))
    if finished_at and spec.ttlSecondsAfterFinished is not None:
        deadlines.append(finished_at + timedelta(seconds=spec.ttlSecondsAfterFinished))
    return max(0.0, (min(deadlines) - now).total_seconds()) if deadlines else None


def with_finished_tasks(sandboxes: list[JSON], old: JSON, tasks: dict[int, JSON], replicas: int) -> list[JSON]:
    """Sandboxes whose pod is gone keep their entry while their task's end is recorded there (a
    finished task is not run again, and status must keep saying how it ended)."""
    have = {s["index"] for s in sandboxes}
    kept = [
        {"index": s["index"], "podName": s["podName"], "ready": False, "task": tasks[s["index"]]}
        for s in old.get("sandboxes") or []
        if s["index"] not in have and s["index"] < replicas and (tasks.get(s["index"]) or {}).get("state") in TERMINAL
    ]
    return sorted(sandboxes + kept, key=lambda s: s["index"]) if kept else sandboxes


def tasks_finished(replicas: int, tasks: dict[int, JSON]) -> tuple[bool, bool]:
    """(every replica's task ended, some failed)."""
    states = [(tasks.get(i) or {}).get("state") for i in range(replicas)]
    return replicas > 0 and all(s in TERMINAL for s in states), "failed" in states


def _same_condition(old: JSON, type_: str, reason: str) -> bool:
    return any(c.get("type") == type_ and c.get("reason") == reason for c in old.get("conditions") or [])
