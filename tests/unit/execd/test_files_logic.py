"""Modes, ranges, globs and multipart parsing behind the /files routes."""

from __future__ import annotations

import os
import stat

import pytest

from opensandbox_platform.daemon.errors import ApiError
from opensandbox_platform.execd import files
from opensandbox_platform.execd.multipart import MultipartParser, PartData, PartEnd, PartStart, boundary_of


def test_modes_travel_as_octal_digits() -> None:
    assert files.mode_to_wire(stat.S_IFREG | 0o755) == 755
    assert files.mode_to_wire(stat.S_IFDIR | 0o4711) == 4711
    assert files.mode_to_wire(0o600) == 600
    assert files.parse_mode(755) == 0o755
    assert files.parse_mode("0644") == 0o644
    assert files.parse_mode(None, 0o644) == 0o644


@pytest.mark.parametrize("bad", [999, 800, "rwx", -1, 77777, True, 1.5, ""])
def test_bad_modes_are_rejected(bad: object) -> None:
    with pytest.raises(ApiError) as err:
        files.parse_mode(bad)
    assert err.value.status == 400


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-9", 100, (0, 9)),
        ("bytes=90-", 100, (90, 99)),
        ("bytes=-10", 100, (90, 99)),
        ("bytes=-500", 100, (0, 99)),
        ("bytes=50-5000", 100, (50, 99)),
        ("bytes=0-0,5-6", 100, (0, 0)),
        ("bytes=9-3", 100, None),
        ("items=0-1", 100, None),
        ("bytes=a-b", 100, None),
    ],
)
def test_parse_range(header: str, size: int, expected: tuple[int, int] | None) -> None:
    assert files.parse_range(header, size) == expected


@pytest.mark.parametrize(("header", "size"), [("bytes=100-", 100), ("bytes=-0", 100), ("bytes=0-", 0)])
def test_unsatisfiable_ranges(header: str, size: int) -> None:
    with pytest.raises(files.RangeNotSatisfiable):
        files.parse_range(header, size)


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("*.py", "a.py", True),
        ("*.py", "d/a.py", False),
        ("**/*.py", "a.py", True),
        ("**/*.py", "d/e/a.py", True),
        ("src/**", "src/x/y", True),
        ("src/*/y", "src/x/y", True),
        ("src/*/y", "src/x/z/y", False),
        ("file?.txt", "file1.txt", True),
        ("file[!0-9].txt", "file1.txt", False),
        ("file[!0-9].txt", "fileA.txt", True),
    ],
)
def test_glob_regex(pattern: str, path: str, matches: bool) -> None:
    assert bool(files.glob_regex(pattern).match(path)) is matches


def test_info_from_stat_shape(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "f")
    with open(path, "w") as fh:
        fh.write("abc")
    os.chmod(path, 0o640)
    info = files.info_from_stat(path, os.stat(path))
    assert info["type"] == "file" and info["size"] == 3 and info["mode"] == 640
    assert info["modified_at"].endswith("Z") and "T" in info["created_at"]
    assert isinstance(info["owner"], str) and isinstance(info["group"], str)


def multipart(boundary: str, parts: list[tuple[str, bytes]]) -> bytes:
    out = b""
    for name, data in parts:
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="x"\r\n'.encode()
        out += b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def parse_all(body: bytes, boundary: bytes, step: int) -> list[tuple[str | None, bytes]]:
    parser = MultipartParser(boundary)
    parts: list[tuple[str | None, bytes]] = []
    for i in range(0, len(body), step):
        for ev in parser.feed(body[i : i + step]):
            if isinstance(ev, PartStart):
                parts.append((ev.name, b""))
            elif isinstance(ev, PartData):
                name, data = parts[-1]
                parts[-1] = (name, data + ev.data)
            else:
                assert isinstance(ev, PartEnd)
    assert parser.finished
    return parts


@pytest.mark.parametrize("step", [1, 7, 64, 100_000])
def test_multipart_parts_survive_any_chunking(step: int) -> None:
    content = b"line\r\n--not-the-boundary\r\n" + bytes(range(256)) * 10
    body = multipart("b0undary", [("metadata", b'{"path": "/x"}'), ("file", content), ("file", b"")])
    assert parse_all(body, b"b0undary", step) == [("metadata", b'{"path": "/x"}'), ("file", content), ("file", b"")]


def test_boundary_of() -> None:
    assert boundary_of('multipart/form-data; boundary="a b"') == b"a b"
    assert boundary_of("multipart/form-data; charset=utf-8; boundary=xyz") == b"xyz"
    with pytest.raises(ApiError):
        boundary_of("application/json")
