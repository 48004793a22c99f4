"""A daemon's listening socket, made first thing at start, before the daemon imports the rest of
itself (asyncio, its routes): from then on a client's connection is accepted by the kernel and waits
in the backlog until the event loop serves it, instead of being refused. A readiness probe (the
kubelet's, the SDK's health check) that comes while the daemon still starts is answered late instead
of failing and being retried a period later.

Standard library `socket` only: this module is imported before anything heavy.
"""

from __future__ import annotations

import socket

TYPE_CHECKING = False  # (not typing's: importing typing costs a daemon 2 ms; mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine
    from typing import Any

BACKLOG = 1024


def listen_early(host: str, port: int, backlog: int = BACKLOG) -> socket.socket | None:
    """A listening TCP socket on `host`:`port` as asyncio's `create_server(host, port,
    reuse_address=True)` would make it, or None when `host` is not one numeric address (a name or ""
    may stand for several addresses: asyncio binds those itself, later). OSError (e.g. the port is
    taken) is the caller's, as it would be from asyncio."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        socket.inet_pton(family, host.split("%", 1)[0])
    except (OSError, ValueError):
        return None
    # IPPROTO_TCP as asyncio's own sockets have: its transports set TCP_NODELAY only on sockets whose
    # proto says TCP, and an accepted socket inherits the listening one's (with proto 0, Nagle held
    # back every SSE event written after an unacknowledged one: ~40 ms per command).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio: "::" is IPv6 only
            sock.bind(socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)[0][4])
        else:
            sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def listen_then_run(
    host: str,
    port: int,
    serve: Callable[[socket.socket | None], Coroutine[Any, Any, None]],
    log_level: str,
    logger: str,
) -> None:
    """A small daemon's start: listen first, then import asyncio and the rest, and run `serve` with
    the socket (None: asyncio binds `host` itself). A port that cannot be had ends the daemon with
    a logged error, as it would from asyncio."""
    error: OSError | None = None
    try:
        sock = listen_early(host, port)
    except OSError as exc:  # e.g. the port is taken
        sock, error = None, exc
    import logging

    from opensandbox_platform.daemon import process  # asyncio and the rest: once the socket listens

    log = logging.getLogger(logger)
    if error is not None:
        process.cannot_start(error, log_level, log)
    process.run(serve(sock), log_level, log)
