"""The interface every runtime implements: `local`, `docker` and `kubernetes`.

Routes validate input, filter, sort and paginate; a runtime only creates, finds and changes
sandboxes, and declares what it can honour beyond the common core (`Capabilities`), so the routes
refuse the rest before it is called. Errors are `server.errors.ApiError` (404 for an unknown id,
409 for a wrong state); the checks every runtime makes are in `guards.py`.
"""

from __future__ import annotations

import builtins
import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Protocol

from opensandbox_platform.daemon import times
from opensandbox_platform.server.runtimes.events import EventList, EventLog
from opensandbox_platform.server.volumes import VolumeSpec

# The largest CPU quantity on any runtime (1000 CPUs): beyond it a number is a typo.
MAX_CPU_MILLIS = 1_000_000


class State:
    PENDING = "Pending"
    RUNNING = "Running"
    PAUSED = "Paused"
    STOPPING = "Stopping"
    TERMINATED = "Terminated"
    FAILED = "Failed"


@dataclass
class SandboxSpec:
    """A validated create request."""

    image: str
    entrypoint: list[str]
    env: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    extensions: dict[str, str] = field(default_factory=dict)
    timeout_seconds: int | None = None
    cpu_millis: int | None = None  # resourceLimits
    memory_bytes: int | None = None
    cpu_request_millis: int | None = None  # resourceRequests (only where capabilities.resource_requests)
    memory_request_bytes: int | None = None
    image_auth: dict[str, str] | None = field(default=None, repr=False)  # {"username", "password"}
    secure_access: bool = False  # endpoints only through the server, with a signed token
    volumes: list[VolumeSpec] = field(default_factory=list)
    snapshot_id: str | None = None  # restore this snapshot (`image` and the rest default to what it holds)
    # networkPolicy, validated and normalized (egress/policy.py); None: no policy, no enforcer
    network_policy: dict[str, Any] | None = None
    # lifecycle hooks, checked (execd/lifecycle.py), in their wire form; None: none
    lifecycle: dict[str, Any] | None = None


@dataclass(frozen=True)
class Capabilities:
    """What a runtime honours beyond the common core. A create or call that needs more is refused
    (400 `SANDBOX::API_NOT_SUPPORTED` naming the field), never silently ignored."""

    runtime: str  # the name refusals give ("resourceRequests is not supported by the local runtime")
    pool_ref: bool = False  # `extensions.poolRef`: claim a warm pod of a Pool
    image_auth: bool = False  # `image.auth`: registry credentials for the image
    resource_requests: bool = False  # `resourceRequests` (never with a poolRef: a claimed pod's are the Pool's)
    pause: bool = False  # pause and resume
    volumes: frozenset[str] = frozenset()  # volume backends it mounts (host, pvc)
    snapshots: bool = False  # snapshots of sandboxes, and `snapshotId` on create
    network_policy: bool = False  # `networkPolicy` and the /networkpolicy routes (docs/network-policy.md)
    lifecycle: bool = False  # `lifecycle` hooks (preStart, periodic), run by execd (execd/hooks.py)
    max_cpu_millis: int = MAX_CPU_MILLIS  # the largest resourceLimits.cpu (docker: at most the host's CPUs)


@dataclass
class SandboxInfo:
    id: str
    image: str
    entrypoint: list[str]
    metadata: dict[str, str]
    extensions: dict[str, str]
    created_at: dt.datetime
    expires_at: dt.datetime | None
    state: str
    reason: str
    message: str
    last_transition_at: dt.datetime
    secure_access: bool = False
    snapshot_id: str = ""  # the snapshot it was restored from


class SnapshotState:
    CREATING = "Creating"
    READY = "Ready"
    FAILED = "Failed"
    DELETING = "Deleting"


@dataclass
class Held:
    """The sandbox a snapshot was taken of, besides its files: a restore starts from these."""

    image: str
    entrypoint: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cpu_millis: int | None = None
    memory_bytes: int | None = None


@dataclass
class SnapshotInfo:
    id: str
    sandbox_id: str
    name: str | None
    state: str
    reason: str
    message: str
    created_at: dt.datetime
    last_transition_at: dt.datetime


@dataclass
class SnapshotRecord:
    """What every runtime keeps of a snapshot: who it is of, what it holds besides its files, and
    where it is in its life (Creating -> Ready or Failed)."""

    id: str
    sandbox_id: str
    name: str | None
    held: Held
    created_at: str
    state: str = SnapshotState.CREATING
    reason: str = ""
    message: str = ""
    last_transition_at: str = ""

    def info(self) -> SnapshotInfo:
        return SnapshotInfo(
            id=self.id,
            sandbox_id=self.sandbox_id,
            name=self.name,
            state=self.state,
            reason=self.reason,
            message=self.message,
            created_at=times.parse(self.created_at),
            last_transition_at=times.parse(self.last_transition_at or self.created_at),
        )

    def transition(self, state: str, reason: str, message: str = "") -> None:
        self.state, self.reason, self.message = state, reason, message
        self.last_transition_at = times.rfc3339(digits=6)


@dataclass
class Endpoint:
    """`address` is host:port[/path] without a scheme; `headers` go with every request to it."""

    address: str
    headers: dict[str, str] = field(default_factory=dict)
    secure_access: bool = False  # the sandbox's: reached only through the server, with a token


@dataclass
class RuntimeHealth:
    """What `/health` reports of the runtime and `/ready` decides on: `ready` is False while the
    engine behind it (the Docker Engine API, the Kubernetes API server) cannot be reached."""

    ready: bool
    detail: dict[str, object] = field(default_factory=dict)


@dataclass
class LogText:
    """A sandbox's output as `diagnostics/logs` returns it; `warnings` say what could not be honoured
    (a `since` on a log without times) or is missing."""

    text: str
    truncated: bool = False
    warnings: list[str] = field(default_factory=list)


def merge_metadata(metadata: dict[str, str], patch: dict[str, str | None]) -> None:
    """Applies a metadata patch in place (JSON merge patch: None removes the key)."""
    for key, value in patch.items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value


class Runtime(Protocol):
    @property
    def capabilities(self) -> Capabilities: ...

    # The server's own events of each sandbox (the routes and the runtime record into it).
    events: EventLog

    async def start(self) -> None:
        """Recover existing sandboxes and start background work (expiry)."""

    def health(self) -> RuntimeHealth:
        """The runtime's last known state (never waits on the engine: a cached check)."""

    async def close(self) -> None:
        """Stop background work; sandboxes keep running."""

    async def create(self, spec: SandboxSpec) -> SandboxInfo: ...

    async def get(self, sandbox_id: str) -> SandboxInfo: ...

    async def list(self) -> list[SandboxInfo]: ...

    async def delete(self, sandbox_id: str) -> None: ...

    async def pause(self, sandbox_id: str) -> None: ...

    async def resume(self, sandbox_id: str) -> None: ...

    async def renew(self, sandbox_id: str, expires_at: dt.datetime) -> SandboxInfo: ...

    async def patch_metadata(self, sandbox_id: str, patch: dict[str, str | None]) -> SandboxInfo: ...

    async def endpoint(self, sandbox_id: str, port: int) -> Endpoint:
        """Where a client reaches `port` of the sandbox directly."""

    async def upstream(self, sandbox_id: str, port: int) -> Endpoint:
        """Where the server's proxy connects for `port`, with the headers it adds."""

    async def logs(self, sandbox_id: str, tail: int | None, since: dt.datetime | None, scope: str) -> LogText:
        """The entrypoint's and execd's output (scope `all`: every container of a pod too)."""

    async def runtime_events(self, sandbox_id: str) -> EventList:
        """What the engine knows happened (pod events, an OOM kill, the exit), oldest first."""

    async def inspect(self, sandbox_id: str) -> dict[str, Any]:
        """The engine's description of the sandbox (container, pod, jail record), secrets left out."""

    # Snapshots (capabilities.snapshots; docs/snapshots.md). 404 `SNAPSHOT::NOT_FOUND` for an
    # unknown id, 409 for a sandbox that is not Running or a snapshot that is in use.
    async def create_snapshot(self, sandbox_id: str, name: str | None) -> SnapshotInfo:
        """Start capturing the sandbox's files; the answer is Creating (or already Ready)."""

    async def get_snapshot(self, snapshot_id: str) -> SnapshotInfo: ...

    async def list_snapshots(self) -> builtins.list[SnapshotInfo]: ...

    async def delete_snapshot(self, snapshot_id: str) -> None: ...
    async def egress(self, sandbox_id: str) -> Endpoint | None:
        """Where the server reaches the sandbox's egress API, with its token; None: no policy."""
