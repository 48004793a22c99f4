"""A warning, with the event loop thread's stack, when the server's event loop stops turning.

Every request, every forwarded connection of a local sandbox and every proxied byte is served by
one event loop: a call that blocks it (a slow disk under `rmtree`, a synchronous engine call) makes
every client wait, and from the outside it looks like a hung sandbox. The loop beats a heartbeat
every `BEAT` seconds; a thread of its own checks it and, once the heartbeat is older than
`threshold`, logs where the loop's thread is (once per stall), and how long the stall lasted when
it ends. The cost is one timer callback per `BEAT` on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback

log = logging.getLogger("opensandbox.server.stall")

BEAT = 0.25


class StallWatch:
    def __init__(self, threshold: float = 2.0) -> None:
        self.threshold = threshold
        self._beat = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop_thread_id = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread_id = threading.get_ident()
        self._tick()
        self._thread = threading.Thread(target=self._watch, name="stall-watch", daemon=True)
        self._thread.start()

    def _tick(self) -> None:
        self._beat = time.monotonic()
        assert self._loop is not None
        self._handle = self._loop.call_later(BEAT, self._tick)

    def _watch(self) -> None:
        stalled_since: float | None = None
        while not self._stop.wait(BEAT):
            late = time.monotonic() - self._beat
            if late > self.threshold and stalled_since is None:
                stalled_since = self._beat
                log.warning("event loop blocked for %.1f s; it is at:\n%s", late, self._loop_stack())
            elif late <= self.threshold and stalled_since is not None:
                log.warning("event loop turned again after %.1f s", self._beat - stalled_since)
                stalled_since = None

    def _loop_stack(self) -> str:
        frame = sys._current_frames().get(self._loop_thread_id)
        return "".join(traceback.format_stack(frame)) if frame is not None else "(unknown)"

    def close(self) -> None:
        self._stop.set()
        if self._handle is not None:
            self._handle.cancel()
        if self._thread is not None:
            self._thread.join(timeout=1)
