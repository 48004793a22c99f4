"""Capture and restore of a sandbox's writable layer (runtimes/filetree.py) against what a hostile
sandbox plants in it: links out of the tree, FIFOs, sparse files, hard links, crafted entries."""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path
from typing import BinaryIO

import pytest

from opensandbox_platform.server.runtimes import filetree
from opensandbox_platform.server.runtimes.filetree import Budget, Entry, TooLarge
from opensandbox_platform.server.runtimes.snapstore import SnapshotStore

BIG = Budget(1 << 30, 10_000)


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    found = SnapshotStore(tmp_path / "store")
    found.prepare()
    return found


def budget(max_bytes: int = 1 << 30, max_entries: int = 10_000) -> Budget:
    return Budget(max_bytes, max_entries)


def by_path(entries: list[Entry]) -> dict[str, Entry]:
    return {e.path: e for e in entries}


def test_links_are_kept_as_links_and_never_followed(tmp_path: Path, store: SnapshotStore) -> None:
    outside = tmp_path / "host"
    outside.mkdir()
    (outside / "secret").write_text("host secret")
    root = tmp_path / "layer"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "file").write_text("mine")
    (root / "to-secret").symlink_to(outside / "secret")
    (root / "to-host-dir").symlink_to(outside)
    os.mkfifo(root / "fifo")  # opened for reading, it would block the capture forever

    captured = filetree.capture(str(root), store.put_blob, budget(), id_offset=0)

    entries = by_path(captured.entries)
    assert set(entries) == {"dir", "dir/file", "to-secret", "to-host-dir", "fifo"}  # nothing under the link
    assert entries["to-secret"].kind == filetree.SYMLINK and entries["to-secret"].target == str(outside / "secret")
    assert entries["fifo"].kind == filetree.FIFO
    stored = {p.read_bytes() for p in store.blobs.glob("*/*")}
    assert stored == {b"mine"}  # the host's secret was never read


def test_a_device_node_is_left_out(tmp_path: Path, store: SnapshotStore) -> None:
    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    root = tmp_path / "layer"
    root.mkdir()
    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "whiteout", stat.S_IFCHR, os.makedev(0, 0))
    plain = filetree.capture(str(root), store.put_blob, budget())
    assert plain.entries == [] and sorted(plain.skipped) == ["null", "whiteout"]
    overlay = filetree.capture(str(root), store.put_blob, budget(), overlay=True)
    assert [(e.path, e.kind) for e in overlay.entries] == [("whiteout", filetree.WHITEOUT)]
    assert overlay.skipped == ["null"]


def test_a_sparse_file_counts_in_full_before_anything_is_read(tmp_path: Path) -> None:
    root = tmp_path / "layer"
    root.mkdir()
    with open(root / "sparse", "wb") as f:
        f.truncate(64 << 30)
    reads: list[int] = []

    def store(source: BinaryIO, size: int) -> tuple[str, int]:
        reads.append(size)
        return "sha256:" + "0" * 64, size

    with pytest.raises(TooLarge, match="MiB"):
        filetree.capture(str(root), store, budget(max_bytes=1 << 30))
    assert reads == []


def test_hard_links_count_once_per_name(tmp_path: Path, store: SnapshotStore) -> None:
    """A restore writes each name as its own file: the budget must count what it will write."""
    root = tmp_path / "layer"
    root.mkdir()
    (root / "data").write_bytes(b"x" * (1 << 20))
    for i in range(7):
        os.link(root / "data", root / f"link{i}")
    with pytest.raises(TooLarge):
        filetree.capture(str(root), store.put_blob, budget(max_bytes=6 << 20))
    captured = filetree.capture(str(root), store.put_blob, budget(max_bytes=8 << 20))
    assert captured.bytes == 8 << 20
    assert len(list(store.blobs.glob("*/*"))) == 1  # the store keeps the content once


def test_too_many_entries_and_too_deep(tmp_path: Path, store: SnapshotStore) -> None:
    root = tmp_path / "layer"
    root.mkdir()
    for i in range(20):
        (root / f"f{i}").touch()
    with pytest.raises(TooLarge, match="files and directories"):
        filetree.capture(str(root), store.put_blob, budget(max_entries=10))


def test_ids_outside_the_sandbox_range_become_nobody() -> None:
    offset = 200_000
    assert filetree.sandbox_id(offset + 1000, offset) == 1000
    assert filetree.sandbox_id(0, offset) == filetree.NOBODY  # host root's file
    assert filetree.sandbox_id(offset + filetree.ID_RANGE, offset) == filetree.NOBODY
    assert filetree.host_id(0, offset) == offset
    assert filetree.host_id(-5, offset) == filetree.host_id(70_000, offset) == offset + filetree.NOBODY


def test_an_entry_round_trips_through_json_with_root_ids() -> None:
    entry = Entry(path="a", kind=filetree.FILE, mode=0o4755, uid=0, gid=0, mtime_ns=1, size=0, digest="sha256:x")
    assert Entry.from_json(entry.to_json()) == entry


def test_round_trip_keeps_contents_modes_times_and_links(tmp_path: Path, store: SnapshotStore) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "tool").write_bytes(b"#!/bin/sh\n")
    (src / "a" / "b" / "tool").chmod(0o4750)
    os.utime(src / "a" / "b" / "tool", ns=(10**18, 10**18))
    (src / "a" / "link").symlink_to("b/tool")
    (src / "a" / "private").mkdir(mode=0o700)
    (src / os.fsdecode(b"caf\xe9")).write_bytes(b"latin-1 name")  # not UTF-8: kept as its bytes
    os.utime(src / "a", ns=(2 * 10**18, 2 * 10**18))
    dst.mkdir()

    captured = filetree.capture(str(src), store.put_blob, budget())
    as_json = json.loads(json.dumps([e.to_json() for e in captured.entries]))  # as the store keeps them
    entries = [Entry.from_json(item) for item in as_json]
    assert filetree.restore(str(dst), entries, store.open_blob) == []
    assert (dst / os.fsdecode(b"caf\xe9")).read_bytes() == b"latin-1 name"

    tool = dst / "a" / "b" / "tool"
    assert tool.read_bytes() == b"#!/bin/sh\n"
    assert stat.S_IMODE(tool.stat().st_mode) == 0o4750 and tool.stat().st_mtime_ns == 10**18
    assert (dst / "a").stat().st_mtime_ns == 2 * 10**18  # set after its children were made
    assert os.readlink(dst / "a" / "link") == "b/tool"
    assert stat.S_IMODE((dst / "a" / "private").stat().st_mode) == 0o700


def restore(dst: Path, entries: list[Entry], blobs: dict[str, bytes], **kwargs: object) -> list[str]:
    return filetree.restore(str(dst), entries, lambda d: io.BytesIO(blobs[d]), **kwargs)  # type: ignore[arg-type]


def file(path: str, digest: str = "d") -> Entry:
    return Entry(
        path=path, kind=filetree.FILE, mode=0o644, uid=os.geteuid(), gid=os.getegid(), mtime_ns=0, digest=digest
    )


def link(path: str, target: str) -> Entry:
    return Entry(
        path=path, kind=filetree.SYMLINK, mode=0o777, uid=os.geteuid(), gid=os.getegid(), mtime_ns=0, target=target
    )


def test_crafted_entries_never_write_outside_the_root(tmp_path: Path) -> None:
    """Entries no real tree yields (a store tampered with): each is left out, nothing lands outside."""
    outside = tmp_path / "host"
    outside.mkdir()
    dst = tmp_path / "dst"
    dst.mkdir()
    entries = [
        file("../host/escaped"),
        file("a/../../host/escaped2"),
        file("/abs"),
        file(""),
        link("door", str(outside)),
        file("door/through-the-link"),
        link("rel-door", "../host"),
        file("rel-door/through"),
    ]
    skipped = restore(dst, entries, {"d": b"payload"})
    assert sorted(skipped) == sorted(["../host/escaped", "a/../../host/escaped2", "/abs", "", "door/through-the-link",
                                      "rel-door/through"])  # fmt: skip
    assert list(outside.iterdir()) == []


def test_a_file_replaces_a_planted_link_instead_of_writing_through_it(tmp_path: Path) -> None:
    outside = tmp_path / "host-file"
    outside.write_text("host")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "target").symlink_to(outside)
    restore(dst, [file("target")], {"d": b"sandbox"})
    assert outside.read_text() == "host"
    assert not (dst / "target").is_symlink() and (dst / "target").read_text() == "sandbox"


def test_protected_paths_and_their_ancestors_are_left_alone(tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    (dst / "etc").mkdir(parents=True)
    (dst / "etc" / "hosts").write_text("the jail's own")
    (dst / "proc").mkdir()
    entries = [file("etc/hosts"), file("proc/x"), link("etc", "/"), file("etc/other")]
    skipped = restore(dst, entries, {"d": b"snap"}, protected=frozenset({"etc/hosts", "proc"}))
    assert sorted(skipped) == ["etc", "etc/hosts", "proc/x"]
    assert (dst / "etc").is_dir() and not (dst / "etc").is_symlink()
    assert (dst / "etc" / "hosts").read_text() == "the jail's own"
    assert (dst / "etc" / "other").read_text() == "snap"
    assert list((dst / "proc").iterdir()) == []
