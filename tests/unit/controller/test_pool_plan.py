"""The Pool's plan: buffer between min and max, capacity, demand, repair and rollout, from a list of pods."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from opensandbox_platform.api.crds import PoolSpec
from opensandbox_platform.controller.pods import PodInfo
from opensandbox_platform.controller.pool import PoolPlan, plan_pool

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
REV = "r1"


def spec(minimum: int = 2, maximum: int = 5, capacity: int = 10) -> PoolSpec:
    return PoolSpec.model_validate(
        {"minBufferSize": minimum, "maxBufferSize": maximum, "capacity": capacity,
         "sandboxTemplate": {"spec": {"image": "ubuntu"}}}
    )  # fmt: skip


def pod(name: str, *, age: float = 60, ready: bool = True, claimed: bool = False, revision: str = REV,
        phase: str = "Running") -> PodInfo:  # fmt: skip
    created = (NOW - timedelta(seconds=age)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return PodInfo(
        namespace="ns", name=name, uid=name, resource_version="1", created=created, pool="p", revision=revision,
        batchsandbox="bs" if claimed else None, index=0 if claimed else None, owner_uid="o", phase=phase,
        reason=None, ready=ready, ip="10.0.0.1", node="n", deleting=False, main_exit_code=None,
        entrypoint_applied=False,
    )  # fmt: skip


def plan(pods: list[PodInfo], s: PoolSpec | None = None, wanted: int = 0, reserved: set[str] | None = None) -> PoolPlan:
    return plan_pool(s or spec(), REV, pods, reserved or set(), wanted, NOW, deadline=300)


def deleted(p: PoolPlan) -> dict[str, str]:
    return {pod.name: why for pod, why in p.delete}


def test_an_empty_pool_fills_to_min_buffer() -> None:
    result = plan([])
    assert (result.create, result.delete) == (2, [])


def test_starting_pods_count_toward_the_buffer() -> None:
    assert plan([pod("a"), pod("b", ready=False, age=1)]).create == 0


def test_surplus_idle_pods_go_oldest_first_and_claimed_pods_never() -> None:
    pods = [pod(f"i{n}", age=100 - n) for n in range(7)] + [pod(f"c{n}", claimed=True, age=500) for n in range(3)]
    result = plan(pods)
    assert deleted(result) == {"i0": "surplus", "i1": "surplus"}
    assert result.create == 0


def test_demand_is_made_beyond_max_buffer_but_never_beyond_capacity() -> None:
    assert plan([], spec(2, 5, 10), wanted=6).create == 8
    assert plan([], spec(2, 5, 10), wanted=20).create == 10
    full = [pod(f"c{n}", claimed=True) for n in range(9)]
    assert plan(full, spec(2, 5, 10), wanted=3).create == 1


def test_idle_pods_kept_for_waiting_sandboxes_are_not_surplus() -> None:
    pods = [pod(f"i{n}") for n in range(8)]
    assert deleted(plan(pods, spec(2, 5, 10), wanted=8)) == {}


def test_pods_being_claimed_satisfy_demand_and_postpone_the_refill() -> None:
    pods = [pod("a"), pod("b")]
    result = plan(pods, wanted=2, reserved={"ns/a", "ns/b"})
    assert result.postponed and result.create == 0
    after = plan([pod("a", claimed=True), pod("b", claimed=True)], wanted=0)
    assert after.create == 2 and not after.postponed


def test_broken_and_stuck_idle_pods_are_replaced() -> None:
    pods = [pod("failed", phase="Failed", ready=False), pod("stuck", ready=False, age=301),
            pod("young", ready=False, age=10), pod("ok")]  # fmt: skip
    result = plan(pods)
    assert deleted(result) == {"failed": "broken", "stuck": "broken"}
    assert [p.name for p in result.starting] == ["young"]
    assert result.create == 0  # "young" and "ok" fill the buffer of 2


def test_a_new_revision_rolls_idle_pods_without_dropping_availability() -> None:
    old = [pod("o1", revision="r0"), pod("o2", revision="r0")]
    first = plan(old)
    assert first.create == 2 and deleted(first) == {}, "old Ready pods stay until replacements are Ready"
    second = plan([*old, pod("n1"), pod("n2")])
    assert deleted(second) == {"o1": "rolled", "o2": "rolled"}
    assert deleted(plan([pod("o3", revision="r0", ready=False, age=5)])) == {"o3": "rolled"}


def test_a_full_pool_makes_room_for_the_new_revision() -> None:
    old = [pod(f"o{n}", revision="r0") for n in range(2)] + [pod(f"c{n}", claimed=True) for n in range(8)]
    result = plan(old, spec(2, 5, 10))
    assert result.create == 2 and set(deleted(result)) == {"o0", "o1"}


def test_lowered_capacity_sheds_idle_pods() -> None:
    pods = [pod(f"i{n}", age=100 - n) for n in range(4)] + [pod(f"c{n}", claimed=True) for n in range(4)]
    result = plan(pods, spec(0, 4, 6))
    assert deleted(result) == {"i0": "over capacity", "i1": "over capacity"}


def test_pods_made_for_demand_on_top_of_min_buffer_are_not_surplus() -> None:
    # min = max = 3 with 3 sandboxes waiting: the 6 pods (3 not Ready yet) stay; deleting 3 would
    # make the next pass create them again, for ever.
    pods = [pod(f"i{n}", ready=n < 3, age=10 - n) for n in range(6)]
    result = plan(pods, spec(3, 3, 6), wanted=3)
    assert (result.create, result.delete) == (0, [])


def with_strategies(s: PoolSpec, scale: int | str | None = None, update: int | str | None = None) -> PoolSpec:
    raw = s.model_dump(mode="json", exclude_none=True)
    if scale is not None:
        raw["scaleStrategy"] = {"maxUnavailable": scale}
    if update is not None:
        raw["updateStrategy"] = {"maxUnavailable": update}
    return PoolSpec.model_validate(raw)


def test_scale_strategy_caps_pods_starting_at_once() -> None:
    big = with_strategies(spec(1000, 1000, 1000), scale="10%")
    assert plan([], big).create == 100
    assert plan([pod(f"s{n}", ready=False, age=1) for n in range(60)], big).create == 40
    assert plan([], with_strategies(spec(10, 10, 10), scale=3)).create == 3


def test_a_full_pool_rolls_without_dropping_below_its_update_budget() -> None:
    """A pool at capacity makes room for the new revision only while at most maxUnavailable of the
    wanted Ready pods are missing: 10,000 pods roll in steps, never all at once."""
    full = with_strategies(spec(100, 100, 100), update="10%")
    old = [pod(f"o{n}", revision="r0") for n in range(100)]
    first = plan(old, full)
    assert (first.create, len(deleted(first))) == (10, 10)
    starting = old[10:] + [pod(f"n{n}", ready=False, age=1) for n in range(10)]
    assert plan(starting, full).create == 0 and deleted(plan(starting, full)) == {}, "wait for the new ones"
    ready = old[10:] + [pod(f"n{n}") for n in range(10)]
    assert (plan(ready, full).create, len(deleted(plan(ready, full)))) == (10, 10)


def test_evicted_idle_pods_go_and_allocated_ones_stay() -> None:
    from dataclasses import replace

    idle = replace(pod("idle"), evicting=True)
    used = replace(pod("used", claimed=True), evicting=True)
    result = plan([idle, used, pod("a"), pod("b")])
    assert deleted(result) == {"idle": "evicted"}


def test_pods_a_ledger_names_are_allocated_even_before_their_label() -> None:
    pods = [pod(f"i{n}") for n in range(7)]
    result = plan_pool(spec(), REV, pods, set(), 0, NOW, deadline=300, allocated=frozenset({"ns/i0", "ns/i1"}))
    assert [p.name for p in result.claimed] == ["i0", "i1"]
    assert set(deleted(result)).isdisjoint({"i0", "i1"}), "allocated pods are never surplus"
