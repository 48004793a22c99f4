"""Snapshots of local sandboxes: the jail's private writable layer, archived under the state dir
(runtimes/snapstore.py, content-addressed) and laid out again in a new jail's layer.

Where the layer is: the jail's root is staged in a private mount namespace (runtimes/staging.py)
that only the outer bwrap process (the parent of the jail's PID 1) still lives in; the server reads
it through that process's `/proc/PID/root`, by directory descriptors only (runtimes/filetree.py):
`<stage>/rw` for the minimal root (the whole tmpfs), `<stage>/rw/upper` over an image (the
overlay's upper layer, whiteouts and opaque directories kept). The jail is frozen meanwhile (its
freezer cgroup, or SIGSTOP), so the capture is one point in time and nothing moves under it.

A restore writes the entries into the new jail's tmpfs while it is staged, before anything runs in
it, never over what the jail's start writes itself (`protected`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from opensandbox_platform.daemon import times
from opensandbox_platform.server import errors
from opensandbox_platform.server.runtimes import filetree, procfs
from opensandbox_platform.server.runtimes import snapshots as snaps
from opensandbox_platform.server.runtimes.base import Held, SnapshotInfo, SnapshotState
from opensandbox_platform.server.runtimes.cgroups import Cgroups
from opensandbox_platform.server.runtimes.snapstore import LocalSnapshot, SnapshotStore

log = logging.getLogger("opensandbox.local.snapshots")

RESTORE_TIMEOUT = 600.0  # seconds: a whole diskSizeMib of small files on a loaded host
# Called with the new jail's cgroups, its writable layer and its first host id (runtimes/staging.py).
Restore = Callable[[dict[str, str], str, int], None]
# What the jail's start makes itself in its root: never taken from a snapshot (bwrap's mounts, the
# files staging writes for this sandbox's name and network).
JAIL_OWNED = frozenset({"proc", "dev", "sys", "run", "etc/hostname", "etc/hosts", "etc/resolv.conf"})


def layer_path(jail_pid: int, stage_dir: str, overlay: bool) -> str:
    """The jail's writable layer as the host reaches it (raises 409 when the jail is gone)."""
    outer = procfs.parent(jail_pid)
    if outer is None:
        raise errors.ApiError(409, errors.SNAPSHOT_INVALID_SOURCE_STATE, "the sandbox's jail is gone")
    return f"/proc/{outer}/root{stage_dir}/rw" + ("/upper" if overlay else "")


class LocalSnapshots:
    def __init__(self, directory: Path, max_bytes: int, store_max_bytes: int) -> None:
        self.store = SnapshotStore(directory)
        self.max_bytes = max_bytes  # one snapshot (the sandbox's disk)
        self.store_max_bytes = store_max_bytes  # all of them together
        self.snapshots: dict[str, LocalSnapshot] = {}
        self.restoring: dict[str, int] = {}  # snapshot id -> creates laying it out now (it is in use)

    def start(self) -> None:
        self.store.prepare()
        self.snapshots = self.store.load_all()
        for snapshot in self.snapshots.values():
            if snapshot.state == SnapshotState.CREATING:  # the server stopped during its capture
                snapshot.transition(SnapshotState.FAILED, snaps.CAPTURE_FAILED, "the server stopped during the capture")
                self.store.save(snapshot)
        self.store.collect()

    def get(self, snapshot_id: str) -> LocalSnapshot:
        snapshot = self.snapshots.get(snapshot_id)
        if snapshot is None:
            raise errors.snapshot_not_found(snapshot_id)
        return snapshot

    def infos(self) -> list[SnapshotInfo]:
        return [s.info() for s in self.snapshots.values()]

    def begin(self, sandbox_id: str, name: str | None, held: Held, image_digest: str) -> LocalSnapshot:
        now = times.rfc3339(digits=6)
        snapshot = LocalSnapshot(
            id=snaps.new_id(),
            sandbox_id=sandbox_id,
            name=name,
            held=held,
            created_at=now,
            last_transition_at=now,
            reason=snaps.ACCEPTED,
            image_digest=image_digest,
        )
        self.snapshots[snapshot.id] = snapshot
        self.store.save(snapshot)
        return snapshot

    async def capture(self, snapshot: LocalSnapshot, layer: str, id_offset: int, overlay: bool) -> None:
        """Archive the layer into the snapshot; Ready, or Failed with the reason (never raises)."""
        async with self.store.lock:
            room = self.store_max_bytes - await asyncio.to_thread(self.store.total_bytes)
            if room < self.max_bytes:  # counted before sharing: a capture may add up to its whole size
                await self._fail(snapshot, snaps.TOO_LARGE, _store_full(room, self.store_max_bytes))
                return
            budget = filetree.Budget(self.max_bytes, snaps.MAX_ENTRIES)
            work = functools.partial(
                filetree.capture, layer, self.store.put_blob, budget, id_offset=id_offset, overlay=overlay
            )
            try:
                captured = await asyncio.to_thread(work)
            except filetree.TooLarge as exc:
                await self._fail(snapshot, snaps.TOO_LARGE, f"the sandbox's files are too large to snapshot: {exc}")
                return
            except OSError as exc:
                log.warning("snapshot capture failed id=%s error=%s", snapshot.id, exc)
                await self._fail(snapshot, snaps.CAPTURE_FAILED, f"the capture failed: {exc.strerror or exc}")
                return
            except Exception:  # never left Creating: a bug here must still end the snapshot
                log.exception("snapshot capture failed id=%s", snapshot.id)
                await self._fail(snapshot, snaps.CAPTURE_FAILED, "the capture failed: internal error")
                return
            snapshot.size_bytes = captured.bytes
            snapshot.files = sum(1 for e in captured.entries if e.kind == filetree.FILE)
            snapshot.skipped = captured.skipped[:100]
            skipped = f"; left out {len(captured.skipped)} device nodes or sockets" if captured.skipped else ""
            snapshot.transition(
                SnapshotState.READY, snaps.READY, f"{snapshot.files} files, {captured.bytes} bytes{skipped}"
            )
            await asyncio.to_thread(self.store.save, snapshot, captured.entries)

    async def fail(self, snapshot: LocalSnapshot, message: str) -> None:
        async with self.store.lock:
            await self._fail(snapshot, snaps.CAPTURE_FAILED, message)

    async def _fail(self, snapshot: LocalSnapshot, reason: str, message: str) -> None:
        snapshot.transition(SnapshotState.FAILED, reason, message)
        self.store.save(snapshot)
        await asyncio.to_thread(self.store.collect)  # the blobs of the half capture

    async def delete(self, snapshot_id: str, users: list[str]) -> None:
        snapshot = self.get(snapshot_id)
        if snapshot.state == SnapshotState.CREATING:
            raise snaps.still_creating(snapshot_id)
        if self.restoring.get(snapshot_id):
            users = [*users, "(a sandbox being created)"]
        if users:
            raise snaps.in_use(snapshot_id, users)
        async with self.store.lock:
            self.snapshots.pop(snapshot_id, None)
            self.store.remove(snapshot_id)
            await asyncio.to_thread(self.store.collect)

    def restorer(self, snapshot: LocalSnapshot, protected: frozenset[str]) -> Restore:
        """What staging calls, in its thread, with the new jail's cgroups, layer and id offset: runs
        runtimes/restore_job.py in those cgroups (the restored files' pages are the sandbox's)."""
        job = {"store": str(self.store.directory), "snapshot": snapshot.id, "protected": sorted(protected | JAIL_OWNED)}

        def restore(cgroups: dict[str, str], layer: str, id_offset: int) -> None:
            command = [sys.executable, "-m", "opensandbox_platform.server.runtimes.restore_job"]
            helper = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                Cgroups.attach(cgroups, helper.pid)  # before it reads its job, so before it writes a byte
                request = json.dumps({**job, "layer": layer, "id_offset": id_offset}).encode()
                out, err = helper.communicate(request, timeout=RESTORE_TIMEOUT)
            finally:
                if helper.poll() is None:
                    helper.kill()
                    helper.wait()
            if helper.returncode != 0:
                raise RuntimeError(f"the restore of {snapshot.id} failed: {err.decode(errors='replace')[-500:]}")
            skipped = json.loads(out)["skipped"]
            if skipped:
                log.info("restore of %s left out %d entries (the jail's own)", snapshot.id, skipped)

        return restore


def _store_full(room: int, limit: int) -> str:
    return (
        f"the snapshot store is full: {max(room, 0) >> 20} MiB left of {limit >> 20} MiB"
        " (local.snapshotStoreMaxMib), less than a snapshot may take (local.diskSizeMib); delete snapshots"
    )
