"""`POST /command` and friends: run, stream, status, logs, interrupt.

A foreground command streams its output as it is produced: `init` (text = command id), one
`stdout`/`stderr` event per line, then `execution_complete` on exit code 0 or `error` (evalue =
exit code) otherwise, and the stream ends at once. Output is read from the pipes only as fast as
the client consumes the stream. A background command writes its combined output to a log file,
read back with `GET /command/{id}/logs?cursor=<byte offset>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from typing import Any

from opensandbox_platform.daemon import errors
from opensandbox_platform.execd import procs, sse
from opensandbox_platform.execd.envfile import Environment, expand_path, valid_key

log = logging.getLogger("execd.commands")

MAX_FINISHED_RECORDS = 1000
MAX_LOG_READ = 4 * 1024 * 1024


def find_shell() -> list[str]:
    """bash (without profile/rc files) when present, else sh: how string commands are run."""
    bash = procs.which("bash")
    if bash:
        return [bash, "--noprofile", "--norc", "-c"]
    return [procs.which("sh") or "/bin/sh", "-c"]


def new_id() -> str:
    return os.urandom(16).hex()


class CommandSpec:
    """A validated run request. (Plain classes here: a dataclass costs execd a millisecond of
    exec() at every start.)"""

    __slots__ = ("argv", "background", "content", "cwd", "env", "gid", "timeout_ms", "uid")

    def __init__(
        self,
        argv: list[str],
        content: str,
        cwd: str,
        env: dict[str, str],
        background: bool = False,
        timeout_ms: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
    ) -> None:
        self.argv = argv
        self.content = content
        self.cwd = cwd
        self.env = env
        self.background = background
        self.timeout_ms = timeout_ms
        self.uid = uid
        self.gid = gid


# The largest uid/gid the API takes (an int32, as upstream's document says; Linux's go to 2**32 - 2).
MAX_ID = 2**31 - 1
# The longest timeout a command can ask for: ~24 days; asyncio's timers and poll(2) take it.
MAX_TIMEOUT_MS = 2**31 - 1


def optional_int(body: Mapping[str, Any], name: str, maximum: int, minimum: int = 0) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise errors.bad_request(f"'{name}' must be an integer from {minimum} to {maximum}")
    return value


def parse_run_request(body: Any, environment: Environment, default_cwd: str, shell: list[str]) -> CommandSpec:
    """Validate a `POST /command` body; every problem is a 400 before anything starts."""
    if not isinstance(body, dict):
        raise errors.bad_request("request body must be a JSON object")
    command = body.get("command")
    argv = body.get("argv")
    if (command is None) == (argv is None):
        raise errors.bad_request("exactly one of 'command' and 'argv' is required")
    if command is not None:
        if not isinstance(command, str) or not command.strip():
            raise errors.bad_request("'command' must be a non-empty string")
        if "\0" in command:
            raise errors.bad_request("'command' must not contain NUL")
        run_argv = [*shell, command]
        content = command
    else:
        if (
            not isinstance(argv, list)
            or not argv
            or not all(isinstance(a, str) and "\0" not in a for a in argv)
            or not argv[0]
        ):
            raise errors.bad_request("'argv' must be a non-empty list of strings without NUL")
        run_argv = list(argv)
        content = shlex.join(argv)

    envs = body.get("envs")
    if envs is not None and not _is_env_map(envs):
        raise errors.bad_request("'envs' must map variable names to strings")
    env = environment.compose(envs)

    background = body.get("background", False)
    if not isinstance(background, bool):
        raise errors.bad_request("'background' must be a boolean")
    timeout_ms = optional_int(body, "timeout", MAX_TIMEOUT_MS)
    uid = optional_int(body, "uid", MAX_ID)
    gid = optional_int(body, "gid", MAX_ID)
    if gid is not None and uid is None:
        raise errors.bad_request("'gid' requires 'uid'")
    if uid is not None and gid is None:
        gid = _primary_gid(uid)
    cwd = resolve_cwd(body.get("cwd"), env, default_cwd)
    return CommandSpec(run_argv, content, cwd, env, background, timeout_ms or None, uid, gid)


def _is_env_map(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and valid_key(k) and isinstance(v, str) and "\0" not in v for k, v in value.items()
    )


def resolve_cwd(raw: Any, env: Mapping[str, str], default_cwd: str) -> str:
    if raw is None or raw == "":
        return default_cwd
    if not isinstance(raw, str) or "\0" in raw:
        raise errors.bad_request("'cwd' must be a string without NUL")
    try:
        cwd = expand_path(raw, env)
    except KeyError as exc:
        raise errors.bad_request(f"'cwd' uses undefined variable {exc.args[0]}") from None
    if not os.path.isabs(cwd):
        cwd = os.path.join(default_cwd, cwd)
    if not os.path.isdir(cwd):
        raise errors.bad_request(f"working directory does not exist: {cwd}")
    return cwd


def _primary_gid(uid: int) -> int:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return uid


class CommandRecord:
    __slots__ = (
        "background",
        "child",
        "content",
        "error",
        "execution_ms",
        "exit_code",
        "finished_at",
        "id",
        "killed_reason",
        "log_path",
        "started_at",
    )

    def __init__(self, id: str, content: str, background: bool) -> None:
        self.id = id
        self.content = content
        self.background = background
        self.started_at = time.time()
        self.finished_at: float | None = None
        self.exit_code: int | None = None
        self.error = ""
        self.child: procs.Child | None = None
        self.log_path: str | None = None
        self.killed_reason: str | None = None
        self.execution_ms = 0

    @property
    def running(self) -> bool:
        return self.finished_at is None

    def finish(self, code: int, message: str = "") -> None:
        if self.finished_at is not None:
            return
        self.finished_at = time.time()
        self.exit_code = code
        self.error = message
        self.execution_ms = int((self.finished_at - self.started_at) * 1000)

    def status(self) -> dict[str, Any]:
        from opensandbox_platform.daemon import times  # (datetime: not needed to start)

        return {
            "id": self.id,
            "content": self.content,
            "running": self.running,
            "exit_code": self.exit_code,
            "error": self.error,
            "started_at": times.rfc3339(self.started_at, digits=3),
            "finished_at": None if self.finished_at is None else times.rfc3339(self.finished_at, digits=3),
        }


def describe_exit(code: int, killed_reason: str | None) -> str:
    if killed_reason:
        return killed_reason
    if code > 128 and code - 128 < signal.NSIG:
        try:
            return f"killed by signal {signal.Signals(code - 128).name}"
        except ValueError:
            pass
    return f"exit status {code}"


def start_error(exc: OSError) -> tuple[int, str]:
    """A failed exec as a shell reports it: 127 not found, 126 cannot execute."""
    code = 127 if isinstance(exc, FileNotFoundError) else 126
    return code, f"failed to start: {exc.strerror or exc}"


class CommandManager:
    """Runs commands and remembers them (the last MAX_FINISHED_RECORDS finished ones)."""

    def __init__(
        self,
        environment: Environment,
        state_dir: str,
        *,
        ping_interval: float = 3.0,
        interrupt_grace: float = 3.0,
    ) -> None:
        self.environment = environment
        self.state_dir = state_dir
        self.ping_interval = ping_interval
        self.interrupt_grace = interrupt_grace
        self.shell = find_shell()
        self._records: OrderedDict[str, CommandRecord] = OrderedDict()

    # -- bookkeeping -------------------------------------------------------------------------

    def _add(self, record: CommandRecord) -> None:
        self._records[record.id] = record
        finished = [r for r in self._records.values() if not r.running]
        for old in finished[: max(0, len(finished) - MAX_FINISHED_RECORDS)]:
            del self._records[old.id]
            if old.log_path:
                with contextlib.suppress(OSError):
                    os.unlink(old.log_path)

    def get(self, command_id: str) -> CommandRecord:
        record = self._records.get(command_id)
        if record is None:
            raise errors.not_found(f"command not found: {command_id}")
        return record

    def _watch_exit(self, record: CommandRecord, child: procs.Child, timer: asyncio.TimerHandle | None) -> None:
        def done(fut: asyncio.Future[int]) -> None:
            if timer is not None:
                timer.cancel()
            code = procs.exit_code(fut.result())
            record.finish(code, "" if code == 0 else describe_exit(code, record.killed_reason))
            log.debug(
                "command finished id=%s code=%d ms=%d background=%s",
                record.id,
                code,
                record.execution_ms,
                record.background,
            )

        child.exited.add_done_callback(done)

    def _timeout_timer(self, record: CommandRecord, child: procs.Child, timeout_ms: int | None) -> Any:
        if not timeout_ms:
            return None

        def expire() -> None:
            if child.running:
                record.killed_reason = f"killed after timeout of {timeout_ms} ms"
                child.signal_group(signal.SIGKILL)

        return asyncio.get_running_loop().call_later(timeout_ms / 1000, expire)

    # -- running -----------------------------------------------------------------------------

    def run(self, spec: CommandSpec, disconnected: asyncio.Future[None]) -> AsyncIterator[bytes]:
        record = CommandRecord(new_id(), spec.content, spec.background)
        self._add(record)
        log.debug("command started id=%s background=%s", record.id, spec.background)
        if spec.background:
            return self._background(record, spec)
        return self._foreground(record, spec, disconnected)

    async def _background(self, record: CommandRecord, spec: CommandSpec) -> AsyncIterator[bytes]:
        yield sse.event("init", text=record.id)
        path = os.path.join(self.state_dir, f"{record.id}.log")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            record.finish(1, f"cannot create log file: {exc.strerror}")
            yield _error_event(1, record.error)
            return
        record.log_path = path
        try:
            child = procs.spawn(spec.argv, env=spec.env, cwd=spec.cwd, stdout=fd, stderr=fd, uid=spec.uid, gid=spec.gid)
        except OSError as exc:
            code, message = start_error(exc)
            record.finish(code, message)
            os.write(fd, (message + "\n").encode())
            yield _error_event(code, message)
            return
        finally:
            os.close(fd)
        record.child = child
        self._watch_exit(record, child, self._timeout_timer(record, child, spec.timeout_ms))
        yield sse.event("execution_complete", execution_time=0)

    async def _foreground(
        self, record: CommandRecord, spec: CommandSpec, disconnected: asyncio.Future[None]
    ) -> AsyncIterator[bytes]:
        yield sse.event("init", text=record.id)
        out_r, out_w = procs.nonblocking_pipe()
        err_r, err_w = procs.nonblocking_pipe()
        try:
            child = procs.spawn(
                spec.argv, env=spec.env, cwd=spec.cwd, stdout=out_w, stderr=err_w, uid=spec.uid, gid=spec.gid
            )
        except OSError as exc:
            for fd in (out_r, err_r):
                os.close(fd)
            code, message = start_error(exc)
            record.finish(code, message)
            yield _error_event(code, message)
            return
        finally:
            os.close(out_w)
            os.close(err_w)
        record.child = child
        self._watch_exit(record, child, self._timeout_timer(record, child, spec.timeout_ms))
        pump = procs.OutputPump({"stdout": out_r, "stderr": err_r}, child.exited)
        try:
            async for frame in stream_output(pump, self.ping_interval, disconnected):
                yield frame
            if disconnected.done():
                return
            code = procs.exit_code(await child.exited)
            record.finish(code, "" if code == 0 else describe_exit(code, record.killed_reason))
            if code == 0:
                yield sse.event("execution_complete", execution_time=record.execution_ms)
            else:
                yield _error_event(code, record.error)
        finally:
            pump.close()
            if child.running:
                # The client went away (or the server is stopping): nobody can see this
                # command's output any more, so it does not outlive its stream.
                record.killed_reason = record.killed_reason or "killed: client disconnected"
                child.signal_group(signal.SIGKILL)

    # -- status, logs, interrupt ------------------------------------------------------------

    def status(self, command_id: str) -> dict[str, Any]:
        return self.get(command_id).status()

    def logs(self, command_id: str, cursor: int) -> tuple[bytes, int]:
        """Output from byte offset `cursor` on, and the offset to ask for next."""
        record = self.get(command_id)
        if record.log_path is None:
            if record.background:
                return b"", 0
            raise errors.bad_request(f"command {command_id} ran in the foreground; its output was streamed")
        try:
            with open(record.log_path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                cursor = min(cursor, size)
                fh.seek(cursor)
                data = fh.read(MAX_LOG_READ)
        except FileNotFoundError:
            return b"", cursor
        if len(data) == MAX_LOG_READ:
            data = data[: sse.utf8_cut(data, len(data) - 1)]
        return data, cursor + len(data)

    def interrupt(self, command_id: str) -> None:
        record = self.get(command_id)
        child = record.child
        if child is None or not child.running:
            return
        record.killed_reason = "interrupted"
        log.info("command interrupted id=%s", command_id)
        procs.terminate_group(child, self.interrupt_grace)

    async def shutdown(self) -> None:
        for record in self._records.values():
            if record.child is not None and record.child.running:
                record.child.signal_group(signal.SIGKILL)


def _error_event(code: int, message: str) -> bytes:
    return sse.event("error", error=sse.error_value("CommandExecError", str(code), [message]))


async def stream_output(
    pump: procs.OutputSource, ping_interval: float, disconnected: asyncio.Future[None]
) -> AsyncIterator[bytes]:
    """Output events for everything the pump yields; pings during silences; stops on disconnect."""
    splitters = {"stdout": sse.LineSplitter(), "stderr": sse.LineSplitter()}
    while True:
        item = await pump.next(ping_interval, disconnected)
        if item is None:
            break
        if item == procs.IDLE:
            if disconnected.done():
                return
            yield sse.ping()
            continue
        name, data = item
        lines = splitters[name].feed(data)
        if lines:
            yield sse.output_events(name, lines, sse.now_ms())
    for name, splitter in splitters.items():
        rest = splitter.flush()
        if rest:
            yield sse.output_events(name, rest, sse.now_ms())
