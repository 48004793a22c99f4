"""Files and directories: info, upload, download (Range, line windows), move, permissions, search,
replace, mkdir, rm. Modes travel as octal digits written in decimal (755 means 0o755)."""

from __future__ import annotations

import contextlib
import fnmatch
import grp
import os
import pwd
import re
import shutil
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, BinaryIO, TypeVar

from opensandbox_platform.daemon import errors, times
from opensandbox_platform.execd.multipart import MultipartParser, PartData, PartEnd, PartStart

MAX_METADATA = 64 * 1024

T = TypeVar("T")


# -- metadata -------------------------------------------------------------------------------


def mode_to_wire(st_mode: int) -> int:
    """0o755 -> 755 (what the SDK shows and sends)."""
    return int(format(stat.S_IMODE(st_mode), "o"))


def parse_mode(value: Any, default: int | None = None) -> int | None:
    """755 (or "755", "0755") -> 0o755; 400 on anything that is not 1-4 octal digits."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise errors.bad_request(f"invalid mode {value!r}: octal digits expected, e.g. 755")
    text = str(value).strip()
    if text.startswith("0o"):
        text = text[2:]
    if not text or not re.fullmatch(r"[0-7]{1,5}", text) or int(text, 8) > 0o7777:
        raise errors.bad_request(f"invalid mode {value!r}: octal digits expected, e.g. 755")
    return int(text, 8)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


# The largest numeric owner or group a request may give (an int32, as uids are in the API).
MAX_ID = 2**31 - 1


def resolve_uid(owner: Any) -> int:
    """A user name, or a numeric id written as a string (the API's owner is a string) -> uid;
    None/"" -> -1 (leave unchanged)."""
    return _resolve_id(owner, "owner", lambda name: pwd.getpwnam(name).pw_uid)


def resolve_gid(group: Any) -> int:
    return _resolve_id(group, "group", lambda name: grp.getgrnam(name).gr_gid)


def _resolve_id(value: Any, what: str, lookup: Callable[[str], int]) -> int:
    if value is None or value == "":
        return -1
    if not isinstance(value, str) or "\0" in value:
        raise errors.bad_request(
            f"invalid {what} {value!r}: a name or a numeric id, as a string", errors.INVALID_FILE_METADATA
        )
    try:
        return lookup(value)
    except KeyError:
        if value.isascii() and value.isdigit() and int(value) <= MAX_ID:
            return int(value)
        raise errors.bad_request(
            f"unknown {'user' if what == 'owner' else what} {value!r}", errors.INVALID_FILE_METADATA
        ) from None


def _type(st_mode: int) -> str:
    if stat.S_ISLNK(st_mode):
        return "symlink"
    if stat.S_ISDIR(st_mode):
        return "directory"
    if stat.S_ISREG(st_mode):
        return "file"
    return "other"


def info_from_stat(path: str, st: os.stat_result) -> dict[str, Any]:
    return {
        "path": path,
        "type": _type(st.st_mode),
        "size": st.st_size,
        "modified_at": times.rfc3339(times.from_ns(st.st_mtime_ns), digits=6),
        # Linux keeps no birth time in stat(2); the inode change time is the closest stand-in.
        "created_at": times.rfc3339(times.from_ns(min(st.st_ctime_ns, st.st_mtime_ns)), digits=6),
        "owner": _user_name(st.st_uid),
        "group": _group_name(st.st_gid),
        "mode": mode_to_wire(st.st_mode),
    }


def _abs(path: str) -> str:
    if not isinstance(path, str) or not path:
        raise errors.bad_request("a non-empty 'path' is required", errors.MISSING_QUERY)
    if "\0" in path:
        raise errors.bad_request("path must not contain NUL", errors.INVALID_FILE)
    return os.path.abspath(os.path.expanduser(path))


def _stat(path: str, *, follow: bool = True) -> os.stat_result:
    try:
        return os.stat(path) if follow else os.lstat(path)
    except OSError as exc:
        raise errors.os_error(exc, path) from None


def files_info(paths: list[str]) -> dict[str, dict[str, Any]]:
    if not paths:
        raise errors.bad_request("query parameter 'path' is required", errors.MISSING_QUERY)
    result: dict[str, dict[str, Any]] = {}
    for path in paths:
        full = _abs(path)
        try:
            st = os.stat(full)
        except FileNotFoundError:
            st = _stat(full, follow=False)  # a dangling symlink is still an entry
        except OSError as exc:
            raise errors.os_error(exc, path) from None
        result[path] = info_from_stat(full, st)
    return result


# -- changing things ------------------------------------------------------------------------


def _apply_owner(path: str, owner: Any, group: Any) -> None:
    uid, gid = resolve_uid(owner), resolve_gid(group)
    if uid == -1 and gid == -1:
        return
    try:
        os.chown(path, uid, gid)
    except OSError as exc:
        raise errors.os_error(exc, path) from None


def _permission_entries(body: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(body, dict) or not all(isinstance(v, dict) for v in body.values()):
        raise errors.bad_request('body must map paths to {"mode", "owner", "group"}')
    return body


def set_permissions(body: Any) -> None:
    entries = _permission_entries(body)
    planned = [(path, _abs(path), parse_mode(item.get("mode"))) for path, item in entries.items()]
    for (path, full, mode), item in zip(planned, entries.values(), strict=True):
        _stat(full)
        _apply_owner(full, item.get("owner"), item.get("group"))
        if mode is not None:
            try:
                os.chmod(full, mode)
            except OSError as exc:
                raise errors.os_error(exc, path) from None


def make_dirs(body: Any) -> None:
    entries = _permission_entries(body)
    planned = [(path, _abs(path), parse_mode(item.get("mode"), 0o755)) for path, item in entries.items()]
    for (path, full, mode), item in zip(planned, entries.values(), strict=True):
        try:
            os.makedirs(full, exist_ok=True)
        except FileExistsError:
            raise errors.bad_request(f"not a directory: {path}", errors.INVALID_FILE) from None
        except OSError as exc:
            raise errors.os_error(exc, path) from None
        if not os.path.isdir(full):
            raise errors.bad_request(f"not a directory: {path}", errors.INVALID_FILE)
        assert mode is not None
        os.chmod(full, mode)  # explicit: makedirs' mode is filtered by the umask
        _apply_owner(full, item.get("owner"), item.get("group"))


def delete_files(paths: list[str]) -> None:
    if not paths:
        raise errors.bad_request("query parameter 'path' is required", errors.MISSING_QUERY)
    for path in paths:
        full = _abs(path)
        if stat.S_ISDIR(_stat(full, follow=False).st_mode):
            raise errors.bad_request(f"is a directory (use DELETE /directories): {path}", errors.INVALID_FILE)
        try:
            os.unlink(full)
        except OSError as exc:
            raise errors.os_error(exc, path) from None


def delete_dirs(paths: list[str]) -> None:
    if not paths:
        raise errors.bad_request("query parameter 'path' is required", errors.MISSING_QUERY)
    for path in paths:
        full = _abs(path)
        st = _stat(full, follow=False)
        if not stat.S_ISDIR(st.st_mode):
            raise errors.bad_request(f"not a directory (use DELETE /files): {path}", errors.INVALID_FILE)
        if full == "/":
            raise errors.bad_request("refusing to delete /", errors.INVALID_FILE)
        try:
            shutil.rmtree(full)
        except OSError as exc:
            raise errors.os_error(exc, path) from None


def move(body: Any) -> None:
    if not isinstance(body, list) or not all(
        isinstance(i, dict) and isinstance(i.get("src"), str) and isinstance(i.get("dest"), str) for i in body
    ):
        raise errors.bad_request('body must be a list of {"src", "dest"}')
    for item in body:
        src, dest = _abs(item["src"]), _abs(item["dest"])
        _stat(src, follow=False)
        parent = os.path.dirname(dest)
        if not os.path.isdir(parent):
            raise errors.not_found(f"destination directory does not exist: {parent}", errors.FILE_NOT_FOUND)
        try:
            os.rename(src, dest)
        except OSError as exc:
            if exc.errno == 18:  # EXDEV: another filesystem
                shutil.move(src, dest)
            else:
                raise errors.os_error(exc, item["src"]) from None


def replace(body: Any) -> dict[str, dict[str, int]]:
    if not isinstance(body, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("old"), str) and isinstance(v.get("new"), str) for v in body.values()
    ):
        raise errors.bad_request('body must map paths to {"old", "new"}')
    results: dict[str, dict[str, int]] = {}
    for path, item in body.items():
        if not item["old"]:
            raise errors.bad_request(f"'old' must not be empty ({path})")
        full = _abs(path)
        if not stat.S_ISREG(_stat(full).st_mode):
            raise errors.bad_request(f"not a regular file: {path}", errors.INVALID_FILE)
        try:
            with open(full, "r+b") as fh:
                # surrogateescape keeps bytes that are not UTF-8 exactly as they were.
                text = fh.read().decode("utf-8", "surrogateescape")
                old = item["old"]
                count = text.count(old)
                if count:
                    fh.seek(0)
                    fh.write(text.replace(old, item["new"]).encode("utf-8", "surrogateescape"))
                    fh.truncate()
        except OSError as exc:
            raise errors.os_error(exc, path) from None
        results[path] = {"replacedCount": count}
    return results


# -- finding things -------------------------------------------------------------------------


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob over '/'-separated paths: `*` and `?` stay within a segment, `**` spans segments."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape("["))
                i += 1
            else:
                body = pattern[i + 1 : end]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    try:
        return re.compile("".join(out) + r"\Z", re.DOTALL)
    except re.error as exc:
        raise errors.bad_request(f"invalid pattern {pattern!r}: {exc}") from None


def search(root: str | None, pattern: str | None) -> list[dict[str, Any]]:
    """Regular files under `root` matching `pattern`: against the file name, or against the path
    relative to `root` when the pattern contains '/' (e.g. `src/**/*.py`)."""
    if not root:
        raise errors.bad_request("query parameter 'path' is required", errors.MISSING_QUERY)
    full = _abs(root)
    if not stat.S_ISDIR(_stat(full).st_mode):
        raise errors.bad_request(f"not a directory: {root}", errors.INVALID_FILE)
    pattern = pattern or "**"
    by_path = "/" in pattern
    regex = glob_regex(pattern) if by_path else None
    found: list[dict[str, Any]] = []

    def unreadable(exc: OSError) -> None:
        if exc.filename == full:  # the root itself (a user's search of what it may not read): a 403
            raise errors.os_error(exc, root) from None

    for dirpath, dirnames, filenames in os.walk(full, onerror=unreadable):
        dirnames.sort()
        for name in sorted(filenames):
            entry = os.path.join(dirpath, name)
            if regex is not None:
                if not regex.match(os.path.relpath(entry, full)):
                    continue
            elif pattern not in ("**", "*") and not fnmatch.fnmatchcase(name, pattern):
                continue
            try:
                st = os.lstat(entry)
            except OSError:
                continue  # vanished while walking
            if stat.S_ISREG(st.st_mode):
                found.append(info_from_stat(entry, st))
    return found


def list_dir(path: str | None, depth_text: str | None) -> list[dict[str, Any]]:
    if not path:
        raise errors.bad_request("query parameter 'path' is required", errors.MISSING_QUERY)
    depth = 1
    if depth_text not in (None, ""):
        assert depth_text is not None
        if not depth_text.isdigit():
            raise errors.bad_request(f"invalid depth {depth_text!r}: a non-negative integer is required")
        depth = int(depth_text)
    full = _abs(path)
    st = _stat(full, follow=False)
    if stat.S_ISLNK(st.st_mode):
        raise errors.bad_request(f"path is a symbolic link; pass the real directory: {path}", errors.INVALID_FILE)
    if not stat.S_ISDIR(st.st_mode):
        raise errors.bad_request(f"not a directory: {path}", errors.INVALID_FILE)
    entries: list[dict[str, Any]] = []

    def walk(directory: str, level: int) -> None:
        try:
            names = sorted(os.listdir(directory))
        except OSError as exc:
            if level == 0:
                raise errors.os_error(exc, directory) from None
            return  # a subdirectory the caller may not read (as another user): listed, not entered
        for name in names:
            entry = os.path.join(directory, name)
            try:
                est = os.lstat(entry)
            except OSError:
                continue
            entries.append(info_from_stat(entry, est))
            if stat.S_ISDIR(est.st_mode) and level + 1 < depth:
                walk(entry, level + 1)

    if depth > 0:
        walk(full, 0)
    return entries


# -- download -------------------------------------------------------------------------------


class RangeNotSatisfiable(Exception):
    pass


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """`bytes=a-b` / `bytes=a-` / `bytes=-n` -> inclusive (start, end); None to send everything.

    Only the first range of a list is honoured. A syntactically invalid header is ignored (RFC
    9110); a valid one that selects nothing raises RangeNotSatisfiable.
    """
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or not spec:
        return None
    first = spec.split(",", 1)[0].strip()
    start_text, dash, end_text = first.partition("-")
    start_text, end_text = start_text.strip(), end_text.strip()
    if not dash or (start_text and not start_text.isdigit()) or (end_text and not end_text.isdigit()):
        return None
    if not start_text:
        if not end_text:
            return None
        suffix = int(end_text)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable
        return max(0, size - suffix), size - 1
    start = int(start_text)
    if end_text and int(end_text) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable
    end = int(end_text) if end_text else size - 1
    return start, min(end, size - 1)


def open_for_download(path: str | None) -> tuple[Any, os.stat_result, str]:
    if not path:
        raise errors.bad_request("query parameter 'path' is required", errors.MISSING_QUERY)
    full = _abs(path)
    try:
        fh = open(full, "rb")  # noqa: SIM115 - handed over to the response, which closes it
    except OSError as exc:
        raise errors.os_error(exc, path) from None
    st = os.fstat(fh.fileno())
    if not stat.S_ISREG(st.st_mode):
        fh.close()
        raise errors.bad_request(f"not a regular file: {path}", errors.INVALID_FILE)
    return fh, st, full


def read_lines(path: str, offset_text: str | None, limit_text: str | None) -> bytes:
    """Lines offset..offset+limit-1 (1-based) of a text file."""
    return lines_of(lambda: open_for_download(path)[0], offset_text, limit_text)


def lines_of(open_file: Callable[[], BinaryIO], offset_text: str | None, limit_text: str | None) -> bytes:
    """Lines offset..offset+limit-1 (1-based) of the file `open_file` opens (after the query is checked)."""
    offset = _positive(offset_text, "offset", 1)
    limit = _positive(limit_text, "limit", 0) if limit_text not in (None, "") else None
    fh = open_file()
    out: list[bytes] = []
    with fh:
        for number, line in enumerate(fh, start=1):
            if number < offset:
                continue
            if limit is not None and len(out) >= limit:
                break
            out.append(line)
    return b"".join(out)


def _positive(text: str | None, name: str, minimum: int) -> int:
    if text in (None, ""):
        return minimum
    assert text is not None
    if not text.isdigit() or int(text) < minimum:
        raise errors.bad_request(f"invalid {name} {text!r}: an integer >= {minimum} is required")
    return int(text)


# -- upload ---------------------------------------------------------------------------------


async def _call(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)


async def upload(
    content_type: str,
    body: AsyncIterator[bytes],
    open_target: Callable[[dict[str, Any]], _Target] | None = None,
    run: Callable[..., Awaitable[Any]] = _call,
) -> int:
    """Write the files of a multipart body: each `metadata` part (JSON: path, mode, owner, group)
    is followed by the `file` part holding its content. Returns the number of files written.
    `open_target` opens each file (default: the path in execd's own filesystem); `run(fn, *args)`
    calls it and each file's finish (e.g. as another user: execd/identity.py)."""
    opener = open_target or _Target.open
    from opensandbox_platform.execd.multipart import boundary_of

    parser = MultipartParser(boundary_of(content_type))
    metadata: dict[str, Any] | None = None
    meta_buf: bytearray | None = None
    target: _Target | None = None
    written = 0
    try:
        async for chunk in body:
            for ev in parser.feed(chunk):
                if isinstance(ev, PartStart):
                    if ev.name == "metadata":
                        meta_buf = bytearray()
                    elif ev.name == "file":
                        if metadata is None:
                            raise errors.bad_request(
                                "a 'file' part must follow its 'metadata' part", errors.INVALID_FILE
                            )
                        target = await run(opener, metadata)
                        metadata = None
                elif isinstance(ev, PartData):
                    if meta_buf is not None:
                        meta_buf += ev.data
                        if len(meta_buf) > MAX_METADATA:
                            raise errors.bad_request("metadata part too large", errors.INVALID_FILE_METADATA)
                    elif target is not None:
                        target.write(ev.data)
                elif isinstance(ev, PartEnd):
                    if meta_buf is not None:
                        metadata = _parse_metadata(bytes(meta_buf))
                        meta_buf = None
                    elif target is not None:
                        await run(target.finish)
                        target = None
                        written += 1
        if not parser.finished:
            raise errors.bad_request("multipart body ended before its closing boundary", errors.INVALID_FILE)
    finally:
        if target is not None:
            target.abort()
    if metadata is not None:
        raise errors.bad_request("a 'metadata' part has no 'file' part after it", errors.INVALID_FILE)
    return written


def _parse_metadata(raw: bytes) -> dict[str, Any]:
    import json

    try:
        meta = json.loads(raw)
    except ValueError:
        raise errors.bad_request("metadata part is not valid JSON", errors.INVALID_FILE_METADATA) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("path"), str) or not meta["path"]:
        raise errors.bad_request('metadata must be a JSON object with a "path"', errors.INVALID_FILE_METADATA)
    meta["_mode"] = parse_mode(meta.get("mode"), 0o644)
    meta["_uid"] = resolve_uid(meta.get("owner"))
    meta["_gid"] = resolve_gid(meta.get("group"))
    return meta


class _Target:
    def __init__(self, path: str, fd: int, meta: dict[str, Any]) -> None:
        self.path = path
        self.fd = fd
        self.meta = meta
        self.size = 0

    @classmethod
    def open(cls, meta: dict[str, Any]) -> _Target:
        path = _abs(meta["path"])
        parent = os.path.dirname(path)
        try:
            os.makedirs(parent, exist_ok=True)
            # No O_TRUNC: overwriting in place and cutting to length at the end skips freeing and
            # re-allocating blocks when a file is rewritten with content of the same size.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise errors.os_error(exc, meta["path"]) from None
        return cls(path, fd, meta)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        self.size += len(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            raise errors.os_error(exc, self.meta["path"]) from None

    def finish(self) -> None:
        try:
            os.ftruncate(self.fd, self.size)
            if self.meta["_uid"] != -1 or self.meta["_gid"] != -1:
                os.fchown(self.fd, self.meta["_uid"], self.meta["_gid"])
            os.fchmod(self.fd, self.meta["_mode"])  # after chown, which may clear setuid bits
        except OSError as exc:
            raise errors.os_error(exc, self.meta["path"]) from None
        finally:
            os.close(self.fd)
            self.fd = -1

    def abort(self) -> None:
        """Close a file whose upload broke off; it keeps what arrived (cut to that length)."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)
            os.close(self.fd)
            self.fd = -1
