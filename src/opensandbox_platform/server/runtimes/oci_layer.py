"""A captured writable layer (runtimes/filetree.py entries) as one OCI image layer, and the image
config and manifest that put it over a base image. Pure: no registry, no kubernetes.

The layer is an uncompressed tar (`application/vnd.oci.image.layer.v1.tar`: its digest is its diff
id, and nothing is spent compressing on the sandbox's node). Overlay whiteouts become the OCI
spec's `.wh.<name>` files and an opaque directory a `<dir>/.wh..wh..opq` file; owners, modes
(setuid included), mtimes and link targets are the entries'. Names the sandbox chose that are not
UTF-8 go through PAX headers as bytes (`hdrcharset=BINARY`), unchanged.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from opensandbox_platform.server.runtimes import filetree

LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
# Docker's media types name the same bytes as OCI's: a base image's layers keep their blobs.
TO_OCI = {
    "application/vnd.docker.image.rootfs.diff.tar.gzip": LAYER_TAR_GZIP,
    "application/vnd.docker.image.rootfs.diff.tar": LAYER_TAR,
    "application/vnd.docker.container.image.v1+json": OCI_CONFIG,
}
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


class _Hashing(io.RawIOBase):
    """A write-only stream that hashes and counts what goes through it to `out`."""

    def __init__(self, out: BinaryIO) -> None:
        self.out, self.sha, self.size = out, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.out.write(view)
        self.sha.update(view)
        self.size += len(view)
        return len(view)


def reserved(path: str) -> bool:
    """A name the layer format reserves (`.wh.*`): a file the sandbox named so would be read as a
    whiteout (removing files of the image) by whoever unpacks the layer, so it is left out."""
    return any(part.startswith(WHITEOUT_PREFIX) for part in path.split("/"))


def write_layer(
    entries: list[filetree.Entry], open_blob: Callable[[str], BinaryIO], out: BinaryIO
) -> tuple[Descriptor, list[str]]:
    """Write `entries` (parents before children, as `filetree.capture` returns them) as a layer tar to
    `out`; file contents come from `open_blob(entry.digest)`. Returns the layer's descriptor and the
    paths left out (reserved names, and all below them)."""
    sink = _Hashing(out)
    left_out = []
    with tarfile.open(
        fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as tar:  # fmt: skip
        for entry in entries:
            if reserved(entry.path):
                left_out.append(entry.path)
                continue
            _add(tar, entry, open_blob)
    return Descriptor(LAYER_TAR, f"sha256:{sink.sha.hexdigest()}", sink.size), left_out


def _add(tar: tarfile.TarFile, entry: filetree.Entry, open_blob: Callable[[str], BinaryIO]) -> None:
    if entry.kind == filetree.WHITEOUT:
        parent, _, name = entry.path.rpartition("/")
        tar.addfile(_info(_join(parent, WHITEOUT_PREFIX + name), entry, tarfile.REGTYPE, mode=0o644))
        return
    if entry.kind == filetree.DIR:
        tar.addfile(_info(entry.path, entry, tarfile.DIRTYPE))
        if entry.opaque:
            tar.addfile(_info(_join(entry.path, OPAQUE_MARKER), entry, tarfile.REGTYPE, mode=0o644))
        return
    if entry.kind == filetree.SYMLINK:
        info = _info(entry.path, entry, tarfile.SYMTYPE)
        info.linkname = entry.target
        tar.addfile(info)
        return
    if entry.kind == filetree.FIFO:
        tar.addfile(_info(entry.path, entry, tarfile.FIFOTYPE))
        return
    if entry.kind == filetree.FILE:
        info = _info(entry.path, entry, tarfile.REGTYPE)
        info.size = entry.size
        with open_blob(entry.digest) as blob:
            tar.addfile(info, blob)


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _info(path: str, entry: filetree.Entry, kind: bytes, mode: int | None = None) -> tarfile.TarInfo:
    info = tarfile.TarInfo(path)
    info.type = kind
    info.mode = entry.mode if mode is None else mode
    info.uid, info.gid = entry.uid, entry.gid
    info.uname = info.gname = ""
    info.mtime = entry.mtime_ns // 1_000_000_000
    return info


def descriptor_of(data: bytes, media_type: str) -> Descriptor:
    return Descriptor(media_type, f"sha256:{hashlib.sha256(data).hexdigest()}", len(data))


def image_config(base: dict[str, Any], layer: Descriptor, created: dt.datetime, comment: str) -> bytes:
    """The base image's config with the layer added (its diff id, and a history entry)."""
    config = copy.deepcopy(base)
    rootfs = config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
    rootfs["diff_ids"] = [*rootfs.get("diff_ids", []), layer.digest]
    stamp = created.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    config["history"] = [*config.get("history", []), {"created": stamp, "created_by": comment}]
    config["created"] = stamp
    return json.dumps(config, separators=(",", ":"), sort_keys=True).encode()


def base_layers(manifest: dict[str, Any]) -> list[Descriptor]:
    """A base image manifest's layers, with OCI media types (the same bytes as Docker's)."""
    layers = []
    for layer in manifest.get("layers") or []:
        media_type = str(layer.get("mediaType") or LAYER_TAR_GZIP)
        layers.append(Descriptor(TO_OCI.get(media_type, media_type), str(layer["digest"]), int(layer["size"])))
    return layers


def image_manifest(
    config: Descriptor, layers: list[Descriptor], annotations: dict[str, str] | None = None
) -> bytes:  # fmt: skip
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.to_json(),
        "layers": [layer.to_json() for layer in layers],
    }
    if annotations:
        manifest["annotations"] = annotations
    return json.dumps(manifest, separators=(",", ":")).encode()


def pick_platform(index: dict[str, Any], os_name: str = "linux", architecture: str = "amd64") -> str:
    """The digest of the manifest for this platform in an image index (or manifest list)."""
    for entry in index.get("manifests") or []:
        platform = entry.get("platform") or {}
        if platform.get("os") == os_name and platform.get("architecture") == architecture:
            return str(entry["digest"])
    raise LookupError(f"the image index has no {os_name}/{architecture} manifest")
