"""The files API inside a session: paths resolved as the session's own processes see them.

execd holds a descriptor of the session's root directory (`/proc/<its PID 1>/root`: the root of the
session's mount namespace, with its overlays, binds and private /tmp). Every path is resolved from
it with openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS): `..` stops at the session's root, an
absolute symlink planted by the session's code resolves inside the session (never into execd's own
filesystem), and /proc/<pid>/root-style jumps are refused. The last component is then worked on
through its parent's descriptor (`*at` calls, without following it where the operation must not).
The formats are those of the plain files API (execd/files.py).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import posixpath
import shutil
import stat
from typing import Any, BinaryIO

from opensandbox_platform.daemon import errors
from opensandbox_platform.daemon.openat2 import RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS
from opensandbox_platform.daemon.openat2 import openat2 as _openat2
from opensandbox_platform.execd import files

RESOLVE = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS


def openat2(dir_fd: int, path: str, flags: int, mode: int = 0, resolve: int = RESOLVE) -> int:
    return _openat2(dir_fd, path, flags, mode, resolve)


def normalize(path: Any) -> str:
    """A session path (absolute, lexically normalized); 400 if missing or malformed."""
    if not isinstance(path, str) or not path:
        raise errors.bad_request("a non-empty 'path' is required", errors.MISSING_QUERY)
    if "\0" in path:
        raise errors.bad_request("path must not contain NUL", errors.INVALID_FILE)
    if not path.startswith("/"):
        raise errors.bad_request(f"path must be absolute inside the session: {path}", errors.INVALID_FILE)
    return posixpath.normpath(path).replace("//", "/")


def _rel(path: str) -> str:
    return path.lstrip("/") or "."


class SessionFS:
    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd

    # -- resolution -----------------------------------------------------------------------

    def open(self, path: str, flags: int, mode: int = 0) -> int:
        try:
            return openat2(self.root_fd, _rel(path), flags, mode)
        except OSError as exc:
            raise errors.os_error(exc, path) from None

    def parent(self, path: str) -> tuple[int, str]:
        """(descriptor of the parent directory, last component). The caller closes the descriptor."""
        if path == "/":
            raise errors.bad_request("the session's root has no parent", errors.INVALID_FILE)
        head, name = posixpath.split(path)
        return self.open(head, os.O_PATH | os.O_DIRECTORY), name

    def lstat(self, path: str) -> os.stat_result:
        if path == "/":
            return os.stat(self.root_fd)
        fd, name = self.parent(path)
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError as exc:
            raise errors.os_error(exc, path) from None
        finally:
            os.close(fd)

    def stat(self, path: str) -> os.stat_result:
        fd = self.open(path, os.O_PATH)
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def makedirs(self, path: str, mode: int = 0o755) -> None:
        """mkdir -p, one component at a time, each resolved inside the session."""
        built = "/"
        for part in [p for p in path.split("/") if p]:
            here = posixpath.join(built, part)
            try:
                fd = openat2(self.root_fd, _rel(here), os.O_PATH | os.O_DIRECTORY)
            except FileNotFoundError:
                parent = self.open(built, os.O_PATH | os.O_DIRECTORY)
                try:
                    os.mkdir(part, mode, dir_fd=parent)
                except FileExistsError:
                    pass
                except OSError as exc:
                    raise errors.os_error(exc, here) from None
                finally:
                    os.close(parent)
            except NotADirectoryError:
                raise errors.bad_request(f"not a directory: {here}", errors.INVALID_FILE) from None
            except OSError as exc:
                raise errors.os_error(exc, here) from None
            else:
                os.close(fd)
            built = here

    # -- the operations -------------------------------------------------------------------

    def info(self, paths: list[str]) -> dict[str, dict[str, Any]]:
        if not paths:
            raise errors.bad_request("query parameter 'path' is required", errors.MISSING_QUERY)
        result: dict[str, dict[str, Any]] = {}
        for raw in paths:
            path = normalize(raw)
            try:
                st = self.stat(path)
            except errors.ApiError as exc:
                if exc.status != 404:
                    raise
                st = self.lstat(path)  # a dangling symlink is still an entry
            result[raw] = files.info_from_stat(path, st)
        return result

    def open_read(self, raw: str | None) -> tuple[BinaryIO, os.stat_result, str]:
        path = normalize(raw)
        fd = self.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a named pipe must not block execd
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise errors.bad_request(f"not a regular file: {path}", errors.INVALID_FILE)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st, path

    def read_lines(self, raw: str | None, offset_text: str | None, limit_text: str | None) -> bytes:
        return files.lines_of(lambda: self.open_read(raw)[0], offset_text, limit_text)

    def open_target(self, meta: dict[str, Any]) -> files._Target:
        """Where an uploaded file goes (files.upload's opener)."""
        path = normalize(meta["path"])
        self.makedirs(posixpath.dirname(path))
        fd = self.open(path, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK, 0o600)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise errors.bad_request(f"not a regular file: {path}", errors.INVALID_FILE)
        os.set_blocking(fd, True)
        return files._Target(path, fd, meta)

    def delete_files(self, paths: list[str]) -> None:
        if not paths:
            raise errors.bad_request("query parameter 'path' is required", errors.MISSING_QUERY)
        for raw in paths:
            path = normalize(raw)
            fd, name = self.parent(path)
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    raise errors.bad_request(f"is a directory (use DELETE /directories): {raw}", errors.INVALID_FILE)
                os.unlink(name, dir_fd=fd)
            except OSError as exc:
                raise errors.os_error(exc, raw) from None
            finally:
                os.close(fd)

    def delete_dirs(self, paths: list[str]) -> None:
        if not paths:
            raise errors.bad_request("query parameter 'path' is required", errors.MISSING_QUERY)
        for raw in paths:
            path = normalize(raw)
            if path == "/":
                raise errors.bad_request("refusing to delete /", errors.INVALID_FILE)
            fd, name = self.parent(path)
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    raise errors.bad_request(f"not a directory (use DELETE /files): {raw}", errors.INVALID_FILE)
                shutil.rmtree(name, dir_fd=fd)
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    raise errors.bad_request(f"is a mount point of the session: {raw}", errors.INVALID_FILE) from None
                raise errors.os_error(exc, raw) from None
            finally:
                os.close(fd)

    def move(self, body: Any) -> None:
        if not isinstance(body, list) or not all(
            isinstance(i, dict) and isinstance(i.get("src"), str) and isinstance(i.get("dest"), str) for i in body
        ):
            raise errors.bad_request('body must be a list of {"src", "dest"}')
        for item in body:
            src, dest = normalize(item["src"]), normalize(item["dest"])
            src_fd, src_name = self.parent(src)
            try:
                try:
                    os.stat(src_name, dir_fd=src_fd, follow_symlinks=False)
                except OSError as exc:
                    raise errors.os_error(exc, item["src"]) from None
                try:
                    dest_fd, dest_name = self.parent(dest)
                except errors.ApiError as exc:
                    if exc.status == 404:
                        raise errors.not_found(
                            f"destination directory does not exist: {posixpath.dirname(dest)}", errors.FILE_NOT_FOUND
                        ) from None
                    raise
                try:
                    os.rename(src_name, dest_name, src_dir_fd=src_fd, dst_dir_fd=dest_fd)
                except OSError as exc:
                    if exc.errno == errno.EXDEV:
                        raise errors.bad_request(
                            f"cannot move across the session's mounts: {item['src']} -> {item['dest']}",
                            errors.INVALID_FILE,
                        ) from None
                    raise errors.os_error(exc, item["src"]) from None
                finally:
                    os.close(dest_fd)
            finally:
                os.close(src_fd)

    def _apply(self, path: str, mode: int | None, owner: Any, group: Any) -> None:
        uid, gid = files.resolve_uid(owner), files.resolve_gid(group)
        fd = self.open(path, os.O_PATH)
        target = f"/proc/self/fd/{fd}"  # the resolved inode itself; nothing is looked up again
        try:
            if uid != -1 or gid != -1:
                os.chown(target, uid, gid)
            if mode is not None:
                os.chmod(target, mode)
        except OSError as exc:
            raise errors.os_error(exc, path) from None
        finally:
            os.close(fd)

    def set_permissions(self, body: Any) -> None:
        entries = files._permission_entries(body)
        planned = [(normalize(p), files.parse_mode(item.get("mode")), item) for p, item in entries.items()]
        for path, mode, item in planned:
            self._apply(path, mode, item.get("owner"), item.get("group"))

    def make_dirs(self, body: Any) -> None:
        entries = files._permission_entries(body)
        planned = [(normalize(p), files.parse_mode(item.get("mode"), 0o755), item) for p, item in entries.items()]
        for path, mode, item in planned:
            self.makedirs(path, 0o755)
            if not stat.S_ISDIR(self.stat(path).st_mode):
                raise errors.bad_request(f"not a directory: {path}", errors.INVALID_FILE)
            self._apply(path, mode, item.get("owner"), item.get("group"))

    def replace(self, body: Any) -> dict[str, dict[str, int]]:
        if not isinstance(body, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("old"), str) and isinstance(v.get("new"), str)
            for v in body.values()
        ):
            raise errors.bad_request('body must map paths to {"old", "new"}')
        results: dict[str, dict[str, int]] = {}
        for raw, item in body.items():
            if not item["old"]:
                raise errors.bad_request(f"'old' must not be empty ({raw})")
            path = normalize(raw)
            fd = self.open(path, os.O_RDWR | os.O_NONBLOCK)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise errors.bad_request(f"not a regular file: {raw}", errors.INVALID_FILE)
            os.set_blocking(fd, True)
            with os.fdopen(fd, "r+b") as fh:
                text = fh.read().decode("utf-8", "surrogateescape")
                count = text.count(item["old"])
                if count:
                    fh.seek(0)
                    fh.write(text.replace(item["old"], item["new"]).encode("utf-8", "surrogateescape"))
                    fh.truncate()
            results[raw] = {"replacedCount": count}
        return results

    def search(self, raw: str | None, pattern: str | None) -> list[dict[str, Any]]:
        if not raw:
            raise errors.bad_request("query parameter 'path' is required", errors.MISSING_QUERY)
        root = normalize(raw)
        fd = self.open(root, os.O_RDONLY | os.O_DIRECTORY)
        pattern = pattern or "**"
        by_path = "/" in pattern
        regex = files.glob_regex(pattern) if by_path else None
        found: list[dict[str, Any]] = []
        try:
            for dirpath, dirnames, filenames, dir_fd in os.fwalk(".", dir_fd=fd, follow_symlinks=False):
                dirnames.sort()
                rel_dir = "" if dirpath == "." else dirpath[2:]
                for name in sorted(filenames):
                    rel = f"{rel_dir}/{name}" if rel_dir else name
                    if regex is not None:
                        if not regex.match(rel):
                            continue
                    elif pattern not in ("**", "*") and not fnmatch.fnmatchcase(name, pattern):
                        continue
                    try:
                        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                    except OSError:
                        continue
                    if stat.S_ISREG(st.st_mode):
                        found.append(files.info_from_stat(posixpath.join(root, rel), st))
        finally:
            os.close(fd)
        return found

    def list_dir(self, raw: str | None, depth_text: str | None) -> list[dict[str, Any]]:
        if not raw:
            raise errors.bad_request("query parameter 'path' is required", errors.MISSING_QUERY)
        depth = 1
        if depth_text not in (None, ""):
            assert depth_text is not None
            if not depth_text.isdigit():
                raise errors.bad_request(f"invalid depth {depth_text!r}: a non-negative integer is required")
            depth = int(depth_text)
        path = normalize(raw)
        st = self.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            raise errors.bad_request(f"path is a symbolic link; pass the real directory: {raw}", errors.INVALID_FILE)
        if not stat.S_ISDIR(st.st_mode):
            raise errors.bad_request(f"not a directory: {raw}", errors.INVALID_FILE)
        entries: list[dict[str, Any]] = []

        def walk(dir_fd: int, at: str, level: int) -> None:
            try:
                names = sorted(os.listdir(dir_fd))
            except OSError as exc:
                raise errors.os_error(exc, at) from None
            for name in names:
                entry = posixpath.join(at, name)
                try:
                    est = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                except OSError:
                    continue
                entries.append(files.info_from_stat(entry, est))
                if stat.S_ISDIR(est.st_mode) and level + 1 < depth:
                    with contextlib.suppress(OSError):
                        sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                        try:
                            walk(sub, entry, level + 1)
                        finally:
                            os.close(sub)

        if depth > 0:
            fd = self.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                walk(fd, path, 0)
            finally:
                os.close(fd)
        return entries
