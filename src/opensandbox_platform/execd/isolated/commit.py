"""Applying a session's changes to the real directories, one entry at a time.

A file (or symlink) is written next to its target under a temporary name and renamed over it, so
a reader sees either the old or the new content, never a mix ("atomic per file"; not fsync'ed).
Directories are created before what they hold; deletions remove the real entry (a directory with
its content). The real tree is walked by descriptors without following symlinks: a symlink where
the session has a directory is replaced, never followed. Set-user-ID and set-group-ID bits are not
carried over (a session's code must not mint a set-uid binary outside the session).

The upper layer is left as it is: after a commit it shows what the real tree now holds, so the
diff is empty and the session goes on seeing the same files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from dataclasses import dataclass, field

from opensandbox_platform.execd.isolated.changes import Change, open_dir_at

TEMP_PREFIX = ".osb-commit-"


@dataclass
class Outcome:
    applied: list[dict[str, object]] = field(default_factory=list)
    failed: list[dict[str, object]] = field(default_factory=list)


class _Dirs:
    """Directory descriptors by path relative to a layer's root, opened without following symlinks."""

    def __init__(self, root_fd: int) -> None:
        self.fds: dict[str, int] = {"": root_fd}
        self._own: list[int] = []

    def get(self, rel: str) -> int:
        if rel in self.fds:
            return self.fds[rel]
        parent, _, name = rel.rpartition("/")
        fd = open_dir_at(self.get(parent), name)
        self.fds[rel] = fd
        self._own.append(fd)
        return fd

    def forget(self, rel: str) -> None:
        """Entries at or under `rel` changed: their descriptors are stale."""
        for key in [k for k in self.fds if k and (k == rel or k.startswith(rel + "/"))]:
            fd = self.fds.pop(key)
            if fd in self._own:
                self._own.remove(fd)
                os.close(fd)

    def close(self) -> None:
        for fd in self._own:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._own.clear()


def _remove(parent_fd: int, name: str) -> None:
    st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=parent_fd)
    else:
        os.unlink(name, dir_fd=parent_fd)


def _exists(parent_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _temp_name(name: str) -> str:
    return f"{TEMP_PREFIX}{os.urandom(6).hex()}-{name[:100]}"


def _copy_file(src_dir: int, name: str, dst_dir: int, temp: str, st: os.stat_result) -> None:
    src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
    try:
        dst = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dst_dir)
        try:
            remaining = st.st_size
            while remaining > 0:
                try:
                    copied = os.copy_file_range(src, dst, remaining)
                except OSError:
                    copied = os.sendfile(dst, src, None, remaining)
                if copied == 0:
                    break
                remaining -= copied
            os.fchown(dst, st.st_uid, st.st_gid)
            os.fchmod(dst, stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _replace(parent_fd: int, temp: str, name: str) -> None:
    """Rename `temp` over `name`; a directory in the way is removed first (not atomic)."""
    existing = _exists(parent_fd, name)
    if existing is not None and stat.S_ISDIR(existing.st_mode):
        shutil.rmtree(name, dir_fd=parent_fd)
    os.rename(temp, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)


def _ensure_parents(real: _Dirs, upper: _Dirs, rel: str) -> int:
    """The real parent directory of `rel`, created (with the upper layer's modes) where missing."""
    parent = rel.rpartition("/")[0]
    if not parent:
        return real.get("")
    built = ""
    for part in parent.split("/"):
        above = built
        built = f"{built}/{part}" if built else part
        try:
            real.get(built)
            continue
        except FileNotFoundError:
            pass
        ust = os.stat(part, dir_fd=upper.get(above), follow_symlinks=False)
        os.mkdir(part, stat.S_IMODE(ust.st_mode) & 0o1777, dir_fd=real.get(above))
        real.get(built)
    return real.get(parent)


def apply(changes: list[Change], upper_fd: int, real_fd: int) -> Outcome:
    """Apply `changes` (in the walk's order: parents first) from an upper layer to the real tree."""
    outcome = Outcome()
    real, upper = _Dirs(real_fd), _Dirs(upper_fd)
    try:
        for change in changes:
            try:
                _apply_one(change, real, upper)
            except OSError as exc:
                outcome.failed.append({**change.wire(), "error": f"{exc.strerror or exc}"})
            else:
                outcome.applied.append(change.wire())
    finally:
        real.close()
        upper.close()
    return outcome


def _apply_one(change: Change, real: _Dirs, upper: _Dirs) -> None:
    rel = change.rel
    if not rel:  # the layer's root itself: only its attributes can change
        ust = os.stat(upper.get(""))
        os.chmod(real.get(""), stat.S_IMODE(ust.st_mode))
        return
    name = rel.rpartition("/")[2]
    parent_rel = rel.rpartition("/")[0]
    if change.kind == "deleted":
        with contextlib.suppress(FileNotFoundError):
            _remove(real.get(parent_rel), name)
        real.forget(rel)
        return
    parent = _ensure_parents(real, upper, rel)
    upper_parent = upper.get(parent_rel)
    ust = os.stat(name, dir_fd=upper_parent, follow_symlinks=False)
    mode = stat.S_IMODE(ust.st_mode) & ~(stat.S_ISUID | stat.S_ISGID)
    if stat.S_ISDIR(ust.st_mode):
        existing = _exists(parent, name)
        if existing is not None and not stat.S_ISDIR(existing.st_mode):
            os.unlink(name, dir_fd=parent)
            existing = None
        if existing is None:
            os.mkdir(name, 0o700, dir_fd=parent)
        real.forget(rel)
        fd = real.get(rel)
        os.chown(fd, ust.st_uid, ust.st_gid)
        os.chmod(fd, mode)
        return
    temp = _temp_name(name)
    try:
        if stat.S_ISREG(ust.st_mode):
            _copy_file(upper_parent, name, parent, temp, ust)
        elif stat.S_ISLNK(ust.st_mode):
            os.symlink(os.readlink(name, dir_fd=upper_parent), temp, dir_fd=parent)
            os.chown(temp, ust.st_uid, ust.st_gid, dir_fd=parent, follow_symlinks=False)
        elif stat.S_ISFIFO(ust.st_mode):
            os.mkfifo(temp, mode, dir_fd=parent)
        else:
            raise OSError(95, "cannot commit a device or socket")  # EOPNOTSUPP
        _replace(parent, temp, name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=parent)
        raise
    real.forget(rel)
