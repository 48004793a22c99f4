"""What a session changed: its overlays' upper layers read against the real directories.

An overlayfs upper layer holds every file the session created or modified (copied up whole:
metacopy and redirect_dir are off), a whiteout (a character device 0/0) for every lower entry it
deleted, and the `user.overlay.opaque` xattr on a directory that replaced a lower one. The diff
walks the upper layer only (cost proportional to what changed, not to the workspace) and compares
each entry with the real one: a file copied up but not changed (opened for writing, then left as
it was; or already committed) is not a change.

Every access goes through directory descriptors, without following symlinks: the upper layer is
written by untrusted code, and the real tree is walked the same way so a symlink there is an entry,
never a way out.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

OPAQUE_XATTRS = ("user.overlay.opaque", "trusted.overlay.opaque")
MAX_CHANGES = 100_000
SET_ID = stat.S_ISUID | stat.S_ISGID
CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Change:
    path: str  # as the session sees it
    rel: str  # relative to its layer's root
    kind: str  # added | modified | deleted
    type: str  # file | directory | symlink | other (the new type; the old one when deleted)
    size: int | None  # new size (bytes; a symlink's target length), None when deleted
    previous_type: str | None = None
    previous_size: int | None = None

    def wire(self) -> dict[str, object]:
        out: dict[str, object] = {"path": self.path, "kind": self.kind, "type": self.type}
        if self.size is not None:
            out["size"] = self.size
        if self.previous_type is not None:
            out["previous_type"] = self.previous_type
            out["previous_size"] = self.previous_size
        return out


def file_type(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _size(st: os.stat_result) -> int:
    return st.st_size if not stat.S_ISDIR(st.st_mode) else 0


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if base else name


def session_path(root: str, rel: str) -> str:
    if not rel:
        return root
    return f"{root.rstrip('/')}/{rel}"


def lstat_at(dir_fd: int | None, name: str) -> os.stat_result | None:
    if dir_fd is None:
        return None
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None


def open_dir_at(dir_fd: int, name: str) -> int:
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def is_opaque(dir_fd: int) -> bool:
    for attr in OPAQUE_XATTRS:
        try:
            if os.getxattr(dir_fd, attr) in (b"y", b"x"):
                return True
        except OSError:
            continue
    return False


def same_content(a_dir: int, a_name: str, b_dir: int, b_name: str) -> bool:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        a = os.open(a_name, flags, dir_fd=a_dir)
    except OSError:
        return False
    try:
        b = os.open(b_name, flags, dir_fd=b_dir)
    except OSError:
        os.close(a)
        return False
    try:
        while True:
            x, y = os.read(a, CHUNK), os.read(b, CHUNK)
            if x != y:
                return False
            if not x:
                return True
    finally:
        os.close(a)
        os.close(b)


def same_entry(upper: os.stat_result, lower: os.stat_result, compare: Callable[[], bool] | None) -> bool:
    """Whether an upper entry shows what the real one already is (type, mode, owner, content)."""
    if stat.S_IFMT(upper.st_mode) != stat.S_IFMT(lower.st_mode):
        return False
    if (stat.S_IMODE(upper.st_mode) ^ stat.S_IMODE(lower.st_mode)) & ~SET_ID:
        return False  # set-id bits are never committed (commit.py), so they are no change either
    if (upper.st_uid, upper.st_gid) != (lower.st_uid, lower.st_gid):
        return False
    if stat.S_ISDIR(upper.st_mode):
        return True
    if upper.st_size != lower.st_size:
        return False
    if stat.S_ISREG(upper.st_mode) and upper.st_mtime_ns == lower.st_mtime_ns:
        return True  # copied up (or committed) and not written since
    return compare() if compare is not None else False


class Walker:
    """Yields the changes of one layer: `upper_fd` its upper directory, `lower_fd` the real one
    (None if it does not exist), `root` where the layer appears in the session."""

    def __init__(
        self,
        root: str,
        upper_fd: int,
        lower_fd: int | None,
        limit: int = MAX_CHANGES,
        *,
        skip: frozenset[str] = frozenset(),
        manifest: frozenset[str] | None = None,
        deep: bool = False,
    ) -> None:
        """For a copy layer, `manifest` is what its copy held when it was made (relative paths: an
        entry of the real directory that is not in the copy was deleted only if it was there then),
        `skip` the names of other layers' mount points at its top, and `deep` says the copy is of the
        whole tree (every directory of it is compared whole, not only its top)."""
        self.root = root
        self.upper_fd = upper_fd
        self.lower_fd = lower_fd
        self.limit = limit
        self.skip = skip
        self.manifest = manifest
        self.deep = deep
        self.count = 0
        self.truncated = False

    def changes(self) -> Iterator[Change]:
        yield from self._dir(self.upper_fd, self.lower_fd, "", opaque=self.manifest is not None)

    def _emit(self, change: Change) -> Iterator[Change]:
        if self.count >= self.limit:
            self.truncated = True
            return
        self.count += 1
        yield change

    def _dir(self, upper: int, lower: int | None, rel: str, *, opaque: bool) -> Iterator[Change]:
        try:
            names = sorted(os.listdir(upper))
        except OSError:
            return
        top = not rel
        if top and self.skip:
            names = [name for name in names if name not in self.skip]
        if opaque and lower is not None:
            present = set(names)
            with contextlib.suppress(OSError):
                for name in sorted(os.listdir(lower)):
                    if name in present or (top and name in self.skip):
                        continue
                    if self.manifest is not None and join(rel, name) not in self.manifest:
                        continue  # appeared in the real directory after the copy was made
                    lst = lstat_at(lower, name)
                    if lst is not None:
                        yield from self._deleted(join(rel, name), lst)
        for name in names:
            if self.truncated:
                return
            ust = lstat_at(upper, name)
            if ust is None:
                continue  # vanished meanwhile
            lst = lstat_at(lower, name)
            path = join(rel, name)
            if is_whiteout(ust):
                if lst is not None:
                    yield from self._deleted(path, lst)
                continue
            if stat.S_ISDIR(ust.st_mode):
                yield from self._directory(upper, lower, name, path, ust, lst)
                continue
            if lst is not None and lower is not None:

                def compare(ln: int = lower, nm: str = name) -> bool:
                    return same_content(upper, nm, ln, nm)

                if stat.S_ISLNK(ust.st_mode) and stat.S_ISLNK(lst.st_mode):
                    if _readlink(upper, name) == _readlink(lower, name) and (ust.st_uid, ust.st_gid) == (
                        lst.st_uid,
                        lst.st_gid,
                    ):
                        continue
                elif same_entry(ust, lst, compare if stat.S_ISREG(ust.st_mode) else None):
                    continue
                yield from self._emit(
                    Change(
                        session_path(self.root, path),
                        path,
                        "modified",
                        file_type(ust.st_mode),
                        _size(ust),
                        file_type(lst.st_mode),
                        _size(lst),
                    )
                )
            else:
                yield from self._emit(
                    Change(session_path(self.root, path), path, "added", file_type(ust.st_mode), _size(ust))
                )

    def _directory(
        self, upper: int, lower: int | None, name: str, path: str, ust: os.stat_result, lst: os.stat_result | None
    ) -> Iterator[Change]:
        try:
            sub = open_dir_at(upper, name)
        except OSError:
            return
        try:
            opaque = self.deep or is_opaque(sub)
            sub_lower: int | None = None
            if lst is None or lower is None:
                yield from self._emit(Change(session_path(self.root, path), path, "added", "directory", 0))
            elif not stat.S_ISDIR(lst.st_mode):
                yield from self._emit(
                    Change(
                        session_path(self.root, path),
                        path,
                        "modified",
                        "directory",
                        0,
                        file_type(lst.st_mode),
                        _size(lst),
                    )
                )
            else:
                if not same_entry(ust, lst, None):
                    yield from self._emit(
                        Change(session_path(self.root, path), path, "modified", "directory", 0, "directory", 0)
                    )
                with contextlib.suppress(OSError):
                    sub_lower = open_dir_at(lower, name)
            try:
                yield from self._dir(sub, sub_lower, path, opaque=opaque)
            finally:
                if sub_lower is not None:
                    os.close(sub_lower)
        finally:
            os.close(sub)

    def _deleted(self, path: str, lst: os.stat_result) -> Iterator[Change]:
        yield from self._emit(
            Change(session_path(self.root, path), path, "deleted", file_type(lst.st_mode), None, None, _size(lst))
        )


def _readlink(dir_fd: int, name: str) -> str | None:
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError:
        return None


def summarize(changes: list[Change]) -> dict[str, int]:
    counts = {"added": 0, "modified": 0, "deleted": 0}
    for change in changes:
        counts[change.kind] += 1
    return counts


def upper_usage(upper_fd: int) -> int:
    """Bytes held by an upper layer (regular files' sizes)."""
    total = 0
    for _, _, files, dir_fd in os.fwalk(".", dir_fd=upper_fd, follow_symlinks=False):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
    return total


def errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, "EIO")
