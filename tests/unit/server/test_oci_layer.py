"""A captured writable layer as an OCI layer (runtimes/oci_layer.py): whiteouts, opaque directories,
links, FIFOs, modes and owners as the OCI image spec names them; the config and manifest over a base."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path
from typing import BinaryIO

import pytest

from opensandbox_platform.server.runtimes import filetree, oci_layer
from opensandbox_platform.server.runtimes.filetree import Entry

MTIME = 1_700_000_000 * 10**9


def entry(path: str, kind: str, **extra: object) -> Entry:
    defaults: dict[str, object] = {"mode": 0o755 if kind == filetree.DIR else 0o644, "uid": 0, "gid": 0}
    return Entry(path=path, kind=kind, mtime_ns=MTIME, **{**defaults, **extra})  # type: ignore[arg-type]


def blobs(contents: dict[str, bytes]) -> tuple[list[Entry], dict[str, bytes]]:
    store = {hashlib.sha256(c).hexdigest(): c for c in contents.values()}
    files = [entry(p, filetree.FILE, size=len(c), digest=hashlib.sha256(c).hexdigest()) for p, c in contents.items()]
    return files, store


def write(entries: list[Entry], store: dict[str, bytes]) -> tuple[oci_layer.Descriptor, bytes]:
    out = io.BytesIO()
    desc, left_out = oci_layer.write_layer(entries, lambda d: io.BytesIO(store[d]), out)
    assert not left_out
    return desc, out.getvalue()


def members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), encoding="utf-8", errors="surrogateescape") as tar:
        return {m.name: m for m in tar.getmembers()}


def test_files_dirs_links_and_fifos_keep_their_metadata() -> None:
    files, store = blobs({"workspace/a.txt": b"hello", "opt/run": b"#!/bin/sh\n"})
    files[1].mode, files[1].uid, files[1].gid = 0o4750, 1000, 1001
    entries = [
        entry("workspace", filetree.DIR),
        files[0],
        entry("opt", filetree.DIR, mode=0o700),
        files[1],
        entry("workspace/root", filetree.SYMLINK, target="/"),
        entry("workspace/fifo", filetree.FIFO, mode=0o600),
    ]
    desc, data = write(entries, store)
    assert desc.media_type == oci_layer.LAYER_TAR
    assert desc.digest == f"sha256:{hashlib.sha256(data).hexdigest()}" and desc.size == len(data)
    found = members(data)
    assert list(found) == ["workspace", "workspace/a.txt", "opt", "opt/run", "workspace/root", "workspace/fifo"]
    assert found["opt"].isdir() and found["opt"].mode == 0o700
    run = found["opt/run"]
    assert run.mode == 0o4750 and (run.uid, run.gid) == (1000, 1001) and run.size == len(b"#!/bin/sh\n")
    assert found["workspace/root"].issym() and found["workspace/root"].linkname == "/"
    assert found["workspace/fifo"].isfifo()
    assert found["workspace/a.txt"].mtime == MTIME // 10**9
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        extracted = tar.extractfile("workspace/a.txt")
        assert extracted is not None and extracted.read() == b"hello"


def test_whiteouts_and_opaque_directories_follow_the_oci_spec() -> None:
    entries = [
        entry("etc", filetree.DIR),
        entry("etc/debian_version", filetree.WHITEOUT),
        entry("top-level-gone", filetree.WHITEOUT),
        entry("usr", filetree.DIR),
        entry("usr/share", filetree.DIR),
        entry("usr/share/doc", filetree.DIR, opaque=True),
    ]
    found = members(write(entries, {})[1])
    assert list(found) == [
        "etc", "etc/.wh.debian_version", ".wh.top-level-gone", "usr", "usr/share", "usr/share/doc",
        "usr/share/doc/.wh..wh..opq",
    ]  # fmt: skip
    assert found["etc/.wh.debian_version"].isfile() and found["etc/.wh.debian_version"].size == 0


def test_names_that_are_not_utf8_pass_unchanged() -> None:
    name = os.fsdecode(b"workspace/caf\xe9")  # latin-1 bytes the sandbox chose
    files, store = blobs({name: b"x"})
    found = members(write([entry("workspace", filetree.DIR), *files], store)[1])
    assert name in found


def test_a_layer_from_a_real_capture_round_trips(tmp_path: Path) -> None:
    """filetree.capture of a planted tree, written as a layer: what tar extracts is what was there."""
    root = tmp_path / "upper"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "file").write_bytes(b"content")
    (root / "link").symlink_to("/etc/shadow")
    spool: dict[str, bytes] = {}

    def put(f: BinaryIO, size: int) -> tuple[str, int]:
        data = f.read(size)
        digest = hashlib.sha256(data).hexdigest()
        spool[digest] = data
        return digest, len(data)

    captured = filetree.capture(str(root), put, filetree.Budget(1 << 20, 100), overlay=True)
    _, data = write(captured.entries, spool)
    target = tmp_path / "out"
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(target, filter="tar")
    assert (target / "dir" / "file").read_bytes() == b"content"
    assert stat.S_ISLNK(os.lstat(target / "link").st_mode) and os.readlink(target / "link") == "/etc/shadow"


BASE_CONFIG = {
    "architecture": "amd64",
    "os": "linux",
    "config": {"Env": ["PATH=/usr/bin"]},
    "rootfs": {"type": "layers", "diff_ids": ["sha256:aaa"]},
    "history": [{"created_by": "base"}],
}


def test_the_config_adds_the_layer_and_a_history_entry() -> None:
    layer = oci_layer.Descriptor(oci_layer.LAYER_TAR, "sha256:bbb", 10)
    created = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)
    config = json.loads(oci_layer.image_config(BASE_CONFIG, layer, created, "snapshot snap-1"))
    assert config["rootfs"]["diff_ids"] == ["sha256:aaa", "sha256:bbb"]
    assert config["history"][-1] == {"created": "2026-11-30T12:00:00.000000Z", "created_by": "snapshot snap-1"}
    assert config["config"] == BASE_CONFIG["config"]
    assert BASE_CONFIG["rootfs"]["diff_ids"] == ["sha256:aaa"]  # type: ignore[index]  # the base is untouched


def test_the_manifest_keeps_the_base_layers_blobs_with_oci_media_types() -> None:
    base = {
        "layers": [
            {"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": "sha256:l1", "size": 5},
            {"mediaType": oci_layer.LAYER_TAR_ZSTD, "digest": "sha256:l2", "size": 6},
        ]
    }
    layers = oci_layer.base_layers(base)
    assert [(d.media_type, d.digest) for d in layers] == [
        (oci_layer.LAYER_TAR_GZIP, "sha256:l1"),
        (oci_layer.LAYER_TAR_ZSTD, "sha256:l2"),
    ]
    config = oci_layer.descriptor_of(b"{}", oci_layer.OCI_CONFIG)
    top = oci_layer.Descriptor(oci_layer.LAYER_TAR, "sha256:top", 7)
    manifest = json.loads(oci_layer.image_manifest(config, [*layers, top], {"io.opensandbox.snapshot": "snap-1"}))
    assert manifest["mediaType"] == oci_layer.OCI_MANIFEST and manifest["schemaVersion"] == 2
    assert manifest["config"]["digest"] == f"sha256:{hashlib.sha256(b'{}').hexdigest()}"
    assert [layer["digest"] for layer in manifest["layers"]] == ["sha256:l1", "sha256:l2", "sha256:top"]


def test_an_index_is_resolved_to_the_nodes_platform() -> None:
    index = {
        "manifests": [
            {"digest": "sha256:arm", "platform": {"os": "linux", "architecture": "arm64"}},
            {"digest": "sha256:amd", "platform": {"os": "linux", "architecture": "amd64"}},
        ]
    }
    assert oci_layer.pick_platform(index) == "sha256:amd"
    with pytest.raises(LookupError):
        oci_layer.pick_platform({"manifests": []})


def test_names_the_format_reserves_are_left_out() -> None:
    """A file the sandbox named `.wh.passwd` would remove /etc/passwd of the image for whoever unpacks
    the layer; `.wh..wh..opq` would hide a directory's content: both are left out, with what is below."""
    files, store = blobs({"etc/.wh.passwd": b"", "workspace/ok": b"ok", "workspace/.wh.d/x": b"x"})
    entries = [
        entry("etc", filetree.DIR),
        files[0],
        entry("etc/.wh..wh..opq", filetree.FILE, size=0, digest=files[0].digest),
        entry("workspace", filetree.DIR),
        files[1],
        entry("workspace/.wh.d", filetree.DIR),
        files[2],
    ]
    out = io.BytesIO()
    _, left_out = oci_layer.write_layer(entries, lambda d: io.BytesIO(store[d]), out)
    assert left_out == ["etc/.wh.passwd", "etc/.wh..wh..opq", "workspace/.wh.d", "workspace/.wh.d/x"]
    assert list(members(out.getvalue())) == ["etc", "workspace", "workspace/ok"]
