"""Server-sent events as the official SDK parses them, and the line splitting behind them.

Framing is standard SSE (`data: <json>\\n\\n`). The SDK (1.1.1) also accepts upstream's bare
`<json>\\n\\n` frames; the standard form is what generic SSE clients read too. Every event carries
`type` and `timestamp` (Unix ms): the SDK rejects an event without a timestamp.
"""

from __future__ import annotations

import json
import time
from typing import Any

SSE_HEADERS = {
    "content-type": "text/event-stream",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
}

# A line longer than this is sent in pieces, so one newline-free output cannot grow memory.
MAX_LINE = 64 * 1024

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def event(
    type_: str,
    *,
    text: str | None = None,
    execution_time: int | None = None,
    error: dict[str, Any] | None = None,
    timestamp: int | None = None,
) -> bytes:
    """One SSE frame; fields that are None are left out, as upstream does."""
    payload: dict[str, Any] = {"type": type_}
    if text is not None:
        payload["text"] = text
    if execution_time is not None:
        payload["execution_time"] = execution_time
    if error is not None:
        payload["error"] = error
    payload["timestamp"] = now_ms() if timestamp is None else timestamp
    return b"data: " + _dumps(payload).encode() + b"\n\n"


def frame(payload: dict[str, Any]) -> bytes:
    """A frame of any event fields (e.g. a code run's `results`); the timestamp is added."""
    payload.setdefault("timestamp", now_ms())
    return b"data: " + _dumps(payload).encode() + b"\n\n"


# Printable ASCII other than `"` and `\\` needs no JSON escaping: such lines are copied as they are.
_PLAIN = bytes(c for c in range(0x20, 0x7F) if c not in b'"\\')


def output_events(type_: str, lines: list[bytes], timestamp: int) -> bytes:
    """Frames for many output lines at once (the hot path: no dict per line)."""
    prefix = f'data: {{"type":"{type_}","text":'.encode()
    suffix = f',"timestamp":{timestamp}}}\n\n'.encode()
    parts = []
    for line in lines:
        if not line.translate(None, _PLAIN):
            parts.append(prefix + b'"' + line + b'"' + suffix)
        else:
            parts.append(prefix + _dumps(line.decode("utf-8", "replace")).encode() + suffix)
    return b"".join(parts)


def error_value(ename: str, evalue: str, traceback: list[str]) -> dict[str, Any]:
    return {"ename": ename, "evalue": evalue, "traceback": traceback}


def ping() -> bytes:
    return event("ping", text="pong")


class LineSplitter:
    """Splits a byte stream into lines without their terminators.

    `\\n`, `\\r\\n` and a lone `\\r` each end a line (progress bars redraw with `\\r`). A line longer
    than `max_line` is cut at a UTF-8 character boundary and sent in pieces.
    """

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._max = max_line
        self._partial = b""
        self._after_cr = False

    def feed(self, data: bytes) -> list[bytes]:
        if self._after_cr:
            self._after_cr = False
            if data[:1] == b"\n":
                data = data[1:]  # the \n of a \r\n split across two reads
        if not data:
            return []
        buf = self._partial + data if self._partial else data
        if b"\r" in buf:
            self._after_cr = buf.endswith(b"\r")
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        parts = buf.split(b"\n")
        rest = parts.pop()
        while len(rest) > self._max:
            cut = utf8_cut(rest, self._max)
            parts.append(rest[:cut])
            rest = rest[cut:]
        self._partial = rest
        return parts

    def flush(self) -> list[bytes]:
        """The unterminated last line, if any."""
        rest, self._partial = self._partial, b""
        return [rest] if rest else []


def utf8_cut(data: bytes, limit: int) -> int:
    """The largest cut <= limit that does not split a UTF-8 sequence (falls back to limit)."""
    cut = limit
    while cut > limit - 4 and cut > 0 and (data[cut] & 0xC0) == 0x80:
        cut -= 1
    return cut if cut > limit - 4 and cut > 0 else limit
