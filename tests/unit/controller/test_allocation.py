"""The allocation ledger and the allocator's plan: each step of the exactly-once argument of
docs/controller.md, on plain data."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from opensandbox_platform.api import labels
from opensandbox_platform.api.crds import BatchSandboxSpec, BatchSandboxStatus
from opensandbox_platform.controller.allocation import (
    Holding,
    assign,
    departing,
    holding,
    is_free,
    read_ledger,
    released_indices,
)
from opensandbox_platform.controller.pods import PodInfo
from opensandbox_platform.controller.status import BatchSandboxView, batchsandbox_status
from tests.unit.controller.test_pool_plan import NOW, REV, pod


def batchsandbox(name: str = "bs", replicas: int = 2, sandboxes: list[dict[str, Any]] | None = None,
                 annotations: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    return {
        "metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}", "annotations": annotations or {}},
        "spec": {"replicas": replicas, "poolRef": "p"},
        "status": {"sandboxes": sandboxes or []},
    }


def entry(index: int, p: PodInfo) -> dict[str, Any]:
    return {"index": index, "podName": p.name, "podUID": p.uid, "ready": True}


def spec_of(bs: dict[str, Any]) -> BatchSandboxSpec:
    return BatchSandboxSpec.model_validate(bs["spec"])


def held(bs: dict[str, Any], pods: list[PodInfo], labelled: list[PodInfo] = ()) -> Holding:  # type: ignore[assignment]
    by_name = {p.name: p for p in pods}
    return holding(spec_of(bs), bs, by_name.get, labelled)


def test_the_ledger_is_the_status_entries_with_a_pod_uid() -> None:
    a, b = pod("a"), pod("b")
    bs = batchsandbox(sandboxes=[entry(0, a), entry(1, b), {"index": 2, "podName": "old-style"}])
    assert {i: x.pod_name for i, x in read_ledger(bs).items()} == {0: "a", 1: "b"}
    direct = {**bs, "spec": {"replicas": 2}, "status": {"sandboxes": [{"index": 0, "podName": "bs-0"}]}}
    assert read_ledger(direct) == {}, "direct-mode pods are found by their labels, not a ledger"
    left = {**bs, "spec": {"replicas": 0, "sandboxTemplate": {"spec": {"image": "i"}}}}
    assert read_ledger(left) == read_ledger(bs), "one that left its Pool names its pods until they are deleting"


def left_pool(bs: dict[str, Any]) -> dict[str, Any]:
    """What the server's pause of a pooled sandbox makes of its BatchSandbox (status untouched)."""
    return {**bs, "spec": {"replicas": 0, "sandboxTemplate": {"spec": {"image": "snapshot"}}}}


def test_a_batchsandbox_that_left_its_pool_releases_the_pods_its_ledger_or_its_labels_name() -> None:
    a, b, other = pod("a"), pod("b"), pod("other")
    labelled = replace(b, batchsandbox="bs", index=1, owner_uid="uid-bs")
    bs = batchsandbox(sandboxes=[entry(0, a)])
    by_name = {p.name: p for p in (a, labelled, other)}.get
    assert departing(bs, by_name, [labelled]) == [], "still pooled: the allocator's"
    assert {p.name for p in departing(left_pool(bs), by_name, [labelled])} == {"a", "b"}
    assert departing(left_pool(bs), {"a": replace(a, uid="namesake")}.get, []) == [], "a namesake is not ours"
    direct_pod = replace(labelled, pool=None)  # a pod of its own template: not a departing one
    assert departing(left_pool(batchsandbox()), by_name, [direct_pod]) == []
    foreign = replace(labelled, owner_uid="uid-earlier-object")
    assert departing(left_pool(batchsandbox()), by_name, [foreign]) == []
    deleting = {"a": replace(a, deleting=True)}.get
    assert departing(left_pool(bs), deleting, []) == [], "deleting already: its ledger may go"


def test_a_namesake_of_an_allocated_pod_is_not_it() -> None:
    a = pod("a")
    bs = batchsandbox(replicas=1, sandboxes=[entry(0, a)])
    result = held(bs, [replace(a, uid="a-recreated")])
    assert result.pods == {} and [x.why for x in result.lost] == ["deleted"]


def test_live_allocations_are_kept_and_only_missing_indices_are_wanted() -> None:
    a = pod("a")
    result = held(batchsandbox(replicas=3, sandboxes=[entry(1, a)]), [a])
    assert result.pods == {1: a} and result.wanted == [0, 2] and not result.changed


def test_lost_pods_are_replaced_unless_their_task_finished() -> None:
    gone, evicted = pod("gone"), replace(pod("ev"), phase="Failed", reason="Evicted")
    bs = batchsandbox(replicas=3, sandboxes=[entry(0, gone), entry(1, evicted)])
    result = held(bs, [evicted])  # "gone" is no longer in the cache
    assert [(x.index, x.why, x.pod) for x in result.lost] == [(0, "deleted", None), (1, "Evicted", evicted)]
    assert result.wanted == [0, 1, 2] and result.changed
    for recorded in bs["status"]["sandboxes"]:
        recorded["task"] = {"state": "succeeded"}
    finished = held(bs, [evicted])
    assert finished.lost == [] and finished.wanted == [2], "a finished sandbox keeps its result, no new pod"


def test_a_pod_whose_label_names_another_batchsandbox_is_not_ours() -> None:
    """Never expected (one allocator per pool); if two ledgers ever named one pod, the claim label,
    written first, wins and the other BatchSandbox gets a new pod."""
    taken = replace(pod("x"), batchsandbox="other")
    result = held(batchsandbox(replicas=1, sandboxes=[entry(0, taken)]), [taken])
    assert result.pods == {} and result.conflicts == [(0, taken)] and result.wanted == [0]


def test_claims_made_before_the_ledger_existed_are_adopted() -> None:
    old = replace(pod("legacy", claimed=True), batchsandbox="bs", index=1, owner_uid="uid-bs")
    stranger = replace(pod("s", claimed=True), batchsandbox="bs", index=0, owner_uid="uid-earlier-bs")
    result = held(batchsandbox(replicas=2), [], labelled=[old, stranger])
    assert result.pods == {1: old} and result.wanted == [0]


def test_released_sandboxes_are_neither_kept_nor_refilled() -> None:
    a, b = pod("a"), pod("b")
    bs = batchsandbox(replicas=2, sandboxes=[entry(0, a), entry(1, b)], annotations={labels.RELEASE: "b"})
    assert released_indices(bs) == {1}
    assert held(bs, [a]).wanted == [], "b was handed back: index 1 stays empty"
    assert released_indices(batchsandbox(annotations={labels.RELEASE: " 0 , x"})) == set()  # no such entries yet


def test_free_pods_go_oldest_batchsandbox_first_and_never_twice() -> None:
    free = [pod(f"f{n}") for n in range(3)]
    result = assign([("ns/first", [0, 1]), ("ns/second", [0, 1])], free)
    assert {k: {i: p.name for i, p in v.items()} for k, v in result.items()} == {
        "ns/first": {0: "f0", 1: "f1"},
        "ns/second": {0: "f2"},
    }
    handed = [p.uid for v in result.values() for p in v.values()]
    assert len(handed) == len(set(handed))


def test_two_batchsandboxes_racing_for_the_last_pod_one_gets_it() -> None:
    result = assign([("ns/a", [0]), ("ns/b", [0])], [pod("last")])
    assert list(result) == ["ns/a"]


def test_only_idle_ready_current_pods_are_free() -> None:
    assert is_free(pod("ok"), REV)
    assert not is_free(pod("starting", ready=False), REV)
    assert not is_free(pod("claimed", claimed=True), REV)
    assert not is_free(pod("old", revision="r0"), REV)
    assert not is_free(replace(pod("doomed"), evicting=True), REV)
    assert not is_free(replace(pod("going"), deleting=True), REV)


def test_allocation_and_ready_are_one_status() -> None:
    """The allocator writes the ledger with readiness: one write makes a pooled sandbox Ready."""
    pods = {0: pod("a"), 1: pod("b")}
    spec = spec_of(batchsandbox(replicas=2))
    status = batchsandbox_status(BatchSandboxView(spec, 1, BatchSandboxStatus(), pods), NOW)
    assert status.phase == "Running" and status.ready == 2
    assert [(s.podName, s.podUID, s.ready) for s in status.sandboxes or []] == [("a", "a", True), ("b", "b", True)]
    ready = next(c for c in status.conditions or [] if c.type == "Ready")
    assert (ready.status, ready.reason) == ("True", "SandboxesReady")
    rebuilt = read_ledger({"spec": {"poolRef": "p"}, "status": status.model_dump(mode="json")})
    assert {i: a.pod_uid for i, a in rebuilt.items()} == {0: "a", 1: "b"}
