"""BatchSandbox and Pool status from the cache's view: phases, conditions, what changes and what not."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from opensandbox_platform.api import conditions, labels
from opensandbox_platform.api.crds import BatchSandboxSpec, BatchSandboxStatus, PoolSpec, PoolStatus
from opensandbox_platform.controller.cache import CachedObject
from opensandbox_platform.controller.status import (
    BatchSandboxView,
    PoolCounts,
    batchsandbox_status,
    next_deadline,
    pool_status,
    pooled_policy,
    pooled_problem,
)
from tests.unit.controller.test_pool_plan import NOW, pod

DIRECT = BatchSandboxSpec.model_validate({"replicas": 2, "sandboxTemplate": {"spec": {"image": "i"}}})
POOLED = BatchSandboxSpec.model_validate({"replicas": 2, "poolRef": "p"})


def view(spec: BatchSandboxSpec = DIRECT, **kwargs) -> BatchSandboxView:  # type: ignore[no-untyped-def]
    return BatchSandboxView(spec, 3, kwargs.pop("old", BatchSandboxStatus()), kwargs.pop("pods", {}), **kwargs)


def cond(status: BatchSandboxStatus | PoolStatus, type_: str) -> tuple[str, str] | None:
    found = next((c for c in status.conditions or [] if c.type == type_), None)
    return (found.status, found.reason) if found else None


def test_pending_until_every_sandbox_is_ready_then_running() -> None:
    half = batchsandbox_status(view(pods={0: pod("a"), 1: pod("b", ready=False)}), NOW)
    assert (half.phase, half.ready, half.replicas) == ("Pending", 1, 2)
    assert cond(half, conditions.READY) == ("False", conditions.SANDBOXES_NOT_READY)
    full = batchsandbox_status(view(old=half, pods={0: pod("a"), 1: pod("b")}), NOW + timedelta(seconds=5))
    assert (full.phase, full.ready) == ("Running", 2)
    assert cond(full, conditions.READY) == ("True", conditions.SANDBOXES_READY)
    assert full.observedGeneration == 3
    assert full.sandboxes and full.sandboxes[0].podUID is None, "direct mode keeps no ledger"


def test_nothing_changed_means_an_equal_status_and_no_write() -> None:
    first = batchsandbox_status(view(pods={0: pod("a"), 1: pod("b")}), NOW)
    again = batchsandbox_status(view(old=first, pods={0: pod("a"), 1: pod("b")}), NOW + timedelta(minutes=5))
    assert again == first, "lastTransitionTime moves only when a condition's status changes"


def test_a_pod_that_cannot_run_fails_the_batchsandbox_with_a_podfailed_condition() -> None:
    stuck = replace(pod("b", ready=False), failure="ImagePullBackOff (sandbox)", failure_detail="401 Unauthorized")
    failed = batchsandbox_status(view(pods={0: pod("a"), 1: stuck}), NOW)
    assert failed.phase == "Failed"
    assert cond(failed, conditions.POD_FAILED) == ("True", "ImagePullBackOff")
    (condition,) = [c for c in failed.conditions or [] if c.type == conditions.POD_FAILED]
    assert condition.message == "ImagePullBackOff (sandbox) in pod b: 401 Unauthorized"  # the kubelet's words
    healed = batchsandbox_status(view(old=failed, pods={0: pod("a"), 1: pod("b")}), NOW)
    assert healed.phase == "Running" and cond(healed, conditions.POD_FAILED) == ("False", conditions.NO_FAILED_POD)


def test_replaced_pods_are_reported_in_a_condition() -> None:
    notes = ["sandbox 0: pod x deleted, replaced"]
    status = batchsandbox_status(view(pods={0: pod("a"), 1: pod("b")}, lost=notes), NOW)
    assert cond(status, conditions.SANDBOX_REPLACED) == ("True", conditions.POD_LOST)
    assert batchsandbox_status(view(old=status, pods={0: pod("a"), 1: pod("b")}), NOW) == status, "kept"


def test_pooled_problems_in_their_order() -> None:
    pool = CachedObject({"metadata": {"namespace": "ns", "name": "p"}, "spec": {"maxBufferSize": 1, "capacity": 1,
                         "sandboxTemplate": {"spec": {"image": "i"}}}})  # fmt: skip
    assert pooled_problem(POOLED, "ns", None, 2) == (conditions.POOL_NOT_FOUND, "Pool p does not exist in namespace ns")
    assert pooled_problem(POOLED, "ns", pool, 2) == (
        conditions.WAITING_FOR_POOL,
        "Waiting for 2 idle Ready pod(s) from Pool p",
    )
    assert pooled_problem(POOLED, "ns", pool, 0) is None
    tasks = BatchSandboxSpec.model_validate({"replicas": 2, "poolRef": "p", "taskTemplate": {"command": ["true"]}})
    assert pooled_problem(tasks, "ns", pool, 0) == (
        conditions.TASK_EXECUTOR_MISSING,
        "Pool p has no taskExecutor.enabled: its pods cannot run tasks",
    )
    # a network policy on a Pool whose pods have no egress sidecar: never started unguarded
    reason, message = pooled_problem(POOLED, "ns", pool, 0, policy=True) or ("", "")
    assert reason == conditions.POOL_WITHOUT_EGRESS and "Pool p has no spec.egress" in message
    guarded = CachedObject({**pool.raw, "spec": {**pool.raw["spec"], "egress": {"defaultAction": "deny"}}})
    assert pooled_problem(POOLED, "ns", guarded, 0, policy=True) is None


def test_a_pooled_sandbox_with_a_policy_is_ready_only_once_the_policy_is_in_its_sidecar() -> None:
    bs = {"metadata": {"annotations": {labels.NETWORK_POLICY: "{}"}}}
    assert pooled_policy(bs, POOLED) and not pooled_policy({"metadata": {}}, POOLED)
    assert not pooled_policy(bs, DIRECT)  # direct mode: the sidecar starts with it
    one = BatchSandboxSpec.model_validate({"replicas": 1, "poolRef": "p"})
    waiting = batchsandbox_status(view(one, pods={0: pod("a", claimed=True)}, policy=True), NOW)
    assert waiting.phase == "Pending" and waiting.sandboxes and not waiting.sandboxes[0].ready
    applied = replace(pod("a", claimed=True), policy_applied=True)
    running = batchsandbox_status(view(one, old=waiting, pods={0: applied}, policy=True), NOW)
    assert running.phase == "Running"
    assert batchsandbox_status(view(one, pods={0: pod("a", claimed=True)}), NOW).phase == "Running"  # no policy


def test_a_pool_without_the_controllers_egress_flags_says_so_in_its_ready_condition() -> None:
    spec = PoolSpec.model_validate({"minBufferSize": 1, "maxBufferSize": 1, "capacity": 1, "egress": {},
                                    "sandboxTemplate": {"spec": {"image": "i"}}})  # fmt: skip
    problem = (conditions.EGRESS_NOT_CONFIGURED, "spec.egress: needs --egress-image")
    status = pool_status(spec, 1, "r", PoolCounts(0, 0, 0, 0), PoolStatus(), problem, NOW)
    assert cond(status, conditions.READY) == ("False", conditions.EGRESS_NOT_CONFIGURED)


def test_released_sandboxes_keep_their_entry_and_do_not_count_as_wanted() -> None:
    old = batchsandbox_status(view(POOLED, pods={0: pod("a"), 1: pod("b")}), NOW)
    after = batchsandbox_status(view(POOLED, old=old, pods={0: pod("a")}, released=frozenset({1})), NOW)
    assert after.phase == "Running" and cond(after, conditions.READY) == ("True", conditions.SANDBOXES_READY)
    assert [(s.index, s.released) for s in after.sandboxes or []] == [(0, None), (1, True)]


def test_deadlines_expiry_and_ttl() -> None:
    spec = DIRECT.model_copy(update={"expireTime": NOW + timedelta(seconds=60), "ttlSecondsAfterFinished": 10})
    assert next_deadline(spec, BatchSandboxStatus(), NOW) == 60
    assert next_deadline(spec, BatchSandboxStatus(finishedAt=NOW), NOW) == 10
    assert next_deadline(DIRECT, BatchSandboxStatus(), NOW) is None


def test_pool_status_ready_when_the_buffer_is_filled() -> None:
    spec = PoolSpec.model_validate({"minBufferSize": 2, "maxBufferSize": 3, "capacity": 5,
                                    "sandboxTemplate": {"spec": {"image": "i"}}})  # fmt: skip
    filling = pool_status(spec, 1, "r", PoolCounts(1, 1, 0, 1), PoolStatus(), None, NOW)
    assert cond(filling, conditions.READY) == ("False", conditions.FILLING)
    filled = pool_status(spec, 1, "r", PoolCounts(2, 2, 0, 0), filling, None, NOW)
    assert cond(filled, conditions.READY) == ("True", conditions.BUFFER_FILLED) and filled.available == 2
    problem = (conditions.FAILED_CREATE, "Pods cannot be created: quantities must match")
    broken = pool_status(spec, 1, "r", PoolCounts(2, 2, 0, 0), filled, problem, NOW)
    assert cond(broken, conditions.READY) == ("False", conditions.FAILED_CREATE)


def test_scaled_to_zero_is_paused_once_its_pods_are_gone() -> None:
    """The server's pause: replicas 0 (the files are in a snapshot image); Pending while a pod remains."""
    paused = DIRECT.model_copy(update={"replicas": 0})
    going = batchsandbox_status(view(paused, pods={0: pod("a")}), NOW)
    assert going.phase != "Paused"
    gone = batchsandbox_status(view(paused), NOW)
    assert (gone.phase, gone.replicas, gone.ready) == ("Paused", 0, 0)
