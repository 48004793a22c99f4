"""The `local` runtime: every sandbox is a bubblewrap jail on this host, running execd.

A sandbox's record (what the API reports, plus where its jail is) is a JSON file in its own
directory under the state dir, written before the jail is released to run anything, so a server
that crashes or restarts finds every jail again. Expiry is a field of that record, enforced by the
shared sweeper (expiry.py), also after a restart.

Starting a jail (`_spawn`): bwrap reports the host pid of the jail's PID 1 on `--info-fd`, the
server puts it in the sandbox's cgroups, then releases it through `--block-fd`; execd announces
its port on a pipe (`jail_init`). Claiming it (`_claim`) sends the env, working directory and
entrypoint down another pipe. With `warmPoolSize` > 0, jails are started ahead of creates and
only claimed at create time (the sandbox id, which is the jail's hostname, is chosen at start).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from opensandbox_platform.api.labels import EXECD_PORT, EXECD_TOKEN_HEADER
from opensandbox_platform.daemon import times
from opensandbox_platform.server import errors
from opensandbox_platform.server.config import Config
from opensandbox_platform.server.errors import ApiError
from opensandbox_platform.server.runtimes import guards, jail_bytecode, procfs
from opensandbox_platform.server.runtimes import jail as jails
from opensandbox_platform.server.runtimes.base import (
    Capabilities,
    Endpoint,
    SandboxInfo,
    SandboxSpec,
    State,
    merge_metadata,
)
from opensandbox_platform.server.runtimes.cgroups import Cgroups
from opensandbox_platform.server.runtimes.expiry import ExpirySweeper

log = logging.getLogger("opensandbox.local")

RECORD = "sandbox.json"
LOOPBACK = "127.0.0.1"
REFILL_DELAY_SECONDS = 0.3


@dataclass
class Record:
    """One sandbox as stored on disk; `claimed` is False for a warm jail nobody asked for yet."""

    id: str
    pid: int  # host pid of the jail's PID 1 (bwrap)
    start_ticks: int  # with `pid`, names that one process even after pid reuse
    token: str
    cgroups: dict[str, str]
    port: int = 0
    claimed: bool = False
    image: str = ""
    entrypoint: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    extensions: dict[str, str] = field(default_factory=dict)
    created_at: str = ""
    expires_at: str | None = None
    state: str = State.PENDING
    reason: str = "STARTING"
    message: str = ""
    last_transition_at: str = ""
    paused_by: str | None = None  # "freezer" or "signal"
    _info: SandboxInfo | None = field(default=None, repr=False, compare=False)

    def info(self) -> SandboxInfo:
        """The API view; cached until the next `_save` (a list reads every record each time)."""
        if self._info is None:
            self._info = self._make_info()
        return self._info

    def forget_info(self) -> None:
        self._info = None

    def _make_info(self) -> SandboxInfo:
        return SandboxInfo(
            id=self.id,
            image=self.image,
            entrypoint=list(self.entrypoint),
            metadata=dict(self.metadata),
            extensions=dict(self.extensions),
            created_at=times.parse(self.created_at),
            expires_at=times.parse_optional(self.expires_at),
            state=self.state,
            reason=self.reason,
            message=self.message,
            last_transition_at=times.parse(self.last_transition_at or self.created_at),
        )

    def transition(self, state: str, reason: str, message: str = "") -> None:
        self.state, self.reason, self.message = state, reason, message
        self.last_transition_at = times.rfc3339(digits=6)
        self.forget_info()


@dataclass
class Jail:
    """A started jail and the server's ends of its pipes (only while this server started it)."""

    record: Record
    popen: subprocess.Popen[bytes]
    ctl_fd: int
    events: asyncio.StreamReader
    transport: asyncio.ReadTransport


class LocalRuntime:
    # image.auth is accepted as image.uri is: a jail's root is the host's, no image is pulled.
    capabilities = Capabilities(runtime="local", image_auth=True, pause=True)

    def __init__(self, config: Config, config_path: str | None = None) -> None:
        self.config = config
        self.local = config.local
        self.state_dir = config.state_dir()
        self.sandboxes_dir = self.state_dir / "sandboxes"
        self.hidden = [self.state_dir] + ([Path(config_path)] if config_path else [])
        self.records: dict[str, Record] = {}
        self.cgroups = Cgroups(enabled=self.local.use_cgroups)
        self._root_args: list[str] = []
        self._locks: dict[str, asyncio.Lock] = {}
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._deleting: set[str] = set()
        self.expiry = ExpirySweeper(
            sandbox_ids=lambda: list(self.records),
            expiry_of=self._expiry_of,
            lock_of=self._lock,
            delete=self._expire,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._warm: asyncio.Queue[Jail] = asyncio.Queue()
        self._warm_wanted = asyncio.Event()
        self._warm_task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._lock_fd: int | None = None

    # -- lifecycle of the runtime --------------------------------------------------------------

    async def start(self) -> None:
        if shutil.which(jails.BWRAP) is None:
            raise RuntimeError("the local runtime needs bubblewrap: apt-get install bubblewrap")
        self.sandboxes_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.chmod(0o700)
        self._lock_state_dir()
        self._root_args = jails.host_root_args()
        await asyncio.to_thread(jail_bytecode.precompile)  # (before the first jail: it compiles nothing then)
        await self._recover()
        self.expiry.start()
        if self.local.warm_pool_size:
            self._warm_task = asyncio.create_task(self._keep_warm(), name="warm-pool")
            self._tasks.append(self._warm_task)
        log.info(
            "local runtime ready state_dir=%s sandboxes=%d cgroups=%s warm_pool=%d",
            self.state_dir,
            len(self.records),
            ",".join(self.cgroups.available) or "none",
            self.local.warm_pool_size,
        )

    async def close(self) -> None:
        # A jail being started for the warm pool is let finish (then killed below): cut short,
        # it could not be found again by its record.
        self._closing.set()
        self._warm_wanted.set()
        await self.expiry.close()
        if self._warm_task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._warm_task), self.local.start_timeout_seconds)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while not self._warm.empty():
            await self._discard(self._warm.get_nowait())
        for task in self._watchers.values():
            task.cancel()
        await asyncio.gather(*self._watchers.values(), return_exceptions=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _lock_state_dir(self) -> None:
        """One server per state dir: two would each reap the other's jails as strays."""
        fd = os.open(self.state_dir / "server.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"another opensandbox-server uses the state dir {self.state_dir}") from None
        self._lock_fd = fd  # held (and released by the kernel) for the life of the process

    async def _recover(self) -> None:
        for directory in sorted(self.sandboxes_dir.iterdir()):
            path = directory / RECORD
            try:
                record = Record(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                # A jail whose start was cut short before its pid was recorded: find it by name.
                log.warning("removing a sandbox directory without a valid record path=%s", directory)
                for pid in procfs.processes_mentioning(f"{directory}/"):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.cgroups.remove({c: str(p / directory.name) for c, p in self.cgroups.parents.items()})
                shutil.rmtree(directory, ignore_errors=True)
                continue
            if not record.claimed:  # a warm jail or a create that never finished
                await self._destroy(record)
                continue
            self.records[record.id] = record
            if procfs.alive(record.pid, record.start_ticks):
                self._watch(record)
            elif record.state in (State.RUNNING, State.PAUSED, State.PENDING):
                record.transition(State.TERMINATED, "JAIL_GONE", "the jail ended while the server was down")
                self._save(record)

    # -- the API -------------------------------------------------------------------------------

    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        jail = await self._take_warm() or await self._spawn(str(uuid.uuid4()))
        record = jail.record
        try:
            await self._claim(jail, spec)
        except BaseException:
            await self._destroy(record)
            raise
        now = times.now()
        record.claimed = True
        record.image = spec.image
        record.entrypoint = list(spec.entrypoint)
        record.metadata = dict(spec.metadata)
        record.extensions = dict(spec.extensions)
        record.created_at = times.rfc3339(now, digits=6)
        if spec.timeout_seconds is not None:
            record.expires_at = times.rfc3339(now + dt.timedelta(seconds=spec.timeout_seconds), digits=6)
        record.transition(State.RUNNING, "JAIL_RUNNING")
        self._save(record)
        self.records[record.id] = record
        self.expiry.wake()
        return record.info()

    async def get(self, sandbox_id: str) -> SandboxInfo:
        return self._record(sandbox_id).info()

    async def list(self) -> list[SandboxInfo]:
        return [r.info() for r in self.records.values()]

    async def delete(self, sandbox_id: str) -> None:
        async with self._lock(sandbox_id):
            record = self._record(sandbox_id)
            await self._destroy(record)

    async def pause(self, sandbox_id: str) -> None:
        async with self._lock(sandbox_id):
            record = self._record(sandbox_id)
            if record.state != State.RUNNING:
                raise ApiError(409, errors.INVALID_STATE, f"sandbox {sandbox_id} is {record.state}, not Running")
            if self.cgroups.freezer_state(record.cgroups) is not None:
                self.cgroups.set_frozen(record.cgroups, True)
                await self._await_freezer(record, "FROZEN")
                record.paused_by = "freezer"
            else:
                namespace = procfs.pid_namespace(record.pid)
                if namespace is not None:
                    procfs.signal_namespace(namespace, signal.SIGSTOP)
                record.paused_by = "signal"
            record.transition(State.PAUSED, "JAIL_PAUSED")
            self._save(record)

    async def resume(self, sandbox_id: str) -> None:
        async with self._lock(sandbox_id):
            record = self._record(sandbox_id)
            if record.state != State.PAUSED:
                raise ApiError(409, errors.INVALID_STATE, f"sandbox {sandbox_id} is {record.state}, not Paused")
            self._thaw(record)
            if record.paused_by == "freezer":
                await self._await_freezer(record, "THAWED")
            record.paused_by = None
            record.transition(State.RUNNING, "JAIL_RUNNING")
            self._save(record)

    async def renew(self, sandbox_id: str, expires_at: dt.datetime) -> SandboxInfo:
        async with self._lock(sandbox_id):
            record = self._record(sandbox_id)
            guards.require_expiry(sandbox_id, record.expires_at)
            record.expires_at = times.rfc3339(expires_at, digits=6)
            self._save(record)
            self.expiry.wake()
            return record.info()

    async def patch_metadata(self, sandbox_id: str, patch: dict[str, str | None]) -> SandboxInfo:
        async with self._lock(sandbox_id):
            record = self._record(sandbox_id)
            merge_metadata(record.metadata, patch)
            self._save(record)
            return record.info()

    async def endpoint(self, sandbox_id: str, port: int) -> Endpoint:
        record = self._record(sandbox_id)
        if port == EXECD_PORT:
            return Endpoint(f"{LOOPBACK}:{record.port}", {EXECD_TOKEN_HEADER: record.token})
        # The jail shares the host's network namespace: its port N is the host's loopback port N.
        return Endpoint(f"{LOOPBACK}:{port}")

    async def upstream(self, sandbox_id: str, port: int) -> Endpoint:
        guards.require_running(sandbox_id, self._record(sandbox_id).state)
        return await self.endpoint(sandbox_id, port)

    # -- jails ---------------------------------------------------------------------------------

    async def _spawn(self, sandbox_id: str) -> Jail:
        """Start a jail and wait (by event) until execd listens in it."""
        dirs = jails.JailDirs(self.sandboxes_dir / sandbox_id)
        dirs.make()
        cgroups = self.cgroups.create(sandbox_id)
        info_r, info_w = os.pipe()
        block_r, block_w = os.pipe()
        ctl_r, ctl_w = os.pipe()
        evt_r, evt_w = os.pipe()
        child_fds = (info_w, block_r, ctl_r, evt_w)
        token = secrets.token_urlsafe(24)
        argv = jails.bwrap_args(
            sandbox_id,
            dirs,
            root_args=self._root_args,
            hidden=self.hidden,
            run_size_bytes=self.local.tmp_size_mib << 20,
            info_fd=info_w,
            block_fd=block_r,
            ctl_fd=ctl_r,
            evt_fd=evt_w,
        )
        try:
            popen = _start_bwrap(argv, child_fds, dirs.log, jails.jail_env(sandbox_id, token, self.local.code_prestart))
        except BaseException:
            for fd in (*child_fds, info_r, block_w, ctl_w, evt_r):
                os.close(fd)
            self.cgroups.remove(cgroups)
            shutil.rmtree(dirs.root, ignore_errors=True)
            raise
        for fd in child_fds:
            os.close(fd)
        self._children[sandbox_id] = popen
        events, transport = await _pipe(evt_r)
        info_reader, info_transport = await _pipe(info_r)
        record = Record(id=sandbox_id, pid=0, start_ticks=0, token=token, cgroups=cgroups)
        jail = Jail(record, popen, ctl_w, events, transport)
        try:
            timeout = self.local.start_timeout_seconds
            info = await asyncio.wait_for(_read_json_object(info_reader), timeout)
            record.pid = int(info["child-pid"])
            record.start_ticks = procfs.start_ticks(record.pid) or 0
            self._save(record)  # from here on, a restarted server can find and remove it
            self.cgroups.set_limits(cgroups, None, None, self.local.max_processes)
            self.cgroups.attach(cgroups, record.pid)
            os.write(block_w, b"go")
            ready = await asyncio.wait_for(_read_event(events), timeout)
            if ready.get("event") != "ready":
                raise self._start_failed(record, "execd did not start")
            record.port = int(ready["port"])
            self._save(record)
            self._watch(record)
            return jail
        except BaseException as exc:
            failure = (
                self._start_failed(record, "the jail did not start in time") if isinstance(exc, TimeoutError) else None
            )
            os.close(ctl_w)
            transport.close()
            if not record.pid:
                _kill_before_known(popen)
            await self._destroy(record)
            if failure is not None:
                raise failure from None
            raise
        finally:
            info_transport.close()
            os.close(block_w)

    async def _claim(self, jail: Jail, spec: SandboxSpec) -> None:
        record = jail.record
        self.cgroups.set_limits(record.cgroups, spec.cpu_millis, spec.memory_bytes, None)
        rlimits: dict[str, list[int]] = {
            "RLIMIT_NOFILE": [self.local.open_files, self.local.open_files],
            "RLIMIT_CORE": [0, 0],
        }
        if spec.memory_bytes and "memory" not in record.cgroups:
            # No memory cgroup: the address-space limit is the only memory bound left.
            rlimits["RLIMIT_AS"] = [spec.memory_bytes, spec.memory_bytes]
        claim = {"env": spec.env, "cwd": jails.WORKSPACE, "argv": spec.entrypoint, "rlimits": rlimits}
        try:
            os.write(jail.ctl_fd, json.dumps(claim).encode() + b"\n")
        finally:
            os.close(jail.ctl_fd)
        try:
            started = await asyncio.wait_for(_read_event(jail.events), self.local.start_timeout_seconds)
        except TimeoutError:
            raise self._start_failed(record, "the entrypoint did not start in time") from None
        finally:
            jail.transport.close()
        if started.get("event") != "started":
            message = started.get("message") or "the jail ended"
            raise ApiError(400, errors.INVALID_PARAMETER, f"cannot start the entrypoint: {message}")

    def _start_failed(self, record: Record, why: str) -> ApiError:
        tail = ""
        with contextlib.suppress(OSError):
            tail = (self.sandboxes_dir / record.id / "jail.log").read_text(errors="replace")[-2000:].strip()
        log.error("jail start failed id=%s why=%s log=%s", record.id, why, tail)
        return ApiError(500, errors.START_FAILED, f"{why}: {tail.splitlines()[-1] if tail else 'no output'}")

    async def _take_warm(self) -> Jail | None:
        while not self._warm.empty():
            jail = self._warm.get_nowait()
            self._warm_wanted.set()
            if procfs.alive(jail.record.pid, jail.record.start_ticks):
                return jail
            await self._discard(jail)
        return None

    async def _discard(self, jail: Jail) -> None:
        """Destroy a jail nobody claimed, and close the server's ends of its pipes."""
        with contextlib.suppress(OSError):
            os.close(jail.ctl_fd)
        jail.transport.close()
        await self._destroy(jail.record)

    async def _keep_warm(self) -> None:
        while not self._closing.is_set():
            if self._warm.qsize() < self.local.warm_pool_size:
                # Starting a jail costs a CPU-heavy quarter second; let the sandbox just handed
                # out answer its first calls before the refill competes with it.
                await self._pause(REFILL_DELAY_SECONDS)
            while not self._closing.is_set() and self._warm.qsize() < self.local.warm_pool_size:
                try:
                    self._warm.put_nowait(await self._spawn(str(uuid.uuid4())))
                except Exception:
                    log.exception("warm jail failed to start")
                    await self._pause(5)
            self._warm_wanted.clear()
            if not self._closing.is_set():
                await self._warm_wanted.wait()

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the runtime closes."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    def _watch(self, record: Record) -> None:
        """Notice the jail ending on its own (entrypoint exited, killed from outside)."""

        async def watch() -> None:
            await procfs.wait_exit(record.pid)
            code = await self._reap_child(record)
            if record.id in self._deleting or not record.claimed or record.id not in self.records:
                return
            if code:
                record.transition(State.FAILED, "JAIL_EXITED", f"the entrypoint exited with code {code}")
            else:
                record.transition(State.TERMINATED, "JAIL_EXITED", "the entrypoint exited")
            self._save(record)
            self.cgroups.remove(record.cgroups)

        self._watchers[record.id] = asyncio.create_task(watch(), name=f"watch-{record.id}")

    async def _reap_child(self, record: Record) -> int | None:
        """Reap the outer bwrap if this server started it; its exit code is the jail's."""
        popen = self._children.pop(record.id, None)
        if popen is None:
            return None
        await procfs.wait_exit(popen.pid)
        return popen.wait()

    async def _destroy(self, record: Record) -> None:
        """Kill every process of the jail, then remove its cgroups, directory and record."""
        self._deleting.add(record.id)
        try:
            if record.pid and procfs.alive(record.pid, record.start_ticks):
                # PID 1 of the namespace: when it dies the kernel kills every process in it.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(record.pid, signal.SIGKILL)
                self._thaw(record)  # a frozen process only dies once thawed
                try:
                    await asyncio.wait_for(procfs.wait_exit(record.pid), 10)
                except TimeoutError:
                    log.error("jail did not die id=%s pid=%d", record.id, record.pid)
            watcher = self._watchers.pop(record.id, None)
            if watcher is not None:
                await asyncio.wait([watcher], timeout=5)
            await self._reap_child(record)
            for _ in range(100):  # the last processes leave the cgroup just after PID 1 is gone
                if self.cgroups.remove(record.cgroups):
                    break
                await asyncio.sleep(0.01)
            self.records.pop(record.id, None)
            self._locks.pop(record.id, None)
            shutil.rmtree(self.sandboxes_dir / record.id, ignore_errors=True)
        finally:
            self._deleting.discard(record.id)

    def _thaw(self, record: Record) -> None:
        if record.paused_by == "freezer" or self.cgroups.freezer_state(record.cgroups) not in (None, "THAWED"):
            with contextlib.suppress(OSError):
                self.cgroups.set_frozen(record.cgroups, False)
        if record.paused_by == "signal":
            namespace = procfs.pid_namespace(record.pid)
            if namespace is not None:
                procfs.signal_namespace(namespace, signal.SIGCONT)

    async def _await_freezer(self, record: Record, wanted: str) -> None:
        # The kernel reports FREEZING until every task has stopped; there is no event for it.
        for _ in range(500):
            if self.cgroups.freezer_state(record.cgroups) == wanted:
                return
            await asyncio.sleep(0.01)
        raise ApiError(500, errors.INTERNAL_ERROR, f"sandbox {record.id} did not reach {wanted}")

    # -- expiry (the sweeper's view of the records) ---------------------------------------------

    def _expiry_of(self, sandbox_id: str) -> dt.datetime | None:
        record = self.records.get(sandbox_id)
        return times.parse_optional(record.expires_at) if record else None

    async def _expire(self, sandbox_id: str) -> None:
        record = self.records.get(sandbox_id)
        if record is not None:
            await self._destroy(record)

    # -- helpers -------------------------------------------------------------------------------

    def _record(self, sandbox_id: str) -> Record:
        record = self.records.get(sandbox_id)
        if record is None:
            raise errors.not_found(sandbox_id)
        return record

    def _lock(self, sandbox_id: str) -> asyncio.Lock:
        return self._locks.setdefault(sandbox_id, asyncio.Lock())

    def _save(self, record: Record) -> None:
        record.forget_info()
        directory = self.sandboxes_dir / record.id
        tmp = directory / (RECORD + ".tmp")
        data = asdict(record)
        del data["_info"]
        tmp.write_text(json.dumps(data))
        os.replace(tmp, directory / RECORD)


def _kill_before_known(popen: subprocess.Popen[bytes]) -> None:
    """Kill a jail whose PID 1 was not reported yet: stop bwrap so it cannot clone any more, kill
    what it cloned (the jail's PID 1, taking the namespace with it), then bwrap itself."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(popen.pid, signal.SIGSTOP)
    for child in procfs.children(popen.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    popen.kill()


def _start_bwrap(argv: list[str], fds: tuple[int, ...], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    # A new session: a Ctrl-C meant for the server must not reach the jails (they outlive it).
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            argv,
            pass_fds=fds,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            env=env,
            start_new_session=True,
        )


async def _pipe(fd: int) -> tuple[asyncio.StreamReader, asyncio.ReadTransport]:
    """Read the pipe `fd` on the event loop (closing the transport closes the fd)."""
    reader = asyncio.StreamReader()
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0)
    )
    return reader, transport


async def _read_json_object(reader: asyncio.StreamReader) -> dict[str, Any]:
    """bwrap's --info-fd output: one (multi-line) JSON object."""
    data = b""
    while True:
        chunk = await reader.read(4096)
        if not chunk:
            raise RuntimeError(f"bwrap exited before reporting its pid: {data!r}")
        data += chunk
        with contextlib.suppress(ValueError):
            parsed = json.loads(data)
            if isinstance(parsed, dict):
                return parsed


async def _read_event(events: asyncio.StreamReader) -> dict[str, Any]:
    line = await events.readline()
    if not line:
        return {"event": "exited"}
    parsed = json.loads(line)
    return parsed if isinstance(parsed, dict) else {}
