"""Interactive terminals: a shell on a pseudo-terminal, driven over a WebSocket (`/pty`).

The wire protocol is upstream execd's (reference: upstream-server-sdk.md 2.6):
- `POST /pty` `{"cwd"?, "command"?}` → `{"session_id"}`: a shell (or `command`) on a new PTY;
  `GET /pty/{id}` → `{"session_id", "running", "output_offset"}`; `DELETE /pty/{id}` ends it.
- `GET /pty/{id}/ws[?since=N][&takeover=1]` upgrades to a WebSocket: first a text frame
  `{"type":"connected","session_id","mode":"pty"}`, then binary frames `0x01`+output; with `since`
  the output kept from byte offset N first comes as `0x03`+offset (8 bytes, big-endian)+bytes.
  The client sends `0x00`+input, and JSON text `{"type":"resize","cols","rows"}`,
  `{"type":"signal","signal":"SIGINT"}`, `{"type":"ping"}` (answered `{"type":"pong"}`). When the
  program exits: `{"type":"exit","exit_code"}`, then close 1000. One client at a time: a second
  gets `ALREADY_CONNECTED` (409) unless it asks `takeover=1`, which closes the first with 4001.

The user of a sandbox is hostile to execd, so every buffer is bounded: output kept for replay
(`REPLAY_BYTES`, oldest dropped), a message from the client (`MAX_MESSAGE`; larger closes with
1009), input (one message is written to the terminal before the next is read, so a program that
never reads its input stops the client's frames, not execd's memory), and output to a client that
never reads (the terminal is read only as fast as the socket drains: the program then blocks on
its writes). While no client is attached, output is read and kept in the replay buffer only.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import termios
from dataclasses import dataclass, field
from typing import Any

from opensandbox_platform.daemon import errors
from opensandbox_platform.daemon.errors import ApiError
from opensandbox_platform.daemon.websocket import NORMAL, Closed, WebSocket
from opensandbox_platform.execd.envfile import Environment, expand_path
from opensandbox_platform.execd.procs import WATCHER, Child, exit_code

log = logging.getLogger("execd.pty")

STDIN, STDOUT, REPLAY = 0x00, 0x01, 0x03
REPLAY_BYTES = 256 * 1024
MAX_MESSAGE = 64 * 1024
READ_SIZE = 16 * 1024
MAX_DIMENSION = 1000
TAKEN_OVER = 4001
SIGNALS = {name: getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGKILL", "SIGQUIT", "SIGHUP", "SIGTSTP")}
KEEPALIVE_SECONDS = 20.0
HANGUP_GRACE = 2.0


class Replay:
    """The last `limit` bytes of output with their absolute offsets."""

    def __init__(self, limit: int = REPLAY_BYTES) -> None:
        self.limit = limit
        self.data = bytearray()
        self.end = 0  # offset just past the last byte ever written

    @property
    def start(self) -> int:
        return self.end - len(self.data)

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        self.end += len(chunk)
        if len(self.data) > self.limit:
            del self.data[: len(self.data) - self.limit]

    def since(self, offset: int) -> tuple[int, bytes]:
        """(offset of the first byte returned, bytes from `offset` or the oldest kept one)."""
        first = min(max(offset, self.start), self.end)
        return first, bytes(self.data[first - self.start :])


def _controlling_terminal() -> None:
    """Runs in the child between fork and exec (subprocess's preexec_fn): the new session's leader
    takes its standard input, the PTY, as its controlling terminal, so ^C reaches the foreground job
    and job control works. Only a system call: nothing here takes a lock another thread could hold."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _set_size(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


@dataclass
class PtySession:
    id: str
    child: Child
    master: int
    replay: Replay = field(default_factory=Replay)
    client: WebSocket | None = None
    client_offset: int = 0  # output below this offset has been sent to the client
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    exit_code: int | None = None
    hung_up: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    _send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _reader: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return not self.exited.is_set()

    def wire(self) -> dict[str, Any]:
        return {"session_id": self.id, "running": self.running, "output_offset": self.replay.end}

    # -- output: the terminal → the replay buffer and the client ---------------------------------------
    async def pump_output(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            chunk = await _read(loop, self.master, self.child.exited)
            if not chunk:
                break
            start = self.replay.end
            self.replay.add(chunk)
            await self._send_output(start, chunk)
        status = await self.child.exited
        self.exit_code = exit_code(status)
        self.exited.set()
        async with self._send_lock:
            client = self.client
        if client is not None:
            with contextlib.suppress(Closed, ConnectionError):
                await client.send_text(json.dumps({"type": "exit", "exit_code": self.exit_code}))
                await client.close(NORMAL)

    async def _send_output(self, start: int, chunk: bytes) -> None:
        async with self._send_lock:
            client = self.client
            if client is None or start + len(chunk) <= self.client_offset:
                return
            fresh = chunk[max(self.client_offset - start, 0) :]
            self.client_offset = start + len(chunk)
            try:
                await client.send_bytes(bytes([STDOUT]) + fresh)  # waits while the client does not read
            except (Closed, ConnectionError):
                self.client = None if self.client is client else self.client

    # -- a client ----------------------------------------------------------------------------------------
    async def attach(self, ws: WebSocket, since: int | None, takeover: bool) -> None:
        async with self._send_lock:
            previous = self.client
            if previous is not None and not previous.closed.done():
                if not takeover:
                    await _refuse(ws, "ALREADY_CONNECTED", "another client holds this terminal; ask takeover=1")
                    return
                self.client = None
                await _refuse(previous, "TAKEN_OVER", "another client took this terminal over", TAKEN_OVER)
            await ws.send_text(json.dumps({"type": "connected", "session_id": self.id, "mode": "pty"}))
            self.client_offset = self.replay.end
            if since is not None:
                first, kept = self.replay.since(since)
                if kept:
                    await ws.send_bytes(bytes([REPLAY]) + struct.pack("!Q", first) + kept)
            self.client = ws
        if not self.running:  # it ended before this client came: tell it at once
            await ws.send_text(json.dumps({"type": "exit", "exit_code": self.exit_code}))
            await ws.close(NORMAL)
            return
        keepalive = asyncio.create_task(ws.keepalive(KEEPALIVE_SECONDS))
        try:
            await self._read_client(ws)
        finally:
            keepalive.cancel()
            async with self._send_lock:
                if self.client is ws:
                    self.client = None

    async def _read_client(self, ws: WebSocket) -> None:
        while True:
            try:
                message = await ws.receive()
            except Closed:
                return
            if message.opcode == 0x2:  # binary: a channel byte, then data
                if message.data[:1] != bytes([STDIN]):
                    await _error(ws, "INVALID_FRAME", "binary frames carry input: 0x00 then the bytes")
                    continue
                if not await self._write_input(message.data[1:]):
                    await _error(ws, "STDIN_WRITE_FAILED", "the terminal is closed")
                continue
            await self._control(ws, message.data)

    async def _control(self, ws: WebSocket, raw: bytes) -> None:
        try:
            command = json.loads(raw)
            kind = command["type"] if isinstance(command, dict) else None
        except (ValueError, KeyError):
            kind = None
        if kind == "ping":
            await ws.send_text('{"type":"pong"}')
        elif kind == "resize":
            cols, rows = command.get("cols"), command.get("rows")
            if not all(
                isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_DIMENSION for v in (cols, rows)
            ):
                await _error(ws, "INVALID_FRAME", f"resize needs integer cols and rows in 1-{MAX_DIMENSION}")
                return
            _set_size(self.master, cols, rows)  # the kernel sends SIGWINCH to the foreground job
        elif kind == "signal":
            number = SIGNALS.get(str(command.get("signal", "")).upper())
            if number is None:
                await _error(ws, "INVALID_FRAME", f"signal must be one of {', '.join(SIGNALS)}")
                return
            self._signal_foreground(number)
        else:
            await _error(ws, "INVALID_FRAME", "text frames are JSON control messages: resize, signal, ping")

    def _signal_foreground(self, number: int) -> None:
        with contextlib.suppress(OSError):
            group = os.tcgetpgrp(self.master)
            os.killpg(group if group > 0 else self.child.pid, number)

    async def _write_input(self, data: bytes) -> bool:
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.master, view)
            except BlockingIOError:
                # The program is not reading: so neither do we (until it does, exits or is deleted).
                if not await _writable(loop, self.master, self.child.exited, self.hung_up):
                    return False
                continue
            except OSError:
                return False
            view = view[written:]
        return True

    def close(self) -> None:
        """Hang up: the program and its job get SIGHUP (as when a terminal window closes), and
        whatever is left of the program's process group SIGKILL a moment later."""
        if self._reader is not None:
            self._reader.cancel()
        _resolve(self.hung_up)
        with contextlib.suppress(OSError):
            os.close(self.master)
        if self.running:
            self.child.signal_group(signal.SIGHUP)
            asyncio.get_running_loop().call_later(HANGUP_GRACE, self.child.signal_group, signal.SIGKILL)


async def _read(loop: asyncio.AbstractEventLoop, fd: int, exited: asyncio.Future[int]) -> bytes:
    """The next output of the terminal; b"" once every process holding it has gone (EIO), or once
    the program has exited and what it wrote has been read (a background job it left behind may
    hold the terminal open: the session ends with the program, as a terminal window does)."""
    while True:
        try:
            return os.read(fd, READ_SIZE)
        except BlockingIOError:
            if exited.done():
                return b""
        except OSError as exc:
            if exc.errno != errno.EIO:
                log.debug("pty read failed: %s", exc)
            return b""
        ready: asyncio.Future[Any] = loop.create_future()
        loop.add_reader(fd, _resolve, ready)
        try:
            await asyncio.wait([ready, exited], return_when=asyncio.FIRST_COMPLETED)
        finally:
            loop.remove_reader(fd)


def _resolve(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_result(None)


async def _writable(loop: asyncio.AbstractEventLoop, fd: int, *ended: asyncio.Future[Any]) -> bool:
    """True once `fd` can be written; False if one of `ended` happens first."""
    ready: asyncio.Future[Any] = loop.create_future()
    loop.add_writer(fd, _resolve, ready)
    try:
        await asyncio.wait([ready, *ended], return_when=asyncio.FIRST_COMPLETED)
    finally:
        loop.remove_writer(fd)
    return ready.done()


async def _error(ws: WebSocket, code: str, message: str) -> None:
    await ws.send_text(json.dumps({"type": "error", "code": code, "message": message}))


async def _refuse(ws: WebSocket, code: str, message: str, close_code: int = 4009) -> None:
    with contextlib.suppress(Closed, ConnectionError):
        await _error(ws, code, message)
        await ws.close(close_code, code)


class PtyManager:
    def __init__(self, environment: Environment, max_sessions: int = 16) -> None:
        self.environment = environment
        self.max_sessions = max_sessions
        self.sessions: dict[str, PtySession] = {}

    def create(self, body: Any, default_cwd: str) -> PtySession:
        if not isinstance(body, dict):
            raise errors.bad_request("the body must be a JSON object: {cwd?, command?}")
        command, cwd = body.get("command"), body.get("cwd") or default_cwd
        if command is not None and (not isinstance(command, str) or not command.strip()):
            raise errors.bad_request("command must be a non-empty string")
        if not isinstance(cwd, str):
            raise errors.bad_request("cwd must be a string")
        self._forget_exited()
        if len(self.sessions) >= self.max_sessions:
            raise ApiError(429, errors.TOO_MANY_SESSIONS, f"at most {self.max_sessions} terminals at once")
        env = {**self.environment.compose(), "TERM": "xterm-256color"}
        try:
            cwd = expand_path(cwd, env)
        except KeyError as missing:
            raise errors.bad_request(f"cwd names an undefined variable {missing}") from None
        shell = shutil.which("bash", path=env.get("PATH")) or shutil.which("sh", path=env.get("PATH")) or "/bin/sh"
        argv = [shell, "-c", command] if command else [shell, "-l"]
        session = self._spawn(argv, env, cwd)
        self.sessions[session.id] = session
        return session

    def _spawn(self, argv: list[str], env: dict[str, str], cwd: str) -> PtySession:
        master, slave = os.openpty()
        try:
            _set_size(master, 80, 24)
            popen = subprocess.Popen(
                argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                cwd=cwd,
                env=env,
                close_fds=True,
                start_new_session=True,
                preexec_fn=_controlling_terminal,  # a single ioctl: see its docstring
            )
        except OSError as exc:
            os.close(master)
            raise (
                errors.os_error(exc, cwd)
                if exc.filename == cwd
                else ApiError(500, errors.RUNTIME_ERROR, f"cannot start {argv[0]}: {exc.strerror}")
            ) from None
        finally:
            os.close(slave)  # the child has its own copies; EIO on the master then means all are gone
        os.set_blocking(master, False)
        session = PtySession(os.urandom(16).hex(), Child(popen, WATCHER.watch(popen.pid)), master)
        session._reader = asyncio.get_running_loop().create_task(session.pump_output())
        return session

    def get(self, session_id: str) -> PtySession:
        session = self.sessions.get(session_id)
        if session is None:
            raise errors.not_found(f"terminal session {session_id} not found", "SESSION_GONE")
        return session

    def delete(self, session_id: str) -> None:
        self.get(session_id).close()
        del self.sessions[session_id]

    def _forget_exited(self) -> None:
        """Ended sessions without a client make room for new ones."""
        for session_id, session in list(self.sessions.items()):
            if not session.running and session.client is None:
                session.close()
                del self.sessions[session_id]

    def shutdown(self) -> None:
        for session in self.sessions.values():
            session.close()
        self.sessions.clear()
