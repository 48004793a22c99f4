"""The local snapshot store (runtimes/snapstore.py): blobs shared by content, collected when no
snapshot names them, records that survive a restart."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from opensandbox_platform.server.runtimes import filetree
from opensandbox_platform.server.runtimes.base import Held
from opensandbox_platform.server.runtimes.filetree import Entry
from opensandbox_platform.server.runtimes.snapstore import LocalSnapshot, SnapshotStore


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    found = SnapshotStore(tmp_path / "snapshots")
    found.prepare()
    return found


def snapshot(snapshot_id: str) -> LocalSnapshot:
    return LocalSnapshot(snapshot_id, "sb", None, Held("img", ["sleep"]), created_at="2030-01-01T00:00:00Z")


def entry(path: str, digest: str) -> Entry:
    return Entry(path=path, kind=filetree.FILE, mode=0o644, uid=0, gid=0, mtime_ns=0, digest=digest)


def test_same_content_is_stored_once_and_a_short_source_is_what_it_is(store: SnapshotStore) -> None:
    first, n1 = store.put_blob(io.BytesIO(b"same"), 4)
    second, n2 = store.put_blob(io.BytesIO(b"same"), 4)
    assert first == second and (n1, n2) == (4, 4)
    assert len(list(store.blobs.glob("*/*"))) == 1
    grown, n = store.put_blob(io.BytesIO(b"grew meanwhile"), 4)  # at most the size checked
    assert n == 4 and store.open_blob(grown).read() == b"grew"


def test_collect_keeps_what_a_snapshot_names(store: SnapshotStore) -> None:
    kept, _ = store.put_blob(io.BytesIO(b"kept"), 4)
    dropped, _ = store.put_blob(io.BytesIO(b"dropped"), 7)
    store.save(snapshot("snap-a"), [entry("f", kept)])
    assert store.collect() == 1
    assert store.blob_path(kept).exists() and not store.blob_path(dropped).exists()
    store.remove("snap-a")
    assert store.collect() == 1


@pytest.mark.parametrize("digest", ["sha256:../../etc/passwd", "sha256:" + "A" * 64, "md5:abc", ""])
def test_a_digest_is_never_a_path(store: SnapshotStore, digest: str) -> None:
    with pytest.raises(ValueError):
        store.blob_path(digest)


def test_records_load_back_and_damaged_ones_are_ignored(store: SnapshotStore) -> None:
    store.save(snapshot("snap-a"), [])
    (store.directory / "snap-b").mkdir()
    (store.directory / "snap-b" / "snapshot.json").write_text("{not json")
    loaded = store.load_all()
    assert list(loaded) == ["snap-a"] and loaded["snap-a"].held == Held("img", ["sleep"])
