"""execd's end of the kernel bridge: starts `bridge.py` with the image's Python and speaks its
JSON-lines protocol (documented in bridge.py) over the bridge's stdin and stdout.

Replies are matched to requests by id; a run's events go to that run's queue. If the bridge dies
(killed by sandbox code, out of memory), every pending request and run ends with an error, the
kernels it started are killed by their process groups (they would otherwise outlive it), and the
owner hears of it through `on_exit`: the next request starts a fresh bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from opensandbox_platform.execd import procs

log = logging.getLogger("execd.code")

SOURCE = Path(__file__).with_name("bridge.py")
MAX_LINE = 256 * 1024 * 1024  # a result is bounded by the bridge at 32 MiB; JSON escaping can double it
HELLO_TIMEOUT = 30.0
# Backpressure: a run whose client reads more slowly than its kernel writes has its kernel paused
# (SIGSTOP to its process group) above HIGH bytes of unread events and continued below LOW.
HIGH = 8 * 1024 * 1024
LOW = 2 * 1024 * 1024
# Output already on its way when the kernel stops (one ipykernel flush can hold hundreds of MiB) is
# dropped above this, with a note in the stream: execd's memory stays bounded whatever the code does.
HARD = 32 * 1024 * 1024

Event = dict[str, Any]


class RunQueue:
    """The events of one run, and the kernel's pause/resume around how much of them is unread."""

    def __init__(self, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        self._queue: asyncio.Queue[tuple[Event, int]] = asyncio.Queue()
        self._pause = pause
        self._resume = resume
        self.unread = 0
        self.paused = False
        self.dropped = 0

    def put(self, event: Event, size: int) -> None:
        if event.get("ev") == "stream" and self.unread + size > HARD:
            self.dropped += len(str(event.get("text", "")))
            return
        if self.dropped:
            note = (
                f"[execd: {self.dropped} characters of output dropped: "
                "the client read more slowly than the code wrote]\n"
            )
            self.dropped = 0
            self._queue.put_nowait(({"ev": "stream", "name": "stderr", "text": note}, len(note)))
        self._queue.put_nowait((event, size))
        self.unread += size
        if not self.paused and self.unread > HIGH:
            self.paused = True
            self._pause()

    async def get(self) -> Event:
        event, size = await self._queue.get()
        self.unread -= size
        if self.paused and self.unread < LOW:
            self.paused = False
            self._resume()
        return event


class BridgeError(Exception):
    """The bridge could not do what was asked (its message says why) or is gone."""


class BridgeGone(BridgeError):
    pass


def _write_script(directory: str) -> str:
    """The bridge's source, where the image's Python can run it (execd may be a one-file build)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    script = os.path.join(directory, "kernel_bridge.py")
    Path(script).write_bytes(SOURCE.read_bytes())
    return script


class Bridge:
    def __init__(self, child: procs.Child, stdin: asyncio.WriteTransport, reader: asyncio.StreamReader) -> None:
        self.child = child
        self._stdin = stdin
        self._reader = reader
        self._ids = itertools.count(1)
        self._replies: dict[int, asyncio.Future[Event]] = {}
        self.runs: dict[str, RunQueue] = {}
        self.kernel_pids: dict[str, int] = {}
        self.specs: dict[str, dict[str, Any]] = {}
        self.versions = ""
        self.on_died: Callable[[str, int], None] = lambda kernel, code: None
        self.on_exit: Callable[[], None] = lambda: None
        self.gone = False
        self._hello: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def start(cls, python: str, script_dir: str, env: Mapping[str, str], cwd: str) -> Bridge:
        """Starts the bridge and waits for its hello (the kernelspecs it found)."""
        script = _write_script(script_dir)
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        try:
            child = procs.spawn([python, script], env=env, cwd=cwd, stdin=in_r, stdout=out_w)
        finally:
            os.close(in_r)
            os.close(out_w)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_LINE)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(out_r, "rb", 0))
        stdin, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(in_w, "wb", 0))
        bridge = cls(child, stdin, reader)
        try:
            hello = await asyncio.wait_for(asyncio.shield(bridge._hello), HELLO_TIMEOUT)
        except (TimeoutError, BridgeError) as exc:
            bridge.kill()
            raise BridgeError(str(exc) or "the kernel bridge did not start") from None
        bridge.specs = hello.get("specs") or {}
        bridge.versions = f"python {hello.get('python')}, jupyter_client {hello.get('jupyter_client')}"
        return bridge

    # -- requests ------------------------------------------------------------------------------

    async def request(self, op: str, **fields: Any) -> Event:
        """Sends a request and waits for its reply; BridgeError with the bridge's reason on failure."""
        if self.gone:
            raise BridgeGone("the kernel bridge is gone")
        request_id = next(self._ids)
        reply: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._replies[request_id] = reply
        self.send(op, id=request_id, **fields)
        try:
            answer = await reply
        finally:
            self._replies.pop(request_id, None)
        if not answer.get("ok"):
            raise BridgeError(str(answer.get("error") or "failed"))
        return answer

    def send(self, op: str, **fields: Any) -> None:
        if self.gone:
            raise BridgeGone("the kernel bridge is gone")
        self._stdin.write(json.dumps({"op": op, **fields}, separators=(",", ":")).encode() + b"\n")

    def execute(self, kernel: str, run_id: str, code: str, silent: bool = False) -> RunQueue:
        queue = RunQueue(lambda: self._quietly("pause", kernel), lambda: self._quietly("resume", kernel))
        self.runs[run_id] = queue
        self.send("execute", kernel=kernel, run=run_id, code=code, silent=silent)
        return queue

    def forget(self, run_id: str, kernel: str) -> None:
        """Nobody reads this run any more (its client went away): drop its events from now on, and
        let its kernel run again if backpressure had stopped it."""
        queue = self.runs.pop(run_id, None)
        if queue is not None and queue.paused:
            queue.paused = False
            self._quietly("resume", kernel)

    def _quietly(self, op: str, kernel: str) -> None:
        if not self.gone:
            self.send(op, kernel=kernel)

    # -- what the bridge says ------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            while line := await self._reader.readline():
                self._dispatch(json.loads(line), len(line))
        except (ValueError, asyncio.LimitOverrunError, ConnectionError) as exc:
            log.warning("kernel bridge protocol broken: %s", exc)
        finally:
            self._gone()

    def _dispatch(self, message: Event, size: int) -> None:
        if "id" in message:
            reply = self._replies.get(message["id"])
            if reply is not None and not reply.done():
                reply.set_result(message)
            return
        event = message.get("ev")
        if event == "hello" and not self._hello.done():
            self._hello.set_result(message)
        elif event == "died":
            self.kernel_pids.pop(str(message.get("kernel")), None)
            self.on_died(str(message.get("kernel")), int(message.get("code") or 0))
        elif "run" in message:
            queue = self.runs.get(message["run"])
            if queue is not None:
                queue.put(message, size)
                if event == "done":
                    self.runs.pop(message["run"], None)

    def _gone(self) -> None:
        if self.gone:
            return
        self.gone = True
        with contextlib.suppress(OSError):
            self._stdin.close()
        for pid in self.kernel_pids.values():  # kernels run in sessions of their own
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
        self.kernel_pids.clear()
        gone = BridgeGone("the kernel bridge exited")
        if not self._hello.done():
            self._hello.set_exception(gone)
            self._hello.exception()  # retrieved: nobody may be waiting any more
        for reply in self._replies.values():
            if not reply.done():
                reply.set_exception(gone)
        for run_id, queue in list(self.runs.items()):
            queue.put({"ev": "done", "run": run_id, "status": "bridge", "ms": 0}, 0)
        self.runs.clear()
        self.child.signal_group(signal.SIGKILL)
        self.on_exit()

    def kill(self) -> None:
        """Stops the bridge (and so every kernel) at once."""
        self.child.signal_group(signal.SIGKILL)
        self._gone()

    async def close(self) -> None:
        """Closes the bridge's stdin: it shuts its kernels down and exits; killed if it lingers."""
        if self.gone:
            return
        with contextlib.suppress(OSError):
            self._stdin.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.child.exited), 5)
        self.kill()
