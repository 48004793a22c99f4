"""Image roots of local sandboxes: an image in the host's containers storage (podman's), unpacked
once per digest into the state dir and shared read-only by every sandbox of that image.

A sandbox's root is then an overlay: the image's unpacked root as the lower layer, mounted
idmapped with the sandbox's user namespace (so the image's root-owned files belong to the sandbox's
root, whatever host range that is; runtimes/staging.py), and a private upper layer on the
sandbox's size-limited tmpfs. The image's `Env` and `WorkingDir` are the sandbox's defaults (the
request's `env` wins); its `Entrypoint` + `Cmd` run when the request's entrypoint is empty.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opensandbox_platform.server.runtimes import linux, staging

PODMAN = "podman"
LOOKUP_TTL_SECONDS = 30.0


@dataclass(frozen=True)
class ImageInfo:
    ref: str
    digest: str  # sha256:...
    layers: list[str]  # host directories of its layers, top first
    env: dict[str, str] = field(default_factory=dict)
    working_dir: str = ""
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.digest.removeprefix("sha256:")

    def describe(self) -> str:
        return f"image {self.ref} ({self.digest[:19]})"


def parse_inspect(ref: str, data: Any) -> ImageInfo | None:
    """`podman image inspect` output -> ImageInfo (None unless an overlay-stored image)."""
    if isinstance(data, list):
        data = data[0] if data else None
    if not isinstance(data, dict):
        return None
    driver = data.get("GraphDriver") or {}
    if driver.get("Name") != "overlay":
        return None
    paths = driver.get("Data") or {}
    layers = [str(paths["UpperDir"])] if paths.get("UpperDir") else []
    layers += [p for p in str(paths.get("LowerDir") or "").split(":") if p]
    if not layers:
        return None
    config = data.get("Config") or {}
    env = dict(str(e).split("=", 1) for e in config.get("Env") or [] if "=" in str(e))
    return ImageInfo(
        ref=ref,
        digest=str(data.get("Digest") or data.get("Id") or ""),
        layers=layers,
        env=env,
        working_dir=str(config.get("WorkingDir") or ""),
        entrypoint=[str(a) for a in config.get("Entrypoint") or []],
        cmd=[str(a) for a in config.get("Cmd") or []],
    )


class Lookup:
    """`find` with its answers kept for `ttl` seconds: asking podman costs ~0.1 s, a create from
    the warm pool ~0.01 s."""

    def __init__(self, ttl: float = LOOKUP_TTL_SECONDS) -> None:
        self.ttl = ttl
        self._answers: dict[str, tuple[float, ImageInfo | None]] = {}

    async def __call__(self, ref: str) -> ImageInfo | None:
        now = time.monotonic()
        cached = self._answers.get(ref)
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        found = await find(ref)
        self._answers[ref] = (now, found)
        return found


async def find(ref: str) -> ImageInfo | None:
    """The image `ref` in the host's containers storage, or None (no podman, no such image)."""
    if not ref or shutil.which(PODMAN) is None:
        return None
    process = await asyncio.create_subprocess_exec(
        PODMAN,
        "image",
        "inspect",
        ref,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        return None
    try:
        return parse_inspect(ref, json.loads(out))
    except (ValueError, KeyError):
        return None


class ImageCache:
    """Unpacked image roots, one directory per digest under `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._locks: dict[str, asyncio.Lock] = {}

    def root(self, image: ImageInfo) -> Path:
        return self.directory / image.key / "rootfs"

    async def ensure(self, image: ImageInfo) -> Path:
        """The image's unpacked root, made the first time (the layers merged by an overlay in a
        private mount namespace and copied, owners and modes as they are)."""
        root = self.root(image)
        async with self._locks.setdefault(image.key, asyncio.Lock()):
            if not root.is_dir():
                await asyncio.wrap_future(staging.in_thread(lambda: _unpack(image, root)))
        return root


def _unpack(image: ImageInfo, root: Path) -> None:
    linux.unshare(linux.CLONE_NEWNS | linux.CLONE_FS)
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    work = root.parent
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o700)
    merged, tmp = work / "merged", work / "rootfs.tmp"
    merged.mkdir(exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    if len(image.layers) == 1:
        linux.mount(image.layers[0], str(merged), None, linux.MS_BIND | linux.MS_RDONLY)
    else:
        linux.mount("overlay", str(merged), "overlay", linux.MS_RDONLY, "lowerdir=" + ":".join(image.layers))
    try:
        subprocess.run(["cp", "-a", f"{merged}/.", str(tmp)], check=True, capture_output=True)
    finally:
        linux.umount(str(merged))
    tmp.rename(root)
