"""Volumes of the docker runtime: `host` as a bind mount of the checked directory, `pvc` as a
Docker named volume (made when missing and createIfNotExists; removed with the sandbox when the
create made it and asked for deleteOnSandboxTermination).

A named volume with a subPath is bound like a host directory: its subPath opened beneath the
volume's mountpoint the same checked way (another sandbox sharing the volume may have made that
subPath a symlink), since the engine's own volume subpath option (API 1.45) is missing in podman 4.
That needs the volume on the server's host (the `local` driver); otherwise it is refused.

The engine takes a bind's source as a path and resolves it again when the container starts, so a
path checked here could be a symlink by then (another sandbox sharing the directory can swap it).
The checked directory is therefore mounted first at a path only the server can write
(`<stateDir>/binds/<id>/<n>`), and that path is what the engine binds; it is unmounted once the
container has started (the container keeps its own copy).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiodocker
from aiodocker.exceptions import DockerError

from opensandbox_platform.api import labels as L
from opensandbox_platform.server import errors
from opensandbox_platform.server.runtimes import linux, volume_dirs
from opensandbox_platform.server.volumes import HostBackend, PvcBackend, VolumeSpec


@dataclass
class Prepared:
    mounts: list[dict[str, Any]] = field(default_factory=list)  # HostConfig.Mounts
    created: list[str] = field(default_factory=list)  # named volumes this create made
    owned: list[str] = field(default_factory=list)  # of those, the ones deleted with the sandbox
    staged: dict[str, str] = field(default_factory=dict)  # the server's own mounts of checked directories -> volume


def _stage(volume: VolumeSpec, base_path: str, target: Path, *, create: bool) -> None:
    """Mount the checked directory (no symlink on the way, subPath beneath it; with `create`, the
    subPath's missing directories made) at `target`."""
    base = volume_dirs.open_host(base_path)
    try:
        fd = volume_dirs.open_beneath(base, volume.sub_path, create=create, label=volume.name)
    finally:
        os.close(base)
    try:
        tree = linux.clone_tree(fd)
    finally:
        os.close(fd)
    try:
        target.mkdir(mode=0o700, parents=True)
        linux.attach_tree(tree, str(target), None, readonly=volume.read_only)
    except FileNotFoundError:
        # Another sandbox sharing the directory removed it between the check and the mount.
        raise errors.invalid(f"volume {volume.name}: its directory was removed while the sandbox started") from None
    finally:
        os.close(tree)


def removed_volume(prepared: Prepared) -> str | None:
    """The name of a staged volume whose directory was deleted since it was checked (another sandbox
    sharing it removed it): the engine then cannot bind it, and that is the create's answer."""
    for path, name in prepared.staged.items():
        with contextlib.suppress(OSError):
            if os.stat(path).st_nlink == 0:
                return name
    return None


def release(prepared: Prepared) -> None:
    """Unmount the server's staging mounts (a started container keeps its own copies)."""
    for path in prepared.staged:
        with contextlib.suppress(OSError):
            linux.umount(path, linux.MNT_DETACH)
        with contextlib.suppress(OSError):
            os.rmdir(path)
    if prepared.staged:
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(next(iter(prepared.staged))))
    prepared.staged.clear()


async def prepare(docker: aiodocker.Docker, sandbox_id: str, volumes: list[VolumeSpec], binds: Path) -> Prepared:
    """The mounts of a create; on failure, what it made is removed again (`release` and `remove`
    after the container started, or failed)."""
    prepared = Prepared()
    try:
        for index, volume in enumerate(volumes):
            mount: dict[str, Any] = {"Target": volume.mount_path, "ReadOnly": volume.read_only}
            if isinstance(volume.backend, HostBackend):
                base_path, create = volume.backend.path, False
            else:
                found = await _ensure_named(docker, sandbox_id, volume.backend, prepared)
                if not volume.sub_path:
                    prepared.mounts.append({**mount, "Type": "volume", "Source": volume.backend.claim_name})
                    continue
                base_path, create = _local_mountpoint(found, volume.backend.claim_name), True
            target = binds / sandbox_id / str(index)
            prepared.staged[str(target)] = volume.name
            await asyncio.to_thread(_stage, volume, base_path, target, create=create)
            prepared.mounts.append(
                {**mount, "Type": "bind", "Source": str(target), "BindOptions": {"Propagation": "rprivate"}}
            )
    except BaseException:
        release(prepared)
        await remove(docker, prepared.created)
        raise
    return prepared


async def _ensure_named(
    docker: aiodocker.Docker, sandbox_id: str, backend: PvcBackend, prepared: Prepared
) -> dict[str, Any]:
    """The named volume's inspect, the volume made first when missing (and allowed)."""
    name = backend.claim_name
    try:
        found: dict[str, Any] = await (await docker.volumes.get(name)).show()  # type: ignore[no-untyped-call]
        return found
    except DockerError as exc:
        if exc.status != 404:
            raise
    if not backend.create_if_not_exists:
        raise errors.invalid(f"volume {name} does not exist (createIfNotExists is false)")
    volume = await docker.volumes.create({"Name": name, "Labels": {L.DOCKER_VOLUME_CREATED_BY: sandbox_id}})  # type: ignore[no-untyped-call]
    prepared.created.append(name)
    if backend.delete_on_sandbox_termination:
        prepared.owned.append(name)
    made: dict[str, Any] = await volume.show()
    return made


def _local_mountpoint(found: dict[str, Any], name: str) -> str:
    """Where a named volume's files are on this host, for a subPath of it (see the module's note)."""
    mountpoint = str(found.get("Mountpoint") or "")
    if found.get("Driver", "local") != "local" or not os.path.isabs(mountpoint) or not os.path.isdir(mountpoint):
        raise errors.ApiError(
            400,
            errors.API_NOT_SUPPORTED,
            f"volume {name}: a subPath of a docker named volume needs a local-driver volume on the server's host",
        )
    return os.path.normpath(mountpoint)


async def remove(docker: aiodocker.Docker, names: list[str]) -> None:
    """Remove named volumes (those still in use by another container stay: the engine refuses)."""
    for name in names:
        with contextlib.suppress(DockerError):
            await (await docker.volumes.get(name)).delete()  # type: ignore[no-untyped-call]


def owned_label(prepared: Prepared) -> dict[str, str]:
    return {L.DOCKER_OWNED_VOLUMES: json.dumps(prepared.owned)} if prepared.owned else {}
