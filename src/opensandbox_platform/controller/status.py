"""The status of Pools and BatchSandboxes, computed from what the cache holds. Pure: no I/O.

Both writers of a pooled BatchSandbox's status (the allocator, which records allocations in it, and
the BatchSandbox reconciler, which follows readiness and tasks) compute it here, so the same inputs
always give the same status and a write happens only when something changed.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

from opensandbox_platform.api import conditions, labels
from opensandbox_platform.api.conditions import find, set_condition
from opensandbox_platform.api.crds import (
    BatchSandboxSpec,
    BatchSandboxStatus,
    Condition,
    PoolSpec,
    PoolStatus,
    SandboxStatus,
    SandboxTaskStatus,
    TaskCounts,
)
from opensandbox_platform.controller.allocation import TERMINAL_TASK_STATES
from opensandbox_platform.controller.cache import CachedObject
from opensandbox_platform.controller.pods import PodInfo
from opensandbox_platform.kube.client import JSON

Phase = Literal["Pending", "Running", "Paused", "Succeeded", "Failed"]
Problem = tuple[str, str]  # (reason, message) of a Ready condition that is False for a known cause


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


def pooled_policy(bs: JSON, spec: BatchSandboxSpec) -> bool:
    """A pooled BatchSandbox with a network policy: its claimed pods' sidecars get it before anything starts."""
    return bool(spec.poolRef) and labels.NETWORK_POLICY in (bs["metadata"].get("annotations") or {})


def sandbox_ready(spec: BatchSandboxSpec, pod: PodInfo, policy: bool = False) -> bool:
    """Ready, and in pooled mode with the requested network policy (`policy`) in force and the
    requested entrypoint started."""
    needs_entrypoint = bool(spec.poolRef) and bootstrap_request(spec) is not None
    return pod.ready and (pod.entrypoint_applied or not needs_entrypoint) and (pod.policy_applied or not policy)


def pooled_problem(
    spec: BatchSandboxSpec, namespace: str, pool: CachedObject | None, short: int, policy: bool = False
) -> Problem | None:
    """Why a pooled BatchSandbox is not Ready beyond its pods' readiness: no Pool, a Pool whose pods
    cannot run tasks or have no egress sidecar for its `policy`, or fewer idle Ready pods than it wants."""
    if pool is None or pool.deleting:
        return conditions.POOL_NOT_FOUND, f"Pool {spec.poolRef} does not exist in namespace {namespace}"
    if policy and PoolSpec.model_validate(pool.raw["spec"]).egress is None:
        return (
            conditions.POOL_WITHOUT_EGRESS,
            f"Pool {spec.poolRef} has no spec.egress: its pods have no egress sidecar to enforce"
            f" {labels.NETWORK_POLICY}",
        )
    if spec.taskTemplate is not None:
        executor = PoolSpec.model_validate(pool.raw["spec"]).taskExecutor
        if executor is None or not executor.enabled:
            return (
                conditions.TASK_EXECUTOR_MISSING,
                f"Pool {spec.poolRef} has no taskExecutor.enabled: its pods cannot run tasks",
            )
    if short > 0:
        return conditions.WAITING_FOR_POOL, f"Waiting for {short} idle Ready pod(s) from Pool {spec.poolRef}"
    return None


@dataclass
class BatchSandboxView:
    """Everything a BatchSandbox's status is computed from."""

    spec: BatchSandboxSpec
    generation: int
    old: BatchSandboxStatus
    pods: dict[int, PodInfo]  # live sandboxes by index
    problem: Problem | None = None  # why Ready is False beyond "not all Ready yet"
    tasks: dict[int, JSON] | None = None  # index -> task status (None: no taskTemplate)
    lost: list[str] | None = None  # "sandbox 2: pod x deleted, replaced" notes since the last status
    released: frozenset[int] = frozenset()  # indices whose pod was handed back
    policy: bool = False  # pooled_policy(): Ready waits for the claim's network policy


def batchsandbox_status(view: BatchSandboxView, now: dt.datetime) -> BatchSandboxStatus:
    spec, old = view.spec, view.old
    sandboxes = [_sandbox(view, index, pod) for index, pod in sorted(view.pods.items())]
    ready = sum(1 for s in sandboxes if s.ready)
    if view.tasks is not None or view.released:
        sandboxes = _with_finished(sandboxes, old, view)
    finished, failed = _finished(view)
    finished_at = old.finishedAt
    if finished and finished_at is None:
        finished_at = now.replace(microsecond=0)
    failure = next(
        (
            f"{p.failure} in pod {p.name}" + (f": {p.failure_detail}" if p.failure_detail else "")
            for p in view.pods.values()
            if p.failure
        ),
        None,
    )
    wanted = spec.replicas - len(view.released)
    phase: Phase
    if failure is not None:
        phase = "Failed"
    elif finished or (finished_at is not None and view.tasks is not None):
        phase = "Failed" if failed else "Succeeded"
    elif spec.replicas == 0 and not view.pods:
        phase = "Paused"  # scaled to nothing: the server's pause (docs/snapshots.md), or a person's
    else:
        phase = "Running" if ready == wanted else "Pending"
    return BatchSandboxStatus(
        observedGeneration=view.generation,
        phase=phase,
        replicas=len(view.pods),
        ready=ready,
        allocated=sum(1 for p in view.pods.values() if spec.poolRef or p.node),
        tasks=count_tasks(view.tasks, spec.replicas) if view.tasks is not None else None,
        sandboxes=sandboxes,
        finishedAt=finished_at,
        conditions=_batchsandbox_conditions(view, ready, wanted, failure, now),
    )


def _sandbox(view: BatchSandboxView, index: int, pod: PodInfo) -> SandboxStatus:
    task = (view.tasks or {}).get(index)
    return SandboxStatus(
        index=index,
        podName=pod.name,
        podUID=pod.uid if view.spec.poolRef else None,
        podIP=pod.ip,
        nodeName=pod.node,
        ready=sandbox_ready(view.spec, pod, view.policy),
        released=None,
        task=SandboxTaskStatus.model_validate(task) if task else None,
    )


def _with_finished(
    sandboxes: list[SandboxStatus], old: BatchSandboxStatus, view: BatchSandboxView
) -> list[SandboxStatus]:
    """Sandboxes whose pod is gone keep their entry while their task's end or their release is
    recorded there (a finished task is not run again; status must keep saying how it ended)."""
    have = {s.index for s in sandboxes}
    tasks = view.tasks or {}
    kept = []
    for entry in old.sandboxes or []:
        if entry.index in have or entry.index >= view.spec.replicas:
            continue
        task = tasks.get(entry.index)
        done = (task or {}).get("state") in TERMINAL_TASK_STATES
        if done or entry.index in view.released:
            kept.append(
                SandboxStatus(
                    index=entry.index,
                    podName=entry.podName,
                    podUID=entry.podUID,
                    ready=False,
                    released=True if entry.index in view.released else None,
                    task=SandboxTaskStatus.model_validate(task) if task else None,
                )
            )
    return sorted(sandboxes + kept, key=lambda s: s.index) if kept else sandboxes


def _finished(view: BatchSandboxView) -> tuple[bool, bool]:
    """(finished, failed): every task ended, or without tasks every sandbox's main process exited."""
    replicas = view.spec.replicas
    if view.tasks is not None:
        states = [(view.tasks.get(i) or {}).get("state") for i in range(replicas)]
        return replicas > 0 and all(s in TERMINAL_TASK_STATES for s in states), "failed" in states
    pods = view.pods.values()
    finished = replicas > 0 and len(view.pods) == replicas and all(p.finished for p in pods)
    return finished, any(p.main_exit_code for p in pods)


def _batchsandbox_conditions(
    view: BatchSandboxView, ready: int, wanted: int, failure: str | None, now: dt.datetime
) -> list[Condition]:
    now = now.replace(microsecond=0)
    result = [c.model_copy() for c in view.old.conditions or []]
    generation = view.generation
    if view.problem is not None:
        set_condition(result, conditions.READY, False, *view.problem, generation, now)
    else:
        reason = conditions.SANDBOXES_READY if ready == wanted else conditions.SANDBOXES_NOT_READY
        set_condition(result, conditions.READY, ready == wanted, reason, f"{ready}/{wanted} sandboxes Ready",
                      generation, now)  # fmt: skip
    if view.lost:
        set_condition(result, conditions.SANDBOX_REPLACED, True, conditions.POD_LOST, "; ".join(view.lost),
                      generation, now)  # fmt: skip
    if failure is not None:
        reason = failure.split(" ", 1)[0]
        set_condition(result, conditions.POD_FAILED, True, reason, failure, generation, now)
    elif find(result, conditions.POD_FAILED) is not None:
        set_condition(result, conditions.POD_FAILED, False, conditions.NO_FAILED_POD, "", generation, now)
    return result


def count_tasks(tasks: dict[int, JSON], replicas: int) -> TaskCounts:
    counts = {"pending": 0, "running": 0, "succeeded": 0, "failed": 0}
    for index in range(replicas):
        counts[(tasks.get(index) or {}).get("state", "pending")] += 1
    return TaskCounts(**counts)


def next_deadline(spec: BatchSandboxSpec, status: BatchSandboxStatus, now: dt.datetime) -> float | None:
    """Seconds until the next time-based action: expiry, or deletion after the TTL once finished."""
    deadlines: list[dt.datetime] = []
    if spec.expireTime is not None:
        deadlines.append(spec.expireTime)
    if status.finishedAt is not None and spec.ttlSecondsAfterFinished is not None:
        deadlines.append(status.finishedAt + dt.timedelta(seconds=spec.ttlSecondsAfterFinished))
    return max(0.0, (min(deadlines) - now).total_seconds()) if deadlines else None


def dump(status: BatchSandboxStatus | PoolStatus) -> JSON:
    return status.model_dump(mode="json", exclude_none=True)


# --- Pool -----------------------------------------------------------------------------------------
@dataclass
class PoolCounts:
    total: int
    available: int  # idle Ready pods
    allocated: int
    starting: int  # idle pods not Ready yet (and pods being created)


def pool_status(
    spec: PoolSpec,
    generation: int,
    revision: str,
    counts: PoolCounts,
    old: PoolStatus,
    error: Problem | None,
    now: dt.datetime,
) -> PoolStatus:
    """`error`: why pods cannot be created (FailedCreate: the API server's words; EgressNotConfigured)."""
    ready = counts.available >= spec.minBufferSize
    detail = f"{counts.available} idle Ready pod(s), minBufferSize {spec.minBufferSize}"
    if error:
        reason, message = error
    else:
        reason, message = (conditions.BUFFER_FILLED if ready else conditions.FILLING), detail
    result = [c.model_copy() for c in old.conditions or []]
    set_condition(result, conditions.READY, ready and not error, reason, message, generation,
                  now.replace(microsecond=0))  # fmt: skip
    return PoolStatus(
        observedGeneration=generation,
        total=counts.total,
        available=counts.available,
        allocated=counts.allocated,
        starting=counts.starting,
        revision=revision,
        conditions=result,
    )
