"""Runs a sandbox's lifecycle hooks (`lifecycle.py` says what they are).

- `preStart` runs once, before the entrypoint: the local runtime's jail init awaits it before it
  starts the entrypoint; on docker and kubernetes the server calls `POST /lifecycle` while the
  bootstrap script holds the entrypoint back at its start gate (a FIFO, `EXECD_START_GATE`), which
  execd opens once preStart succeeded. Its run is the answer; the server fails the create (and
  removes the sandbox) when it did not exit 0.
- `periodic` hooks run on their schedules from then on, never two runs of one hook at once: a run
  still going when the next is due makes that one skipped (and counted). `GET /lifecycle` reports
  the last runs of each (the server's `diagnostics/events` shows them).

Every run is its own process group with stdout and stderr on one pipe, of which only the last
OUTPUT_TAIL bytes are kept (a flood costs reading, not memory). At its timeout, and also when it
ends, the whole group is killed: nothing a hook started in its group outlives the run. A process
that leaves the group (setsid) is not followed; it ends with the sandbox like any other.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opensandbox_platform.daemon import errors, times
from opensandbox_platform.daemon.errors import ApiError
from opensandbox_platform.execd import lifecycle, procs
from opensandbox_platform.execd.envfile import Environment

log = logging.getLogger("execd.hooks")

OUTPUT_TAIL = 4096  # bytes of a run's output kept (its end)
RUNS_KEPT = 10  # runs of each periodic hook reported
EXIT_CANNOT_START = 127  # as a shell reports a program it cannot run


@dataclass
class Run:
    started_at: float  # Unix seconds
    duration: float  # seconds
    exit_code: int  # 128 + signal when killed (137 at a timeout)
    timed_out: bool
    output: bytes  # the end of stdout and stderr, interleaved
    truncated: bool  # output is only the end of what was written
    skipped: bool = False  # due while the previous run was still going: not run

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.skipped

    def to_json(self) -> dict[str, Any]:
        return {
            "startedAt": times.rfc3339(self.started_at, digits=3),
            "durationMs": round(self.duration * 1000),
            "exitCode": self.exit_code,
            "timedOut": self.timed_out,
            "skipped": self.skipped,
            "output": self.output.decode(errors="replace"),
            "outputTruncated": self.truncated,
        }


class _Tail:
    """The last `limit` bytes written to a pipe, read as they come."""

    def __init__(self, fd: int, limit: int = OUTPUT_TAIL) -> None:
        self.fd, self.limit = fd, limit
        self.data = bytearray()
        self.truncated = False
        asyncio.get_running_loop().add_reader(fd, self.read)

    def read(self) -> None:
        for _ in range(16):  # a bounded slice of the loop per wake-up, so a flood cannot hog it
            try:
                chunk = os.read(self.fd, procs.READ_SIZE)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                asyncio.get_running_loop().remove_reader(self.fd)
                return
            self.data += chunk
            if len(self.data) > self.limit:
                del self.data[: len(self.data) - self.limit]
                self.truncated = True

    def close(self) -> None:
        self.read()  # what is already in the pipe
        asyncio.get_running_loop().remove_reader(self.fd)
        os.close(self.fd)


class Runner:
    """Starts hook runs and can kill every one still going (execd's shutdown)."""

    def __init__(self, environment: Environment, cwd: Callable[[], str]) -> None:
        self.environment = environment
        self.cwd = cwd
        self.live: set[procs.Child] = set()

    async def run(self, hook: lifecycle.Hook) -> Run:
        started, clock = time.time(), time.monotonic()
        read_end, write_end = procs.nonblocking_pipe()
        try:
            env, cwd = self.environment.compose(), self.cwd()
            child = procs.spawn(hook.command, env=env, cwd=cwd, stdout=write_end, stderr=write_end)
        except OSError as exc:
            os.close(read_end)
            message = f"cannot start {hook.command[0]}: {exc.strerror or exc}".encode()
            return Run(started, 0.0, EXIT_CANNOT_START, False, message, False)
        finally:
            os.close(write_end)
        tail = _Tail(read_end)
        self.live.add(child)
        timed_out = False
        try:
            try:
                await asyncio.wait_for(asyncio.shield(child.exited), hook.timeout_seconds)
            except TimeoutError:
                timed_out = True
            finally:
                # The group goes with the run: at a timeout, and whatever it left running in the background.
                child.signal_group(signal.SIGKILL)
                self.live.discard(child)
            status = await child.exited
        finally:
            tail.close()
        duration = time.monotonic() - clock
        return Run(started, duration, procs.exit_code(status), timed_out, bytes(tail.data), tail.truncated)

    def kill_all(self) -> None:
        for child in list(self.live):
            child.signal_group(signal.SIGKILL)


@dataclass
class _Periodic:
    hook: lifecycle.PeriodicHook
    schedule: lifecycle.Schedule
    runs: deque[Run]
    skipped: int = 0
    running: bool = False
    task: asyncio.Task[None] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            **self.hook.to_json(),
            "running": self.running,
            "skipped": self.skipped,
            "runs": [run.to_json() for run in self.runs],
        }


class Hooks:
    """The sandbox's hooks: preStart once, then the periodic ones until execd stops."""

    def __init__(self, environment: Environment, cwd: Callable[[], str], gate: str | None = None) -> None:
        self.runner = Runner(environment, cwd)
        self.gate = gate  # the bootstrap script's start gate (FIFO), opened once preStart succeeded
        self.pre_start: Run | None = None
        self.periodic: list[_Periodic] = []
        self.begun = False
        self._runs: set[asyncio.Task[None]] = set()

    async def begin(self, raw: object) -> Run | None:
        """Run preStart (if any) and, if it succeeded, schedule the periodic hooks. Once per execd."""
        try:
            spec = lifecycle.parse(raw)
        except lifecycle.LifecycleError as exc:
            raise errors.bad_request(str(exc)) from None
        if self.begun:
            raise ApiError(409, errors.CONFLICT, "the lifecycle hooks were already started")
        self.begun = True
        if spec.pre_start is not None:
            self.pre_start = run = await self.runner.run(spec.pre_start)
            log.info("preStart exited code=%d timed_out=%s ms=%d", run.exit_code, run.timed_out, run.duration * 1000)
            if not run.ok:
                return run
        await self._open_gate()
        anchor = time.time()
        for hook in spec.periodic:
            state = _Periodic(hook, lifecycle.Schedule(hook.schedule), deque(maxlen=RUNS_KEPT))
            state.task = asyncio.create_task(self._schedule(state, anchor))
            self.periodic.append(state)
        return self.pre_start

    async def _open_gate(self) -> None:
        """Let the entrypoint go: the bootstrap script is blocked reading the FIFO since before execd
        started (a moment may pass before it opens it: ENXIO until then)."""
        if not self.gate:
            return
        for _ in range(100):
            try:
                fd = os.open(self.gate, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise ApiError(500, errors.RUNTIME_ERROR, f"cannot open the start gate: {exc.strerror}") from None
                await asyncio.sleep(0.05)
                continue
            try:
                os.write(fd, b"go\n")
            finally:
                os.close(fd)
            return
        raise ApiError(500, errors.RUNTIME_ERROR, "the bootstrap script does not wait at its start gate")

    async def _schedule(self, state: _Periodic, anchor: float) -> None:
        due = state.schedule.next_after(anchor, anchor)
        while True:
            await asyncio.sleep(max(0.0, due - time.time()))
            if state.running:
                state.skipped += 1
                state.runs.append(Run(time.time(), 0.0, 0, False, b"", False, skipped=True))
                log.info("periodic hook %s skipped: its previous run is still going", state.hook.name)
            else:
                state.running = True
                task = asyncio.create_task(self._run(state))
                self._runs.add(task)
                task.add_done_callback(self._runs.discard)
            # Times missed while the sandbox was paused are not caught up: the next one after now.
            due = state.schedule.next_after(max(due, time.time()), anchor)

    async def _run(self, state: _Periodic) -> None:
        try:
            run = await self.runner.run(state.hook)
            state.runs.append(run)
        finally:
            state.running = False

    def status(self) -> dict[str, Any]:
        return {
            "preStart": None if self.pre_start is None else self.pre_start.to_json(),
            "periodic": [state.to_json() for state in self.periodic],
        }

    def shutdown(self) -> None:
        for state in self.periodic:
            if state.task is not None:
                state.task.cancel()
        for task in self._runs:
            task.cancel()
        self.runner.kill_all()
