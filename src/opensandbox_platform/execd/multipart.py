"""A streaming multipart/form-data parser: memory stays flat whatever the size of a part."""

from __future__ import annotations

import re
from dataclasses import dataclass

from opensandbox_platform.daemon import errors

MAX_PART_HEAD = 16 * 1024


@dataclass
class PartStart:
    headers: dict[str, str]

    @property
    def name(self) -> str | None:
        return _param(self.headers.get("content-disposition", ""), "name")

    @property
    def filename(self) -> str | None:
        return _param(self.headers.get("content-disposition", ""), "filename")


@dataclass
class PartData:
    data: bytes


@dataclass
class PartEnd:
    pass


Event = PartStart | PartData | PartEnd


def boundary_of(content_type: str) -> bytes:
    """The boundary of a multipart/form-data Content-Type; 400 if there is none."""
    kind = content_type.split(";", 1)[0].strip().lower()
    boundary = _param(content_type, "boundary")
    if kind != "multipart/form-data" or not boundary:
        raise errors.bad_request("expected Content-Type multipart/form-data with a boundary", errors.INVALID_FILE)
    return boundary.encode("latin-1")


def _param(header: str, name: str) -> str | None:
    match = re.search(rf'(?:^|;)\s*{name}\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))', header, re.IGNORECASE)
    if match is None:
        return None
    if match.group(1) is not None:
        return re.sub(r"\\(.)", r"\1", match.group(1))
    return match.group(2)


class MultipartParser:
    """Feed body bytes in; get part events out. `finished` is True after the closing boundary."""

    def __init__(self, boundary: bytes) -> None:
        self._first = b"--" + boundary
        self._delim = b"\r\n--" + boundary
        self._buf = b""
        self._state = "preamble"
        self.finished = False

    def feed(self, data: bytes) -> list[Event]:
        self._buf += data
        events: list[Event] = []
        while True:
            if self._state == "preamble":
                index = self._buf.find(self._first)
                if index < 0:
                    self._buf = self._buf[-len(self._first) :]
                    return events
                self._buf = self._buf[index + len(self._first) :]
                self._state = "after-boundary"
            elif self._state == "after-boundary":
                if len(self._buf) < 2:
                    return events
                if self._buf.startswith(b"--"):
                    self._state = "epilogue"
                    self.finished = True
                    self._buf = b""
                    return events
                if not self._buf.startswith(b"\r\n"):
                    raise errors.bad_request("malformed multipart boundary", errors.INVALID_FILE)
                self._buf = self._buf[2:]
                self._state = "headers"
            elif self._state == "headers":
                index = self._buf.find(b"\r\n\r\n")
                if index < 0:
                    if len(self._buf) > MAX_PART_HEAD:
                        raise errors.bad_request("multipart part headers too large", errors.INVALID_FILE)
                    return events
                events.append(PartStart(_parse_headers(self._buf[:index])))
                self._buf = self._buf[index + 4 :]
                self._state = "body"
            elif self._state == "body":
                index = self._buf.find(self._delim)
                if index < 0:
                    keep = len(self._delim) - 1
                    if len(self._buf) > keep:
                        events.append(PartData(self._buf[:-keep]))
                        self._buf = self._buf[-keep:]
                    return events
                if index:
                    events.append(PartData(self._buf[:index]))
                events.append(PartEnd())
                self._buf = self._buf[index + len(self._delim) :]
                self._state = "after-boundary"
            else:  # epilogue
                self._buf = b""
                return events


def _parse_headers(raw: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in raw.split(b"\r\n"):
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            raise errors.bad_request("malformed multipart part header", errors.INVALID_FILE)
        headers[name.decode("latin-1").strip().lower()] = value.decode("utf-8", "replace").strip()
    return headers
