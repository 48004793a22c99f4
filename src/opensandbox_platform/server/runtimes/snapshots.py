"""What every runtime's snapshots share: what a snapshot holds besides files, how a create from a
snapshot takes its defaults from it, ids, and the errors. docs/snapshots.md."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

from opensandbox_platform.server import errors
from opensandbox_platform.server.errors import ApiError
from opensandbox_platform.server.runtimes.base import Held, SandboxSpec, SnapshotInfo, SnapshotRecord, SnapshotState

R = TypeVar("R", bound=SnapshotRecord)

# Machine-readable reasons of a snapshot's state (the SDK's examples).
ACCEPTED = "snapshot_accepted"
READY = "snapshot_ready"
CAPTURE_FAILED = "snapshot_capture_failed"
TOO_LARGE = "snapshot_too_large"
# The most files and directories a snapshot holds (every runtime that walks a layer itself).
MAX_ENTRIES = 1_000_000
# A restore's entrypoint when the request names none (specs/sandbox-lifecycle.yml).
DEFAULT_ENTRYPOINT = ("tail", "-f", "/dev/null")


def new_id() -> str:
    """A snapshot id: also a Kubernetes object name and an image tag."""
    return f"snap-{uuid.uuid4().hex[:20]}"


def restored(spec: SandboxSpec, held: Held, image: str | None = None) -> SandboxSpec:
    """The create of a sandbox from a snapshot: what the request names wins, the rest is the
    snapshot's (its env under the request's), but for the entrypoint, which the spec defaults to
    `tail -f /dev/null` (the snapshot holds no process to go on with). `image`: what the runtime
    starts it from."""
    return dataclasses.replace(
        spec,
        image=image if image is not None else held.image,
        entrypoint=spec.entrypoint or list(DEFAULT_ENTRYPOINT),
        env={**held.env, **spec.env},
        cpu_millis=spec.cpu_millis or held.cpu_millis,
        memory_bytes=spec.memory_bytes or held.memory_bytes,
    )


def not_running(sandbox_id: str, state: str) -> ApiError:
    return ApiError(
        409, errors.SNAPSHOT_INVALID_SOURCE_STATE, f"sandbox {sandbox_id} is {state}: only a Running one is captured"
    )


def require_ready(info: SnapshotInfo) -> None:
    """A create can only restore a Ready snapshot (409 naming the state otherwise)."""
    if info.state != SnapshotState.READY:
        raise ApiError(
            409,
            errors.SNAPSHOT_INVALID_STATE,
            f"snapshot {info.id} is {info.state}, not Ready{': ' + info.message if info.message else ''}",
        )


async def ready_for_create(find: Callable[[str], Awaitable[R]], snapshot_id: str) -> R:
    """The record a create restores from: a 400 for an unknown snapshot, a 409 for one not Ready."""
    try:
        record = await find(snapshot_id)
    except ApiError as exc:
        if exc.status == 404:
            raise unknown_for_create(snapshot_id) from None
        raise
    require_ready(record.info())
    return record


def unknown_for_create(snapshot_id: str) -> ApiError:
    return ApiError(400, errors.INVALID_PARAMETER, f"snapshotId {snapshot_id!r}: no such snapshot")


def in_use(snapshot_id: str, sandbox_ids: list[str]) -> ApiError:
    names = ", ".join(sorted(sandbox_ids)[:5])
    return ApiError(
        409,
        errors.SNAPSHOT_IN_USE,
        f"snapshot {snapshot_id} is in use by sandbox {names}: delete the sandboxes restored from it first",
    )


def still_creating(snapshot_id: str) -> ApiError:
    return ApiError(409, errors.SNAPSHOT_INVALID_STATE, f"snapshot {snapshot_id} is still being created")
