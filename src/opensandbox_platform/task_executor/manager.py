"""The task manager: submit (idempotent by id), run, time out, cancel, and remember across restarts.

Every change bumps a revision and wakes long-polling readers (GET ...?since=N&wait=S), so a client
learns of an exit the moment it happens instead of polling.

A restart of the executor (its container was killed or restarted) also ends its tasks' processes:
they are in the sidecar's cgroup, which the runtime kills with it. A task the state on disk says
was running is therefore run again from the start (`attempts` counts the starts), at most
`max_attempts` times; then it fails with reason Interrupted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from opensandbox_platform.daemon import times
from opensandbox_platform.task_executor.runner import Runner, StartError, kill_group, process_start_time
from opensandbox_platform.task_executor.tasks import (
    CANCELLED,
    COMPLETED,
    ERROR,
    INTERRUPTED,
    START_FAILED,
    TIMEOUT,
    Spec,
    Store,
    Task,
)

log = logging.getLogger("task-executor")


@dataclass
class Limits:
    max_running: int = 16  # tasks running at once; more wait as pending
    max_attempts: int = 3  # starts of one task across executor restarts
    kill_grace: float = 3.0  # seconds between SIGTERM and SIGKILL of a task's process group
    output_tail: int = 4096  # bytes of output returned with a task


class Running:
    """A started task's process, its exit watched through a pidfd (no SIGCHLD handler, no threads)."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pgid = popen.pid
        self.ended_by: str | None = None  # TIMEOUT or CANCELLED when we ended it
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._fd = os.pidfd_open(popen.pid)
        asyncio.get_running_loop().add_reader(self._fd, self._reap)
        self.timer: asyncio.TimerHandle | None = None

    def _reap(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._fd)
        os.close(self._fd)
        _, status = os.waitpid(self.popen.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        self.popen.returncode = code  # so Popen never waits on a reaped pid
        if not self.exited.done():
            self.exited.set_result(128 - code if code < 0 else code)  # killed by signal N: 128 + N

    def stop(self, reason: str, grace: float) -> None:
        """SIGTERM the process group, SIGKILL it after `grace` seconds."""
        if self.ended_by is not None:
            return
        self.ended_by = reason
        if self.timer is not None:
            self.timer.cancel()
        if grace <= 0:
            kill_group(self.pgid, signal.SIGKILL)
            return
        kill_group(self.pgid, signal.SIGTERM)
        asyncio.get_running_loop().call_later(grace, kill_group, self.pgid, signal.SIGKILL)


class TaskManager:
    def __init__(self, store: Store, runner: Runner, limits: Limits | None = None) -> None:
        self.store = store
        self.runner = runner
        self.limits = limits or Limits()
        self.tasks: dict[str, Task] = {}
        self.running: dict[str, Running] = {}
        self.revision = 0
        self._changed: asyncio.Future[None] | None = None
        self._waits: set[asyncio.Task[None]] = set()

    # --- lifecycle --------------------------------------------------------------------------------
    def recover(self) -> None:
        """Loads the tasks on disk; those that were running when we stopped run again."""
        for task in self.store.load():
            self.tasks[task.id] = task
            self.revision = max(self.revision, task.revision)
        for task in self.tasks.values():
            if task.state != "running":
                continue
            if task.pid and task.pidStart and process_start_time(task.pid) == task.pidStart:
                kill_group(task.pid)  # survived us (direct mode), but its exit status is not ours to read
            if task.attempts >= self.limits.max_attempts:
                self._finish(task, None, INTERRUPTED, f"interrupted by {task.attempts} executor restart(s)")
            else:
                log.info("re-running task interrupted by a restart id=%s attempts=%d", task.id, task.attempts)
                self._update(task, state="pending", pid=None, pidStart=None)
        self._start_pending()

    def shutdown(self) -> None:
        """Stops the running processes at once (the pod is going away); their state stays `running`, so
        a restart of the executor in the same pod runs them again."""
        for running in self.running.values():
            kill_group(running.pgid, signal.SIGKILL)

    # --- API --------------------------------------------------------------------------------------
    def submit(self, spec: Spec) -> tuple[Task, bool]:
        """The task with this id, created and started if new. Returns (task, created)."""
        existing = self.tasks.get(spec.id)
        if existing is not None:
            return existing, False
        task = Task(spec=spec)
        self.tasks[spec.id] = task
        self._update(task)
        self._start_pending()
        return task, True

    def get(self, task_id: str) -> Task | None:
        return self.tasks.get(task_id)

    def cancel(self, task_id: str) -> Task | None:
        task = self.tasks.get(task_id)
        if task is None or task.done:
            return task
        running = self.running.get(task_id)
        if running is not None:
            running.stop(CANCELLED, self.limits.kill_grace)
        else:
            self._finish(task, None, CANCELLED, "cancelled before it started")
        return task

    def remove(self, task_id: str) -> bool:
        """Cancels the task if needed and forgets it (its record and output)."""
        task = self.tasks.pop(task_id, None)
        if task is None:
            return False
        running = self.running.pop(task_id, None)
        if running is not None:
            running.stop(CANCELLED, 0)
        self.store.remove(task_id)
        self._notify()
        return True

    async def wait_change(self, since: int, timeout: float, ids: Iterable[str] | None = None) -> None:
        """Returns once a task (of `ids`, or any) has a revision above `since`, or after `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._changed_since(since, ids):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            if self._changed is None or self._changed.done():
                self._changed = loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._changed), remaining)
            except TimeoutError:
                return

    def output(self, task: Task) -> str:
        return self.store.tail(task.id, self.limits.output_tail)

    # --- internals --------------------------------------------------------------------------------
    def _changed_since(self, since: int, ids: Iterable[str] | None) -> bool:
        if ids is None:
            return self.revision > since
        return any((t := self.tasks.get(i)) is None or t.revision > since for i in ids)

    def _update(self, task: Task, **changes: object) -> None:
        for name, value in changes.items():
            setattr(task, name, value)
        self.revision += 1
        task.revision = self.revision
        if self.tasks.get(task.id) is task:
            self.store.save(task)
        self._notify()

    def _notify(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)

    def _start_pending(self) -> None:
        for task in self.tasks.values():
            if len(self.running) >= self.limits.max_running:
                return
            if task.state == "pending":
                self._start(task)

    def _start(self, task: Task) -> None:
        try:
            popen = self.runner.spawn(task.spec, self.store.log_path(task.id))
        except StartError as exc:
            self._finish(task, None, START_FAILED, str(exc))
            return
        running = Running(popen)
        self.running[task.id] = running
        timeout = task.spec.timeoutSeconds
        if timeout:
            running.timer = asyncio.get_running_loop().call_later(
                timeout, running.stop, TIMEOUT, self.limits.kill_grace
            )
        self._update(
            task,
            state="running",
            startedAt=times.rfc3339(digits=3),
            attempts=task.attempts + 1,
            pid=popen.pid,
            pidStart=process_start_time(popen.pid),
        )
        waiter = asyncio.get_running_loop().create_task(self._wait_exit(task, running))
        self._waits.add(waiter)
        waiter.add_done_callback(self._waits.discard)

    async def _wait_exit(self, task: Task, running: Running) -> None:
        code = await running.exited
        if running.timer is not None:
            running.timer.cancel()
        kill_group(running.pgid)  # what the task left behind in its group ends with it
        if self.running.get(task.id) is running:
            del self.running[task.id]
        if self.tasks.get(task.id) is task:
            if running.ended_by == TIMEOUT:
                self._finish(task, code, TIMEOUT, f"killed after timeoutSeconds={task.spec.timeoutSeconds:g}")
            elif running.ended_by == CANCELLED:
                self._finish(task, code, CANCELLED, "cancelled while running")
            else:
                self._finish(task, code, COMPLETED if code == 0 else ERROR, None)
        self._start_pending()

    def _finish(self, task: Task, code: int | None, reason: str, message: str | None) -> None:
        succeeded = reason == COMPLETED
        self._update(
            task,
            state="succeeded" if succeeded else "failed",
            exitCode=code,
            reason=reason,
            message=message,
            finishedAt=times.rfc3339(digits=3),
            pid=None,
            pidStart=None,
        )
        log.info("task ended id=%s state=%s reason=%s exit_code=%s", task.id, task.state, reason, code)
