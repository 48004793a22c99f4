"""The BatchSandbox reconciler: N sandboxes, built from a template (direct) or allocated from a Pool.

Direct mode creates pods `<name>-<index>` and replaces lost ones. Pooled mode gets its pods from
the allocator (allocator.py), which records them in the BatchSandbox's ledger; here they are
labelled and owned (for garbage collection and kubectl, off the critical path), the requested
entrypoint and env are started through execd, and pods are handed back when asked or when their
task completed under `taskResourcePolicyWhenCompleted: Release`. Both modes: `expireTime` and
`ttlSecondsAfterFinished` delete the BatchSandbox; status lists every sandbox with its pod IP (and
the `endpoints` annotation repeats the IPs, as upstream's controller writes them); with a
`taskTemplate`, each sandbox runs one task through the task-executor sidecar (tasks.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import aiohttp
from prometheus_client import Histogram

from opensandbox_platform.api import conditions, labels, tokens
from opensandbox_platform.api.conditions import find
from opensandbox_platform.api.crds import BatchSandboxSpec, BatchSandboxStatus
from opensandbox_platform.api.resources import BATCHSANDBOXES
from opensandbox_platform.controller import status as statuses
from opensandbox_platform.controller.allocation import read_ledger, released_indices
from opensandbox_platform.controller.cache import (
    BY_BATCHSANDBOX,
    BY_POOL_REF,
    CachedObject,
    changed,
    namespaced,
)
from opensandbox_platform.controller.events import EventRecorder
from opensandbox_platform.controller.inflight import InFlight
from opensandbox_platform.controller.manager import Manager
from opensandbox_platform.controller.pods import (
    EgressSidecar,
    PodCreateError,
    PodInfo,
    TaskExecutorSidecar,
    build_pod,
    delete_pod,
    egress_request,
    egress_sidecar,
    owner_reference,
    slim_pod,
)
from opensandbox_platform.controller.tasks import TERMINAL, TaskDispatcher
from opensandbox_platform.daemon import times
from opensandbox_platform.kube.client import JSON, PODS, KubeError
from opensandbox_platform.kube.controller import Controller

log = logging.getLogger(__name__)

READY_LATENCY = Histogram(
    "opensandbox_sandbox_ready_duration_seconds",
    "BatchSandbox created → every sandbox Ready.",
    ["mode"],
    buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
EXECD_TIMEOUT = aiohttp.ClientTimeout(total=10)
LEAVING_RECHECK = 1.0  # seconds: a BatchSandbox leaving its Pool looks again (its pods' events come first)


def report_transition(
    events: EventRecorder, bs: JSON, spec: BatchSandboxSpec, old: BatchSandboxStatus, new: BatchSandboxStatus
) -> None:
    """Events and metrics for what a status write changes (both writers of a status call it)."""
    ready, was = find(new.conditions, conditions.READY), find(old.conditions, conditions.READY)
    if (
        ready is not None
        and ready.status == "False"
        and ready.reason
        not in (
            conditions.SANDBOXES_NOT_READY,
            was.reason if was else None,
        )
    ):
        kind = "Warning" if ready.reason == conditions.POOL_NOT_FOUND else "Normal"
        events.record(bs, kind, ready.reason, ready.message)
    failed, had = find(new.conditions, conditions.POD_FAILED), find(old.conditions, conditions.POD_FAILED)
    if failed is not None and failed.status == "True" and (had is None or had.message != failed.message):
        events.record(bs, "Warning", conditions.EVENT_POD_FAILED, failed.message)
    if ready is not None and ready.status == "True" and old.ready != new.ready:
        created = times.parse_optional(bs["metadata"].get("creationTimestamp"))
        if created:
            mode = "pooled" if spec.poolRef else "direct"
            READY_LATENCY.labels(mode).observe((datetime.now(UTC) - created).total_seconds())


def endpoints(status: BatchSandboxStatus, replicas: int) -> str:
    """The `endpoints` annotation: pod IPs by index, "" where a sandbox has none (yet)."""
    ips = {s.index: s.podIP or "" for s in status.sandboxes or [] if not s.released}
    return json.dumps([ips.get(i, "") for i in range(replicas)], separators=(",", ":"))


class BatchSandboxReconciler:
    name = "batchsandbox"

    def __init__(self, manager: Manager, inflight: InFlight) -> None:
        self.manager = manager
        self.inflight = inflight
        self.controller = Controller(self.name, self.reconcile, manager.options.concurrency)
        self.tasks = TaskDispatcher(self.controller.queue, manager.settings.pod_token)
        self.lost_notes: dict[str, list[str]] = {}  # direct mode: BatchSandbox key -> pods lost since
        self.tombstones: dict[str, list[PodInfo]] = {}  # deleted pooled BatchSandboxes -> pods to delete

    def setup(self) -> Controller:
        """Wake on the BatchSandbox, on its pods (by claim label or by ledger), and on its Pool."""
        cache = self.manager.cache
        cache.batchsandboxes.add_handler(self._on_batchsandbox)
        cache.pods.add_handler(self._on_pod)
        cache.pools.add_handler(self._on_pool)
        self.manager.add(self.controller, self.tasks.close)
        return self.controller

    def _on_batchsandbox(self, old: CachedObject | None, new: CachedObject | None) -> None:
        if new is None and old is not None:
            # Its ledger is gone with it: pods it held that carry no claim label yet would look free.
            # Marked before any other reconcile runs, deleted by the reconcile of the key.
            pods = self.manager.cache.pods
            named = [pods.get(f"{old.namespace}/{a.pod_name}") for a in read_ledger(old.raw).values()]
            held = [p for p, a in zip(named, read_ledger(old.raw).values(), strict=True)
                    if p is not None and p.uid == a.pod_uid and not p.claimed]  # fmt: skip
            if held:
                self.tombstones[old.key] = held
                self.inflight.doomed.update(p.key for p in held)
        self.controller.queue.add(changed(old, new).key)

    def _on_pod(self, old: PodInfo | None, new: PodInfo | None) -> None:
        pod = changed(old, new)
        owner = namespaced(pod.namespace, pod.batchsandbox)
        if owner is None:
            holder = self.manager.cache.allocated_to(pod)
            owner = holder.key if holder is not None else None
        if owner is None:
            return
        if new is None and old is not None and old.pool is None and self.manager.cache.pods.synced.is_set():
            self._note_lost(owner, old)
        self.controller.queue.add(owner)

    def _on_pool(self, old: CachedObject | None, new: CachedObject | None) -> None:
        if old is None or new is None:  # a pool appeared or vanished: its BatchSandboxes say so
            for bs in self.manager.cache.batchsandboxes.by_index(BY_POOL_REF, changed(old, new).key):
                self.controller.queue.add(bs.key)

    def _note_lost(self, key: str, pod: PodInfo) -> None:
        """Direct mode: a pod deleted behind our back is replaced, and status and an Event say so."""
        bs = self.manager.cache.batchsandboxes.get(key)
        if bs is None or bs.deleting or pod.owner_uid != bs.uid or pod.lost:
            return
        if pod.index is not None and pod.index >= int(bs.raw["spec"].get("replicas", 1)):
            return  # scaled down
        self.lost_notes.setdefault(key, []).append(f"sandbox {pod.index}: pod {pod.name} deleted, replaced")
        if self.manager.leading:
            message = f"Pod {pod.name} (sandbox {pod.index}) was deleted; replacing it"
            self.manager.events.record(bs.raw, "Warning", conditions.EVENT_SANDBOX_LOST, message)

    # --- reconcile --------------------------------------------------------------------------------
    async def reconcile(self, key: str) -> float | None:
        cached = self.manager.cache.batchsandboxes.get(key)
        if cached is None:
            await self._gone(key)
            return None
        if cached.deleting:
            return None  # foreground or orphan deletion: the garbage collector does what was asked
        bs = cached.raw
        spec = BatchSandboxSpec.model_validate(bs["spec"])
        now = datetime.now(UTC)
        old = BatchSandboxStatus.model_validate(bs.get("status") or {})
        if spec.expireTime is not None and spec.expireTime <= now:
            await self._delete(cached, conditions.EVENT_EXPIRED, f"expireTime {times.rfc3339(spec.expireTime)} reached")
            return None
        ttl = spec.ttlSecondsAfterFinished
        if old.finishedAt and ttl is not None and old.finishedAt + timedelta(seconds=ttl) <= now:
            await self._delete(cached, conditions.EVENT_TTL_EXPIRED, f"finished {ttl}s ago")
            return None

        if spec.poolRef:
            pods, problem = await self._pooled(cached, spec)
            lost = None
        else:
            if await self._leave_pool(cached):
                return LEAVING_RECHECK  # the pods' deletion events bring it back sooner
            pods, lost = await self._current_pods(cached)
            problem = None if self._tasks_done(spec, old) else await self._create_missing(cached, spec, pods)
            await self._scale_down(cached, spec, pods)
        tasks = self._sync_tasks(cached, spec, pods, problem)
        if spec.taskResourcePolicyWhenCompleted == "Release" and tasks is not None:
            await self._release_finished(cached, pods, tasks)
        view = statuses.BatchSandboxView(
            spec=spec,
            generation=int(bs["metadata"].get("generation", 0)),
            old=old,
            pods=pods,
            problem=problem,
            tasks=tasks,
            lost=lost or None,
            released=frozenset(released_indices(bs)),
            policy=statuses.pooled_policy(bs, spec),
        )
        new = statuses.batchsandbox_status(view, now)
        # A pooled BatchSandbox still waiting for pods is the allocator's to write (it writes the
        # allocations with the status); only task news are written here meanwhile.
        waiting = problem is not None and problem[0] == conditions.WAITING_FOR_POOL
        allocator_owns = waiting and (tasks is None or new.tasks == old.tasks)
        if new != old and not allocator_owns:
            await self._write_status(cached, spec, old, new)
        await self._write_endpoints(cached, new, spec.replicas)
        if problem and problem[0] in (conditions.FAILED_CREATE, conditions.EGRESS_POLICY_FAILED):
            raise PodCreateError(problem[1])  # retried with backoff; the status already says why
        return statuses.next_deadline(spec, new, now)

    async def _gone(self, key: str) -> None:
        """Deleted: its claimed pods go too (recycleStrategy Delete)."""
        self.tasks.forget(key)
        self.lost_notes.pop(key, None)
        # Owned pods are deleted by the garbage collector even while we are down; deleting them here
        # frees the pool's capacity without waiting for it. Pods the collector orphaned
        # (`--cascade=orphan`) have no owner any more and are left alone.
        cache = self.manager.cache
        owned = [p for p in cache.pods.by_index(BY_BATCHSANDBOX, key) if p.owner_uid and not p.deleting]
        unlabelled = self.tombstones.pop(key, [])
        try:
            await self._delete_pods([*owned, *unlabelled])
        finally:
            self.inflight.doomed.difference_update(p.key for p in unlabelled)

    # --- pooled mode ------------------------------------------------------------------------------
    async def _pooled(
        self, bs: CachedObject, spec: BatchSandboxSpec
    ) -> tuple[dict[int, PodInfo], statuses.Problem | None]:
        """The allocated pods by index, and why the BatchSandbox is not Ready beyond their readiness."""
        cache = self.manager.cache
        pool_key = f"{bs.namespace}/{spec.poolRef}"
        held = cache.holding(bs, spec)
        released = released_indices(bs.raw)
        pods = {i: p for i, p in held.pods.items() if i < spec.replicas and i not in released}
        await self._label(bs, pods)
        policy = statuses.pooled_policy(bs.raw, spec)
        problem = statuses.pooled_problem(spec, bs.namespace, cache.pools.get(pool_key), len(held.wanted), policy)
        if problem is not None and problem[0] == conditions.POOL_WITHOUT_EGRESS:
            return pods, problem  # nothing starts unguarded
        failed = await self._prepare(bs, spec, pods, policy)
        # The cache holds what _prepare marked: this pass's status says Ready, not the pod's next event's.
        pods = {i: cache.pods.get(p.key) or p for i, p in pods.items()}
        return pods, failed or problem

    async def _label(self, bs: CachedObject, pods: dict[int, PodInfo]) -> None:
        """Allocated pods get the claim label and this BatchSandbox as owner (garbage collection, kubectl).

        The pod's resourceVersion is the precondition: a pod some other BatchSandbox's label claims is
        never relabelled (the allocator replaces it in our ledger)."""
        todo = [(i, p) for i, p in pods.items() if p.batchsandbox is None]
        if not todo:
            return
        semaphore = asyncio.Semaphore(self.manager.settings.write_concurrency)

        async def one(index: int, pod: PodInfo) -> None:
            patch = {
                "metadata": {
                    "resourceVersion": pod.resource_version,
                    "labels": {labels.BATCHSANDBOX: bs.name, labels.INDEX: str(index)},
                    "annotations": {labels.CLAIMED_AT: times.rfc3339(digits=6)},
                    "ownerReferences": [owner_reference(bs.raw)],
                }
            }
            async with semaphore:
                try:
                    result = await self.manager.client.patch(PODS, pod.name, patch, pod.namespace)
                except KubeError as err:
                    if err.conflict or err.not_found:
                        return  # changed meanwhile: its event brings us back
                    raise
            self.manager.cache.pods.assume(result)

        await asyncio.gather(*(one(i, p) for i, p in todo))

    async def _prepare(
        self, bs: CachedObject, spec: BatchSandboxSpec, pods: dict[int, PodInfo], policy: bool
    ) -> statuses.Problem | None:
        """Each allocated pod gets the BatchSandbox's network policy (with `policy`; replacing the
        Pool's in its sidecar), then the requested entrypoint and env through execd: the entrypoint
        never runs under the Pool's policy. Marked on the pod (one patch), so done once."""
        body = statuses.bootstrap_request(spec)
        try:
            request = egress_request(bs.raw["metadata"].get("annotations")) if policy else None
        except ValueError as err:
            return conditions.EGRESS_POLICY_FAILED, str(err)
        rules = request[0] if request else None

        def undone(pod: PodInfo) -> bool:
            return (rules is not None and not pod.policy_applied) or (body is not None and not pod.entrypoint_applied)

        todo = [p for p in pods.values() if p.ip and undone(p)]
        failed = await asyncio.gather(*(self._prepare_pod(bs, p, rules, body) for p in todo))
        return next((f for f in failed if f), None)

    async def _prepare_pod(
        self, bs: CachedObject, pod: PodInfo, rules: JSON | None, body: JSON | None
    ) -> statuses.Problem | None:
        marks: dict[str, str] = {}
        if rules is not None and not pod.policy_applied:
            try:
                await self._put_policy(pod, rules)
            except (aiohttp.ClientError, TimeoutError, ValueError) as err:
                message = f"Could not apply the network policy in pod {pod.name} through its egress sidecar: {err}"
                self.manager.events.record(bs.raw, "Warning", conditions.EVENT_EGRESS_POLICY_FAILED, message)
                return conditions.EGRESS_POLICY_FAILED, message
            marks[labels.NETWORK_POLICY_APPLIED] = times.rfc3339(digits=6)
        if body is not None and not pod.entrypoint_applied:
            await self._bootstrap(bs, pod, body)
            marks[labels.ENTRYPOINT_APPLIED] = times.rfc3339(digits=6)
        patch = {"metadata": {"annotations": marks}}
        self.manager.cache.pods.assume(await self.manager.client.patch(PODS, pod.name, patch, pod.namespace))
        return None

    async def _put_policy(self, pod: PodInfo, rules: JSON) -> None:
        """PUT /policy on the pod's egress sidecar: it answers once the kernel holds the new ruleset."""
        key = self.manager.settings.token_key
        if key is None:
            raise ValueError("the controller has no --sandbox-token-key-file to call the sidecar with")
        url = f"http://{pod.ip}:{labels.EGRESS_PORT}/policy"
        headers = {labels.EGRESS_TOKEN_HEADER: tokens.egress_token(key, pod.name)}
        async with self.manager.client.session.put(url, json=rules, headers=headers, timeout=EXECD_TIMEOUT) as response:
            response.raise_for_status()

    async def _bootstrap(self, bs: CachedObject, pod: PodInfo, body: JSON) -> None:
        url = f"http://{pod.ip}:{labels.EXECD_PORT}{labels.EXECD_START_PATH}"
        token = self.manager.settings.pod_token(pod.name)
        headers = {labels.EXECD_TOKEN_HEADER: token} if token else None
        try:
            async with self.manager.client.session.post(
                url, json=body, headers=headers, timeout=EXECD_TIMEOUT
            ) as response:
                # 409: the main process already runs (an earlier attempt started it before we recorded it).
                if response.status != 409:
                    response.raise_for_status()
        except (aiohttp.ClientError, TimeoutError) as err:
            message = f"Could not start the entrypoint in pod {pod.name} through execd: {err}"
            self.manager.events.record(bs.raw, "Warning", conditions.EVENT_ENTRYPOINT_FAILED, message)
            raise

    async def _release_finished(self, bs: CachedObject, pods: dict[int, PodInfo], tasks: dict[int, JSON]) -> None:
        """`Release`: a sandbox whose task ended gives its pod back (deleted; its result stays in status)."""
        done = [i for i, p in pods.items() if (tasks.get(i) or {}).get("state") in TERMINAL]
        if not done:
            return
        await self._delete_pods([pods.pop(i) for i in done])
        self.manager.events.record(
            bs.raw, "Normal", conditions.EVENT_RELEASED, f"Released {len(done)} pod(s) whose task completed"
        )

    # --- leaving a Pool ---------------------------------------------------------------------------
    async def _leave_pool(self, bs: CachedObject) -> bool:
        """A BatchSandbox whose poolRef was removed (the CRD allows it only with replicas 0: the server's
        pause of a pooled sandbox) deletes the pods it claimed: they hold its state, so they never go back
        to the Pool. Until the cache sees each of them deleting, nothing else is done and its status (the
        ledger naming them) is not rewritten, so none of them can look free. True while that lasts."""
        pods = self.manager.cache.departing(bs)
        if not pods:
            return False
        self.inflight.doomed.update(p.key for p in pods)  # before the first await: see inflight.py
        try:
            await self._delete_pods(pods, at_once=True)
        finally:
            self.inflight.doomed.difference_update(p.key for p in pods)
        names = ", ".join(p.name for p in pods)
        self.manager.events.record(
            bs.raw, "Normal", conditions.EVENT_LEFT_POOL, f"Left its Pool: deleted its claimed pod(s) {names}"
        )
        return True

    # --- direct mode ------------------------------------------------------------------------------
    async def _current_pods(self, bs: CachedObject) -> tuple[dict[int, PodInfo], list[str]]:
        """Live pods by index; lost ones are deleted (and reported) so their index is filled again."""
        pods: dict[int, PodInfo] = {}
        lost = self.lost_notes.pop(bs.key, [])
        for pod in sorted(self.manager.cache.pods.by_index(BY_BATCHSANDBOX, bs.key), key=lambda p: p.created):
            if pod.owner_uid != bs.uid:
                await delete_pod(self.manager.client, pod)  # left over from an earlier object of the same name
                continue
            if pod.pool is not None:
                continue  # claimed before it left its Pool, deleting (_leave_pool): never one of its sandboxes
            if pod.lost:
                lost.append(f"sandbox {pod.index}: pod {pod.name} {pod.reason or 'failed'}, replaced")
                await delete_pod(self.manager.client, pod)
                message = f"Pod {pod.name} (sandbox {pod.index}) was {pod.reason or 'lost'}; replacing it"
                self.manager.events.record(bs.raw, "Warning", conditions.EVENT_SANDBOX_LOST, message)
                continue
            if pod.deleting or pod.index is None:
                continue
            if pod.index in pods:  # never expected; keep the older one
                await delete_pod(self.manager.client, pod)
                continue
            pods[pod.index] = pod
        return pods, lost

    @staticmethod
    def _tasks_done(spec: BatchSandboxSpec, old: BatchSandboxStatus) -> bool:
        """With tasks, a finished BatchSandbox does not replace pods that go."""
        return spec.taskTemplate is not None and old.finishedAt is not None

    async def _create_missing(
        self, bs: CachedObject, spec: BatchSandboxSpec, pods: dict[int, PodInfo]
    ) -> statuses.Problem | None:
        """Creates the pods of missing indices. Returns a (reason, message) problem, if any."""
        template = spec.sandboxTemplate
        assert template is not None  # the CRD's CEL rule guarantees it in direct mode
        missing = [i for i in range(spec.replicas) if i not in pods]
        settings = self.manager.settings
        sidecar: TaskExecutorSidecar | None = None
        if spec.taskTemplate is not None and missing:
            if not settings.task_executor_image:
                return conditions.FAILED_CREATE, "taskTemplate needs the controller's --task-executor-image"
            sidecar = TaskExecutorSidecar(
                settings.task_executor_image, settings.task_executor_resources(), settings.task_executor_pull_policy
            )

        egress: EgressSidecar | None = None
        if missing:
            try:
                request = egress_request(bs.raw["metadata"].get("annotations"))
            except ValueError as err:
                return conditions.FAILED_CREATE, str(err)
            if request is not None:
                try:
                    egress = egress_sidecar(settings, *request)
                except ValueError as err:
                    return conditions.FAILED_CREATE, f"{labels.NETWORK_POLICY}: {err}"

        async def one(index: int) -> str | None:
            pod = build_pod(
                name=f"{bs.name}-{index}",
                namespace=bs.namespace,
                template=template,
                pod_labels={labels.BATCHSANDBOX: bs.name, labels.INDEX: str(index)},
                owner=bs.raw,
                execd_image=settings.execd_image,
                task_executor=sidecar,
                token_key=settings.token_key,
                execd_install=settings.execd_install,
                egress=egress,
            )
            try:
                created = await self.manager.client.create(PODS, pod, bs.namespace)
            except KubeError as err:
                return None if err.conflict else err.message  # a conflict: the old pod is still terminating
            pods[index] = slim_pod(created)
            return None

        errors = [e for e in await asyncio.gather(*(one(i) for i in missing)) if e]
        events = self.manager.events
        if len(errors) < len(missing):
            events.record(
                bs.raw, "Normal", conditions.EVENT_SUCCESSFUL_CREATE, f"Created {len(missing) - len(errors)} pod(s)"
            )
        if not errors:
            return None
        events.record(bs.raw, "Warning", conditions.EVENT_FAILED_CREATE, f"Failed to create pod: {errors[0]}")
        return conditions.FAILED_CREATE, f"Pods cannot be created: {errors[0]}"

    async def _scale_down(self, bs: CachedObject, spec: BatchSandboxSpec, pods: dict[int, PodInfo]) -> None:
        extra = sorted((i for i in pods if i >= spec.replicas), reverse=True)
        paused = labels.PAUSED in (bs.raw["metadata"].get("annotations") or {})
        for index in extra:
            await delete_pod(self.manager.client, pods.pop(index), at_once=paused)
        if extra:
            message = f"Deleted {len(extra)} sandbox(es) above replicas"
            self.manager.events.record(bs.raw, "Normal", conditions.EVENT_SCALED_DOWN, message)

    # --- both modes -------------------------------------------------------------------------------
    def _sync_tasks(
        self, bs: CachedObject, spec: BatchSandboxSpec, pods: dict[int, PodInfo], problem: statuses.Problem | None
    ) -> dict[int, JSON] | None:
        if spec.taskTemplate is None:
            return None
        blocked = problem is not None and problem[0] == conditions.TASK_EXECUTOR_MISSING
        policy = statuses.pooled_policy(bs.raw, spec)
        ready = set() if blocked else {i for i, p in pods.items() if statuses.sandbox_ready(spec, p, policy)}
        return self.tasks.sync(bs.key, bs.raw, spec.taskTemplate, pods, ready)

    async def _delete_pods(self, pods: Iterable[PodInfo], at_once: bool = False) -> None:
        await asyncio.gather(*(delete_pod(self.manager.client, p, at_once) for p in pods))

    async def _delete(self, bs: CachedObject, reason: str, message: str) -> None:
        self.manager.events.record(bs.raw, "Normal", reason, f"Deleting: {message}")
        try:
            await self.manager.client.request(
                "DELETE",
                BATCHSANDBOXES.path(bs.namespace, bs.name),
                body={"preconditions": {"uid": bs.uid}, "propagationPolicy": "Background"},
            )
        except KubeError as err:
            if not (err.not_found or err.conflict):
                raise

    async def _write_status(
        self, bs: CachedObject, spec: BatchSandboxSpec, old: BatchSandboxStatus, new: BatchSandboxStatus
    ) -> None:
        """With the resourceVersion as precondition: never over an allocation we have not seen (409 retries)."""
        body = {"metadata": {"resourceVersion": bs.raw["metadata"]["resourceVersion"]}, "status": statuses.dump(new)}
        result = await self.manager.client.patch(BATCHSANDBOXES, bs.name, body, bs.namespace, "status")
        self.manager.cache.batchsandboxes.assume(result)
        report_transition(self.manager.events, bs.raw, spec, old, new)

    async def _write_endpoints(self, bs: CachedObject, status: BatchSandboxStatus, replicas: int) -> None:
        value = endpoints(status, replicas)
        current = (bs.raw["metadata"].get("annotations") or {}).get(labels.ENDPOINTS)
        if current == value or (current is None and not any(s.podIP for s in status.sandboxes or [])):
            return
        patch = {"metadata": {"annotations": {labels.ENDPOINTS: value}}}
        result = await self.manager.client.patch(BATCHSANDBOXES, bs.name, patch, bs.namespace)
        self.manager.cache.batchsandboxes.assume(result)
