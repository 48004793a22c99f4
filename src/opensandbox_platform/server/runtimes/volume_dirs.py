"""The host directories behind a sandbox's volumes, opened safely (local and docker runtimes).

A directory is opened once, as a file descriptor, with the kernel refusing every symlink on the
way (openat2 RESOLVE_NO_SYMLINKS; a subPath also RESOLVE_BENEATH), and the local runtime mounts
that very descriptor (open_tree): what was checked is what is mounted, even if a sandbox swaps a
directory of a shared volume for a symlink a moment later.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from opensandbox_platform.daemon import openat2
from opensandbox_platform.server import errors
from opensandbox_platform.server.runtimes import linux
from opensandbox_platform.server.volumes import HostBackend, PvcBackend, VolumeSpec

_AT_FDCWD = -100
_NO_LINKS = openat2.RESOLVE_NO_SYMLINKS | openat2.RESOLVE_NO_MAGICLINKS
_DIRECTORY = os.O_PATH | os.O_DIRECTORY
_WHY = {
    errno.ELOOP: "a symlink is on the way (refused)",
    errno.ENOENT: "it does not exist",
    errno.ENOTDIR: "it is not a directory",
    errno.EXDEV: "it leads outside its volume (refused)",
    errno.EACCES: "permission denied",
}


@dataclass
class OpenedVolume:
    spec: VolumeSpec
    fd: int  # O_PATH of the directory to mount
    created: bool  # a named volume this create made (deleteOnSandboxTermination removes only these)
    tree: int = -1  # its detached mount (local runtime: `with_trees`)


# (A name for class bodies whose `list` method hides the builtin.)
Opened = list[OpenedVolume]


def _refuse(what: str, exc: OSError) -> errors.ApiError:
    return errors.invalid(f"volume {what}: {_WHY.get(exc.errno or 0, exc.strerror)}")


def open_host(path: str) -> int:
    """The directory `path` (absolute, normalized, under an allowed prefix: volumes.py checked),
    with no symlink anywhere on its path."""
    try:
        return openat2.openat2(_AT_FDCWD, path, _DIRECTORY, resolve=_NO_LINKS)
    except OSError as exc:
        raise _refuse(path, exc) from None


def open_beneath(base_fd: int, sub_path: str, create: bool, label: str) -> int:
    """`sub_path` under `base_fd`, never leaving it and through no symlink; with `create`, the
    missing directories are made (mode 0755, owned by whoever the mount maps to root)."""
    if not sub_path:
        return os.dup(base_fd)
    current = os.dup(base_fd)
    try:
        for part in sub_path.split("/"):
            try:
                following = openat2.openat2(current, part, _DIRECTORY, resolve=_NO_LINKS | openat2.RESOLVE_BENEATH)
            except FileNotFoundError:
                if not create:
                    raise
                with _real_dir(current) as parent:
                    os.mkdir(part, 0o755, dir_fd=parent)
                following = openat2.openat2(current, part, _DIRECTORY, resolve=_NO_LINKS | openat2.RESOLVE_BENEATH)
            os.close(current)
            current = following
        return current
    except OSError as exc:
        os.close(current)
        raise _refuse(f"{label} subPath {sub_path}", exc) from None


@contextmanager
def _real_dir(path_fd: int) -> Iterator[int]:
    """A real (not O_PATH) descriptor of the same directory, for mkdirat."""
    fd = openat2.openat2(path_fd, ".", os.O_RDONLY | os.O_DIRECTORY, resolve=openat2.RESOLVE_BENEATH)
    try:
        yield fd
    finally:
        os.close(fd)


def open_named(root: Path, backend: PvcBackend) -> tuple[int, bool]:
    """The local runtime's named volume `root/<claimName>` (made when createIfNotExists)."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    base = os.open(root, _DIRECTORY | os.O_CLOEXEC)
    try:
        created = False
        try:
            fd = openat2.openat2(base, backend.claim_name, _DIRECTORY, resolve=_NO_LINKS | openat2.RESOLVE_BENEATH)
        except FileNotFoundError:
            if not backend.create_if_not_exists:
                raise errors.invalid(
                    f"volume {backend.claim_name} does not exist (createIfNotExists is false)"
                ) from None
            with _real_dir(base) as parent:
                os.mkdir(backend.claim_name, 0o755, dir_fd=parent)
            created = True
            fd = openat2.openat2(base, backend.claim_name, _DIRECTORY, resolve=_NO_LINKS | openat2.RESOLVE_BENEATH)
        return fd, created
    finally:
        os.close(base)


def open_all(volumes: list[VolumeSpec], named_root: Path) -> list[OpenedVolume]:
    """Every volume's directory (subPath included), or a 400 with nothing left open or made."""
    opened: list[OpenedVolume] = []
    try:
        for volume in volumes:
            if isinstance(volume.backend, HostBackend):
                base, created = open_host(volume.backend.path), False
            else:
                base, created = open_named(named_root, volume.backend)
            try:
                named = not isinstance(volume.backend, HostBackend)
                fd = open_beneath(base, volume.sub_path, create=named, label=volume.name)
            except BaseException:
                if created:
                    remove_named(named_root, volume.backend)  # type: ignore[arg-type]
                raise
            finally:
                os.close(base)
            opened.append(OpenedVolume(volume, fd, created))
    except BaseException:
        close_all(opened)
        for done in opened:
            if done.created:
                remove_named(named_root, done.spec.backend)  # type: ignore[arg-type]
        raise
    return opened


def with_trees(opened: list[OpenedVolume]) -> list[OpenedVolume]:
    """Detached mounts of the opened directories, made here, in the server's mount namespace."""
    for volume in opened:
        volume.tree = linux.clone_tree(volume.fd)
    return opened


def close_all(opened: list[OpenedVolume]) -> None:
    for volume in opened:
        os.close(volume.fd)
        if volume.tree >= 0:
            os.close(volume.tree)


def remove_named(root: Path, backend: PvcBackend) -> None:
    """Delete a named volume of the local runtime (its directory, not following symlinks)."""
    target = root / backend.claim_name
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target, ignore_errors=True)


def fd_path(fd: int) -> str:
    """The path the kernel gives an opened directory (for an engine that takes paths)."""
    return os.readlink(f"/proc/self/fd/{fd}")
