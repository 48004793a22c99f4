"""A daemon's process: serve until SIGTERM or SIGINT; exit 1 (logged) when it cannot start."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Coroutine
from typing import Any, NoReturn

from opensandbox_platform.daemon import logs


def run(serve: Coroutine[Any, Any, None], log_level: str, log: logging.Logger) -> None:
    """Logs logfmt lines to stderr and runs `serve`; exits 1 when it cannot start, e.g. the port is taken."""
    logs.setup(log_level)
    try:
        asyncio.run(serve)
    except OSError as exc:
        cannot_start(exc, log_level, log)


def cannot_start(exc: OSError, log_level: str, log: logging.Logger) -> NoReturn:
    """Logs why the daemon cannot start (as a logfmt line on stderr) and exits 1."""
    logs.setup(log_level)
    log.error("cannot start error=%s", exc)
    sys.exit(1)


def stop_on_signals() -> asyncio.Event:
    """An event that SIGTERM and SIGINT set (call it inside the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
