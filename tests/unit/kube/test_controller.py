"""The controller's workers: one key never twice at once, failures retried with backoff."""

from __future__ import annotations

import asyncio

from opensandbox_platform.kube.controller import Controller, Reconcile
from opensandbox_platform.kube.workqueue import WorkQueue


class Recording(Controller):
    """A controller that also keeps each outcome."""

    def __init__(self, name: str, reconcile: Reconcile, workers: int, queue: WorkQueue, results: list[str]) -> None:
        super().__init__(name, reconcile, workers, queue)
        self.results = results

    def _record(self, key: str, result: str, seconds: float) -> None:
        super()._record(key, result, seconds)
        self.results.append(result)


async def test_workers_never_run_one_key_concurrently() -> None:
    queue = WorkQueue("t-workers")
    running: set[str] = set()
    overlaps = 0
    seen = 0

    async def reconcile(key: str) -> float | None:
        nonlocal overlaps, seen
        if key in running:
            overlaps += 1
        running.add(key)
        await asyncio.sleep(0.001)
        running.discard(key)
        seen += 1
        return None

    workers = asyncio.create_task(Controller("t-workers", reconcile, 8, queue).run())
    for i in range(200):
        queue.add(f"k{i % 5}")
        if i % 10 == 0:
            await asyncio.sleep(0.002)
    await asyncio.sleep(0.1)
    workers.cancel()
    assert overlaps == 0
    assert seen >= 5


async def test_a_failing_reconcile_is_retried_until_it_succeeds() -> None:
    queue = WorkQueue("t-retry", base_delay=0.001)
    attempts = 0
    results: list[str] = []

    async def reconcile(key: str) -> float | None:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise RuntimeError("conflict")
        return None

    workers = asyncio.create_task(Recording("t-retry", reconcile, 1, queue, results).run())
    queue.add("k")
    for _ in range(100):
        if results[-1:] == ["success"]:
            break
        await asyncio.sleep(0.005)
    workers.cancel()
    assert results == ["error", "error", "success"]
