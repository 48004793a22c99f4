import asyncio

import pytest

from opensandbox_platform.kube.workqueue import WorkQueue


async def test_a_key_added_many_times_is_processed_once() -> None:
    queue = WorkQueue("t-dedup")
    for _ in range(5):
        queue.add("ns/a")
    queue.add("ns/b")
    assert len(queue) == 2
    assert await queue.get() == "ns/a"
    assert await queue.get() == "ns/b"


async def test_a_key_added_while_processing_waits_for_done() -> None:
    queue = WorkQueue("t-serial")
    queue.add("k")
    key = await queue.get()
    queue.add("k")  # changed again while a worker holds it
    assert len(queue) == 0, "must not hand the key to a second worker"
    queue.done(key)
    assert len(queue) == 1
    assert await queue.get() == "k"


async def test_failures_back_off_exponentially_with_a_cap() -> None:
    queue = WorkQueue("t-backoff", base_delay=0.01, max_delay=0.05)
    delays = [queue.retry("k") for _ in range(6)]
    assert delays == pytest.approx([0.01, 0.02, 0.04, 0.05, 0.05, 0.05])
    queue.forget("k")
    assert queue.retry("k") == pytest.approx(0.01)


async def test_add_after_fires_once_and_the_earliest_wins() -> None:
    queue = WorkQueue("t-after")
    queue.add_after("k", 0.2)
    queue.add_after("k", 0.02)
    queue.add_after("k", 0.5)
    await asyncio.wait_for(queue.get(), 0.15)
