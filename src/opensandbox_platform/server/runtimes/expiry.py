"""Expiry for runtimes that enforce it themselves (local, docker; kubernetes leaves it to the controller).

One task sleeps until the earliest deadline, or until `wake()` says a deadline was added or moved,
then deletes what is due. The deletion runs under the sandbox's lock and only if the sandbox is
still due then (a renew may have won the lock first). A delete that fails is retried a few seconds
later, not in a tight loop and not never.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager

from opensandbox_platform.daemon import times

log = logging.getLogger("opensandbox.expiry")

RETRY_SECONDS = 5.0


class ExpirySweeper:
    """Deletes sandboxes whose expiry has passed.

    `sandbox_ids()` names the sandboxes, `expiry_of(id)` gives one's deadline (None: none, or gone),
    `lock_of(id)` the lock its writes take, and `delete(id)` removes it.
    """

    def __init__(
        self,
        *,
        sandbox_ids: Callable[[], Iterable[str]],
        expiry_of: Callable[[str], dt.datetime | None],
        lock_of: Callable[[str], AbstractAsyncContextManager[object]],
        delete: Callable[[str], Awaitable[None]],
        retry_seconds: float = RETRY_SECONDS,
    ) -> None:
        self._sandbox_ids = sandbox_ids
        self._expiry_of = expiry_of
        self._lock_of = lock_of
        self._delete = delete
        self._retry = dt.timedelta(seconds=retry_seconds)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="expiry-sweep")

    def wake(self) -> None:
        """A deadline was added or moved: look again."""
        self._wake.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            next_due = await self.sweep()
            delay = None if next_due is None else max((next_due - times.now()).total_seconds(), 0.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def sweep(self) -> dt.datetime | None:
        """Delete what is due now; the next deadline (a failed delete's retry included), if any."""
        now = times.now()
        next_due: dt.datetime | None = None
        for sandbox_id in list(self._sandbox_ids()):
            due = self._expiry_of(sandbox_id)
            if due is None:
                continue
            if due <= now and not await self._expire(sandbox_id):
                due = now + self._retry
            if due > now and (next_due is None or due < next_due):
                next_due = due
        return next_due

    async def _expire(self, sandbox_id: str) -> bool:
        """Delete the sandbox if it is still due under its lock; False when the delete failed."""
        try:
            async with self._lock_of(sandbox_id):
                due = self._expiry_of(sandbox_id)
                if due is not None and due <= times.now():
                    log.info("sandbox expired id=%s", sandbox_id)
                    await self._delete(sandbox_id)
        except Exception:
            log.exception("expiry failed id=%s", sandbox_id)
            return False
        return True
