"""Snapshots of docker sandboxes: a container commit (the runtime pauses the container and checks
its writable layer's size first) to a local image `opensandbox-snapshot:<id>`, labelled with the
snapshot's id and record.

The image is the record of a Ready snapshot, so snapshots survive a server restart and another
server on the same engine sees them. A capture in progress, and one that failed, live in this
server's memory only (a restart forgets them: the first never becomes an image, the second never
was one). A container restored from a snapshot carries its id (`L.DOCKER_SNAPSHOT`): while one
exists, the snapshot is in use and its image cannot be removed.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import aiodocker
from aiodocker.exceptions import DockerError

from opensandbox_platform.api import labels as L
from opensandbox_platform.daemon import times
from opensandbox_platform.server import errors
from opensandbox_platform.server.errors import ApiError
from opensandbox_platform.server.runtimes import docker_api, docker_model
from opensandbox_platform.server.runtimes import snapshots as snaps
from opensandbox_platform.server.runtimes.base import Held, SnapshotInfo, SnapshotRecord, SnapshotState

log = logging.getLogger("opensandbox.docker.snapshots")
REPOSITORY = "opensandbox-snapshot"
# execd's own variables and the start gate's: the next sandbox gets its own (a gate nobody opens
# would hold its entrypoint back for ever)
EXECD_ENV = frozenset(docker_model.execd_env("", "")) | {L.START_GATE_ENV}


@dataclass
class Record(SnapshotRecord):
    reason: str = snaps.ACCEPTED

    def encode(self) -> str:
        return base64.b64encode(json.dumps(asdict(self)).encode()).decode()

    @classmethod
    def decode(cls, value: str) -> Record | None:
        try:
            data = json.loads(base64.b64decode(value))
            data["held"] = Held(**data["held"])
            return cls(**data)
        except (ValueError, TypeError, KeyError):
            return None


def _too_large(size: int, limit: int) -> str:
    return (
        f"the sandbox's files are too large to snapshot: its writable layer is {size >> 20} MiB, more than"
        f" {limit >> 20} MiB (docker.snapshotMaxSizeMib; sparse files count in full)"
    )


def image_ref(snapshot_id: str) -> str:
    return f"{REPOSITORY}:{snapshot_id}"


def held_of(inspect: dict[str, Any], image: str, entrypoint: list[str]) -> Held:
    """What a restore takes from the sandbox: its env (without execd's), image and resources."""
    env = dict(e.split("=", 1) for e in (inspect.get("Config") or {}).get("Env") or [] if "=" in e)
    host = inspect.get("HostConfig") or {}
    return Held(
        image=image,
        entrypoint=list(entrypoint),
        env={k: v for k, v in env.items() if k not in EXECD_ENV},
        cpu_millis=(host.get("NanoCpus") or 0) // 1_000_000 or None,
        memory_bytes=host.get("Memory") or None,
    )


class DockerSnapshots:
    def __init__(self, docker: Callable[[], aiodocker.Docker], max_bytes: int) -> None:
        self._docker = docker
        self.max_bytes = max_bytes
        self.pending: dict[str, Record] = {}  # Creating, and Failed (this server's memory only)
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def docker(self) -> aiodocker.Docker:
        return self._docker()

    def begin(self, container_id: str, sandbox_id: str, name: str | None, held: Held, lock: asyncio.Lock) -> Record:
        """Start the commit in the background, under the sandbox's `lock` (no pause, resume, delete
        or other capture of it in between)."""
        now = times.rfc3339(digits=6)
        record = Record(snaps.new_id(), sandbox_id, name, held, created_at=now, last_transition_at=now)
        self.pending[record.id] = record
        task = asyncio.create_task(self._locked_commit(container_id, record, lock), name=f"snapshot-{record.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return record

    async def _locked_commit(self, container_id: str, record: Record, lock: asyncio.Lock) -> None:
        async with lock:
            await self._commit(container_id, record)

    async def _commit(self, container_id: str, record: Record) -> None:
        """Pause the container, measure its writable layer, commit it, let it go on. The runtime
        pauses (not the commit) so the size measured is the size committed: a sandbox must not
        make the engine write a 64 GiB sparse file into an image."""
        ready = Record(**{**asdict(record), "held": record.held})
        ready.state, ready.reason = SnapshotState.READY, snaps.READY
        ready.last_transition_at = times.rfc3339(digits=6)
        changes = [f"LABEL {L.DOCKER_SNAPSHOT}={record.id}", f"LABEL {L.DOCKER_SNAPSHOT_RECORD}={ready.encode()}"]
        container = self.docker.containers.container(container_id)
        try:
            await container.pause()
            try:
                size = (await container.show(size="true")).get("SizeRw")
                if not isinstance(size, int) or size < 0:  # fail closed: never commit what was not measured
                    self._fail(record, snaps.CAPTURE_FAILED, f"the engine did not report the layer's size ({size!r})")
                    return
                if size > self.max_bytes:
                    self._fail(record, snaps.TOO_LARGE, _too_large(size, self.max_bytes))
                    return
                await container.commit(repository=REPOSITORY, tag=record.id, changes=changes, pause=False, config={})
            finally:
                with contextlib.suppress(DockerError):
                    await container.unpause()
        except DockerError as exc:
            log.warning("snapshot commit failed id=%s error=%s", record.id, exc.message)
            self._fail(record, snaps.CAPTURE_FAILED, f"the commit failed: {exc.message}")
            return
        except Exception as exc:  # the engine gone, a timeout: never left Creating
            log.warning("snapshot commit failed id=%s error=%r", record.id, exc)
            self._fail(record, snaps.CAPTURE_FAILED, f"the commit failed: {type(exc).__name__}")
            return
        self.pending.pop(record.id, None)

    @staticmethod
    def _fail(record: Record, reason: str, message: str) -> None:
        record.transition(SnapshotState.FAILED, reason, message)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=60)

    async def images(self) -> builtins.list[dict[str, Any]]:
        filters = json.dumps({"label": [L.DOCKER_SNAPSHOT]})
        found: list[dict[str, Any]] = await self.docker.images.list(filters=filters)
        return found

    def _ready(self, image: dict[str, Any]) -> Record | None:
        labels = image.get("Labels") or {}
        return Record.decode(labels.get(L.DOCKER_SNAPSHOT_RECORD, ""))

    async def find(self, snapshot_id: str) -> Record:
        if snapshot_id in self.pending:
            return self.pending[snapshot_id]
        try:
            image = await self.docker.images.inspect(image_ref(snapshot_id))
        except DockerError as exc:
            if exc.status == 404:
                raise errors.snapshot_not_found(snapshot_id) from None
            raise
        record = Record.decode(((image.get("Config") or {}).get("Labels") or {}).get(L.DOCKER_SNAPSHOT_RECORD, ""))
        if record is None or record.id != snapshot_id:
            raise errors.snapshot_not_found(snapshot_id)
        return record

    async def list(self) -> builtins.list[SnapshotInfo]:
        infos = {r.id: r.info() for r in self.pending.values()}
        for image in await self.images():
            record = self._ready(image)
            if record is not None and record.id not in infos:
                infos[record.id] = record.info()
        return list(infos.values())

    async def delete(self, snapshot_id: str) -> None:
        record = await self.find(snapshot_id)
        if record.state == SnapshotState.CREATING:
            raise snaps.still_creating(snapshot_id)
        if record.state == SnapshotState.FAILED:
            self.pending.pop(snapshot_id, None)
            return
        users = await docker_api.list_containers(self.docker, f"{L.DOCKER_SNAPSHOT}={snapshot_id}")
        names = [str((c.get("Labels") or {}).get(L.DOCKER_ID, c.get("Id", ""))) for c in users]
        if names:
            raise snaps.in_use(snapshot_id, names)
        try:
            await self.docker.images.delete(image_ref(snapshot_id), force=False)
        except DockerError as exc:
            if exc.status == 404:
                raise errors.snapshot_not_found(snapshot_id) from None
            if exc.status == 409:
                raise ApiError(
                    409, errors.SNAPSHOT_IN_USE, f"the engine keeps snapshot {snapshot_id}: {exc.message}"
                ) from None
            raise
