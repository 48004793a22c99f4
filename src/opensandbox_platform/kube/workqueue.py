"""A work queue of keys, as controllers use it (client-go semantics, asyncio); kube/controller.py
runs the workers that take keys from it.

- A key added many times before a worker takes it is processed once (dedup).
- A key is never processed by two workers at once: one added while in progress is queued again
  when the worker is done (per-key serialization).
- Failures retry with a capped exponential backoff: milliseconds to a few seconds, never minutes,
  so status never lags far behind reality.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from prometheus_client import Counter, Gauge, Histogram

DEPTH = Gauge("workqueue_depth", "Current depth of the work queue.", ["name"])
ADDS = Counter("workqueue_adds_total", "Keys added to the work queue.", ["name"])
RETRIES = Counter("workqueue_retries_total", "Keys retried after a failure.", ["name"])
QUEUE_DURATION = Histogram(
    "workqueue_queue_duration_seconds",
    "Time a key waits in the queue before a worker takes it.",
    ["name"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
WORK_DURATION = Histogram(
    "workqueue_work_duration_seconds",
    "Time a worker spends on one key.",
    ["name"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


class WorkQueue:
    def __init__(self, name: str, *, base_delay: float = 0.005, max_delay: float = 2.0) -> None:
        self.name = name
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._queue: deque[str] = deque()
        self._dirty: dict[str, float] = {}  # key -> time it was queued
        self._processing: dict[str, float] = {}  # key -> when a worker took it
        self._failures: dict[str, int] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._depth = DEPTH.labels(name)
        self._adds = ADDS.labels(name)

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, key: str) -> None:
        if key in self._dirty:
            return
        self._adds.inc()
        self._dirty[key] = time.monotonic()
        if key not in self._processing:
            self._queue.append(key)
            self._depth.set(len(self._queue))
            self._wake()

    def add_after(self, key: str, delay: float) -> None:
        """Add `key` in `delay` seconds; an earlier pending timer for the key wins."""
        if delay <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        timer = self._timers.get(key)
        if timer is not None and not timer.cancelled() and timer.when() <= due:
            return
        if timer is not None:
            timer.cancel()
        self._timers[key] = loop.call_at(due, self._fire, key)

    def _fire(self, key: str) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def retry(self, key: str) -> float:
        """Requeue after a failure with capped exponential backoff; returns the delay."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        delay: float = min(self.base_delay * 2.0**failures, self.max_delay)
        RETRIES.labels(self.name).inc()
        self.add_after(key, delay)
        return delay

    def forget(self, key: str) -> None:
        self._failures.pop(key, None)

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def get(self) -> str:
        while not self._queue:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        key = self._queue.popleft()
        self._depth.set(len(self._queue))
        queued_at = self._dirty.pop(key)
        QUEUE_DURATION.labels(self.name).observe(time.monotonic() - queued_at)
        self._processing[key] = time.monotonic()
        return key

    def done(self, key: str) -> None:
        started = self._processing.pop(key, None)
        if started is not None:
            WORK_DURATION.labels(self.name).observe(time.monotonic() - started)
        if key in self._dirty:  # added again while it was being processed
            self._queue.append(key)
            self._depth.set(len(self._queue))
            self._wake()
