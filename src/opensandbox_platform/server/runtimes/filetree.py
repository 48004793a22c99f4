"""Capturing a sandbox's writable layer as a list of entries, and laying it out again: by directory
file descriptors only, never by path, so nothing a hostile sandbox plants can send us elsewhere.

Both sides run as root on the host (the local runtime's server) or on a node (the kubernetes
committer), on a tree whose every name the sandbox chose. So:

- every name is opened relative to its parent's descriptor with `O_NOFOLLOW` (a symlink is read as
  a link, never followed; a directory swapped for a symlink mid-walk fails the open, it does not
  lead out of the tree);
- regular files are read from the descriptor that was opened and checked (`fstat`), never from a
  path looked up again;
- device nodes and sockets are left out (an overlay whiteout, a 0/0 character device, is kept as
  a whiteout); setuid/setgid bits are kept (they are the sandbox's own files, and only work inside
  it, as before);
- the sum of file sizes (apparent, so a sparse file counts in full) and the number of entries are
  bounded before anything is read: `TooLarge` instead of filling the host's disk;
- owners are translated between host ids and the sandbox's own (`id_offset`), and ids outside the
  sandbox's range become 65534 (nobody);
- `restore` never replaces what the caller protects (the jail's mount points and the files it
  writes itself) and creates each file with `O_EXCL | O_NOFOLLOW` after removing what was there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO

ID_RANGE = 65536
NOBODY = 65534
OPAQUE_XATTR = "trusted.overlay.opaque"
MAX_DEPTH = 512
CHUNK = 1 << 20

DIR, FILE, SYMLINK, FIFO, WHITEOUT = "dir", "file", "symlink", "fifo", "whiteout"
OPTIONAL = frozenset({"size", "digest", "target", "opaque"})  # Entry's fields with a default


class TooLarge(Exception):
    """The tree holds more than the caller's budget (bytes or entries)."""


@dataclass
class Entry:
    path: str  # relative to the root, "/"-separated (file system encoding, surrogateescape)
    kind: str  # DIR, FILE, SYMLINK, FIFO or WHITEOUT
    mode: int  # permission bits, setuid/setgid/sticky included
    uid: int  # as the sandbox sees it
    gid: int
    mtime_ns: int
    size: int = 0
    digest: str = ""  # FILE: the blob holding its content (the caller's naming)
    target: str = ""  # SYMLINK
    opaque: bool = False  # DIR: an overlay opaque directory (hides the lower layer's content)

    def to_json(self) -> dict[str, Any]:
        # the optional fields only where set (`0 in ("", False)` is true: uid 0 must not be dropped)
        return {k: v for k, v in asdict(self).items() if k not in OPTIONAL or v not in ("", 0, False)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        return cls(**data)


@dataclass
class Budget:
    max_bytes: int
    max_entries: int
    bytes: int = 0
    entries: int = 0

    def take(self, size: int) -> None:
        self.bytes += size
        self.entries += 1
        if self.bytes > self.max_bytes:
            raise TooLarge(f"the files add up to more than {self.max_bytes >> 20} MiB (sparse files count in full)")
        if self.entries > self.max_entries:
            raise TooLarge(f"more than {self.max_entries} files and directories")


@dataclass
class Captured:
    entries: list[Entry]
    skipped: list[str]  # device nodes and sockets left out
    bytes: int


# Called with the open, checked file (positioned at 0) and its size: stores at most that many bytes
# (it may have changed meanwhile) and returns the blob's name and the bytes stored.
StoreBlob = Callable[[BinaryIO, int], tuple[str, int]]


def sandbox_id(host_id: int, offset: int) -> int:
    inside = host_id - offset
    return inside if 0 <= inside < ID_RANGE else NOBODY


def host_id(inside: int, offset: int) -> int:
    return offset + (inside if 0 <= inside < ID_RANGE else NOBODY)


def _open_dir(name: str, dir_fd: int) -> int:
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def capture(root: str, store: StoreBlob, budget: Budget, *, id_offset: int = 0, overlay: bool = False) -> Captured:
    """The entries under `root` (itself excluded), parents before children. `overlay`: `root` is an
    overlay's upper layer (whiteouts and opaque directories are kept as such)."""
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    result = Captured([], [], 0)
    try:
        _walk(root_fd, "", 0, store, budget, id_offset, overlay, result)
    finally:
        os.close(root_fd)
    result.bytes = budget.bytes
    return result


def _walk(
    dir_fd: int, prefix: str, depth: int, store: StoreBlob, budget: Budget, offset: int, overlay: bool, out: Captured
) -> None:
    if depth > MAX_DEPTH:
        raise TooLarge(f"directories nested deeper than {MAX_DEPTH}")
    with os.scandir(dir_fd) as listing:
        names = sorted(entry.name for entry in listing)
    for name in names:
        path = prefix + name
        try:
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue  # removed meanwhile (the sandbox runs on while it is not frozen)
        mode = info.st_mode
        if stat.S_ISDIR(mode):
            budget.take(0)
            try:
                child = _open_dir(name, dir_fd)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                    continue  # swapped for something else meanwhile
                raise
            try:
                checked = os.fstat(child)
                opaque = overlay and _opaque(child)
                out.entries.append(_entry(path, DIR, checked, offset, opaque=opaque))
                _walk(child, path + "/", depth + 1, store, budget, offset, overlay, out)
            finally:
                os.close(child)
        elif stat.S_ISREG(mode):
            budget.take(info.st_size)
            entry = _capture_file(name, dir_fd, path, store, offset)
            if entry is not None:
                out.entries.append(entry)
        elif stat.S_ISLNK(mode):
            budget.take(0)
            with contextlib.suppress(FileNotFoundError, OSError):
                target = os.readlink(name, dir_fd=dir_fd)
                out.entries.append(_entry(path, SYMLINK, info, offset, target=target))
        elif stat.S_ISFIFO(mode):
            budget.take(0)
            out.entries.append(_entry(path, FIFO, info, offset))
        elif overlay and stat.S_ISCHR(mode) and info.st_rdev == 0:
            budget.take(0)
            out.entries.append(_entry(path, WHITEOUT, info, offset))
        else:
            out.skipped.append(path)  # a device node or a socket: never part of a snapshot


def _capture_file(name: str, dir_fd: int, path: str, store: StoreBlob, offset: int) -> Entry | None:
    # O_PATH first: opening a device node or a FIFO swapped in for the file must have no effect
    # (a device's open can); the checked inode is then reopened through its descriptor.
    try:
        handle = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        checked = os.fstat(handle)
        if not stat.S_ISREG(checked.st_mode):
            return None  # swapped for something else meanwhile
        fd = os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(handle)
    with open(fd, "rb", buffering=0, closefd=True) as f:
        digest, size = store(f, checked.st_size)
    return _entry(path, FILE, checked, offset, size=size, digest=digest)


def _entry(path: str, kind: str, info: os.stat_result, offset: int, **extra: Any) -> Entry:
    return Entry(
        path=path,
        kind=kind,
        mode=stat.S_IMODE(info.st_mode),
        uid=sandbox_id(info.st_uid, offset),
        gid=sandbox_id(info.st_gid, offset),
        mtime_ns=info.st_mtime_ns,
        **extra,
    )


def _opaque(fd: int) -> bool:
    try:
        return os.getxattr(fd, OPAQUE_XATTR) == b"y"
    except OSError:
        return False


# -- restore -----------------------------------------------------------------------------------


def restore(
    root: str,
    entries: list[Entry],
    open_blob: Callable[[str], BinaryIO],
    *,
    id_offset: int = 0,
    protected: frozenset[str] = frozenset(),
) -> list[str]:
    """Lay `entries` out under `root`; returns the paths left out (protected, or whose parent is
    not a directory of the tree). Entries at or below a protected path are left out; an ancestor
    of one is only ever a directory."""
    skipped: list[str] = []
    ancestors = {p.rsplit("/", i)[0] for p in protected for i in range(1, p.count("/") + 1)}
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    directories: list[Entry] = []
    try:
        for entry in entries:
            parts = entry.path.split("/")
            if not entry.path or any(part in ("", ".", "..") for part in parts) or _under(entry.path, protected):
                skipped.append(entry.path)
                continue
            if entry.path in ancestors and entry.kind != DIR:
                skipped.append(entry.path)
                continue
            with _parent(root_fd, parts[:-1]) as parent:
                if parent is None:
                    skipped.append(entry.path)
                    continue
                _lay_out(parent, parts[-1], entry, open_blob, id_offset)
            if entry.kind == DIR:
                directories.append(entry)
        for entry in reversed(directories):  # children first: their creation moved the parent's mtime
            with _parent(root_fd, entry.path.split("/")) as fd:
                if fd is not None:
                    os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
    finally:
        os.close(root_fd)
    return skipped


def _under(path: str, protected: frozenset[str]) -> bool:
    return any(path == p or path.startswith(p + "/") for p in protected)


@contextlib.contextmanager
def _parent(root_fd: int, parts: list[str]) -> Iterator[int | None]:
    """The directory `parts` below the root, opened component by component without following
    links; None when one of them is not a directory."""
    fds: list[int] = []
    current = root_fd
    try:
        for part in parts:
            try:
                current = _open_dir(part, current)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                    yield None
                    return
                raise
            fds.append(current)
        yield current
    finally:
        for fd in fds:
            os.close(fd)


def _lay_out(parent: int, name: str, entry: Entry, open_blob: Callable[[str], BinaryIO], offset: int) -> None:
    uid, gid = host_id(entry.uid, offset), host_id(entry.gid, offset)
    if entry.kind == DIR:
        _make_dir(parent, name)
        fd = _open_dir(name, parent)
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, entry.mode)
            if entry.opaque:
                os.setxattr(fd, OPAQUE_XATTR, b"y")
        finally:
            os.close(fd)
        return
    _remove(parent, name)
    if entry.kind == FILE:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, 0o600, dir_fd=parent)
        with open(fd, "wb", closefd=True) as out, open_blob(entry.digest) as blob:
            while chunk := blob.read(CHUNK):
                out.write(chunk)
            out.flush()
            os.fchown(fd, uid, gid)
            os.fchmod(fd, entry.mode)  # after the chown, which clears setuid and setgid
            os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
        return
    if entry.kind == SYMLINK:
        os.symlink(entry.target, name, dir_fd=parent)
    elif entry.kind == FIFO:
        os.mkfifo(name, entry.mode, dir_fd=parent)
    elif entry.kind == WHITEOUT:
        os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=parent)
    else:
        return
    os.chown(name, uid, gid, dir_fd=parent, follow_symlinks=False)
    if entry.kind != SYMLINK:
        os.chmod(name, entry.mode, dir_fd=parent, follow_symlinks=False)
    os.utime(name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=parent, follow_symlinks=False)


def _make_dir(parent: int, name: str) -> None:
    try:
        info = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        os.mkdir(name, 0o700, dir_fd=parent)
        return
    if not stat.S_ISDIR(info.st_mode):
        os.unlink(name, dir_fd=parent)
        os.mkdir(name, 0o700, dir_fd=parent)


def _remove(parent: int, name: str) -> None:
    """Whatever is at `name` goes (a directory with all it holds), so the new entry is made fresh."""
    try:
        info = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode):
        os.unlink(name, dir_fd=parent)
        return
    fd = _open_dir(name, parent)
    try:
        with os.scandir(fd) as listing:
            children = [child.name for child in listing]
        for child in children:
            _remove(fd, child)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent)
