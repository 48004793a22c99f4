"""The allocator's failure handling, on a real cache fed by hand and a scripted API: a ledger write
with an unknown outcome, a BatchSandbox deleted before its pods were labelled, and one that left its
Pool (the server's pause of a pooled sandbox)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from opensandbox_platform.api import labels
from opensandbox_platform.api.crds import PoolSpec
from opensandbox_platform.controller.allocation import read_ledger
from opensandbox_platform.controller.allocator import Allocator, UnknownOutcome
from opensandbox_platform.controller.batchsandbox import LEAVING_RECHECK, BatchSandboxReconciler
from opensandbox_platform.controller.inflight import InFlight
from opensandbox_platform.controller.manager import Manager, Options
from opensandbox_platform.controller.pods import pool_revision
from opensandbox_platform.controller.pool import demand

POOL_SPEC = {"minBufferSize": 2, "maxBufferSize": 4, "capacity": 4, "sandboxTemplate": {"spec": {"image": "i"}}}
REVISION = pool_revision(PoolSpec.model_validate(POOL_SPEC))


class ScriptedApi:
    """What the allocator calls: status patches (answered, or failing as scripted) and GETs."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.fail_next_patch: BaseException | None = None
        self.version = 100
        self.deleted: list[str] = []

    async def patch(self, res: Any, name: str, patch: dict[str, Any], namespace: str, sub: str | None = None) -> Any:
        obj = self.objects[f"{namespace}/{name}"]
        assert patch["metadata"]["resourceVersion"] == obj["metadata"]["resourceVersion"]
        self.version += 1
        obj["status"] = patch["status"]
        obj["metadata"]["resourceVersion"] = str(self.version)
        if self.fail_next_patch is not None:  # the write landed, but the answer is lost
            failure, self.fail_next_patch = self.fail_next_patch, None
            raise failure
        return copy.deepcopy(obj)

    async def get(self, res: Any, name: str, namespace: str) -> Any:
        return copy.deepcopy(self.objects[f"{namespace}/{name}"])

    async def create(self, res: Any, obj: Any, namespace: str | None = None) -> Any:  # Events
        return obj

    async def delete(self, res: Any, name: str, *args: Any, **kwargs: Any) -> None:
        self.deleted.append(name)


def pod(name: str) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "ns", "name": name, "uid": f"uid-{name}", "resourceVersion": "1",
                     "creationTimestamp": f"2026-01-01T00:00:0{name[-1]}Z",
                     "labels": {labels.POOL: "p", labels.POOL_REVISION: REVISION}},
        "spec": {"nodeName": "n"},
        "status": {"phase": "Running", "podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
    }  # fmt: skip


def batchsandbox(name: str, version: int) -> dict[str, Any]:
    return {
        "apiVersion": labels.API_VERSION,
        "kind": "BatchSandbox",
        "metadata": {"namespace": "ns", "name": name, "uid": f"uid-{name}", "resourceVersion": str(version),
                     "creationTimestamp": f"2026-01-01T00:01:0{version % 10}Z"},
        "spec": {"replicas": 2, "poolRef": "p"},
    }  # fmt: skip


@pytest.fixture
def setup() -> tuple[Manager, ScriptedApi, Allocator, InFlight]:
    api = ScriptedApi()
    manager = Manager(api, Options(namespace="ns"))  # type: ignore[arg-type]
    inflight = InFlight()
    allocator = Allocator(manager, inflight)
    allocator.setup()
    manager.cache.pools.assume({"metadata": {"namespace": "ns", "name": "p", "uid": "up", "resourceVersion": "1"},
                                "spec": POOL_SPEC})  # fmt: skip
    for n in range(4):
        manager.cache.pods.assume(pod(f"pod{n}"))
    return manager, api, allocator, inflight


def add(manager: Manager, api: ScriptedApi, obj: dict[str, Any]) -> None:
    api.objects[f"ns/{obj['metadata']['name']}"] = obj
    manager.cache.batchsandboxes.assume(copy.deepcopy(obj))


async def test_an_unknown_outcome_stops_the_pool_until_a_fresh_read(setup: Any) -> None:
    manager, api, allocator, inflight = setup
    add(manager, api, batchsandbox("first", 10))
    api.fail_next_patch = TimeoutError("no answer")
    with pytest.raises(UnknownOutcome):
        await allocator.reconcile("ns/p")
    assert inflight.uncertain["ns/p"] == {"ns/first"}
    assert read_ledger(manager.cache.batchsandboxes.get("ns/first").raw) == {}, "the cache does not know yet"

    add(manager, api, batchsandbox("second", 20))
    await allocator.reconcile("ns/p")  # reads "first" again before allocating anything
    first = {a.pod_uid for a in read_ledger(manager.cache.batchsandboxes.get("ns/first").raw).values()}
    second = {a.pod_uid for a in read_ledger(manager.cache.batchsandboxes.get("ns/second").raw).values()}
    assert len(first) == 2 and len(second) == 2 and not first & second
    assert not inflight.uncertain.get("ns/p")


async def test_a_deleted_batchsandboxs_unlabelled_pods_are_never_free(setup: Any) -> None:
    manager, api, allocator, inflight = setup
    BatchSandboxReconciler(manager, inflight).setup()
    add(manager, api, batchsandbox("gone", 10))
    await allocator.reconcile("ns/p")
    held = {a.pod_name for a in read_ledger(manager.cache.batchsandboxes.get("ns/gone").raw).values()}
    manager.cache.batchsandboxes._remove("ns/gone")  # deleted before its pods got their claim labels
    assert {k.split("/")[1] for k in inflight.doomed} == held
    add(manager, api, batchsandbox("next", 20))
    await allocator.reconcile("ns/p")
    taken = {a.pod_name for a in read_ledger(manager.cache.batchsandboxes.get("ns/next").raw).values()}
    assert taken and not taken & held


async def test_a_batchsandbox_that_left_its_pool_deletes_its_pods_and_none_is_handed_out_meanwhile(
    setup: Any,
) -> None:
    manager, api, allocator, inflight = setup
    reconciler = BatchSandboxReconciler(manager, inflight)
    reconciler.setup()
    add(manager, api, batchsandbox("paused", 10))
    await allocator.reconcile("ns/p")
    bs = api.objects["ns/paused"]
    held = {a.pod_name for a in read_ledger(bs).values()}
    # The server's pause: poolRef removed with replicas 0 (its pods not labelled yet: the worst case).
    bs["spec"] = {"replicas": 0, "sandboxTemplate": {"spec": {"image": "snapshot"}}}
    api.version += 1
    bs["metadata"]["resourceVersion"] = str(api.version)
    manager.cache.batchsandboxes.assume(copy.deepcopy(bs))

    assert demand(manager, "ns/p")[1] >= {f"ns/{n}" for n in held}, "the Pool counts them allocated, not idle"
    add(manager, api, batchsandbox("greedy", 40) | {"spec": {"replicas": 4, "poolRef": "p"}})
    await allocator.reconcile("ns/p")
    taken = {a.pod_name for a in read_ledger(api.objects["ns/greedy"]).values()}
    assert len(taken) == 2 and not taken & held, "a departing BatchSandbox's pods are never free"

    assert await reconciler.reconcile("ns/paused") == LEAVING_RECHECK
    assert set(api.deleted) == held
    assert read_ledger(manager.cache.batchsandboxes.get("ns/paused").raw), "its ledger stays until they are deleting"
    await allocator.reconcile("ns/p")
    assert {a.pod_name for a in read_ledger(api.objects["ns/greedy"]).values()} == taken

    for name in held:  # the watch delivers the deletions
        deleting = pod(name)
        deleting["metadata"] |= {"deletionTimestamp": "2026-01-01T00:02:00Z", "resourceVersion": "2"}
        manager.cache.pods.assume(deleting)
    await reconciler.reconcile("ns/paused")
    written = manager.cache.batchsandboxes.get("ns/paused").raw
    assert written["status"]["phase"] == "Paused" and read_ledger(written) == {}
