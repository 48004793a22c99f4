"""The `local` runtime: every sandbox is a bubblewrap jail on this host, running execd.

A jail is a user namespace whose root is an unprivileged host uid range of its own
(runtimes/uidmap.py), with its own mount, PID, IPC, UTS, cgroup and network namespaces, a private
size-limited root file system (runtimes/rootfs.py), a seccomp filter (runtimes/seccomp.py), cgroup
limits, and outbound network through slirp4netns under an nftables policy (runtimes/netpolicy.py,
runtimes/slirp.py). See docs/local-runtime.md and docs/security.md.

A sandbox's record (what the API reports, plus where its jail is) is a JSON file in its own
directory under the state dir, written before the jail is released to run anything, so a server
that crashes or restarts finds every jail again. Expiry is a field of that record, enforced by the
shared sweeper (expiry.py), also after a restart.

Starting a jail (`_spawn`): a thread of its own stages the root and the network namespace and
starts bwrap (runtimes/staging.py), which reports the host pid of the jail's first process on
`--info-fd` and waits on `--userns-block-fd`; the server writes the record, puts the pid in the
sandbox's cgroups, starts slirp4netns, and lets the jail go. execd announces itself on a pipe
(`jail_init`), and the server forwards a port of the host's loopback to it (runtimes/forward.py).
Claiming the jail (`_claim`) sends the env, working directory and entrypoint down another pipe.
With `warmPoolSize` > 0, jails are started ahead of creates and only claimed at create time (the
sandbox id, which is the jail's hostname, is chosen at start).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import datetime as dt
import errno
import fcntl
import functools
import json
import logging
import os
import secrets
import shutil
import signal
import stat
import subprocess
import uuid
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from opensandbox_platform.api.labels import (
    EGRESS_PORT,
    EGRESS_TOKEN_HEADER,
    EXECD_PORT,
    EXECD_TOKEN_HEADER,
    wants_isolation,
)
from opensandbox_platform.daemon import openat2, times
from opensandbox_platform.execd import lifecycle
from opensandbox_platform.server import errors, validation
from opensandbox_platform.server.config import Config
from opensandbox_platform.server.errors import ApiError
from opensandbox_platform.server.runtimes import (
    guards,
    images,
    jail_bytecode,
    netpolicy,
    procfs,
    rootfs,
    seccomp,
    slirp,
    staging,
    volume_dirs,
)
from opensandbox_platform.server.runtimes import jail as jails
from opensandbox_platform.server.runtimes import snapshots as snaps
from opensandbox_platform.server.runtimes.base import (
    Capabilities,
    Endpoint,
    Held,
    LogText,
    RuntimeHealth,
    SandboxInfo,
    SandboxSpec,
    SnapshotInfo,
    State,
    merge_metadata,
)
from opensandbox_platform.server.runtimes.cgroups import Cgroups
from opensandbox_platform.server.runtimes.events import EventList, EventLog, Reason, SandboxEvent
from opensandbox_platform.server.runtimes.expiry import ExpirySweeper
from opensandbox_platform.server.runtimes.forward import LOOPBACK, PortRange, SandboxPorts
from opensandbox_platform.server.runtimes.local_egress import JailEgress
from opensandbox_platform.server.runtimes.local_snapshots import LocalSnapshots, Restore, layer_path
from opensandbox_platform.server.runtimes.snapstore import LocalSnapshot
from opensandbox_platform.server.runtimes.uidmap import IdRange, NoFreeSlot, UidSlots, overlaps, slot_range
from opensandbox_platform.server.volumes import PvcBackend

# What a restored sandbox needs on top of its files within its memory limit (execd, a shell, a command).
RESTORE_HEADROOM = 128 << 20
log = logging.getLogger("opensandbox.local")

RECORD = "sandbox.json"
LOG = "jail.log"
JAIL_LOG = "run/opensandbox/jail.log"  # in the jail's root: where jail_init sends execd's and the entrypoint's output
REFILL_DELAY_SECONDS = 0.3
LOG_LIMIT = 1 << 20  # bytes of a jail's output kept in its log
MINIMAL_ROOT = "the host's /usr read-only with a private /etc, home, /tmp and /workspace"
EXECD_EXITED = "EXECD_EXITED"
# When execd ends because the entrypoint did, the jail's PID 1 follows within milliseconds.
EXECD_EXIT_GRACE_SECONDS = 1.0


@dataclass
class Record:
    """One sandbox as stored on disk; `claimed` is False for a warm jail nobody asked for yet."""

    id: str
    pid: int  # host pid of the jail's first process (bwrap's child, PID 1 of its namespace)
    start_ticks: int  # with `pid`, names that one process even after pid reuse
    token: str
    cgroups: dict[str, str]
    uid_slot: int = -1  # the host uid/gid range (runtimes/uidmap.py)
    ports: dict[str, int] = field(default_factory=dict)  # sandbox port -> forwarded host port (loopback)
    helper_pid: int = 0  # slirp4netns
    helper_ticks: int = 0
    root: str = MINIMAL_ROOT  # what the jail's root file system is (the status message says it)
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
    execd_pid: int = 0  # host pid of the jail init, which is execd (0: unknown)
    execd_ticks: int = 0
    secure_access: bool = False
    owned_volumes: list[str] = field(default_factory=list)  # named volumes deleted with the sandbox
    # What a snapshot of it holds besides its files (runtimes/local_snapshots.py).
    env: dict[str, str] = field(default_factory=dict)
    cpu_millis: int | None = None
    memory_bytes: int | None = None
    image_digest: str = ""  # its root's image ("": the minimal root)
    snapshot_id: str = ""  # the snapshot it was restored from
    network_policy: dict[str, Any] | None = None  # the create's (None: no enforcer); runtimes/local_egress.py
    egress_token: str = ""
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
            secure_access=self.secure_access,
            snapshot_id=self.snapshot_id,
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
    transport: _PipeReader


@dataclass
class _Pipes:
    """The pipes and fds of one jail start; `child` are the ends bwrap inherits."""

    info: tuple[int, int] = field(default_factory=os.pipe)
    block: tuple[int, int] = field(default_factory=os.pipe)
    ctl: tuple[int, int] = field(default_factory=os.pipe)
    evt: tuple[int, int] = field(default_factory=os.pipe)
    out: tuple[int, int] = field(default_factory=os.pipe)  # bwrap's stdout and stderr
    exit: tuple[int, int] = field(default_factory=os.pipe)  # slirp4netns ends when jail_init's end closes
    seccomp: int = -1

    @property
    def child(self) -> tuple[int, ...]:
        return (self.info[1], self.block[0], self.ctl[0], self.evt[1], self.out[1], self.exit[1], self.seccomp)

    def fds(self) -> jails.Fds:
        return jails.Fds(
            info=self.info[1],
            userns_block=self.block[0],
            seccomp=self.seccomp,
            ctl=self.ctl[0],
            evt=self.evt[1],
            keep=self.exit[1],
        )

    def release(self) -> None:
        """Close the server's end of --userns-block-fd (once: the number may be reused after)."""
        _close(self.block[1])
        self.block = (self.block[0], -1)

    def close_child(self) -> None:
        for fd in self.child:
            _close(fd)

    def close_all(self) -> None:
        self.close_child()
        for fd in (self.info[0], self.block[1], self.ctl[1], self.evt[0], self.out[0], self.exit[0]):
            _close(fd)


def _close(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


class LocalRuntime:
    # image.auth is accepted as image.uri is: no image is pulled.
    capabilities = Capabilities(
        runtime="local",
        image_auth=True,
        pause=True,
        volumes=frozenset({"host", "pvc"}),
        snapshots=True,
        network_policy=True,
        lifecycle=True,
    )

    def __init__(self, config: Config, config_path: str | None = None) -> None:
        self.config = config
        self.local = config.local
        self.state_dir = config.state_dir()
        self.sandboxes_dir = self.state_dir / "sandboxes"
        self.volumes_dir = self.state_dir / "volumes"  # pvc volumes: one directory per claimName
        self.hidden = [self.state_dir] + ([Path(config_path)] if config_path else [])
        self.records: dict[str, Record] = {}
        self.cgroups = Cgroups(enabled=self.local.use_cgroups)
        run_dir = Path(self.local.run_dir)
        self.uids = UidSlots(
            run_dir / "uids", self.local.uid_range_start, self.local.uid_range_slots, alive=procfs.alive
        )
        self._self = (os.getpid(), procfs.start_ticks(os.getpid()) or 0)
        self.stage_dir = run_dir / "stage"
        self.default_cpu = validation.cpu_millis(self.local.default_cpu) if self.local.default_cpu else None
        self.default_memory = validation.memory_bytes(self.local.default_memory) if self.local.default_memory else None
        self.images = images.ImageCache(self.state_dir / "images")
        # A snapshot holds at most what the sandbox's disk holds (a sparse file counts in full).
        self.snapshots = LocalSnapshots(
            self.state_dir / "snapshots", self.local.disk_size_mib << 20, self.local.snapshot_store_max_mib << 20
        )
        self._find_image = images.Lookup()
        self._bpf = b""
        self._bpf_userns = b""
        self._layout: jails.RuntimeLayout | None = None
        self._parts: list[rootfs.HostPart] = []
        self._proc_masks: list[str] = []
        self.ports = SandboxPorts(PortRange.parse(self.local.forward_ports))
        self._helpers: dict[str, subprocess.Popen[bytes]] = {}
        self._drains: dict[str, asyncio.Task[None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._egress: dict[str, JailEgress] = {}
        self._deleting: set[str] = set()
        self.expiry = ExpirySweeper(
            sandbox_ids=lambda: list(self.records),
            expiry_of=self._expiry_of,
            lock_of=self._lock,
            delete=self._expire,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._captures: set[asyncio.Task[None]] = set()
        self._warm: asyncio.Queue[Jail] = asyncio.Queue()
        self._warm_wanted = asyncio.Event()
        self._warm_task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._lock_fd: int | None = None
        self.events = EventLog()

    # -- lifecycle of the runtime --------------------------------------------------------------

    async def start(self) -> None:
        self._check_host()
        self.sandboxes_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.chmod(0o700)
        self._lock_state_dir()
        self.uids.prepare()
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        self.snapshots.start()
        self._bpf = seccomp.compile_bpf()
        self._bpf_userns = seccomp.compile_bpf(seccomp.rules(userns=True))  # isolated sessions asked for
        self._layout = jails.runtime_layout()
        self._parts = rootfs.host_parts()
        self._proc_masks = jails.masks() + self._hidden_masks()
        await asyncio.to_thread(jail_bytecode.precompile)  # (before the first jail: it compiles nothing then)
        self.ports.start()
        await self._recover()
        self.expiry.start()
        if self.local.warm_pool_size:
            self._warm_task = asyncio.create_task(self._keep_warm(), name="warm-pool")
            self._tasks.append(self._warm_task)
        log.info(
            "local runtime ready state_dir=%s sandboxes=%d cgroups=%s warm_pool=%d network=%s",
            self.state_dir,
            len(self.records),
            ",".join(self.cgroups.available) or "none",
            self.local.warm_pool_size,
            self.local.network,
        )

    def _check_host(self) -> None:
        if os.geteuid() != 0:
            raise RuntimeError(
                "the local runtime needs root (it maps each sandbox to a host uid range of its own and makes"
                " its network namespace); run the server as root, or use the docker runtime"
            )
        needed = [jails.BWRAP, "nft"] + ([slirp.SLIRP4NETNS] if self.local.network == "outbound" else [])
        missing = [program for program in needed if shutil.which(program) is None]
        if missing:
            raise RuntimeError(
                f"the local runtime needs {', '.join(missing)}: apt-get install bubblewrap nftables slirp4netns"
            )
        for path in ("/etc/subuid", "/etc/subgid"):
            with contextlib.suppress(OSError):
                clash = overlaps(self.local.uid_range_start, self.local.uid_range_slots, Path(path).read_text())
                if clash:
                    log.warning("sandbox uid ranges overlap %s entries: %s", path, "; ".join(clash))

    def _hidden_masks(self) -> list[str]:
        """The server's state dir and config file, where a read-only host part would show them."""
        assert self._layout is not None
        shown = [(p.path, p.path) for p in self._parts if p.link is None]
        shown += [(host, self._layout.jail_path(name)) for name, host in self._layout.binds.items()]
        args: list[str] = []
        for hidden in self.hidden:
            resolved = os.path.realpath(hidden)
            for host, inside in shown:
                if resolved == host or resolved.startswith(host.rstrip("/") + "/"):
                    target = inside + resolved[len(host) :]
                    args += ["--tmpfs", target] if os.path.isdir(resolved) else ["--ro-bind", "/dev/null", target]
        return args

    async def close(self) -> None:
        # A jail being started for the warm pool is let finish (then killed below): cut short,
        # it could not be found again by its record.
        self._closing.set()
        self._warm_wanted.set()
        await self.expiry.close()
        if self._captures:  # a capture cut short would leave its jail frozen
            await asyncio.wait(self._captures, timeout=60)
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
        for egress in self._egress.values():
            await egress.close()
        self._egress.clear()
        await self.ports.close_all()
        for drain in self._drains.values():
            drain.cancel()
        await asyncio.gather(*self._drains.values(), return_exceptions=True)
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
                for pid in procfs.processes_mentioning(directory.name):
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
                await self._reattach(record)
                self._watch(record)
                if record.state == State.RUNNING:
                    self._thaw(record)  # a snapshot's capture cut short by a stop leaves it frozen
            elif record.state in (State.RUNNING, State.PAUSED, State.PENDING):
                record.transition(State.TERMINATED, "JAIL_GONE", "the jail ended while the server was down")
                self._save(record)

    async def _reattach(self, record: Record) -> None:
        """After a restart: the jail's network namespace, its policy's enforcer, and its forwarded
        ports on the same host ports."""
        if not self.ports.attach_process(record.id, record.pid):
            return
        if record.network_policy is not None:
            try:
                await self._start_egress(record)
            except Exception:  # the kernel still holds its ruleset; lookups fail (closed)
                log.exception("cannot enforce the network policy again id=%s", record.id)
        wanted = dict(record.ports)
        for port, host_port in wanted.items():
            await self._start_forward(record, int(port), host_port)
        if record.ports != wanted:
            self._save(record)

    # -- the API -------------------------------------------------------------------------------

    def health(self) -> RuntimeHealth:
        return RuntimeHealth(ready=True)  # no engine: the jails are this process's children

    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        if spec.snapshot_id:
            return await self._create_from_snapshot(spec, spec.snapshot_id)
        image = await self._image(spec.image)
        userns = wants_isolation(spec.extensions)
        opened = await asyncio.to_thread(self._open_volumes, spec)
        try:
            if image is not None or userns or opened:  # warm jails: the minimal root, the default filter, no mounts
                jail = await self._spawn(str(uuid.uuid4()), image, userns=userns, volumes=opened)
            else:
                jail = await self._take_warm() or await self._spawn(str(uuid.uuid4()))
        except BaseException:
            self._remove_created_volumes(opened)
            raise
        finally:
            volume_dirs.close_all(opened)
        return await self._finish_create(jail, spec, image, opened)

    async def _finish_create(
        self, jail: Jail, spec: SandboxSpec, image: images.ImageInfo | None, opened: volume_dirs.Opened | None = None
    ) -> SandboxInfo:
        opened = opened or []
        record = jail.record
        record.owned_volumes = [
            v.spec.backend.claim_name
            for v in opened
            if v.created and isinstance(v.spec.backend, PvcBackend) and v.spec.backend.delete_on_sandbox_termination
        ]
        try:
            if spec.network_policy is not None:  # enforced before the entrypoint starts
                record.network_policy = spec.network_policy
                record.egress_token = secrets.token_urlsafe(24)
                await self._start_egress(record)
            await self._claim(jail, spec, image)
        except BaseException:
            await self._destroy(record)
            self._remove_created_volumes(opened)
            raise
        now = times.now()
        record.claimed = True
        record.image = spec.image
        record.entrypoint = list(spec.entrypoint)
        record.env = {**(image.env if image is not None else {}), **spec.env}  # what ran: a snapshot holds it
        record.cpu_millis, record.memory_bytes = spec.cpu_millis, spec.memory_bytes
        record.image_digest = image.digest if image is not None else ""
        record.snapshot_id = spec.snapshot_id or ""
        record.metadata = dict(spec.metadata)
        record.extensions = dict(spec.extensions)
        record.secure_access = spec.secure_access
        record.created_at = times.rfc3339(now, digits=6)
        if spec.timeout_seconds is not None:
            record.expires_at = times.rfc3339(now + dt.timedelta(seconds=spec.timeout_seconds), digits=6)
        record.transition(State.RUNNING, "JAIL_RUNNING", self._root_message(record))
        self._save(record)
        self.records[record.id] = record
        self.expiry.wake()
        return record.info()

    async def _image(self, ref: str) -> images.ImageInfo | None:
        found = await self._find_image(ref) if self.local.images == "containers-storage" else None
        if found is None and self.local.require_image:
            raise ApiError(
                400,
                errors.INVALID_PARAMETER,
                f"image {ref!r} is not in this host's containers storage (podman images), and local.requireImage"
                " refuses the minimal root",
            )
        return found

    async def _create_from_snapshot(self, spec: SandboxSpec, snapshot_id: str) -> SandboxInfo:
        if spec.volumes:
            raise ApiError(
                400, errors.API_NOT_SUPPORTED, "volumes with snapshotId are not supported by the local runtime"
            )
        snapshot = self.snapshots.snapshots.get(snapshot_id)
        if snapshot is None:
            raise snaps.unknown_for_create(snapshot_id)
        snaps.require_ready(snapshot.info())
        spec = snaps.restored(spec, snapshot.held)
        self._check_room(spec, snapshot.size_bytes)
        image = await self._snapshot_image(snapshot.held.image, snapshot.image_digest)
        restore = self.snapshots.restorer(snapshot, self._jail_paths(image is not None))
        self.snapshots.restoring[snapshot_id] = self.snapshots.restoring.get(snapshot_id, 0) + 1
        try:
            jail = await self._spawn(str(uuid.uuid4()), image, userns=wants_isolation(spec.extensions), restore=restore)
            return await self._finish_create(jail, spec, image)
        finally:
            self.snapshots.restoring[snapshot_id] -= 1

    def _check_room(self, spec: SandboxSpec, files_bytes: int) -> None:
        """A jail's files are memory of its own (its tmpfs): the memory limit must hold the snapshot's
        files and leave room to run (400 naming the field, before anything starts)."""
        memory = spec.memory_bytes or self.default_memory
        if memory and "memory" in self.cgroups.parents and memory < files_bytes + RESTORE_HEADROOM:
            raise errors.invalid(
                f"resourceLimits.memory ({memory >> 20} MiB) must be above the snapshot's files"
                f" ({files_bytes >> 20} MiB, kept in memory on the local runtime) plus {RESTORE_HEADROOM >> 20} MiB"
            )

    async def _snapshot_image(self, ref: str, digest: str) -> images.ImageInfo | None:
        """The image root a snapshot was taken over: the host's image if it is still that digest (its
        env and working directory come along), else the unpacked root still in the cache."""
        if not digest:
            return None
        found = await self._find_image(ref)
        if found is not None and found.digest == digest:
            return found
        cached = images.ImageInfo(ref=ref, digest=digest, layers=[])
        if self.images.root(cached).is_dir():
            return cached
        raise ApiError(
            409,
            errors.SNAPSHOT_INVALID_STATE,
            f"the image {ref} ({digest[:19]}) the snapshot was taken over is no longer on this host",
        )

    def _jail_paths(self, image_root: bool) -> frozenset[str]:
        """Paths of a jail's root that its start makes (mount points, bwrap's links): a restore
        leaves them alone."""
        assert self._layout is not None
        parts = [] if image_root else self._parts
        points = [path for path, _ in jails.mountpoints(parts, self._layout)]
        links = [part.path for part in parts if part.link is not None]
        return frozenset(path.strip("/") for path in points + links)

    def _root_message(self, record: Record) -> str:
        if record.root == MINIMAL_ROOT:
            return f"root: minimal ({MINIMAL_ROOT}); image {record.image!r} is not used"
        return f"root: {record.root}"

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
            await self._stop(record)
            record.transition(State.PAUSED, "JAIL_PAUSED", self._root_message(record))
            self._save(record)

    async def _stop(self, record: Record) -> None:
        """Stop every process of the jail: its freezer cgroup, else SIGSTOP to its PID namespace."""
        if self.cgroups.freezer_state(record.cgroups) is not None:
            self.cgroups.set_frozen(record.cgroups, True)
            await self._await_freezer(record, "FROZEN")
            record.paused_by = "freezer"
        else:
            namespace = procfs.pid_namespace(record.pid)
            if namespace is not None:
                procfs.signal_namespace(namespace, signal.SIGSTOP)
                for _ in range(200):  # no event for it: the stops land as the processes run
                    if procfs.all_stopped(namespace):
                        break
                    await asyncio.sleep(0.01)
            record.paused_by = "signal"

    async def _continue(self, record: Record) -> None:
        self._thaw(record)
        if record.paused_by == "freezer":
            await self._await_freezer(record, "THAWED")
        record.paused_by = None

    async def resume(self, sandbox_id: str) -> None:
        async with self._lock(sandbox_id):
            record = self._record(sandbox_id)
            if record.state != State.PAUSED:
                raise ApiError(409, errors.INVALID_STATE, f"sandbox {sandbox_id} is {record.state}, not Paused")
            await self._continue(record)
            record.transition(State.RUNNING, "JAIL_RUNNING", self._root_message(record))
            self._save(record)

    async def create_snapshot(self, sandbox_id: str, name: str | None) -> SnapshotInfo:
        async with self._lock(sandbox_id):
            record = self._record(sandbox_id)
            if record.state != State.RUNNING:
                raise snaps.not_running(sandbox_id, record.state)
            held = Held(
                image=record.image,
                entrypoint=list(record.entrypoint),
                env=dict(record.env),
                cpu_millis=record.cpu_millis,
                memory_bytes=record.memory_bytes,
            )
            snapshot = self.snapshots.begin(sandbox_id, name, held, record.image_digest)
        task = asyncio.create_task(self._capture(record, snapshot), name=f"snapshot-{snapshot.id}")
        self._captures.add(task)
        task.add_done_callback(self._captures.discard)
        return snapshot.info()

    async def _capture(self, record: Record, snapshot: LocalSnapshot) -> None:
        """Freeze the jail, archive its writable layer, let it go on (under the sandbox's lock: no
        pause, resume or delete in between)."""
        async with self._lock(record.id):
            if self.records.get(record.id) is not record or record.state != State.RUNNING:
                await self.snapshots.fail(snapshot, f"the sandbox was {record.state} before its capture began")
                return
            overlay = bool(record.image_digest)
            try:
                layer = layer_path(record.pid, str(self.stage_dir), overlay)
            except ApiError as exc:
                await self.snapshots.fail(snapshot, exc.message)
                return
            ids = slot_range(self.local.uid_range_start, record.uid_slot)
            await self._stop(record)
            try:
                await self.snapshots.capture(snapshot, layer, ids.start, overlay)
            finally:
                await self._continue(record)

    async def get_snapshot(self, snapshot_id: str) -> SnapshotInfo:
        return self.snapshots.get(snapshot_id).info()

    async def list_snapshots(self) -> builtins.list[SnapshotInfo]:
        return self.snapshots.infos()

    async def delete_snapshot(self, snapshot_id: str) -> None:
        users = [r.id for r in self.records.values() if r.snapshot_id == snapshot_id]
        await self.snapshots.delete(snapshot_id, users)

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
        """Port N of the sandbox's own network namespace, forwarded from an ephemeral port of the
        host's loopback (opened the first time anyone asks for N)."""
        record = self._record(sandbox_id)
        host_port = await self._host_port(record, port)
        headers = {EXECD_TOKEN_HEADER: record.token} if port == EXECD_PORT else {}
        if port == EGRESS_PORT and record.egress_token:
            headers = {EGRESS_TOKEN_HEADER: record.egress_token}
        return Endpoint(f"{LOOPBACK}:{host_port}", headers, record.secure_access)

    async def upstream(self, sandbox_id: str, port: int) -> Endpoint:
        guards.require_running(sandbox_id, self._record(sandbox_id).state)
        return await self.endpoint(sandbox_id, port)

    async def egress(self, sandbox_id: str) -> Endpoint | None:
        record = self._record(sandbox_id)
        if record.network_policy is None:
            return None
        guards.require_running(sandbox_id, record.state)
        return await self.endpoint(sandbox_id, EGRESS_PORT)

    async def _start_egress(self, record: Record) -> None:
        netns = self.ports.netns(record.id)
        if netns is None:
            raise ApiError(409, errors.INVALID_STATE, f"sandbox {record.id} has no network namespace")
        assert record.network_policy is not None
        self._egress[record.id] = await JailEgress.start(
            netns, record.network_policy, record.egress_token, self.config.egress, self.sandboxes_dir / record.id
        )

    async def _stop_egress(self, record: Record) -> None:
        egress = self._egress.pop(record.id, None)
        if egress is not None:
            await egress.close()

    async def _host_port(self, record: Record, port: int) -> int:
        known = self.ports.host_port(record.id, port)
        if known is not None:
            return known
        async with self._lock(record.id):
            known = self.ports.host_port(record.id, port)
            if known is not None:
                return known
            if not self.ports.attached(record.id):
                if str(port) in record.ports:
                    return record.ports[str(port)]
                raise ApiError(409, errors.INVALID_STATE, f"sandbox {record.id} is {record.state}")
            host_port = await self._start_forward(record, port)
            self._save(record)
            return host_port

    async def _start_forward(self, record: Record, port: int, host_port: int = 0) -> int:
        bound = await self.ports.open(record.id, port, host_port)
        record.ports[str(port)] = bound
        return bound

    # -- jails ---------------------------------------------------------------------------------

    async def _spawn(
        self,
        sandbox_id: str,
        image: images.ImageInfo | None = None,
        *,
        userns: bool = False,
        volumes: volume_dirs.Opened | None = None,
        restore: Restore | None = None,
    ) -> Jail:
        """Start a jail (with the image's root, or the minimal one) and wait (by event) until execd
        listens in it. `userns`: its filter lets it make user namespaces (isolated sessions);
        `volumes`: directories mounted into it."""
        image_root = str(await self.images.ensure(image)) if image is not None else None
        directory = self.sandboxes_dir / sandbox_id
        directory.mkdir(mode=0o700)
        try:
            ids = self.uids.claim(self._self)
        except NoFreeSlot as exc:
            shutil.rmtree(directory, ignore_errors=True)
            raise ApiError(503, errors.START_FAILED, f"cannot start a sandbox: {exc}") from None
        pipes = _Pipes(seccomp=seccomp.program_fd(self._bpf_userns if userns else self._bpf))
        token = secrets.token_urlsafe(24)
        cgroups = self.cgroups.create(sandbox_id)
        record = Record(id=sandbox_id, pid=0, start_ticks=0, token=token, cgroups=cgroups, uid_slot=ids.slot)
        if image is not None:
            record.root = image.describe()
        plan = self._plan(sandbox_id, directory, ids, pipes, token, image_root, volumes or [])
        plan.restore = functools.partial(restore, cgroups) if restore is not None else None
        future = staging.in_thread(functools.partial(staging.stage_and_start, plan))
        try:
            staged = await asyncio.shield(asyncio.wrap_future(future))
        except BaseException as exc:
            future.add_done_callback(functools.partial(_abandon, pipes))
            self.cgroups.remove(cgroups)
            shutil.rmtree(directory, ignore_errors=True)
            if isinstance(exc, staging.VolumeGone):
                raise ApiError(400, errors.INVALID_PARAMETER, str(exc)) from None
            if isinstance(exc, Exception):
                log.error("jail start failed id=%s error=%s", sandbox_id, exc)
                raise ApiError(500, errors.START_FAILED, f"the jail did not start: {exc}") from exc
            raise
        pipes.close_child()
        self._drain(sandbox_id, pipes.out[0], directory / LOG)
        self._children[sandbox_id] = staged.popen
        self.ports.attach(sandbox_id, staged.netns_fd)
        record.pid = staged.pid
        record.start_ticks = procfs.start_ticks(staged.pid) or 0
        transport = _PipeReader(pipes.evt[0])
        events = transport.reader
        jail = Jail(record, staged.popen, pipes.ctl[1], events, transport)
        try:
            self._save(record)  # from here on, a restarted server can find and remove it
            self.cgroups.set_limits(cgroups, None, None, self.local.max_processes)
            self.cgroups.attach(cgroups, record.pid)
            if self.local.network == "outbound":
                await self._start_helper(record, staged.netns_fd, pipes.exit[0], directory / "slirp4netns.log")
            os.write(pipes.block[1], b"1")  # go
            pipes.release()
            ready = await asyncio.wait_for(_read_event(events), self.local.start_timeout_seconds)
            if ready.get("event") != "ready":
                raise _StartFailed("execd did not start")
            await self._start_forward(record, EXECD_PORT)
            record.execd_pid, record.execd_ticks = _execd_process(record.pid)
            self._save(record)
            self._watch(record)
            return jail
        except BaseException as exc:
            _close(jail.ctl_fd)
            transport.close()
            pipes.release()  # bwrap's host side waits for this before it can end
            await self._kill(record)
            failure = None
            if isinstance(exc, TimeoutError | _StartFailed):
                failure = await self._start_failed(record, str(exc) or "the jail did not start in time")
            await self._destroy(record)
            if failure is not None:
                raise failure from None
            raise
        finally:
            pipes.release()
            _close(pipes.info[0])
            _close(pipes.exit[0])

    def _plan(
        self,
        sandbox_id: str,
        directory: Path,
        ids: IdRange,
        pipes: _Pipes,
        token: str,
        image_root: str | None,
        volumes: volume_dirs.Opened,
    ) -> staging.StagePlan:
        assert self._layout is not None
        stage = str(self.stage_dir)
        if image_root is None:
            root = jails.root_args(stage, self._parts, self._layout)
            mountpoints = jails.mountpoints(self._parts, self._layout)
            skeleton = rootfs.skeleton
        else:
            root = jails.image_root_args(stage, self._layout)
            mountpoints = jails.mountpoints([], self._layout)
            skeleton = rootfs.image_skeleton
        argv = jails.bwrap_args(
            sandbox_id,
            root=root,
            layout=self._layout,
            run_size_bytes=self.local.tmp_size_mib << 20,
            fds=pipes.fds(),
            proc_masks=self._proc_masks,
            volumes=[(f"{stage}/vol/{i}", v.spec.mount_path, v.spec.read_only) for i, v in enumerate(volumes)],
        )
        mountpoints = mountpoints + [(v.spec.mount_path, True) for v in volumes]
        outbound = self.local.network == "outbound"
        return staging.StagePlan(
            argv=argv,
            env=jails.jail_env(sandbox_id, token, self.local.code_prestart),
            pass_fds=pipes.child,
            output_fd=pipes.out[1],
            ids=ids,
            stage_dir=stage,
            disk_bytes=self.local.disk_size_mib << 20,
            skeleton=skeleton(sandbox_id, netpolicy.SLIRP_DNS if outbound else None),
            mountpoints=mountpoints,
            image_root=image_root,
            runtime_binds=dict(self._layout.binds),
            ruleset=self._ruleset() if outbound else netpolicy.loopback_ruleset(),
            sysctls=netpolicy.SYSCTLS,
            info_fd=pipes.info[0],
            timeout=self.local.start_timeout_seconds,
            on_pid=lambda pid: self.uids.hold(ids.slot, (pid, procfs.start_ticks(pid) or 0)),
            volumes=[(v.tree, v.spec.read_only) for v in volumes],
        )

    def _ruleset(self) -> str:
        try:
            host = netpolicy.host_addresses(Path("/proc/net/fib_trie").read_text())
        except OSError:
            host = []
        return netpolicy.ruleset(host=host, allow=self.local.network_allow, deny=self.local.network_deny)

    async def _start_helper(self, record: Record, netns_fd: int, exit_fd: int, log_path: Path) -> None:
        helper = await slirp.start(netns_fd, exit_fd, log_path, self.local.start_timeout_seconds)
        self._helpers[record.id] = helper
        record.helper_pid = helper.pid
        record.helper_ticks = procfs.start_ticks(helper.pid) or 0
        with contextlib.suppress(OSError):  # its traffic's CPU and memory are the sandbox's
            self.cgroups.attach(record.cgroups, helper.pid)
        self._save(record)

    async def _claim(self, jail: Jail, spec: SandboxSpec, image: images.ImageInfo | None = None) -> None:
        record = jail.record
        memory = spec.memory_bytes or self.default_memory
        try:
            self.cgroups.set_limits(record.cgroups, spec.cpu_millis or self.default_cpu, memory, None)
        except OSError as exc:
            if exc.errno != errno.EBUSY or not memory:
                raise
            raise errors.invalid(  # the kernel cannot reclaim tmpfs pages: a restore's files did not fit
                f"resourceLimits.memory ({memory >> 20} MiB) is below what the sandbox already holds in memory"
            ) from None
        rlimits: dict[str, list[int]] = {
            "RLIMIT_NOFILE": [self.local.open_files, self.local.open_files],
            "RLIMIT_NPROC": [self.local.max_processes, self.local.max_processes],
            "RLIMIT_CORE": [0, 0],
        }
        if memory and "memory" not in record.cgroups:
            # No memory cgroup: the address-space limit is the only memory bound left.
            rlimits["RLIMIT_AS"] = [memory, memory]
        env, cwd, argv = dict(spec.env), jails.WORKSPACE, list(spec.entrypoint)
        if image is not None:  # the image's defaults; the request's env and entrypoint win
            env = {**image.env, **spec.env}
            cwd = image.working_dir or jails.WORKSPACE
            argv = argv or image.entrypoint + image.cmd
        claim = {"env": env, "cwd": cwd, "argv": argv, "rlimits": rlimits, "lifecycle": spec.lifecycle}
        try:
            os.write(jail.ctl_fd, json.dumps(claim).encode() + b"\n")
        finally:
            os.close(jail.ctl_fd)
        # A preStart hook runs before the entrypoint starts (and is killed at its own timeout).
        timeout = self.local.start_timeout_seconds + lifecycle.pre_start_seconds(spec.lifecycle)
        try:
            started = await asyncio.wait_for(_read_event(jail.events), timeout)
        except TimeoutError:
            await self._kill(record)
            raise await self._start_failed(record, "the entrypoint did not start in time") from None
        finally:
            jail.transport.close()
        if started.get("event") == "hook-failed":
            why = lifecycle.failure(started.get("run") or {}) or "the preStart hook failed"
            raise ApiError(400, errors.PRESTART_FAILED, why)
        if started.get("event") != "started":
            message = started.get("message") or "the jail ended"
            raise ApiError(400, errors.INVALID_PARAMETER, f"cannot start the entrypoint: {message}")

    async def _start_failed(self, record: Record, why: str) -> ApiError:
        """The error of a failed start, with the end of the jail's log (its processes are gone:
        what they wrote is drained first)."""
        drain = self._drains.get(record.id)
        if drain is not None:
            await asyncio.wait([drain], timeout=1)
        tail = ""
        with contextlib.suppress(OSError):
            tail = (self.sandboxes_dir / record.id / LOG).read_text(errors="replace")[-2000:].strip()
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
        _close(jail.ctl_fd)
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
        """Notice the jail ending on its own (entrypoint exited, killed from outside), and execd
        dying while the jail lives on (its other processes keep PID 1 alive)."""

        async def watch() -> None:
            await self._watch_execd(record)
            await procfs.wait_exit(record.pid)
            code = await self._reap_child(record)
            if record.id in self._deleting or not record.claimed or record.id not in self.records:
                return
            if record.reason == EXECD_EXITED:
                pass  # the jail's exit code is execd's death, not the entrypoint's
            elif code:
                record.transition(State.FAILED, "JAIL_EXITED", f"the entrypoint exited with code {code}")
            else:
                record.transition(State.TERMINATED, "JAIL_EXITED", "the entrypoint exited")
            self.events.record(record.id, Reason.EXITED, record.message, warning=bool(code))
            self._save(record)
            await self._kill_helper(record)
            await self._remove_cgroups(record)

        self._watchers[record.id] = asyncio.create_task(watch(), name=f"watch-{record.id}")

    async def _watch_execd(self, record: Record) -> None:
        """Returns when the jail ends, or execd has ended without it (then the sandbox is Failed)."""
        if not record.execd_pid:
            return
        jail = asyncio.ensure_future(procfs.wait_exit(record.pid))
        execd = asyncio.ensure_future(
            procfs.wait_exit(record.execd_pid)
            if procfs.alive(record.execd_pid, record.execd_ticks)
            else asyncio.sleep(0)
        )
        try:
            await asyncio.wait({jail, execd}, return_when=asyncio.FIRST_COMPLETED)
            if not jail.done():
                await asyncio.wait({jail}, timeout=EXECD_EXIT_GRACE_SECONDS)
            if jail.done() or record.id in self._deleting or record.id not in self.records:
                return
            log.warning("execd exited while the jail lives on id=%s", record.id)
            record.transition(
                State.FAILED,
                EXECD_EXITED,
                "execd, the sandbox's command daemon, exited; the sandbox's other processes still run",
            )
            self.events.record(record.id, Reason.EXITED, record.message, warning=True)
            self._save(record)
        finally:
            for task in (jail, execd):
                task.cancel()

    async def _reap_child(self, record: Record) -> int | None:
        """Reap the outer bwrap if this server started it; its exit code is the jail's."""
        popen = self._children.pop(record.id, None)
        if popen is None:
            return None
        await procfs.wait_exit(popen.pid)
        return popen.wait()

    def _drain(self, sandbox_id: str, fd: int, path: Path) -> None:
        """Copy the jail's output (bwrap's errors, execd's log) to its log file, up to LOG_LIMIT."""

        async def drain() -> None:
            pipe = _PipeReader(fd)
            reader = pipe.reader
            try:
                with _append(path) as log_file:
                    written = log_file.tell()
                    while chunk := await reader.read(65536):
                        if written < LOG_LIMIT:
                            kept = chunk[: LOG_LIMIT - written]
                            log_file.write(kept + (b"\n[the rest is dropped]\n" if len(kept) < len(chunk) else b""))
                            log_file.flush()
                            written += len(chunk)
            finally:
                pipe.close()

        self._drains[sandbox_id] = asyncio.create_task(drain(), name=f"drain-{sandbox_id}")

    async def _kill_helper(self, record: Record) -> None:
        """Kill the jail's slirp4netns (found by pid and start time, also after a restart)."""
        if record.helper_pid and procfs.alive(record.helper_pid, record.helper_ticks):
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.helper_pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(procfs.wait_exit(record.helper_pid), 5)
        helper = self._helpers.pop(record.id, None)
        if helper is not None:
            helper.poll()  # reaped if it is gone (our child only while this server started it)

    async def _remove_cgroups(self, record: Record) -> None:
        for _ in range(100):  # the last processes leave the cgroup just after PID 1 is gone
            if self.cgroups.remove(record.cgroups):
                return
            await asyncio.sleep(0.01)

    async def _kill(self, record: Record) -> None:
        """Kill every process of the jail (and its slirp4netns) and wait until they are gone."""
        if record.pid and procfs.alive(record.pid, record.start_ticks):
            # PID 1 of the namespace: when it dies the kernel kills every process in it.
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, signal.SIGKILL)
            self._thaw(record)  # a frozen process only dies once thawed
            try:
                await asyncio.wait_for(procfs.wait_exit(record.pid), 10)
            except TimeoutError:
                log.error("jail did not die id=%s pid=%d", record.id, record.pid)
        await self._kill_helper(record)

    async def _destroy(self, record: Record) -> None:
        """Kill every process of the jail, then remove its cgroups, directory and record."""
        self._deleting.add(record.id)
        try:
            await self._stop_egress(record)
            await self.ports.close(record.id)
            await self._kill(record)
            watcher = self._watchers.pop(record.id, None)
            if watcher is not None:
                await asyncio.wait([watcher], timeout=5)
            await self._reap_child(record)
            await self._remove_cgroups(record)
            drain = self._drains.pop(record.id, None)
            if drain is not None:
                await asyncio.wait([drain], timeout=5)
            self.records.pop(record.id, None)
            self._locks.pop(record.id, None)
            shutil.rmtree(self.sandboxes_dir / record.id, ignore_errors=True)
            for claim in record.owned_volumes:  # deleteOnSandboxTermination, made by its create
                volume_dirs.remove_named(self.volumes_dir, PvcBackend(claim))
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
            self.events.gone(sandbox_id, Reason.EXPIRED, f"its expiry {record.expires_at} passed")

    def _open_volumes(self, spec: SandboxSpec) -> volume_dirs.Opened:
        opened = volume_dirs.open_all(spec.volumes, self.volumes_dir)
        try:
            return volume_dirs.with_trees(opened)
        except OSError as exc:
            volume_dirs.close_all(opened)
            self._remove_created_volumes(opened)
            raise ApiError(500, errors.START_FAILED, f"cannot mount the volumes: {exc}") from None

    def _remove_created_volumes(self, opened: volume_dirs.Opened) -> None:
        """A failed create leaves no named volume it made."""
        for volume in opened:
            if volume.created and isinstance(volume.spec.backend, PvcBackend):
                volume_dirs.remove_named(self.volumes_dir, volume.spec.backend)

    # -- diagnostics ---------------------------------------------------------------------------

    async def logs(self, sandbox_id: str, tail: int | None, since: dt.datetime | None, scope: str) -> LogText:
        """The jail's start-up output (bwrap's errors, execd's first lines; drained by the server),
        then execd's log and the entrypoint's output, which the jail writes to its own
        /run/opensandbox/jail.log. Lines carry no times of their own: `since` is not honoured."""
        record = self._record(sandbox_id)
        started = await asyncio.to_thread(_tail_bytes, self.sandboxes_dir / sandbox_id / LOG)
        inside = b""
        if procfs.alive(record.pid, record.start_ticks):
            inside = await asyncio.to_thread(jail_log, record.pid, LOG_LIMIT)
        text = (started + inside).decode(errors="replace")
        warnings = ["since is not supported by the local runtime's log (its lines carry no times)"] if since else []
        if tail is not None:
            text = "".join(text.splitlines(keepends=True)[-tail:])
        return LogText(text, truncated=len(inside) >= LOG_LIMIT, warnings=warnings)

    async def runtime_events(self, sandbox_id: str) -> EventList:
        record = self._record(sandbox_id)
        at = times.parse(record.last_transition_at or record.created_at)
        found = [SandboxEvent(at, record.reason, f"{record.state}: {record.message}".rstrip(": "), source="jail")]
        kills = self.cgroups.oom_kills(record.cgroups)
        if kills:
            message = f"the kernel killed {kills} process(es) of the sandbox for exceeding its memory limit"
            found.append(SandboxEvent(times.now(), Reason.OOM_KILLED, message, source="cgroup", type="Warning"))
        return found

    async def inspect(self, sandbox_id: str) -> dict[str, Any]:
        record = self._record(sandbox_id)
        data = {k: v for k, v in asdict(record).items() if k not in ("_info", "token")}
        data["freezer"] = self.cgroups.freezer_state(record.cgroups)
        return data

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


def _tail_bytes(path: Path, limit: int = LOG_LIMIT) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
            return f.read(limit)
    except FileNotFoundError:
        return b""


def jail_log(pid: int, limit: int) -> bytes:
    """The last `limit` bytes of the jail's /run/opensandbox/jail.log, read as root from a file the
    sandbox controls: resolved inside the jail's root (a symlink to /etc/shadow is the jail's
    /etc/shadow, `..` stops at its root), and only a regular file (a FIFO would block)."""
    root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        resolve = openat2.RESOLVE_IN_ROOT | openat2.RESOLVE_NO_MAGICLINKS
        fd = openat2.openat2(root, JAIL_LOG, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, resolve=resolve)
    except OSError:
        return b""
    finally:
        os.close(root)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return b"[the jail's log is not a regular file]\n"
        f.seek(max(0, info.st_size - limit))
        return f.read(limit)


def _append(path: Path) -> BinaryIO:
    return open(path, "ab")


def _execd_process(jail_pid: int) -> tuple[int, int]:
    """(pid, start ticks) of the jail init (execd), the only child of the jail's PID 1 until the
    entrypoint starts; (0, 0) if that cannot be told."""
    children = procfs.children(jail_pid)
    if len(children) != 1:
        return 0, 0
    return children[0], procfs.start_ticks(children[0]) or 0


class _StartFailed(Exception):
    pass


def _abandon(pipes: _Pipes, future: Future[staging.Staged]) -> None:
    """A start given up while its thread still ran: once the thread is done, undo what it made."""
    if not future.cancelled() and future.exception() is None:
        staged = future.result()
        staging.kill_unreleased(staged.popen)
        _close(staged.netns_fd)
    pipes.close_all()


class _PipeReader:
    """A pipe read on the event loop into a StreamReader; `close()` closes its fd, once.

    Not `connect_read_pipe`: uvloop closes a pipe's fd, then its file object again (expecting
    EBADF), and meanwhile a staging thread may have opened a file with that number."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.reader = asyncio.StreamReader()
        self._loop = asyncio.get_running_loop()
        os.set_blocking(fd, False)
        self._loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.reader.feed_data(data)
        else:
            self.reader.feed_eof()
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            self._loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1


async def _read_event(events: asyncio.StreamReader) -> dict[str, Any]:
    line = await events.readline()
    if not line:
        return {"event": "exited"}
    parsed = json.loads(line)
    return parsed if isinstance(parsed, dict) else {}
