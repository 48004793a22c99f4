"""Bash sessions: one persistent shell per session, so `cd`, exports, variables and functions
carry over from one run to the next.

Each run's code is written to a file and sourced by the shell (`. file </dev/null`), so a syntax
error or a stray read of stdin cannot derail the shell's own input. After the code, the shell
prints a per-run random token on stdout (followed by the exit code and working directory) and on
stderr; everything before the token is the run's output. If the code ends the shell (`exit 7`),
the run reports that exit code and the next run starts a fresh shell in the last known directory
(exported variables of the old shell are lost then).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

from opensandbox_platform.daemon import errors
from opensandbox_platform.daemon.errors import ApiError
from opensandbox_platform.execd import procs, sse
from opensandbox_platform.execd.commands import MAX_TIMEOUT_MS, new_id, optional_int, resolve_cwd, stream_output
from opensandbox_platform.execd.envfile import Environment, expand_path

log = logging.getLogger("execd.sessions")


class MarkerScanner:
    """Passes bytes through until `marker` appears; then hands back what follows it."""

    def __init__(self, marker: bytes) -> None:
        self._marker = marker
        self._held = b""
        self.found = False

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        """(output before the marker, bytes after the marker or None if not seen yet)."""
        buf = self._held + data if self._held else data
        index = buf.find(self._marker)
        if index >= 0:
            self.found = True
            self._held = b""
            return buf[:index], buf[index + len(self._marker) :]
        # Hold back only a suffix that could be the start of the marker.
        hold = 0
        for k in range(min(len(self._marker) - 1, len(buf)), 0, -1):
            if self._marker.startswith(buf[-k:]):
                hold = k
                break
        if hold:
            self._held = buf[-hold:]
            return buf[:-hold], None
        self._held = b""
        return buf, None


class _Shell:
    def __init__(self, child: procs.Child, stdin_fd: int, pump: procs.OutputPump) -> None:
        self.child = child
        self.stdin_fd = stdin_fd
        self.pump = pump

    def close(self) -> None:
        self.child.signal_group(signal.SIGKILL)
        self.pump.close()
        with contextlib.suppress(OSError):
            os.close(self.stdin_fd)


class Session:
    def __init__(self, session_id: str, cwd: str, env: dict[str, str]) -> None:
        self.id = session_id
        self.cwd = cwd
        self.env = env
        self.lock = asyncio.Lock()
        self.shell: _Shell | None = None
        self.killed_reason: str | None = None
        self.last_used = time.monotonic()

    def idle_for(self, now: float) -> float:
        """Seconds since the session was last created or ran code (0 while code runs)."""
        return 0.0 if self.lock.locked() else now - self.last_used


def _shell_argv() -> list[str]:
    bash = procs.which("bash")
    return [bash, "--noprofile", "--norc"] if bash else [procs.which("sh") or "/bin/sh"]


class SessionManager:
    """The sessions: at most `max_sessions` at once (one more is a 429), and a session unused for
    `idle_timeout` seconds (0: never) is deleted by a sweep, so abandoned shells do not pile up."""

    def __init__(
        self,
        environment: Environment,
        state_dir: str,
        *,
        ping_interval: float = 3.0,
        max_sessions: int = 64,
        idle_timeout: float = 3600.0,
    ) -> None:
        self.environment = environment
        self.state_dir = state_dir
        self.ping_interval = ping_interval
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self._sessions: dict[str, Session] = {}
        self._argv = _shell_argv()
        self._sweeper: asyncio.TimerHandle | None = None

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def __len__(self) -> int:
        return len(self._sessions)

    def reap_idle(self) -> list[str]:
        """Delete the sessions unused for longer than `idle_timeout`; their ids."""
        if not self.idle_timeout:
            return []
        now = time.monotonic()
        expired = [s.id for s in self._sessions.values() if s.idle_for(now) > self.idle_timeout]
        for session_id in expired:
            self.delete(session_id)
            log.info("session deleted after %gs unused id=%s", self.idle_timeout, session_id)
        return expired

    def _schedule_sweep(self) -> None:
        if not self.idle_timeout or self._sweeper is not None or not self._sessions:
            return

        def sweep() -> None:
            self._sweeper = None
            self.reap_idle()
            self._schedule_sweep()

        interval = min(max(self.idle_timeout / 4, 0.05), 60.0)
        self._sweeper = asyncio.get_running_loop().call_later(interval, sweep)

    def create(self, body: Any, default_cwd: str) -> str:
        if not isinstance(body, dict):
            raise errors.bad_request("request body must be a JSON object")
        self.reap_idle()
        if len(self._sessions) >= self.max_sessions:
            raise ApiError(
                429,
                errors.TOO_MANY_SESSIONS,
                f"{len(self._sessions)} sessions are open (the limit): delete one first",
                {"retry-after": "1"},
            )
        raw_cwd = body.get("cwd")
        if raw_cwd is not None and (not isinstance(raw_cwd, str) or "\0" in raw_cwd):
            raise errors.bad_request("'cwd' must be a string without NUL")
        env = self.environment.compose()
        cwd = default_cwd
        if raw_cwd:
            try:
                cwd = expand_path(raw_cwd, env)
            except KeyError as exc:
                raise errors.bad_request(f"'cwd' uses undefined variable {exc.args[0]}") from None
            cwd = os.path.join(default_cwd, cwd)
            try:
                os.makedirs(cwd, exist_ok=True)
            except OSError as exc:
                raise errors.os_error(exc, cwd) from None
        session = Session(new_id(), cwd, env)
        session.shell = self._start_shell(session)
        self._sessions[session.id] = session
        self._schedule_sweep()
        log.info("session created id=%s", session.id)
        return session.id

    def _start_shell(self, session: Session) -> _Shell:
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = procs.nonblocking_pipe()
        err_r, err_w = procs.nonblocking_pipe()
        try:
            cwd = session.cwd if os.path.isdir(session.cwd) else "/"
            child = procs.spawn(self._argv, env=session.env, cwd=cwd, stdin=in_r, stdout=out_w, stderr=err_w)
        except OSError as exc:
            for fd in (in_w, out_r, err_r):
                os.close(fd)
            raise ApiError(500, errors.RUNTIME_ERROR, f"cannot start a shell: {exc.strerror}") from None
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        return _Shell(child, in_w, procs.OutputPump({"stdout": out_r, "stderr": err_r}, child.exited))

    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise errors.not_found(f"session not found: {session_id}")
        return session

    def prepare_run(self, session_id: str, body: Any) -> tuple[Session, str, str | None, int | None]:
        """Validate a run request (400/404 before the stream starts)."""
        session = self.get(session_id)
        if not isinstance(body, dict):
            raise errors.bad_request("request body must be a JSON object")
        command = body.get("command")
        if not isinstance(command, str) or not command.strip():
            raise errors.bad_request("'command' must be a non-empty string")
        timeout = optional_int(body, "timeout", MAX_TIMEOUT_MS)
        raw_cwd = body.get("cwd")
        cwd = None if raw_cwd is None or raw_cwd == "" else resolve_cwd(raw_cwd, session.env, session.cwd)
        return session, command, cwd, timeout or None

    async def run(
        self,
        session: Session,
        command: str,
        cwd: str | None,
        timeout_ms: int | None,
        disconnected: asyncio.Future[None],
    ) -> AsyncIterator[bytes]:
        async with session.lock:
            try:
                async for frame in self._run_locked(session, command, cwd, timeout_ms, disconnected):
                    yield frame
            finally:
                session.last_used = time.monotonic()

    async def _run_locked(
        self,
        session: Session,
        command: str,
        cwd: str | None,
        timeout_ms: int | None,
        disconnected: asyncio.Future[None],
    ) -> AsyncIterator[bytes]:
        yield sse.event("init", text=session.id)
        started = time.monotonic()
        if session.shell is None or not session.shell.child.running:
            if session.shell is not None:
                session.shell.close()
            session.shell = self._start_shell(session)
        shell = session.shell
        session.killed_reason = None
        token = f"__OSB_{os.urandom(12).hex()}__"
        # The script's name must not contain the token: bash names the file in its error messages.
        script = os.path.join(self.state_dir, f"session-{session.id}-{os.urandom(6).hex()}.sh")
        fd = os.open(script, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, (command if command.endswith("\n") else command + "\n").encode())
        finally:
            os.close(fd)
        quoted = shlex.quote(script)
        cd = f"cd -- {shlex.quote(cwd)} && " if cwd else ""
        line = (
            f"{cd}. {quoted} </dev/null; __osb_rc=$?; rm -f {quoted}; "
            f"printf '%s:%s:%s\\n' {token} \"$__osb_rc\" \"$PWD\"; printf '%s\\n' {token} >&2\n"
        )
        with contextlib.suppress(OSError):  # a dead shell is reported below, as its exit
            os.write(shell.stdin_fd, line.encode())
        timer = None
        if timeout_ms:
            timer = asyncio.get_running_loop().call_later(timeout_ms / 1000, self._expire, session, shell, timeout_ms)
        scanner = _RunScanner(token.encode())
        try:
            async for frame in stream_output(_ScannedPump(shell.pump, scanner), self.ping_interval, disconnected):
                yield frame
            if disconnected.done():
                shell.close()
                return
            if scanner.trailer_done:
                code, pwd = scanner.result()
                if pwd:
                    session.cwd = pwd
                message = f"exit status {code}"
            else:
                # The code ended the shell (exit, exec, a fatal signal or our timeout).
                code = procs.exit_code(await shell.child.exited)
                message = session.killed_reason or f"shell exited with status {code}"
                shell.close()
                session.shell = None
            elapsed = int((time.monotonic() - started) * 1000)
            if code == 0:
                yield sse.event("execution_complete", execution_time=elapsed)
            else:
                yield sse.event("error", error=sse.error_value("CommandExecError", str(code), [message]))
        finally:
            if timer is not None:
                timer.cancel()
            with contextlib.suppress(OSError):
                os.unlink(script)

    def _expire(self, session: Session, shell: _Shell, timeout_ms: int) -> None:
        session.killed_reason = f"killed after timeout of {timeout_ms} ms"
        shell.child.signal_group(signal.SIGKILL)

    def interrupt(self, session_id: str, grace: float) -> None:
        session = self.get(session_id)
        if session.shell is not None and session.shell.child.running:
            session.killed_reason = "interrupted"
            procs.terminate_group(session.shell.child, grace)

    def delete(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is None:
            raise errors.not_found(f"session not found: {session_id}")
        if session.shell is not None:
            session.shell.close()
        log.info("session deleted id=%s", session_id)

    def shutdown(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for session in self._sessions.values():
            if session.shell is not None:
                session.shell.close()
        self._sessions.clear()


class _RunScanner:
    """Finds the end-of-run token on both streams and parses `:<code>:<cwd>` after it."""

    def __init__(self, token: bytes) -> None:
        self.streams = {"stdout": MarkerScanner(token), "stderr": MarkerScanner(token)}
        self._trailer = b""
        self.trailer_done = False

    @property
    def done(self) -> bool:
        return self.trailer_done and self.streams["stderr"].found

    def feed(self, name: str, data: bytes) -> bytes:
        scanner = self.streams[name]
        if scanner.found:
            if name == "stdout" and not self.trailer_done:
                self._take_trailer(data)
            return b""  # output after the token belongs to no run
        out, rest = scanner.feed(data)
        if rest is not None and name == "stdout":
            self._take_trailer(rest)
        return out

    def _take_trailer(self, data: bytes) -> None:
        self._trailer += data
        if b"\n" in self._trailer:
            self.trailer_done = True

    def result(self) -> tuple[int, str]:
        line = self._trailer.split(b"\n", 1)[0].decode("utf-8", "replace")
        _, code_text, pwd = line.split(":", 2) if line.count(":") >= 2 else ("", "1", "")
        try:
            return int(code_text), pwd
        except ValueError:
            return 1, pwd


class _ScannedPump:
    """An OutputPump view that ends at the run's token instead of at the shell's exit."""

    def __init__(self, pump: procs.OutputPump, scanner: _RunScanner) -> None:
        self._pump = pump
        self._scanner = scanner

    async def next(self, idle_after: float | None = None, cancel: asyncio.Future[Any] | None = None) -> procs.Output:
        while not self._scanner.done:
            item = await self._pump.next(idle_after, cancel)
            if item is None or item == procs.IDLE:
                return item
            name, data = item
            out = self._scanner.feed(name, data)
            if out:
                return name, out
        return None
