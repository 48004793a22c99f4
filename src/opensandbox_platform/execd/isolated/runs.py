"""Background runs of a session: their output comes through a named pipe in the session's control
directory, and execd copies it into a log file of its own (outside the session, so session code
can neither read another run's log nor grow it past the cap). Each log keeps at most `LOG_CAP`
bytes; what comes after is read and dropped, so the run is never blocked by its log.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from dataclasses import dataclass, field

from opensandbox_platform.daemon import times

log = logging.getLogger("execd.isolated")

LOG_CAP = 16 * 1024 * 1024  # per run, as the SDK documents
PAGE_MAX = 16 * 1024 * 1024  # per logs call
READ_SIZE = 64 * 1024


@dataclass
class BackgroundRun:
    session_id: str
    run_id: str
    log_path: str
    started_at: float = field(default_factory=lambda: times.now().timestamp())
    finished_at: float | None = None
    exit_code: int | None = None
    error: str | None = None
    written: int = 0  # bytes kept in the log
    dropped: int = 0  # bytes read past the cap
    _pipe_fd: int = -1
    _hold_fd: int = -1  # our own write end: no end-of-file before the run has opened the pipe
    _log_fd: int = -1
    _loop: asyncio.AbstractEventLoop | None = None
    drained: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def running(self) -> bool:
        return self.finished_at is None

    def open(self, pipe_dir_fd: int, pipe_name: str) -> None:
        """Create the named pipe (in the control directory, by descriptor) and the log; start reading."""
        os.mkfifo(pipe_name, 0o600, dir_fd=pipe_dir_fd)
        self._pipe_fd = os.open(pipe_name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=pipe_dir_fd)
        self._hold_fd = os.open(pipe_name, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=pipe_dir_fd)
        self._log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._pipe_fd, self._readable)

    def _readable(self) -> None:
        while True:
            try:
                data = os.read(self._pipe_fd, READ_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                data = b""
            if not data:
                self._close_pipe()
                return
            room = LOG_CAP - self.written
            if room > 0:
                kept = data[:room]
                try:
                    os.write(self._log_fd, kept)
                except OSError as exc:  # a full disk: stop keeping, keep draining
                    log.warning("run %s: log write failed: %s", self.run_id, exc)
                    room = 0
                else:
                    self.written += len(kept)
            self.dropped += max(0, len(data) - max(room, 0))

    def _close_pipe(self) -> None:
        if self._pipe_fd >= 0:
            if self._loop is not None:
                self._loop.remove_reader(self._pipe_fd)
            os.close(self._pipe_fd)
            self._pipe_fd = -1
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1
        self.drained.set()

    def finish(self, exit_code: int | None, error: str | None = None) -> None:
        """The run ended (or its session did): stop holding the pipe open; its end comes once every
        process that inherited it is gone."""
        if self.finished_at is None:
            self.finished_at = times.now().timestamp()
            self.exit_code = exit_code
            self.error = error
        if self._hold_fd >= 0:
            os.close(self._hold_fd)
            self._hold_fd = -1
            if self._pipe_fd >= 0:
                self._readable()

    def close(self) -> None:
        """The session is gone: read what is buffered, then stop."""
        if self._pipe_fd >= 0:
            self._readable()
        self.finish(self.exit_code, self.error or "session terminated")
        self._close_pipe()

    def status(self) -> dict[str, object]:
        out: dict[str, object] = {
            "session_id": self.session_id,
            "run_id": self.run_id,
            "running": self.running,
            "exit_code": self.exit_code,
            "started_at": times.rfc3339(self.started_at, digits=3),
            "finished_at": times.rfc3339(self.finished_at, digits=3) if self.finished_at is not None else None,
        }
        if self.error:
            out["error"] = self.error
        if self.dropped:
            out["log_truncated_bytes"] = self.dropped
        return out

    def read_log(self, cursor: int, limit: int = PAGE_MAX) -> tuple[bytes, int]:
        """Bytes from `cursor` (at most `limit`) and the cursor to ask for next."""
        limit = max(1, min(limit, PAGE_MAX))
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(cursor)
                data = fh.read(limit)
        except FileNotFoundError:
            data = b""
        return data, cursor + len(data)

    def remove_log(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.log_path)
