"""One isolated session at run time: its namespace (bwrap and the mounts under it), its persistent
shell, its background runs, its files and its changes.

Layout on execd's side, under `<state dir>/isolated/<session id>/`:

    stage/      the session's stage: u/<n> upper layers, w/<n> overlay work directories, m/<n> the
                mounted overlays (only in the session's mount namespace), ctl/ run scripts and log
                pipes (the session sees it at /dev/.osb). A private tmpfs when execd's state
                directory cannot hold upper layers (a container's overlayfs root); execd keeps a
                descriptor of it either way.
    logs/       background run logs (never visible to the session)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import stat
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from opensandbox_platform.daemon import errors, times
from opensandbox_platform.daemon.errors import ApiError
from opensandbox_platform.execd import procs, sse
from opensandbox_platform.execd.commands import stream_output
from opensandbox_platform.execd.isolated import changes, layout, nsetup, shell
from opensandbox_platform.execd.isolated import commit as committing
from opensandbox_platform.execd.isolated.runs import BackgroundRun
from opensandbox_platform.execd.isolated.sessionfs import SessionFS
from opensandbox_platform.execd.isolated.spec import CommitSpec, RunSpec, SessionSpec, under
from opensandbox_platform.execd.sessions import MarkerScanner

log = logging.getLogger("execd.isolated")

TOO_MANY_RUNS = "TOO_MANY_RUNS"
SESSION_NOT_ACTIVE = "SESSION_NOT_ACTIVE"
MAX_CTL_LINE = 4096


@dataclass(frozen=True)
class Settings:
    state_dir: str  # execd's
    root: str  # <state_dir>/isolated
    bwrap: str
    bash: str
    private_proc: bool = True
    disk_upper: bool = True  # execd's state directory can hold upper layers
    tmpfs_bytes: int = 1024 << 20  # the stage tmpfs, when one is needed
    tmp_bytes: int = 512 << 20  # each session's private /tmp
    hide: tuple[str, ...] = ()
    mask_files: tuple[str, ...] = ()
    ping_interval: float = 3.0
    interrupt_grace: float = 2.0
    start_timeout: float = 15.0
    max_active_runs: int = 16
    max_kept_runs: int = 64
    copy: bool = False  # no overlayfs here: copy-on-write layers are copies of the whole tree
    copy_max_bytes: int = 1 << 30


LayerChanges = tuple[layout.Layer, list[changes.Change]]


class _Output:
    """The shell's stdout and stderr as an OutputSource for one run: it ends when `ended` resolves
    (the shell exited) and what was written before has been read."""

    def __init__(self, fds: dict[str, int], ended: asyncio.Future[int]) -> None:
        self._fds = fds
        self._order = list(fds)
        self._ended = ended

    async def next(self, idle_after: float | None = None, cancel: asyncio.Future[Any] | None = None) -> procs.Output:
        loop = asyncio.get_running_loop()
        deadline = None if idle_after is None else loop.time() + idle_after
        while True:
            ended = self._ended.done()
            got = self._read_any()
            if got is not None:
                return got
            if ended:
                return None
            waiters: list[asyncio.Future[Any]] = [self._ended]
            readers = []
            for fd in self._fds.values():
                fut: asyncio.Future[None] = loop.create_future()
                loop.add_reader(fd, _resolve, fut)
                readers.append((fd, fut))
                waiters.append(fut)
            if cancel is not None:
                if cancel.done():
                    return procs.IDLE
                waiters.append(cancel)
            try:
                remaining = None if deadline is None else max(0.0, deadline - loop.time())
                done, _ = await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for fd, fut in readers:
                    loop.remove_reader(fd)
                    fut.cancel()
            if not done or (cancel is not None and cancel.done()):
                return procs.IDLE

    def _read_any(self) -> tuple[str, bytes] | None:
        for name in list(self._order):
            try:
                data = os.read(self._fds[name], procs.READ_SIZE)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                continue  # the namespace is gone; the session notices through its control pipe
            self._order.remove(name)
            self._order.append(name)
            return name, data
        return None


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Scanned:
    """A run's view of the shell's output: it ends at the run's token (on both streams)."""

    def __init__(self, source: _Output, token: bytes) -> None:
        self._source = source
        self.streams = {"stdout": MarkerScanner(token), "stderr": MarkerScanner(token)}
        self.trailer = b""
        self.trailer_done = False

    @property
    def done(self) -> bool:
        return self.trailer_done and self.streams["stderr"].found

    async def next(self, idle_after: float | None = None, cancel: asyncio.Future[Any] | None = None) -> procs.Output:
        while not self.done:
            item = await self._source.next(idle_after, cancel)
            if item is None or item == procs.IDLE:
                return item
            name, data = item
            scanner = self.streams[name]
            if scanner.found:
                if name == "stdout" and not self.trailer_done:
                    self._trail(data)
                continue
            out, rest = scanner.feed(data)
            if rest is not None and name == "stdout":
                self._trail(rest)
            if out:
                return name, out
        return None

    def _trail(self, data: bytes) -> None:
        self.trailer += data
        if b"\n" in self.trailer:
            self.trailer_done = True

    def result(self) -> tuple[int, str]:
        line = self.trailer.split(b"\n", 1)[0].decode("utf-8", "replace")
        parts = line.split(":", 2)
        try:
            return int(parts[1]), parts[2] if len(parts) > 2 else ""
        except (IndexError, ValueError):
            return 1, ""


class Session:
    def __init__(
        self,
        session_id: str,
        spec: SessionSpec,
        env: dict[str, str],
        settings: Settings,
        on_idle: Callable[[Session], None],
    ) -> None:
        self.id = session_id
        self.spec = spec
        self.env = env
        self.settings = settings
        self.on_idle = on_idle
        self.created_at = time.time()
        self.last_run_at = self.created_at
        self.status = "starting"  # starting | active | dead | destroyed
        self.reason = ""
        self.dir = os.path.join(settings.root, session_id)
        self.stage = os.path.join(self.dir, "stage")
        self.layers: list[layout.Layer] = []
        self.lock = asyncio.Lock()
        self.runs: dict[str, BackgroundRun] = {}
        self.cwd = layout.session_cwd(spec)
        self.restarted = False
        self.foreground = 0  # runs streaming right now
        self._child: procs.Child | None = None
        self._pid1 = 0
        self._fds: dict[str, int] = {}
        self._stage_fd = -1
        self._ctl_dir_fd = -1
        self._root_fd = -1
        self._uppers: dict[int, int] = {}  # overlay number -> its upper directory
        self._skeletons: dict[int, int] = {}  # copy layer number -> its skeleton
        self.manifests: dict[int, frozenset[str]] = {}
        self._ctl_w = -1
        self._ctl_buf = b""
        self._ready: asyncio.Future[None] | None = None
        self._shell_ended: asyncio.Future[int] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._escalation: asyncio.TimerHandle | None = None
        self.killed_reason: str | None = None
        self.last_activity = time.monotonic()

    # -- identity ---------------------------------------------------------------------------

    def identity(self) -> tuple[int, int]:
        """The uid/gid the session's processes have inside its user namespace."""
        euid, egid = os.geteuid(), os.getegid()
        if self.spec.uid_mode == "userns":
            return (euid if self.spec.uid is None else self.spec.uid, egid if self.spec.gid is None else self.spec.gid)
        if self.spec.uid not in (None, euid) or self.spec.gid not in (None, egid):
            raise ApiError(
                503,
                errors.NOT_SUPPORTED,
                f"uid_mode 'setpriv' can keep only execd's own identity here (uid {euid}, gid {egid}): a real "
                "identity switch needs a user namespace mapping that execd cannot write without privileges; "
                "use uid_mode 'userns' for another uid/gid inside the session",
            )
        return euid, egid

    # -- start and stop ---------------------------------------------------------------------

    def _prepare(self, mounts: list[layout.Mount]) -> None:
        """Plan the layers, make the session's directories and the copy layers' skeletons."""
        hidden = [self.settings.state_dir, self.settings.root]
        self.layers = layout.plan_layers(self.spec, mounts, hidden, kind_of, _listdir, copy=self.settings.copy)
        os.makedirs(self.stage, mode=0o700, exist_ok=True)
        os.makedirs(os.path.join(self.dir, "logs"), mode=0o700, exist_ok=True)
        skeletons = os.path.join(self.dir, "k")
        shutil.rmtree(skeletons, ignore_errors=True)
        os.makedirs(skeletons, mode=0o700)
        self.manifests = {}
        budget = [self.settings.copy_max_bytes]
        for layer in self.layers:
            if layer.kind == "copy":
                target = os.path.join(skeletons, str(layer.n))
                if layer.deep:
                    self.manifests[layer.n] = build_copy(layer.path, target, budget)
                else:
                    self.manifests[layer.n] = build_skeleton(layer.path, target, dict(layer.placeholders))

    async def start(self, mounts: list[layout.Mount]) -> None:
        uid, gid = self.identity()
        await asyncio.to_thread(self._prepare, mounts)
        # An upper layer cannot live inside its own lower directory (overlayfs refuses overlapping
        # layers): then, as when the state directory is an overlayfs, uppers go to a private tmpfs.
        inside = any(layer.kind == "overlay" and under(self.settings.state_dir, layer.path) for layer in self.layers)
        disk = self.settings.disk_upper and not inside
        loop = asyncio.get_running_loop()
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = procs.nonblocking_pipe()
        err_r, err_w = procs.nonblocking_pipe()
        ctl_r, ctl_w = procs.nonblocking_pipe()
        info_r, info_w = os.pipe2(os.O_CLOEXEC)
        view = layout.View(
            stage=self.stage,
            skeletons=os.path.join(self.dir, "k"),
            cwd=_existing_dir(self.cwd, layout.session_cwd(self.spec)),
            uid=uid,
            gid=gid,
            info_fd=info_w,
            private_proc=self.settings.private_proc,
            hide=self.settings.hide,
            mask_files=self.settings.mask_files,
            tmp_bytes=self.settings.tmp_bytes,
            caps=layout.ROOT_CAPS if uid == 0 and self.spec.profile == "balanced" else (),
        )
        script = shell.init_script(ctl_w, self.settings.bash, close=(info_w,))
        command = [self.settings.bash, "--noprofile", "--norc", "-c", script]
        argv = layout.bwrap_argv(self.settings.bwrap, self.spec, self.layers, view, command)
        plan = nsetup.MountPlan(
            stage=self.stage,
            tmpfs_bytes=None if disk else self.settings.tmpfs_bytes,
            overlays=tuple((layer.n, layer.path) for layer in self.layers if layer.kind == "overlay"),
        )
        self._ready = loop.create_future()
        try:
            self._child, self._stage_fd = nsetup.spawn(
                argv, plan, env=self.env, stdin=in_r, stdout=out_w, stderr=err_w, pass_fds=(ctl_w, info_w)
            )
        except nsetup.SetupError as exc:
            for fd in (in_w, out_r, err_r, ctl_r, info_r, ctl_w):
                os.close(fd)
            raise ApiError(503, errors.NOT_SUPPORTED, f"cannot create the session's namespace: {exc}") from None
        finally:
            for fd in (in_r, out_w, err_w, info_w):
                os.close(fd)
        self._ctl_w = ctl_w  # its number is what the shell writes to; our copy is closed below
        os.close(ctl_w)
        self._fds = {"stdin": in_w, "stdout": out_r, "stderr": err_r, "ctl": ctl_r}
        loop.add_reader(ctl_r, self._on_control)
        child = self._child
        child.exited.add_done_callback(lambda _: self._child_exited(child))
        try:
            waiters: list[asyncio.Future[Any]] = [self._ready, child.exited]
            done, _ = await asyncio.wait(
                waiters,
                timeout=self.settings.start_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if self._ready not in done:
                detail = self._drain_stderr() or "it did not start in time"
                raise ApiError(503, errors.NOT_SUPPORTED, f"cannot start the session's namespace: {detail}")
            info = _read_info(info_r)
            self._pid1 = int(json.loads(info)["child-pid"])
            self._root_fd = os.open(f"/proc/{self._pid1}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            self._ctl_dir_fd = os.open("ctl", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self._stage_fd)
            for layer in self.layers:
                if layer.kind == "overlay":
                    self._uppers[layer.n] = os.open(
                        f"u/{layer.n}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self._stage_fd
                    )
                elif layer.kind == "copy":
                    self._skeletons[layer.n] = os.open(
                        os.path.join(self.dir, "k", str(layer.n)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
                    )
        except BaseException:
            self._stop()
            raise
        finally:
            os.close(info_r)
        self.status = "active"
        self.touch()

    def _drain_stderr(self) -> str:
        fd = self._fds.get("stderr", -1)
        out = b""
        with contextlib.suppress(OSError):
            while len(out) < 8192 and (data := os.read(fd, 4096)):
                out += data
        return out.decode("utf-8", "replace").strip()

    def _on_control(self) -> None:
        fd = self._fds.get("ctl", -1)
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(fd)
            self._died("the session's first process exited")
            return
        self._ctl_buf += data
        *lines, self._ctl_buf = self._ctl_buf.split(b"\n")
        if len(self._ctl_buf) > MAX_CTL_LINE:
            self._ctl_buf = b""  # garbage from the session's code: ignored
        for line in lines:
            self._control(line.decode("ascii", "replace").split())

    def _control(self, words: list[str]) -> None:
        if words == ["ready"]:
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
        elif len(words) == 2 and words[0] == "exit" and words[1].isdigit():
            self.restarted = True
            if self._shell_ended is not None and not self._shell_ended.done():
                self._shell_ended.set_result(int(words[1]))
        elif len(words) == 3 and words[0] == "bg" and words[2].isdigit():
            run = self.runs.get(words[1])
            if run is not None and run.running:
                run.finish(int(words[2]))
                self._after_activity()

    def _child_exited(self, child: procs.Child) -> None:
        if child is self._child:
            self._died("the session's namespace ended")

    def _died(self, reason: str) -> None:
        if self.status in ("dead", "destroyed"):
            return
        if self.status == "active":
            log.warning("isolated session %s: %s", self.id, reason)
        self.status = "dead"
        self.reason = reason
        if self._shell_ended is not None and not self._shell_ended.done():
            self._shell_ended.set_result(137)
        for run in self.runs.values():
            if run.running:
                run.finish(None, "session terminated")
        self._cancel_idle()

    def _stop(self) -> None:
        """Kill the namespace and release what execd holds of it (not the session's directory)."""
        if self._pid1:
            with contextlib.suppress(OSError):
                os.kill(self._pid1, signal.SIGKILL)
        if self._child is not None:
            self._child.signal_group(signal.SIGKILL)
        loop = asyncio.get_running_loop()
        ctl = self._fds.get("ctl", -1)
        if ctl >= 0:
            loop.remove_reader(ctl)
        held = [*self._fds.values(), self._stage_fd, self._ctl_dir_fd, self._root_fd]
        for fd in [*held, *self._uppers.values(), *self._skeletons.values()]:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fds, self._uppers, self._skeletons = {}, {}, {}
        self._stage_fd = self._ctl_dir_fd = self._root_fd = -1
        self._pid1 = 0
        if self._escalation is not None:
            self._escalation.cancel()
            self._escalation = None

    def close(self, reason: str = "deleted") -> None:
        if self.status != "dead":
            self.reason = reason
        self.status = "destroyed"
        self._cancel_idle()
        if self._shell_ended is not None and not self._shell_ended.done():
            self._shell_ended.set_result(137)
        for run in self.runs.values():
            run.close()
        self._stop()
        # Its upper layers and copies can be large: removed off the event loop.
        asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, self.dir, True)

    # -- idleness ---------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self.foreground > 0 or any(run.running for run in self.runs.values())

    def touch(self) -> None:
        self.last_activity = time.monotonic()
        self._after_activity()

    def _after_activity(self) -> None:
        self._cancel_idle()
        timeout = self.spec.idle_timeout_seconds
        if timeout and self.status == "active" and not self.busy:
            self._idle_timer = asyncio.get_running_loop().call_later(timeout, self.on_idle, self)

    def _cancel_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def idle_remaining(self) -> int | None:
        timeout = self.spec.idle_timeout_seconds
        if not timeout or self.status != "active":
            return None
        if self.busy:
            return timeout
        return max(0, round(timeout - (time.monotonic() - self.last_activity)))

    # -- runs -------------------------------------------------------------------------------

    def check_active(self) -> None:
        if self.status != "active":
            raise ApiError(409, SESSION_NOT_ACTIVE, f"session {self.id} is {self.status}: {self.reason}")

    def _write_script(self, name: str, code: str) -> None:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=self._ctl_dir_fd)
        try:
            os.write(fd, (code if code.endswith("\n") else code + "\n").encode())
        finally:
            os.close(fd)

    def _send(self, line: str) -> None:
        data = line.encode()
        fd = self._fds["stdin"]
        while data:
            data = data[os.write(fd, data) :]

    def _unlink(self, name: str) -> None:
        if self._ctl_dir_fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=self._ctl_dir_fd)

    async def run(self, spec: RunSpec, disconnected: asyncio.Future[None]) -> AsyncIterator[bytes]:
        """A foreground run, as SSE frames (init, output, then execution_complete or error)."""
        run_id = str(uuid.uuid4())
        self.foreground += 1
        self._after_activity()
        try:
            async with self.lock:
                yield sse.event("init", text=run_id)
                frames = self._run_locked(spec, disconnected)
                try:
                    async for frame in frames:
                        yield frame
                finally:  # a client that left closes us: the run is wound down under the lock
                    await frames.aclose()
        finally:
            self.foreground -= 1
            self.last_run_at = time.time()
            self.touch()

    async def _run_locked(self, spec: RunSpec, disconnected: asyncio.Future[None]) -> AsyncGenerator[bytes, None]:
        if self.status != "active":
            yield sse.event(
                "error", error=sse.error_value("SessionError", "137", [f"session is {self.status}: {self.reason}"])
            )
            return
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        token = f"__OSB_{os.urandom(12).hex()}__"
        script = f"r-{os.urandom(8).hex()}.sh"  # not the token: an error message naming the file must not end the run
        self._write_script(script, spec.code)
        ended: asyncio.Future[int] = loop.create_future()
        self._shell_ended = ended
        self.killed_reason = None
        cd = self.cwd if self.restarted else None
        self.restarted = False
        self._send(shell.foreground_line(shell.script_path(script), token, self._ctl_w, spec.envs, cd))
        timer = None
        if spec.timeout_seconds:
            reason = f"killed after timeout of {spec.timeout_seconds} s"
            timer = loop.call_later(spec.timeout_seconds, self.interrupt, reason)
        output = _Output({"stdout": self._fds["stdout"], "stderr": self._fds["stderr"]}, ended)
        scanned = _Scanned(output, token.encode())
        streamed = False
        try:
            async for frame in stream_output(scanned, self.settings.ping_interval, disconnected):
                yield frame
            streamed = not disconnected.done()
            if not streamed:
                return
            if scanned.trailer_done:
                code, pwd = scanned.result()
                if pwd:
                    self.cwd = pwd
                message = f"exit status {code}"
            else:
                code = ended.result() if ended.done() else 137
                message = self.killed_reason or f"the session's shell exited with status {code}"
            elapsed = int((time.monotonic() - started) * 1000)
            if code == 0:
                yield sse.event("execution_complete", execution_time=elapsed)
            else:
                yield sse.event("error", error=sse.error_value("CommandExecError", str(code), [message]))
        finally:
            if not streamed and not scanned.done and not ended.done():
                # The client went away (its stream was closed, or it stopped reading): interrupt.
                self.interrupt("the client went away")
                await self._settle(scanned)
            if timer is not None:
                timer.cancel()
            if self._escalation is not None:
                self._escalation.cancel()
                self._escalation = None
            self._shell_ended = None
            self._unlink(script)

    async def _settle(self, scanned: _Scanned) -> None:
        """After the client left: drop the run's output until it ends (interrupted, escalated if it
        ignores SIGINT), so the next run starts on a quiet shell."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2 * self.settings.interrupt_grace + 5
        never: asyncio.Future[None] = loop.create_future()
        while loop.time() < deadline and await scanned.next(1.0, never) is not None:
            pass

    def interrupt(self, reason: str = "interrupted") -> None:
        """SIGINT to the session's processes (background runs ignore it), SIGKILL to all of them but
        PID 1 if the run has not ended after the grace period."""
        if not self._pid1:
            return
        self.killed_reason = reason
        with contextlib.suppress(OSError):
            os.kill(self._pid1, signal.SIGUSR1)
        ended = self._shell_ended

        def escalate() -> None:
            self._escalation = None
            if ended is not None and not ended.done() and self._pid1:
                with contextlib.suppress(OSError):
                    os.kill(self._pid1, signal.SIGUSR2)

        if self._escalation is None:
            self._escalation = asyncio.get_running_loop().call_later(self.settings.interrupt_grace, escalate)

    async def start_background(self, spec: RunSpec) -> BackgroundRun:
        if sum(run.running for run in self.runs.values()) >= self.settings.max_active_runs:
            raise ApiError(429, TOO_MANY_RUNS, f"at most {self.settings.max_active_runs} background runs at once")
        async with self.lock:
            self.check_active()
            run_id = str(uuid.uuid4())
            token = f"__OSB_{os.urandom(12).hex()}__"
            script, pipe = f"b-{run_id}.sh", f"b-{run_id}.out"
            run = BackgroundRun(self.id, run_id, os.path.join(self.dir, "logs", f"{run_id}.log"))
            self._write_script(script, spec.code)
            run.open(self._ctl_dir_fd, pipe)
            self.runs[run_id] = run
            ended: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self._shell_ended = ended
            cd = self.cwd if self.restarted else None
            line = shell.background_line(
                run_id, shell.script_path(script), shell.script_path(pipe), token, self._ctl_w, spec.envs
            )
            self._send((f"cd -- {shlex.quote(cd)} 2>/dev/null; " if cd else "") + line)
            self.restarted = False
            scanned = _Scanned(
                _Output({"stdout": self._fds["stdout"], "stderr": self._fds["stderr"]}, ended), token.encode()
            )
            try:
                while await scanned.next(self.settings.start_timeout) not in (None, procs.IDLE):
                    pass  # nothing is expected before the acknowledgement
            finally:
                self._shell_ended = None
            if not scanned.trailer_done:
                run.finish(None, "the session's shell did not start the run")
            self._forget_old_runs()
            self.touch()
            return run

    def _forget_old_runs(self) -> None:
        finished = [r for r in self.runs.values() if not r.running]
        for run in finished[: max(0, len(self.runs) - self.settings.max_kept_runs)]:
            run.remove_log()
            self.runs.pop(run.run_id, None)

    def run_of(self, run_id: str) -> BackgroundRun:
        run = self.runs.get(run_id)
        if run is None:
            raise errors.not_found(f"run not found in session {self.id}: {run_id}")
        return run

    # -- files, diff, commit ------------------------------------------------------------------

    def fs(self) -> SessionFS:
        if self._root_fd < 0:
            raise ApiError(409, SESSION_NOT_ACTIVE, f"session {self.id} is {self.status}: its files are gone")
        self.touch()
        return SessionFS(self._root_fd)

    def _tracked(self) -> list[tuple[int, layout.Layer]]:
        """(entry index, layer) of every overlay and copy layer whose changes are kept (persist is not false)."""
        return [
            (layer.entry, layer)
            for layer in self.layers
            if self.spec.overlays[layer.entry].persistent
            and (
                (layer.kind == "overlay" and layer.n in self._uppers)
                or (layer.kind == "copy" and layer.n in self._skeletons)
            )
        ]

    def _changes_of(self, layer: layout.Layer, lower: int | None) -> changes.Walker:
        if layer.kind == "copy":
            return changes.Walker(
                layer.path,
                self._skeletons[layer.n],
                lower,
                skip=frozenset(name for name, _ in layer.placeholders),
                manifest=self.manifests.get(layer.n, frozenset()),
                deep=layer.deep,
            )
        return changes.Walker(layer.path, self._uppers[layer.n], lower)

    def _upper_fd(self, layer: layout.Layer) -> int:
        return self._skeletons[layer.n] if layer.kind == "copy" else self._uppers[layer.n]

    def _walk(self, paths: tuple[str, ...] = ()) -> tuple[dict[int, list[LayerChanges]], bool]:
        by_entry: dict[int, list[LayerChanges]] = {}
        truncated = False
        for entry, layer in self._tracked():
            lower = _open_real(layer.path)
            try:
                walker = self._changes_of(layer, lower)
                found = [c for c in walker.changes() if not paths or any(under(c.path, p) for p in paths)]
                truncated = truncated or walker.truncated
            finally:
                if lower is not None:
                    os.close(lower)
            by_entry.setdefault(entry, []).append((layer, found))
        return by_entry, truncated

    def diff(self) -> dict[str, Any]:
        if self._stage_fd < 0:
            raise ApiError(409, SESSION_NOT_ACTIVE, f"session {self.id} is {self.status}: its changes are gone")
        by_entry, truncated = self._walk()
        overlays = []
        total = {"added": 0, "modified": 0, "deleted": 0}
        for index, entry in enumerate(self.spec.overlays):
            item: dict[str, Any] = entry.wire()
            if index not in by_entry:
                item["tracked"] = False  # rw, ro or persist=false: no upper layer to read
                overlays.append(item)
                continue
            found = [c for _, layer_changes in by_entry[index] for c in layer_changes]
            summary = changes.summarize(found)
            for key, value in summary.items():
                total[key] += value
            item.update(
                tracked=True,
                changes=[c.wire() for c in found],
                summary=summary,
                upper_bytes=sum(
                    changes.upper_usage(self._uppers[layer.n])
                    for layer, _ in by_entry[index]
                    if layer.kind == "overlay"
                ),
            )
            overlays.append(item)
        return {"session_id": self.id, "overlays": overlays, "summary": total, "truncated": truncated}

    async def commit(self, spec: CommitSpec) -> dict[str, Any]:
        async with self.lock:
            if any(run.running for run in self.runs.values()):
                raise ApiError(409, errors.CONFLICT, "a background run is still active in this session")
            if spec.discard:
                await self._discard()
                return {"session_id": self.id, "discarded": True, "applied": [], "failed": []}
            if self._stage_fd < 0:
                raise ApiError(409, SESSION_NOT_ACTIVE, f"session {self.id} is {self.status}: its changes are gone")
            outcome = await asyncio.to_thread(self._commit, spec.paths)
            self.touch()
            log.info(
                "isolated session %s: committed %d changes (%d failed)",
                self.id,
                len(outcome.applied),
                len(outcome.failed),
            )
            summary = {"added": 0, "modified": 0, "deleted": 0}
            for applied in outcome.applied:
                summary[str(applied["kind"])] += 1
            return {
                "session_id": self.id,
                "discarded": False,
                "applied": outcome.applied,
                "failed": outcome.failed,
                "summary": summary,
            }

    def _commit(self, paths: tuple[str, ...]) -> committing.Outcome:
        by_entry, _ = self._walk(paths)
        total = committing.Outcome()
        for layered in by_entry.values():
            for layer, found in layered:
                if not found:
                    continue
                real = _open_real(layer.path)
                if real is None:
                    total.failed += [{**c.wire(), "error": "the real directory is gone"} for c in found]
                    continue
                try:
                    outcome = committing.apply(found, self._upper_fd(layer), real)
                finally:
                    os.close(real)
                total.applied += outcome.applied
                total.failed += outcome.failed
        return total

    async def _discard(self) -> None:
        """Throw the upper layers away: a new namespace over empty ones (the shell restarts in the
        same directory; its variables are lost)."""
        self._cancel_idle()
        self.status = "starting"
        self._stop()
        if self.settings.disk_upper:
            for sub in ("u", "w", "m", "ctl"):
                shutil.rmtree(os.path.join(self.stage, sub), ignore_errors=True)
        self._ctl_buf = b""
        self.restarted = True
        await self.start(_mounts())
        self.restarted = True

    # -- reporting ----------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "session_id": self.id,
            "status": "active" if self.status == "starting" else self.status,
            "created_at": times.rfc3339(self.created_at, digits=3),
            "last_run_at": times.rfc3339(self.last_run_at, digits=3),
            "idle_remaining_seconds": self.idle_remaining(),
            **self.spec.wire(),
        }
        if self.reason and self.status != "active":
            out["reason"] = self.reason
        out["cwd"] = self.cwd
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "session_id": self.id,
            "status": "active" if self.status == "starting" else self.status,
            "created_at": times.rfc3339(self.created_at, digits=3),
            "last_run_at": times.rfc3339(self.last_run_at, digits=3),
            "idle_remaining_seconds": self.idle_remaining(),
        }


def kind_of(path: str) -> str:
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return "missing"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    return "symlink" if stat.S_ISLNK(mode) else "other"


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def build_skeleton(source: str, target: str, placeholders: dict[str, bool]) -> frozenset[str]:
    """A copy layer's skeleton: `source`'s files, symlinks and named pipes copied (with their modes,
    owners and times), an empty directory or file for each placeholder. Returns the names copied."""
    st = os.stat(source)
    os.mkdir(target, 0o700)
    copied = set()
    for name in _listdir(source):
        path, into = os.path.join(source, name), os.path.join(target, name)
        if name in placeholders:
            if placeholders[name]:
                os.mkdir(into, 0o755)
            else:
                os.close(os.open(into, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
            continue
        try:
            lst = os.lstat(path)
            if stat.S_ISREG(lst.st_mode):
                shutil.copy2(path, into, follow_symlinks=False)
            elif stat.S_ISLNK(lst.st_mode):
                os.symlink(os.readlink(path), into)
            elif stat.S_ISFIFO(lst.st_mode):
                os.mkfifo(into, stat.S_IMODE(lst.st_mode))
            else:
                continue  # sockets and devices stay out (the session sees them as absent)
            os.chown(into, lst.st_uid, lst.st_gid, follow_symlinks=False)
        except OSError as exc:
            log.warning("skeleton of %s: cannot copy %s: %s", source, name, exc)
            continue
        copied.add(name)
    os.chown(target, st.st_uid, st.st_gid)
    os.chmod(target, stat.S_IMODE(st.st_mode))
    return frozenset(copied)


def build_copy(source: str, target: str, budget: list[int]) -> frozenset[str]:
    """A copy of the whole tree under `source` (modes, owners, times; symlinks as symlinks; named
    pipes; no sockets or devices; never into another filesystem), taken from `budget[0]` bytes.
    Returns the relative paths copied. 503 when the budget runs out."""
    copied: set[str] = set()
    device = os.lstat(source).st_dev
    dirs: list[tuple[str, os.stat_result]] = []

    def walk(src: str, dst: str, rel: str) -> None:
        try:
            entries = list(os.scandir(src))
        except OSError as exc:
            log.warning("copy of %s: cannot list %s: %s", source, src, exc)
            return
        for entry in entries:
            path, into = entry.path, os.path.join(dst, entry.name)
            name = f"{rel}/{entry.name}" if rel else entry.name
            try:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    os.mkdir(into, 0o700)
                    if st.st_dev == device:  # a mount point below: an empty directory
                        walk(path, into, name)
                    dirs.append((into, st))
                elif stat.S_ISREG(st.st_mode):
                    budget[0] -= st.st_size
                    if budget[0] < 0:
                        raise ApiError(
                            503,
                            errors.NOT_SUPPORTED,
                            f"{source} is too large to copy (this sandbox has no overlayfs, so a session's "
                            f"copy-on-write layers are copies; EXECD_ISOLATED_COPY_MAX_MIB bounds them)",
                        )
                    shutil.copy2(path, into, follow_symlinks=False)
                elif stat.S_ISLNK(st.st_mode):
                    os.symlink(os.readlink(path), into)
                elif stat.S_ISFIFO(st.st_mode):
                    os.mkfifo(into, stat.S_IMODE(st.st_mode))
                else:
                    continue
                os.chown(into, st.st_uid, st.st_gid, follow_symlinks=False)
            except OSError as exc:
                log.warning("copy of %s: cannot copy %s: %s", source, path, exc)
                continue
            copied.add(name)

    st = os.stat(source)
    os.mkdir(target, 0o700)
    walk(source, target, "")
    dirs.append((target, st))
    for path, dst in reversed(dirs):  # modes and times last, deepest first (a 0555 directory is filled first)
        with contextlib.suppress(OSError):
            os.chmod(path, stat.S_IMODE(dst.st_mode))
            os.utime(path, ns=(dst.st_atime_ns, dst.st_mtime_ns))
    return frozenset(copied)


def _existing_dir(*paths: str) -> str:
    """Where the session's first process starts: the first of `paths` that exists (execd's view)."""
    return next((path for path in paths if os.path.isdir(path)), "/")


def _read_info(fd: int) -> bytes:
    """bwrap's --info-fd JSON (written by bwrap right after it started the session's first process)."""
    out = b""
    while not out.rstrip().endswith(b"}"):
        data = os.read(fd, 65536)
        if not data:
            break
        out += data
    return out


def _open_real(path: str) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None


def _mounts() -> list[layout.Mount]:
    with open("/proc/self/mountinfo") as fh:
        return layout.parse_mountinfo(fh.read())
