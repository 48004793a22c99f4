"""The server's HTTP listener: uvicorn's httptools protocol with the limits uvicorn lacks.

uvicorn (0.54, httptools) reads a request head of any size, never closes a connection that has
not sent a complete request yet (its keep-alive timer only starts after a first response), and
caps connections only by answering 503 to everyone past `limit_concurrency`. One 96 MiB header
made every other client wait seconds; ten thousand idle sockets without an API key exhausted the
server's file descriptors. This protocol adds, before any byte reaches the parser or the app:

- a request line longer than `maxRequestLineBytes` → 414, a head larger than `maxHeaderBytes` →
  431, both `{code, message}` with `Connection: close`;
- a head must be complete `headerTimeoutSeconds` after the connection opened (or after the first
  byte of a later request), else 408 and close; between requests uvicorn's keep-alive timer
  (`keepAliveTimeoutSeconds`) closes idle connections;
- at most `maxConnections` connections: a new one closes the connection idle the longest
  (daemon/connections.py), and is refused with 503 only when every connection is serving a request;
- uvicorn's plain-text 400 for a malformed request becomes `{code, message}`.

The API key is checked by the app (auth.py) right after the head, before any body is read, and
a refusal closes the connection, so a client without a key can neither send a large head nor make
the server read its body. It relies on uvicorn's `HttpToolsProtocol` callbacks
(`connection_made`, `data_received`, `on_headers_complete`, `on_message_complete`,
`on_response_complete`, `handle_websocket_upgrade`, `connection_lost`, `send_400_response`);
tests/unit/server/test_listener.py fails if they change.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import uuid
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from opensandbox_platform.daemon.connections import ConnectionTable
from opensandbox_platform.daemon.http import Limits
from opensandbox_platform.server.config import ServerSection

log = logging.getLogger("opensandbox.server.listener")

# Descriptors kept for everything but client connections: sandboxes' pipes, proxied upstream
# connections, the engine's sockets, log files.
RESERVED_FDS = 1024

_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}
_CODES = {
    400: "SANDBOX::INVALID_PARAMETER",
    408: "REQUEST_TIMEOUT",
    414: "URI_TOO_LONG",
    431: "REQUEST_HEADER_FIELDS_TOO_LARGE",
    503: "SERVER_BUSY",
}


class HeadMeter:
    """Counts a request head's bytes as they arrive, before the parser sees them (pure logic).

    `feed` returns 414 or 431 as soon as the request line or the head is too long; `done` once
    the empty line ending the head has been seen (what follows is body or the next request).
    """

    def __init__(self, max_request_line: int, max_head_bytes: int) -> None:
        self.max_request_line = max_request_line
        self.max_head_bytes = max_head_bytes
        self.reset()

    def reset(self) -> None:
        self.size = 0
        self.done = False
        self._line_ended = False
        self._tail = b""

    @property
    def started(self) -> bool:
        return self.size > 0

    def feed(self, data: bytes) -> int | None:
        if self.done:
            return None
        combined = self._tail + data
        offset = self.size - len(self._tail)  # where combined[0] sits in the head
        if not self._line_ended:
            line_end = combined.find(b"\r\n")
            line_length = offset + (line_end if line_end >= 0 else len(combined))
            if line_length > self.max_request_line:
                return 414
            self._line_ended = line_end >= 0
        head_end = combined.find(b"\r\n\r\n")
        length = offset + head_end + 4 if head_end >= 0 else self.size + len(data)
        if length > self.max_head_bytes:
            return 431
        self.done = head_end >= 0
        self.size += len(data)
        self._tail = combined[-3:]
        return None


def error_bytes(status: int, message: str) -> bytes:
    """A complete `{code, message}` response that closes the connection."""
    body = json.dumps({"code": _CODES.get(status, "SANDBOX::INVALID_PARAMETER"), "message": message}).encode()
    headers = [
        b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Error")),
        b"content-type: application/json",
        b"content-length: %d" % len(body),
        b"x-request-id: " + uuid.uuid4().hex.encode(),
        b"connection: close",
    ]
    if status == 503:
        headers.append(b"retry-after: 1")
    return b"\r\n".join(headers) + b"\r\n\r\n" + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """One client connection; `protocol_class` binds the limits and the listener's connection table."""

    limits: ClassVar[Limits]
    table: ClassVar[ConnectionTable[GuardedHttpToolsProtocol]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._meter = HeadMeter(self.limits.max_request_line, self.limits.max_head_bytes)
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False

    # -- connection ----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        admitted, victims = self.table.admit(self)
        for victim in victims:
            victim.transport.close()
        if not admitted:
            log.warning("connection refused: %d connections, all serving requests", len(self.table))
            self._refuse(503, "too many connections; retry shortly")
            return
        self._arm_head_timer()  # the first request's head must be complete in time

    def connection_lost(self, exc: Exception | None) -> None:
        self.table.remove(self)
        self._cancel_head_timer()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self) -> None:
        # The WebSocket protocol takes the transport over; it is no longer ours to count.
        self.table.remove(self)
        self._cancel_head_timer()
        super().handle_websocket_upgrade()

    # -- the head ------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if not self._meter.done:
            if not self._meter.started and self._head_timer is None:
                self._arm_head_timer()  # a later request: its head is timed from its first byte
            status = self._meter.feed(data)
            if status is not None:
                what = "request line" if status == 414 else "request head"
                self._refuse(status, f"{what} too large")
                return
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        self.table.busy(self)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._meter.reset()  # what follows is the next request's head

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.table.idle(self)

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, f"malformed HTTP request: {msg}")

    # -- helpers -------------------------------------------------------------------------------
    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.limits.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._meter.started:
            self._refuse(408, "the request head did not arrive in time")
        elif not self.transport.is_closing():
            self.transport.close()  # connected and silent: nothing to answer

    def _refuse(self, status: int, message: str) -> None:
        self._refused = True
        self._cancel_head_timer()
        if not self.transport.is_closing():
            self.transport.write(error_bytes(status, message))
            self.transport.close()


def limits_of(server: ServerSection) -> Limits:
    return Limits(
        max_head_bytes=server.max_header_bytes,
        max_request_line=server.max_request_line_bytes,
        head_timeout=server.header_timeout_seconds,
        keep_alive_timeout=server.keep_alive_timeout_seconds,
        max_connections=connection_cap(server.max_connections),
    )


def connection_cap(wanted: int) -> int:
    """`wanted`, lowered to what the process's descriptor limit leaves for clients (after raising
    the soft limit to the hard one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    available = max(soft - RESERVED_FDS, soft // 2)
    if wanted > available:
        log.warning("server.maxConnections %d lowered to %d (RLIMIT_NOFILE %d)", wanted, available, soft)
        return available
    return wanted


def protocol_class(limits: Limits) -> type[GuardedHttpToolsProtocol]:
    """A protocol class for uvicorn's `http=`, with its own connection table."""
    table: ConnectionTable[GuardedHttpToolsProtocol] = ConnectionTable(limits.max_connections)
    return type("ServerHttpProtocol", (GuardedHttpToolsProtocol,), {"limits": limits, "table": table})
