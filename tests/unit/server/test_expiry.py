"""The expiry sweeper of the local and docker runtimes, against an in-memory set of sandboxes."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable

from opensandbox_platform.daemon import times
from opensandbox_platform.server.runtimes.expiry import ExpirySweeper


class FakeSandboxes:
    """Deadlines and locks by id; `failures` deletes of an id fail before one succeeds."""

    def __init__(self) -> None:
        self.expiries: dict[str, dt.datetime | None] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.deleted: list[str] = []
        self.attempts: list[str] = []
        self.failures: dict[str, int] = {}
        self.changed = asyncio.Event()  # a delete was attempted

    def add(self, sandbox_id: str, in_seconds: float | None) -> None:
        self.expiries[sandbox_id] = None if in_seconds is None else soon(in_seconds)
        self.locks[sandbox_id] = asyncio.Lock()

    async def delete(self, sandbox_id: str) -> None:
        self.attempts.append(sandbox_id)
        self.changed.set()
        if self.failures.get(sandbox_id, 0) > 0:
            self.failures[sandbox_id] -= 1
            raise RuntimeError("the engine said no")
        del self.expiries[sandbox_id]
        self.deleted.append(sandbox_id)

    async def until(self, condition: Callable[[], bool], timeout: float = 2.0) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                self.changed.clear()
                await self.changed.wait()

    def sweeper(self, retry_seconds: float = 5.0) -> ExpirySweeper:
        return ExpirySweeper(
            sandbox_ids=lambda: list(self.expiries),
            expiry_of=self.expiries.get,
            lock_of=lambda sandbox_id: self.locks[sandbox_id],
            delete=self.delete,
            retry_seconds=retry_seconds,
        )


def soon(seconds: float) -> dt.datetime:
    return times.now() + dt.timedelta(seconds=seconds)


async def test_due_sandboxes_are_deleted_and_the_others_kept() -> None:
    sandboxes = FakeSandboxes()
    sandboxes.add("past", -1)
    sandboxes.add("soon", 0.1)
    sandboxes.add("later", 3600)
    sandboxes.add("never", None)
    sweeper = sandboxes.sweeper()
    sweeper.start()
    try:
        await sandboxes.until(lambda: sandboxes.deleted == ["past", "soon"])
        assert set(sandboxes.expiries) == {"later", "never"}
    finally:
        await sweeper.close()


async def test_a_new_or_renewed_deadline_wakes_the_sweeper() -> None:
    sandboxes = FakeSandboxes()
    sandboxes.add("long", 3600)
    sweeper = sandboxes.sweeper()
    sweeper.start()
    try:
        await asyncio.sleep(0.05)  # asleep until the hour is up
        sandboxes.expiries["long"] = soon(0.05)  # a renew to sooner
        sweeper.wake()
        await sandboxes.until(lambda: sandboxes.deleted == ["long"])
        sandboxes.add("new", 0.05)  # a create
        sweeper.wake()
        await sandboxes.until(lambda: sandboxes.deleted == ["long", "new"])
    finally:
        await sweeper.close()


async def test_a_renew_that_wins_the_lock_keeps_the_sandbox() -> None:
    sandboxes = FakeSandboxes()
    sandboxes.add("renewed", -1)
    sweeper = sandboxes.sweeper()
    async with sandboxes.locks["renewed"]:
        sweep = asyncio.create_task(sweeper.sweep())
        await asyncio.sleep(0.05)  # the sweep waits for the lock
        sandboxes.expiries["renewed"] = soon(3600)
    await sweep
    assert sandboxes.attempts == [] and "renewed" in sandboxes.expiries


async def test_a_failed_delete_is_retried_after_retry_seconds() -> None:
    sandboxes = FakeSandboxes()
    sandboxes.add("stuck", -1)
    sandboxes.failures["stuck"] = 2
    sweeper = sandboxes.sweeper(retry_seconds=0.1)
    started = asyncio.get_running_loop().time()
    sweeper.start()
    try:
        await sandboxes.until(lambda: sandboxes.deleted == ["stuck"])
        assert sandboxes.attempts == ["stuck"] * 3 and sandboxes.deleted == ["stuck"]
        assert asyncio.get_running_loop().time() - started >= 0.2  # two retries, not a tight loop
    finally:
        await sweeper.close()


async def test_a_failed_delete_schedules_its_retry_as_the_next_deadline() -> None:
    sandboxes = FakeSandboxes()
    sandboxes.add("stuck", -1)
    sandboxes.add("later", 3600)
    sandboxes.failures["stuck"] = 1
    before = times.now()
    next_due = await sandboxes.sweeper(retry_seconds=5).sweep()
    assert next_due is not None and 4 <= (next_due - before).total_seconds() <= 6


async def test_closing_stops_the_sweeper() -> None:
    sandboxes = FakeSandboxes()
    sandboxes.add("later", 0.2)
    sweeper = sandboxes.sweeper()
    sweeper.start()
    await asyncio.sleep(0.05)
    await sweeper.close()
    await asyncio.sleep(0.3)
    assert sandboxes.attempts == []
    await sweeper.close()  # twice is fine
