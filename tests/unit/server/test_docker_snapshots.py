"""The docker snapshot's size check (runtimes/docker_snapshots.py) against a fake engine: nothing is
committed that was not measured and found within the bound, and the container is always let go."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from opensandbox_platform.server.runtimes.base import Held, SnapshotState
from opensandbox_platform.server.runtimes.docker_snapshots import DockerSnapshots

LIMIT = 256 << 20


class FakeContainer:
    def __init__(self, size: object) -> None:
        self.size = size
        self.calls: list[str] = []

    async def pause(self) -> None:
        self.calls.append("pause")

    async def unpause(self) -> None:
        self.calls.append("unpause")

    async def show(self, **params: Any) -> dict[str, Any]:
        self.calls.append(f"show size={params.get('size')}")
        return {} if self.size is None else {"SizeRw": self.size}

    async def commit(self, **params: Any) -> dict[str, Any]:
        self.calls.append(f"commit pause={params['pause']}")
        return {}


class FakeDocker:
    def __init__(self, container: FakeContainer) -> None:
        self.containers = self
        self._container = container

    def container(self, container_id: str) -> FakeContainer:
        return self._container


@pytest.mark.parametrize(
    ("size", "state", "reason", "committed"),
    [
        (LIMIT, SnapshotState.CREATING, "snapshot_accepted", True),  # committed: Ready once its image is listed
        (LIMIT + 1, SnapshotState.FAILED, "snapshot_too_large", False),
        (64 << 30, SnapshotState.FAILED, "snapshot_too_large", False),
        (None, SnapshotState.FAILED, "snapshot_capture_failed", False),  # not measured: not committed
        ("big", SnapshotState.FAILED, "snapshot_capture_failed", False),
    ],
)
def test_only_a_measured_layer_within_the_bound_is_committed(
    size: object, state: str, reason: str, committed: bool
) -> None:
    container = FakeContainer(size)
    snapshots = DockerSnapshots(lambda: FakeDocker(container), LIMIT)  # type: ignore[arg-type, return-value]

    async def scenario() -> None:
        record = snapshots.begin("c1", "sb", None, Held("img", ["sleep"]), asyncio.Lock())
        await snapshots.close()
        assert (record.state, record.reason) == (state, reason)

    asyncio.run(scenario())
    assert container.calls[:2] == ["pause", "show size=true"]
    assert ("commit pause=False" in container.calls) == committed
    assert container.calls[-1] == "unpause"  # let go in every case
