"""A controller: a named work queue, its workers and their metrics (controller-runtime's Controller).

Reconcilers declare what wakes them (informer handlers that add keys to the queue, see each
reconciler's `setup`); the controller runs `reconcile(key)` for queued keys with `workers` at once,
never one key twice at the same time, and records what happened.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from prometheus_client import Counter, Histogram

from opensandbox_platform.kube.workqueue import WorkQueue

log = logging.getLogger(__name__)

# A reconcile returns None (done) or seconds after which to look again; it raises to retry.
Reconcile = Callable[[str], Awaitable[float | None]]

RECONCILE_TOTAL = Counter(
    "controller_runtime_reconcile_total",
    "Reconciliations per controller and result.",
    ["controller", "result"],
)
RECONCILE_ERRORS = Counter("controller_runtime_reconcile_errors_total", "Failed reconciliations.", ["controller"])
RECONCILE_TIME = Histogram(
    "controller_runtime_reconcile_time_seconds",
    "Time per reconciliation.",
    ["controller"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


class Controller:
    def __init__(self, name: str, reconcile: Reconcile, workers: int, queue: WorkQueue | None = None) -> None:
        self.name = name
        self.reconcile = reconcile
        self.workers = max(1, workers)
        self.queue = queue if queue is not None else WorkQueue(name)  # (an empty queue is falsy)

    async def run(self) -> None:
        """Run the workers until cancelled."""
        await asyncio.gather(*(self._worker() for _ in range(self.workers)))

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            start = time.monotonic()
            try:
                requeue_after = await self.reconcile(key)
            except asyncio.CancelledError:
                self.queue.done(key)
                raise
            except Exception as err:
                delay = self.queue.retry(key)
                log.warning("reconcile failed, retrying in %.3fs: %s", delay, err, extra={"key": key})
                log.debug("reconcile failure", exc_info=True)
                result = "error"
            else:
                self.queue.forget(key)
                if requeue_after is not None:
                    self.queue.add_after(key, requeue_after)
                    result = "requeue_after"
                else:
                    result = "success"
            self.queue.done(key)
            self._record(key, result, time.monotonic() - start)

    def _record(self, key: str, result: str, seconds: float) -> None:
        log.debug(
            "reconciled", extra={"controller": self.name, "key": key, "result": result, "ms": round(seconds * 1000, 2)}
        )
        RECONCILE_TOTAL.labels(self.name, result).inc()
        RECONCILE_TIME.labels(self.name).observe(seconds)
        if result == "error":
            RECONCILE_ERRORS.labels(self.name).inc()
