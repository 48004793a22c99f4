"""The Pool reconciler when the API server's connection fails mid-creation (a fault-injecting client):
nothing it expected stays expected, so the pool does not stop refilling."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from opensandbox_platform.controller.inflight import InFlight
from opensandbox_platform.controller.manager import Manager, Options
from opensandbox_platform.controller.pool import PoolReconciler
from opensandbox_platform.kube.client import KubeError

POOL = {
    "apiVersion": "sandbox.opensandbox.io/v1alpha1",
    "kind": "Pool",
    "metadata": {"namespace": "ns", "name": "p", "uid": "up", "resourceVersion": "1", "generation": 1},
    "spec": {"minBufferSize": 3, "maxBufferSize": 3, "capacity": 5, "sandboxTemplate": {"spec": {"image": "i"}}},
}


class FlakyApi:
    """Pod creations fail with `failure` while it is set; everything else answers."""

    def __init__(self) -> None:
        self.failure: BaseException | None = None
        self.created: list[str] = []

    async def create(self, res: Any, obj: Any, namespace: str | None = None) -> Any:
        if obj.get("kind") == "Pod":
            if self.failure is not None:
                raise self.failure
            self.created.append(obj["metadata"]["name"])
        return obj

    async def patch(self, res: Any, name: str, patch: Any, namespace: str, sub: str | None = None) -> Any:
        return {**POOL, "status": patch["status"]}


@pytest.fixture
def pools() -> tuple[PoolReconciler, FlakyApi]:
    api = FlakyApi()
    manager = Manager(api, Options(namespace="ns"))  # type: ignore[arg-type]
    reconciler = PoolReconciler(manager, InFlight())
    reconciler.setup()
    manager.cache.pools.assume(dict(POOL))
    return reconciler, api


@pytest.mark.parametrize(
    "failure",
    [aiohttp.ClientConnectionError("connection reset"), TimeoutError(), KubeError(503, "ServiceUnavailable", "")],
    ids=["connection", "timeout", "503"],
)
async def test_a_failed_connection_leaves_no_expectation_behind(pools: Any, failure: BaseException) -> None:
    reconciler, api = pools
    api.failure = failure
    with pytest.raises(type(failure)):
        await reconciler.reconcile("ns/p")  # retried by the work queue with backoff
    assert reconciler.creating.wait("ns/p") is None, "an expectation leaked: the pool would stall"
    api.failure = None
    await reconciler.reconcile("ns/p")
    assert len(api.created) == 3, "the next pass creates the buffer"


async def test_a_refused_template_is_reported_not_retried_as_an_outage(pools: Any) -> None:
    reconciler, api = pools
    api.failure = KubeError(422, "Invalid", "quantities must match the regular expression")
    with pytest.raises(Exception, match="quantities must match"):
        await reconciler.reconcile("ns/p")
    assert reconciler.creating.wait("ns/p") is None
