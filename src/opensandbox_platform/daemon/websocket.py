"""WebSocket (RFC 6455) for the small daemons: the handshake, framing, masking, ping/pong, close.

Standard library only, like the rest of `daemon/`: execd's terminal (`/pty/{id}/ws`) is its one
user. A route answers with `accept(request, run)`; the HTTP server (daemon/http.py) writes the
`101 Switching Protocols` and hands the connection to `run(ws)`; the connection closes when `run`
returns.

The peer may be hostile (code in a sandbox can reach execd), so everything is bounded: a message
(all its fragments) larger than `max_message` closes the connection with 1009 before its payload is
read; unmasked client frames, reserved bits, unknown opcodes, fragmented or oversized control frames
and bad close codes close it with 1002, text that is not UTF-8 with 1007. Sends wait for the socket
to drain, so a peer that never reads stops its sender instead of filling memory; a pong waits too,
so a flood of pings from a peer that does not read stops our reading of its frames (TCP pushes back).
No extensions (permessage-deflate) and no subprotocols are negotiated.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from opensandbox_platform.daemon import errors
from opensandbox_platform.daemon.errors import ApiError
from opensandbox_platform.daemon.http import Upgrade

log = logging.getLogger("daemon.websocket")

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
DATA_OPCODES = (TEXT, BINARY)
CONTROL_OPCODES = (CLOSE, PING, PONG)

NORMAL, GOING_AWAY, PROTOCOL_ERROR, UNSUPPORTED_DATA = 1000, 1001, 1002, 1003
INVALID_DATA, POLICY_VIOLATION, TOO_BIG, INTERNAL_ERROR = 1007, 1008, 1009, 1011
# Codes a peer may send (RFC 6455 7.4, and the IANA registry's 1012-1014); 1005/1006/1015 never travel.
_VALID_CODES = {1000, 1001, 1002, 1003, *range(1007, 1015)}
CLOSE_TIMEOUT = 5.0


class Closed(Exception):
    """The connection is closing: the peer's close frame, or a violation we answered with `code`."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"{code} {reason}".strip())
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Message:
    opcode: int  # TEXT or BINARY
    data: bytes

    @property
    def text(self) -> str:
        return self.data.decode()


Run = Callable[["WebSocket"], Awaitable[None]]


def _sha1(data: bytes) -> bytes:
    try:  # CPython's own SHA-1: hashlib would load OpenSSL (~3 MiB of resident memory in every sandbox)
        from _sha1 import sha1  # type: ignore[import-not-found]
    except ImportError:  # pragma: no cover - a Python built without it
        from hashlib import sha1
    digest: bytes = sha1(data).digest()
    return digest


def accept_key(key: str) -> str:
    return binascii.b2a_base64(_sha1(key.encode("latin-1") + GUID), newline=False).decode()


def _tokens(value: str) -> set[str]:
    return {token.strip().lower() for token in value.split(",")}


def accept(method: str, headers: dict[str, str], run: Run, max_message: int = 1024 * 1024) -> Upgrade:
    """The upgrade for a valid opening handshake (RFC 6455 4.2.1); a 4xx ApiError otherwise."""
    if method != "GET":
        raise ApiError(405, errors.METHOD_NOT_ALLOWED, "a WebSocket handshake is a GET", {"allow": "GET"})
    if "websocket" not in _tokens(headers.get("upgrade", "")) or "upgrade" not in _tokens(
        headers.get("connection", "")
    ):
        raise ApiError(426, errors.INVALID_REQUEST_BODY, "this route speaks WebSocket: send Upgrade: websocket",
                       {"upgrade": "websocket", "connection": "Upgrade"})  # fmt: skip
    if headers.get("sec-websocket-version", "").strip() != "13":
        raise ApiError(426, errors.INVALID_REQUEST_BODY, "WebSocket version 13 is required",
                       {"sec-websocket-version": "13"})  # fmt: skip
    key = headers.get("sec-websocket-key", "").strip()
    try:
        valid = len(binascii.a2b_base64(key, strict_mode=True)) == 16
    except (binascii.Error, ValueError):
        valid = False
    if not valid:
        raise errors.bad_request("Sec-WebSocket-Key must be 16 bytes in base64")
    headers = {"upgrade": "websocket", "connection": "Upgrade", "sec-websocket-accept": accept_key(key)}
    return Upgrade(headers, run, max_message)


def _frame(opcode: int, payload: bytes) -> bytes:
    """A final, unmasked frame (servers never mask)."""
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 126, size)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, size)
    return head + payload


def _unmask(payload: bytes, mask: bytes) -> bytes:
    # XOR with the 4-byte key repeated, done as one big integer (no per-byte Python loop).
    if not payload:
        return payload
    key = (mask * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(len(payload), "big")


class WebSocket:
    """One server-side connection after the handshake."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_message: int) -> None:
        self._reader = reader
        self._writer = writer
        self.max_message = max_message
        self.close_sent = False
        self.closed = asyncio.get_running_loop().create_future()  # resolves with the code once closed
        self._reading = False
        self.last_heard = asyncio.get_running_loop().time()

    # -- sending ---------------------------------------------------------------------------------
    async def _send(self, opcode: int, payload: bytes) -> None:
        if self.close_sent:
            raise Closed(self.closed.result() if self.closed.done() else NORMAL, "closing")
        self._writer.write(_frame(opcode, payload))
        await self._writer.drain()

    async def send_text(self, text: str) -> None:
        await self._send(TEXT, text.encode())

    async def send_bytes(self, data: bytes) -> None:
        await self._send(BINARY, data)

    async def ping(self, data: bytes = b"") -> None:
        await self._send(PING, data[:125])

    async def close(self, code: int = NORMAL, reason: str = "") -> None:
        """Send our close frame (once) and wait briefly for the peer's; then drop the connection.
        While `receive` runs elsewhere, that loop reads the peer's answer; otherwise we read it."""
        if not self.close_sent:
            self.close_sent = True
            payload = struct.pack("!H", code) + reason.encode()[:123]
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    self._writer.write(_frame(CLOSE, payload))
                    await self._writer.drain()
                    if self._reading:
                        await asyncio.shield(self.closed)
                    else:
                        while (await self._read_frame())[1] != CLOSE:
                            pass  # data after our close is discarded
            except (Closed, ConnectionError, asyncio.IncompleteReadError, TimeoutError):
                pass
        self._finish(code)

    def abort(self, code: int = INTERNAL_ERROR) -> None:
        """Drop the connection without a closing handshake (a peer that stopped answering)."""
        self.close_sent = True
        self._writer.transport.abort()
        self._finish(code)

    def _finish(self, code: int) -> None:
        if not self.closed.done():
            self.closed.set_result(code)
        self._writer.close()

    # -- receiving -------------------------------------------------------------------------------
    async def receive(self) -> Message:
        """The next data message; control frames are handled on the way. Raises Closed at the end
        (after answering the peer's close, or closing with the code of what it did wrong)."""
        opcode: int | None = None
        parts: list[bytes] = []
        size = 0
        self._reading = True
        try:
            while True:
                fin, frame_opcode, payload = await self._read_frame(self.max_message - size)
                if frame_opcode in CONTROL_OPCODES:
                    await self._control(frame_opcode, payload)
                    continue
                if frame_opcode == CONTINUATION:
                    if opcode is None:
                        raise Closed(PROTOCOL_ERROR, "continuation without a message")
                elif opcode is not None:
                    raise Closed(PROTOCOL_ERROR, "a new message inside a fragmented one")
                else:
                    opcode = frame_opcode
                parts.append(payload)
                size += len(payload)
                if fin:
                    data = b"".join(parts)
                    if opcode == TEXT:
                        try:
                            data.decode()
                        except UnicodeDecodeError:
                            raise Closed(INVALID_DATA, "text is not UTF-8") from None
                    return Message(opcode, data)
        except Closed as closing:
            self._reading = False
            if not self.close_sent:
                await self.close(closing.code, closing.reason)
            self._finish(closing.code)
            raise
        except (ConnectionError, asyncio.IncompleteReadError):
            self._finish(1006)
            raise Closed(1006, "connection lost") from None
        finally:
            self._reading = False

    async def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == PING:
            if not self.close_sent:
                await self._send(PONG, payload)
        elif opcode == CLOSE:
            code = NORMAL
            if len(payload) == 1:
                raise Closed(PROTOCOL_ERROR, "a close payload of one byte")
            if len(payload) >= 2:
                code = struct.unpack("!H", payload[:2])[0]
                if code not in _VALID_CODES and not 3000 <= code <= 4999:
                    raise Closed(PROTOCOL_ERROR, f"close code {code} is not allowed")
                try:
                    reason = payload[2:].decode()
                except UnicodeDecodeError:
                    raise Closed(INVALID_DATA, "close reason is not UTF-8") from None
            else:
                reason = ""
            if not self.close_sent:  # echo the peer's close, then we are done
                self.close_sent = True
                self._writer.write(_frame(CLOSE, payload[:2]))
                await self._writer.drain()
            self._finish(code)
            raise Closed(code, reason)

    async def _read_frame(self, room: int | None = None) -> tuple[bool, int, bytes]:
        """(fin, opcode, unmasked payload) of the next frame, checked against the RFC and `room`
        (the bytes the message in progress may still grow by)."""
        first, second = await self._reader.readexactly(2)
        self.last_heard = asyncio.get_running_loop().time()
        fin, opcode, masked, size = bool(first & 0x80), first & 0x0F, bool(second & 0x80), second & 0x7F
        if first & 0x70:
            raise Closed(PROTOCOL_ERROR, "reserved bits set (no extension was negotiated)")
        if opcode not in (CONTINUATION, *DATA_OPCODES, *CONTROL_OPCODES):
            raise Closed(PROTOCOL_ERROR, f"unknown opcode {opcode}")
        if opcode in CONTROL_OPCODES and (not fin or size > 125):
            raise Closed(PROTOCOL_ERROR, "control frames are single frames of at most 125 bytes")
        if not masked:
            raise Closed(PROTOCOL_ERROR, "client frames must be masked")
        if size == 126:
            size = struct.unpack("!H", await self._reader.readexactly(2))[0]
        elif size == 127:
            size = struct.unpack("!Q", await self._reader.readexactly(8))[0]
            if size >> 63:
                raise Closed(PROTOCOL_ERROR, "payload length with its top bit set")
        limit = self.max_message if room is None else room
        if opcode not in CONTROL_OPCODES and size > limit:
            raise Closed(TOO_BIG, f"messages are limited to {self.max_message} bytes")
        mask = await self._reader.readexactly(4)
        payload = _unmask(await self._reader.readexactly(size), mask)
        return fin, opcode, payload

    async def keepalive(self, interval: float) -> None:
        """Ping every `interval` seconds; a peer silent for three intervals is dropped (1011)."""
        loop = asyncio.get_running_loop()
        while not self.closed.done():
            await asyncio.wait([self.closed], timeout=interval)
            if self.closed.done():
                return
            if loop.time() - self.last_heard > 3 * interval:
                log.info("websocket peer silent for %.0fs: dropped", loop.time() - self.last_heard)
                self.abort()
                return
            try:
                async with asyncio.timeout(interval):
                    await self.ping()
            except (Closed, ConnectionError, TimeoutError):
                self.abort()
                return
