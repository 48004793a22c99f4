"""One logging setup for every program: a line per record on stderr, logfmt or JSON.

Log calls say a phrase and their fields, either as trailing `key=%s` pairs in the message (the
daemons' style: "execd listening host=%s port=%d") or as `extra={...}` (the controller's style);
both formats keep every field machine-readable:

    ts=2026-11-30T04:29:19.123Z level=info logger=execd msg="execd listening" host=0.0.0.0 port=44772
    {"ts": "2026-11-30T04:29:19.123Z", "level": "info", "logger": "...", "msg": "...", "key": "..."}
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, Literal

Format = Literal["logfmt", "json"]

# The attributes every LogRecord has: anything else on a record came from `extra=`.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}
_TRAILING_FIELDS = re.compile(r"^(.*?)((?:\s+[A-Za-z_]+=\S*)*)$", re.DOTALL)
_BARE = re.compile(r"^[^\s\"=]+$")


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


def _logfmt_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if _BARE.match(text) else json.dumps(text)


class LogfmtFormatter(logging.Formatter):
    """`ts=... level=info logger=execd msg="phrase" key=value ...`: one line per record."""

    def format(self, record: logging.LogRecord) -> str:
        match = _TRAILING_FIELDS.match(record.getMessage())
        assert match is not None  # the pattern matches any string
        phrase = match.group(1).replace('"', "'")
        out = f'ts={_timestamp(record)} level={record.levelname.lower()} logger={record.name} msg="{phrase}"'
        out += match.group(2)
        for key, value in extra_fields(record).items():
            out += f" {key}={_logfmt_value(value)}"
        if record.exc_info:
            out += "\n" + self.formatException(record.exc_info)
        return out


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the `extra=` fields of each call."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(extra_fields(record))
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup(level: int | str, fmt: Format = "logfmt") -> None:
    """Root logging at `level` (a number, or debug/info/warning/error) as `fmt` lines on stderr.

    HTTP client libraries log every request at debug level: they stay at warning unless asked."""
    numeric = level if isinstance(level, int) else logging.getLevelName(level.upper())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for noisy in ("httpx", "httpcore", "httpx2", "httpcore2"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))


def verbosity_to_level(verbosity: int) -> int:
    """The chart's logLevel 0-5: 0 errors only, 1 warnings, 2-3 info (default 3), 4-5 debug."""
    return {0: logging.ERROR, 1: logging.WARNING, 2: logging.INFO, 3: logging.INFO}.get(verbosity, logging.DEBUG)
