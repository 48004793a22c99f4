"""Child processes: spawning into their own process group, reaping, and reading their pipes.

execd reaps with one SIGCHLD handler doing `waitpid(-1)`, so it also reaps orphans that the kernel
re-parents to it (it marks itself a child subreaper, and may run as PID 1). asyncio's subprocess
machinery is not used: its per-child watcher would race that handler for exit statuses.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

log = logging.getLogger("execd.procs")

READ_SIZE = 64 * 1024
# After the main process exits, its last output (at most a pipe's capacity) is still read; output
# from descendants that keep the pipe open is collected only up to this many bytes more.
POST_EXIT_BUDGET = 2 * 1024 * 1024


IDLE: Literal["idle"] = "idle"
# What a pump yields: (stream name, bytes), IDLE when nothing came for a while, None at the end.
Output = tuple[str, bytes] | Literal["idle"] | None


class OutputSource(Protocol):
    async def next(self, idle_after: float | None = None, cancel: asyncio.Future[Any] | None = None) -> Output: ...


def which(program: str, path: str | None = None) -> str | None:
    """The executable `program` found on `path` (default $PATH), as shutil.which finds it (shutil
    itself imports bz2 and lzma: not worth it in every sandbox for this)."""
    if "/" in program:
        return program if os.access(program, os.X_OK) and not os.path.isdir(program) else None
    search = os.environ.get("PATH", os.defpath) if path is None else path
    for directory in search.split(os.pathsep):
        candidate = os.path.join(directory or ".", program)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    return None


def exit_code(status: int) -> int:
    """A wait status as a shell would report it: the exit code, or 128 + the signal number."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


class ChildWatcher:
    """Reaps every child of this process and resolves a future per watched pid."""

    def __init__(self) -> None:
        self._waiters: dict[int, asyncio.Future[int]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        _become_subreaper()
        self.reap()

    def uninstall(self) -> None:
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGCHLD)

    def watch(self, pid: int) -> asyncio.Future[int]:
        """A future resolved with the child's wait status once it has been reaped.

        Call it right after the fork, with no await in between: the SIGCHLD handler runs on the
        event loop, so it cannot reap the child before the watch is registered.
        """
        loop = self._loop or asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        self._waiters[pid] = fut
        return fut

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            fut = self._waiters.pop(pid, None)
            if fut is None:
                continue  # an orphan re-parented to us: reaping it is all there is to do
            if not fut.done():
                fut.set_result(status)


def _become_subreaper() -> None:
    """Orphans of our commands get re-parented to execd (and reaped) instead of to PID 1."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_CHILD_SUBREAPER = 36
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except Exception:  # not Linux, or no libc symbols: reaping still works for direct children
        log.debug("could not become a child subreaper", exc_info=True)


WATCHER = ChildWatcher()


class Child:
    """A spawned process, leader of its own process group."""

    def __init__(self, popen: subprocess.Popen[bytes], exited: asyncio.Future[int]) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.exited = exited
        self.started = time.monotonic()
        exited.add_done_callback(self._on_exit)

    def _on_exit(self, fut: asyncio.Future[int]) -> None:
        # Popen must not waitpid() a pid we reaped (it could belong to a newer child by then).
        if not fut.cancelled():
            self.popen.returncode = exit_code(fut.result())

    @property
    def running(self) -> bool:
        return not self.exited.done()

    def signal_group(self, sig: int) -> bool:
        """Signal the whole process group; False if nothing was left to signal."""
        try:
            os.killpg(self.pid, sig)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return False


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str | None,
    stdin: int | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
    uid: int | None = None,
    gid: int | None = None,
) -> Child:
    """Start `argv` in a new process group and watch it. Raises OSError if it cannot start."""
    kwargs: dict[str, Any] = {}
    # Asking for the identity we already have needs no switch (and setgroups() would need
    # CAP_SETGID, which a sandbox running execd as a plain user does not have).
    same = (uid is None or uid == os.getuid()) and (gid is None or gid == os.getgid())
    if not same:
        if uid is not None:
            kwargs["user"] = uid
            kwargs["extra_groups"] = []
        if gid is not None:
            kwargs["group"] = gid
    popen = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL if stdin is None else stdin,
        stdout=stdout,
        stderr=stderr,
        cwd=cwd,
        env=dict(env),
        close_fds=True,
        process_group=0,
        **kwargs,
    )
    return Child(popen, WATCHER.watch(popen.pid))


def nonblocking_pipe() -> tuple[int, int]:
    """(read end, write end); the read end is non-blocking, both close on exec."""
    r, w = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(r, False)
    return r, w


class OutputPump:
    """Reads a child's output pipes only when asked, so a slow consumer slows the child down.

    `next()` returns `(name, data)` from whichever pipe has data, or None once the child has
    exited and its pipes are drained. Pipes still held open by the child's descendants after that
    are left to `close()`, which keeps draining them in the background (discarding) so those
    descendants never die of SIGPIPE.
    """

    def __init__(self, pipes: dict[str, int], exited: asyncio.Future[int]) -> None:
        self._pipes = dict(pipes)
        self._order = list(pipes)
        self._exited = exited
        self._after_exit = 0

    async def next(self, idle_after: float | None = None, cancel: asyncio.Future[Any] | None = None) -> Output:
        """Next output; None when done; IDLE if `idle_after` seconds passed (or `cancel` fired) first."""
        loop = asyncio.get_running_loop()
        deadline = None if idle_after is None else loop.time() + idle_after
        while True:
            # Look at the exit before reading: whatever the child wrote before exiting is then
            # already in the pipe and is read before we report the end.
            exited = self._exited.done()
            if exited and self._after_exit > POST_EXIT_BUDGET:
                return None
            got = self._read_any()
            if got is not None:
                if exited:
                    self._after_exit += len(got[1])
                return got
            if exited:
                return None
            pending = [(fd, _readable(loop, fd)) for fd in self._pipes.values()]
            waiters: list[asyncio.Future[Any]] = [self._exited, *(fut for _, fut in pending)]
            if cancel is not None:
                if cancel.done():
                    return IDLE
                waiters.append(cancel)
            try:
                remaining = None if deadline is None else max(0.0, deadline - loop.time())
                done, _ = await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for fd, fut in pending:
                    if not fut.done():
                        loop.remove_reader(fd)
                        fut.cancel()
            if not done or (cancel is not None and cancel.done()):
                return IDLE

    def _read_any(self) -> tuple[str, bytes] | None:
        for name in list(self._order):
            fd = self._pipes.get(name)
            if fd is None:
                continue
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno != errno.EIO:
                    log.debug("pipe read failed: %s", exc)
                data = b""
            if not data:
                self._close_pipe(name)
                continue
            # Rotate so a chatty stream cannot starve the other one.
            self._order.remove(name)
            self._order.append(name)
            return name, data
        return None

    def _close_pipe(self, name: str) -> None:
        fd = self._pipes.pop(name, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """Stop reading; pipes still open are drained and discarded until their writers close."""
        for fd in self._pipes.values():
            _discard_until_eof(fd)
        self._pipes.clear()


def _readable(loop: asyncio.AbstractEventLoop, fd: int) -> asyncio.Future[None]:
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        loop.remove_reader(fd)
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    return fut


def _discard_until_eof(fd: int) -> None:
    loop = asyncio.get_running_loop()

    def drain() -> None:
        while True:
            try:
                if os.read(fd, READ_SIZE):
                    continue
            except BlockingIOError:
                return
            except OSError:
                pass
            loop.remove_reader(fd)
            os.close(fd)
            return

    loop.add_reader(fd, drain)


def terminate_group(child: Child, grace: float, on_done: Callable[[], None] | None = None) -> None:
    """SIGINT to the group now, SIGKILL to whatever is left of it after `grace` seconds."""
    loop = asyncio.get_running_loop()
    child.signal_group(signal.SIGINT)

    def kill() -> None:
        child.signal_group(signal.SIGKILL)
        if on_done is not None:
            on_done()

    loop.call_later(grace, kill)
