"""What the small daemons (execd, the task executor, the local runtime's jail init) share: logfmt lines
on stderr, serving until SIGTERM or SIGINT, exit 1 when they cannot start.

Standard library only: both executables are PyInstaller bundles that leave most modules out.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import sys
import time
from collections.abc import Coroutine
from typing import Any

_FIELDS = re.compile(r"^(.*?)((?:\s+[A-Za-z_]+=\S*)*)$", re.DOTALL)


class LogfmtFormatter(logging.Formatter):
    """`ts=... level=info logger=execd msg="phrase" key=value ...`: one line per record.

    Log calls are written as "phrase key=%s key=%s", so the trailing pairs stay machine-readable.
    """

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        match = _FIELDS.match(record.getMessage())
        assert match is not None  # the pattern matches any string
        phrase = match.group(1).replace('"', "'")
        out = f'ts={ts} level={record.levelname.lower()} logger={record.name} msg="{phrase}"{match.group(2)}'
        if record.exc_info:
            out += "\n" + self.formatException(record.exc_info)
        return out


def log_to_stderr(level: str) -> None:
    """Root logging at `level` (debug, info, ...), logfmt lines on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler])


def run(serve: Coroutine[Any, Any, None], log_level: str, log: logging.Logger) -> None:
    """Logs to stderr and runs `serve`; exits 1 (logged) when it cannot start, e.g. the port is taken."""
    log_to_stderr(log_level)
    try:
        asyncio.run(serve)
    except OSError as exc:
        log.error("cannot start error=%s", exc)
        sys.exit(1)


def stop_on_signals() -> asyncio.Event:
    """An event that SIGTERM and SIGINT set (call it inside the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
