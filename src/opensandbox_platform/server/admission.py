"""Admission control for creates: a bounded number in flight, a short queue, then a clean refusal.

150 concurrent creates on the local runtime once ended as 137 x 500 after ~33 s: every cold start
competed for the same two CPUs and all hit the start timeout together. Now at most `concurrency`
creates run at once; up to `queue_size` more wait in order, each at most `queue_timeout` seconds;
past that a create is refused at once with 429 (queue full) or, after its wait, 503 (no slot in
time), both `{code, message}` with `Retry-After` (an estimate from recent create durations). A
client that goes away while its create waits leaves the queue without creating anything.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import os
import time
from collections.abc import AsyncIterator

from opensandbox_platform.server import metrics
from opensandbox_platform.server.errors import ApiError

TOO_MANY_CREATES = "SANDBOX::TOO_MANY_CREATES"
SERVER_BUSY = "SANDBOX::SERVER_BUSY"
KUBERNETES_CONCURRENCY = 256  # creates there wait on the API server and the controller, not on this host's CPU
MAX_RETRY_AFTER = 60


def default_concurrency(runtime_type: str) -> int:
    """Creates in flight when `server.createConcurrency` is 0: a cold start on local is CPU-bound in
    this host's Python (one per CPU); on docker most of a create is the engine's work, in its own
    process (two per CPU, at least 4); on kubernetes it is the API server's and the controller's."""
    cpus = max(os.cpu_count() or 1, 1)
    if runtime_type == "kubernetes":
        return KUBERNETES_CONCURRENCY
    if runtime_type == "docker":
        return max(2 * cpus, 4)
    return cpus


class ClientGone(Exception):
    """The client disconnected while its create waited for a slot."""


class Admission:
    def __init__(self, concurrency: int, queue_size: int, queue_timeout: float) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.concurrency = concurrency
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.running = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._average = 1.0  # seconds per create, smoothed
        self.refused = 0

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the work ahead spread over the slots."""
        ahead = self.running + self.waiting
        return min(max(math.ceil(self._average * ahead / self.concurrency), 1), MAX_RETRY_AFTER)

    @contextlib.asynccontextmanager
    async def slot(self, client_gone: asyncio.Future[None] | None = None) -> AsyncIterator[None]:
        """Hold one of the slots for the block; raises ApiError (429/503) or ClientGone instead."""
        await self._acquire(client_gone)
        started = time.monotonic()
        try:
            yield
        finally:
            self._average = 0.8 * self._average + 0.2 * (time.monotonic() - started)
            self._release()

    async def _acquire(self, client_gone: asyncio.Future[None] | None) -> None:
        if self.running < self.concurrency and not self.waiting:
            self.running += 1
            return
        if self.waiting >= self.queue_size:
            self.refused += 1
            metrics.CREATES_SHED.labels("queue_full").inc()
            raise ApiError(
                429,
                TOO_MANY_CREATES,
                f"{self.running} creates are running and {self.waiting} waiting (the limit); retry later",
                {"Retry-After": str(self.retry_after())},
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        watched: set[asyncio.Future[None]] = {waiter} if client_gone is None else {waiter, client_gone}
        metrics.CREATES_QUEUED.inc()
        queued_at = time.monotonic()
        try:
            await asyncio.wait(watched, timeout=self.queue_timeout, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            self._abandon(waiter)
            raise
        finally:
            metrics.CREATE_QUEUE_WAIT.observe(time.monotonic() - queued_at)
        if client_gone is not None and client_gone.done():
            self._abandon(waiter)
            raise ClientGone
        if waiter.done() and not waiter.cancelled():
            return  # the slot was handed over by _release: running already counts it
        self._abandon(waiter)
        self.refused += 1
        metrics.CREATES_SHED.labels("queue_timeout").inc()
        raise ApiError(
            503,
            SERVER_BUSY,
            f"no create slot within {self.queue_timeout:g}s ({self.running} running, {self.waiting} waiting)",
            {"Retry-After": str(self.retry_after())},
        )

    def _abandon(self, waiter: asyncio.Future[None]) -> None:
        """Leave the queue; a slot handed over in the meantime goes to the next waiter."""
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
        if waiter.done() and not waiter.cancelled():
            self._release()
        else:
            waiter.cancel()

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to it: running stays the same
                return
        self.running -= 1
