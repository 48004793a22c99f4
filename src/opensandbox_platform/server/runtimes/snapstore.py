"""The local runtime's snapshots, under the state dir, content-addressed:

    <stateDir>/snapshots/<id>/snapshot.json   the record: state, what it holds (runtimes/snapshots.Held)
    <stateDir>/snapshots/<id>/entries.json    its files as filetree.Entry records
    <stateDir>/snapshots/blobs/sha256/<hh>/<digest>   file contents, one per distinct content

Two snapshots (of one sandbox at two times, or of sandboxes of one image) share every file whose
bytes are the same. A blob nobody's entries name any more is removed by `collect` (after a delete,
and after a failed capture). Writes and collections are serialized by the runtime (`lock`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

from opensandbox_platform.server.runtimes.base import Held, SnapshotRecord
from opensandbox_platform.server.runtimes.filetree import CHUNK, Entry

RECORD = "snapshot.json"
ENTRIES = "entries.json"


@dataclass
class LocalSnapshot(SnapshotRecord):
    reason: str = ""
    image_digest: str = ""  # the image root it was taken over ("": the minimal root)
    size_bytes: int = 0  # the files' bytes (before sharing)
    files: int = 0
    skipped: list[str] = field(default_factory=list)  # device nodes and sockets left out


class SnapshotStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.blobs = directory / "blobs" / "sha256"
        self.lock = asyncio.Lock()  # one capture or collection at a time: a collection must not see half a capture

    def prepare(self) -> None:
        (self.directory / "blobs" / "tmp").mkdir(parents=True, exist_ok=True)
        self.blobs.mkdir(exist_ok=True)
        self.directory.chmod(0o700)

    # -- records -------------------------------------------------------------------------------

    def load_all(self) -> dict[str, LocalSnapshot]:
        found: dict[str, LocalSnapshot] = {}
        for path in self.directory.glob(f"*/{RECORD}"):
            try:
                data = json.loads(path.read_text())
                data["held"] = Held(**data["held"])
                snapshot = LocalSnapshot(**data)
            except (OSError, ValueError, TypeError, KeyError):
                continue
            found[snapshot.id] = snapshot
        return found

    def save(self, snapshot: LocalSnapshot, entries: list[Entry] | None = None) -> None:
        directory = self.directory / snapshot.id
        directory.mkdir(mode=0o700, exist_ok=True)
        if entries is not None:
            _write_json(directory / ENTRIES, [e.to_json() for e in entries])
        _write_json(directory / RECORD, asdict(snapshot))

    def entries(self, snapshot_id: str) -> list[Entry]:
        data = json.loads((self.directory / snapshot_id / ENTRIES).read_text())
        return [Entry.from_json(item) for item in data]

    def remove(self, snapshot_id: str) -> None:
        shutil.rmtree(self.directory / snapshot_id, ignore_errors=True)

    # -- blobs ---------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        hexa = digest.removeprefix("sha256:")
        if len(hexa) != 64 or not all(c in "0123456789abcdef" for c in hexa):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self.blobs / hexa[:2] / hexa

    def open_blob(self, digest: str) -> BinaryIO:
        return open(self.blob_path(digest), "rb")

    def put_blob(self, source: BinaryIO, size: int) -> tuple[str, int]:
        """Copy at most `size` bytes of `source` into the store; its digest and the bytes copied."""
        digest = hashlib.sha256()
        tmp_dir = self.directory / "blobs" / "tmp"
        fd, tmp = tempfile.mkstemp(dir=tmp_dir)
        copied = 0
        try:
            with open(fd, "wb") as out:
                while copied < size:
                    chunk = source.read(min(CHUNK, size - copied))
                    if not chunk:
                        break
                    digest.update(chunk)
                    out.write(chunk)
                    copied += len(chunk)
            name = "sha256:" + digest.hexdigest()
            target = self.blob_path(name)
            if target.exists():
                os.unlink(tmp)
            else:
                target.parent.mkdir(exist_ok=True)
                os.replace(tmp, target)
            return name, copied
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def collect(self) -> int:
        """Remove the blobs no snapshot's entries name; returns how many."""
        wanted: set[str] = set()
        for path in self.directory.glob(f"*/{ENTRIES}"):
            with contextlib.suppress(OSError, ValueError):
                wanted |= {e["digest"].removeprefix("sha256:") for e in json.loads(path.read_text()) if e.get("digest")}
        removed = 0
        for blob in self.blobs.glob("*/*"):
            if blob.name not in wanted:
                blob.unlink(missing_ok=True)
                removed += 1
        for stale in (self.directory / "blobs" / "tmp").iterdir():
            stale.unlink(missing_ok=True)
        return removed

    def total_bytes(self) -> int:
        """What every blob takes on disk."""
        total = 0
        for blob in self.blobs.glob("*/*"):
            with contextlib.suppress(OSError):
                total += blob.stat().st_size
        return total


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
