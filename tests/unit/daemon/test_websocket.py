"""daemon/websocket.py on a real HttpServer on 127.0.0.1: a conforming client (the `websockets`
library) for echo, fragments, ping and close; raw sockets for what a hostile peer sends (unmasked
frames, reserved bits, bad UTF-8, oversized control frames, bad close codes, a huge declared
length) and for the handshake's refusals."""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from collections.abc import AsyncIterator

import pytest
import websockets
from websockets.asyncio.client import connect

from opensandbox_platform.daemon import websocket
from opensandbox_platform.daemon.http import AnyResponse, HttpServer, Request, Response
from opensandbox_platform.daemon.websocket import Closed, WebSocket

MAX = 1024


async def _echo(ws: WebSocket) -> None:
    while True:
        try:
            message = await ws.receive()
        except Closed:
            return
        if message.opcode == websocket.TEXT:
            await ws.send_text(message.text)
        else:
            await ws.send_bytes(message.data)


async def _dispatch(request: Request) -> AnyResponse:
    if request.path == "/ws":
        return websocket.accept(request.method, request.headers, _echo, MAX)
    return Response(b"plain")


@pytest.fixture
async def port() -> AsyncIterator[int]:
    server = HttpServer(_dispatch)
    listener = await server.start("127.0.0.1", 0)
    yield listener.sockets[0].getsockname()[1]
    listener.close()
    await server.close()


async def test_a_conforming_client_echoes_text_bytes_and_fragments(port: int) -> None:
    async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
        await ws.send("héllo")
        assert await ws.recv() == "héllo"
        await ws.send(b"\x00\x01\xff" * 100)
        assert await ws.recv() == b"\x00\x01\xff" * 100
        await ws.send(["frag", "mented"])  # one message in three frames (the last empty)
        assert await ws.recv() == "fragmented"
        pong = await ws.ping(b"are you there")
        await asyncio.wait_for(pong, 5)
    assert ws.close_code == 1000


async def test_a_message_over_the_limit_is_closed_1009_even_in_fragments(port: int) -> None:
    async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
        await ws.send(b"x" * (MAX + 1))
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
    assert ws.close_code == 1009
    async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
        await ws.send([b"x" * (MAX // 2), b"y" * (MAX // 2), b"z"])
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
    assert ws.close_code == 1009


# --- raw frames ----------------------------------------------------------------------------------------------
async def _raw(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101 ")
    assert (
        f"sec-websocket-accept: {websocket.accept_key(key)}".encode() in head.lower()
        or websocket.accept_key(key).encode() in head
    )
    return reader, writer


def _frame(
    opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True, rsv: int = 0, size: int | None = None
) -> bytes:
    size = len(payload) if size is None else size
    first = (0x80 if fin else 0) | rsv | opcode
    if size < 126:
        head = struct.pack("!BB", first, (0x80 if mask else 0) | size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", first, (0x80 if mask else 0) | 126, size)
    else:
        head = struct.pack("!BBQ", first, (0x80 if mask else 0) | 127, size)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def _close_code(reader: asyncio.StreamReader) -> int:
    """The code of the server's close frame (skipping data frames before it)."""
    while True:
        first, second = await asyncio.wait_for(reader.readexactly(2), 10)
        size = second & 0x7F
        if size == 126:
            size = struct.unpack("!H", await reader.readexactly(2))[0]
        elif size == 127:
            size = struct.unpack("!Q", await reader.readexactly(8))[0]
        payload = await reader.readexactly(size)
        if first & 0x0F == websocket.CLOSE:
            return int(struct.unpack("!H", payload[:2])[0])


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (_frame(websocket.TEXT, b"plain", mask=False), 1002),  # clients must mask
        (_frame(websocket.TEXT, b"x", rsv=0x40), 1002),  # no extension negotiated
        (_frame(0x3, b"x"), 1002),  # reserved opcode
        (_frame(websocket.PING, b"x" * 126), 1002),  # control frames are small
        (_frame(websocket.PING, b"x", fin=False), 1002),  # and never fragmented
        (_frame(websocket.CONTINUATION, b"x"), 1002),  # nothing to continue
        (_frame(websocket.TEXT, b"\xff\xfe"), 1007),  # text must be UTF-8
        (_frame(websocket.CLOSE, struct.pack("!H", 1005)), 1002),  # a code that never travels
        (_frame(websocket.CLOSE, b"\x03"), 1002),  # a one-byte close payload
        (_frame(websocket.BINARY, b"", size=(1 << 62)), 1009),  # refused before reading a byte of it
    ],
)
async def test_a_hostile_peer_is_closed_with_the_rfc_code(port: int, frame: bytes, code: int) -> None:
    reader, writer = await _raw(port)
    writer.write(frame)
    assert await _close_code(reader) == code
    writer.close()


async def test_a_peers_close_is_echoed_and_the_connection_ends(port: int) -> None:
    reader, writer = await _raw(port)
    writer.write(_frame(websocket.CLOSE, struct.pack("!H", 4321) + b"bye"))
    assert await _close_code(reader) == 4321
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_pings_from_a_peer_that_never_reads_do_not_grow_memory(port: int) -> None:
    """The pongs wait for the socket to drain: the server stops reading, TCP pushes back."""
    _, writer = await _raw(port)
    batch = _frame(websocket.PING, b"p" * 125) * 8000  # ~1 MB
    sent = 0
    try:
        while sent < 200:  # kernel buffers on loopback hold some 10-20 MB each way; 200 MB would mean no push-back
            writer.write(batch)
            await asyncio.wait_for(writer.drain(), 2)
            sent += 1
    except TimeoutError:
        pass
    assert sent < 200, "the server kept reading pings that it could not answer"
    writer.transport.abort()


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n", 426),
        ("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n", 400),
        ("Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n", 426),
    ],
)
async def test_a_bad_handshake_is_a_4xx(port: int, headers: str, status: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /ws HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(f"HTTP/1.1 {status} ".encode())
    writer.close()
