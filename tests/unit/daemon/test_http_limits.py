"""The small daemons' listener under abuse: head limits (414, 431), slow heads (408), idle
connections, the connection cap with the longest idle closed first, HEAD without a body, and
bodies nested too deeply. A real HttpServer on 127.0.0.1 with small limits, raw sockets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from opensandbox_platform.daemon import cli
from opensandbox_platform.daemon import http as httpserver
from opensandbox_platform.daemon.http import HttpServer, Limits, Request, Response, StreamResponse

GONE = asyncio.Event()


async def _dispatch(request: Request) -> httpserver.AnyResponse:
    if request.path == "/json":
        return Response.json({"got": await request.json()})
    if request.path == "/slow":
        await asyncio.sleep(0.5)
        return Response(b"slow")
    if request.path == "/stream":

        async def chunks() -> AsyncIterator[bytes]:
            yield b"one"
            yield b"two"

        return StreamResponse(chunks())
    if request.path == "/until-gone":  # a silent stream (no write to fail) that ends when its client leaves

        async def silent() -> AsyncIterator[bytes]:
            yield b"started"
            await request.disconnected
            GONE.set()

        return StreamResponse(silent())
    if request.path == "/hello":
        return Response(b"hello world", content_type="text/plain")
    raise httpserver.errors.not_found(f"no route for {request.path}")


@pytest.fixture
async def server() -> AsyncIterator[tuple[HttpServer, int]]:
    limits = Limits(
        max_head_bytes=4096, max_request_line=1024, head_timeout=0.4, keep_alive_timeout=0.6, max_connections=3
    )
    srv = HttpServer(_dispatch, limits)
    listener = await srv.start("127.0.0.1", 0)
    yield srv, listener.sockets[0].getsockname()[1]
    listener.close()
    await srv.close()


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def _response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


async def _closed(reader: asyncio.StreamReader, within: float = 5) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), within) == b""
    except ConnectionError:
        return True


async def test_request_line_too_long_is_414_and_head_too_large_is_431(server: tuple[HttpServer, int]) -> None:
    _, port = server
    reader, writer = await _connect(port)
    writer.write(b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = await _response(reader)
    assert status == 414 and json.loads(body)["code"] and headers["connection"] == "close"
    assert await _closed(reader)

    reader, writer = await _connect(port)
    writer.write(b"GET /hello HTTP/1.1\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n")
    status, _, body = await _response(reader)
    assert status == 431 and set(json.loads(body)) == {"code", "message"}
    assert await _closed(reader)

    reader, writer = await _connect(port)  # one header line longer than the reader's buffer
    writer.write(b"GET /hello HTTP/1.1\r\nX-Big: " + b"a" * 70000)
    status, _, _ = await _response(reader)
    assert status == 431


async def test_a_head_trickled_slowly_is_cut_off_with_408(server: tuple[HttpServer, int]) -> None:
    _, port = server
    reader, writer = await _connect(port)
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def trickle() -> None:
        for byte in b"GET /hello HTTP/1.1\r\nX-Slow: " + b"a" * 1000:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.02)

    slowloris = asyncio.create_task(trickle())
    try:
        status, _, _ = await _response(reader)
    finally:
        slowloris.cancel()
        await asyncio.gather(slowloris, return_exceptions=True)
    assert status == 408
    assert loop.time() - started < 1.5


async def test_idle_connections_are_closed(server: tuple[HttpServer, int]) -> None:
    _, port = server
    loop = asyncio.get_running_loop()
    reader, _ = await _connect(port)  # never sends anything: closed after head_timeout
    started = loop.time()
    assert await _closed(reader)
    assert 0.3 < loop.time() - started < 2

    reader, writer = await _connect(port)  # keep-alive: closed keep_alive_timeout after the response
    writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await _response(reader))[0] == 200
    started = loop.time()
    assert await _closed(reader)
    assert 0.5 < loop.time() - started < 2


async def test_at_the_cap_the_longest_idle_connection_makes_room(server: tuple[HttpServer, int]) -> None:
    srv, port = server
    idle = [await _connect(port) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert srv.connection_count == 3
    reader, writer = await _connect(port)
    writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await _response(reader))[0] == 200
    assert await _closed(idle[0][0], within=0.3)  # the oldest idle one went
    assert not idle[1][0].at_eof()
    assert srv.connection_count == 3


async def test_when_every_connection_is_busy_a_new_one_gets_503(server: tuple[HttpServer, int]) -> None:
    _, port = server
    busy = [await _connect(port) for _ in range(3)]
    for _, writer in busy:
        writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.sleep(0.1)
    reader, _ = await _connect(port)
    status, headers, body = await _response(reader)
    assert status == 503 and headers["retry-after"] == "1" and json.loads(body)["code"]
    for reader, _ in busy:
        assert (await _response(reader))[0] == 200


async def test_head_answers_without_a_body_and_keeps_the_connection_usable(server: tuple[HttpServer, int]) -> None:
    _, port = server
    reader, writer = await _connect(port)
    for path in ("/hello", "/nope", "/stream"):
        writer.write(f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 " + (b"404" if path == "/nope" else b"200"))
        if path == "/hello":
            assert b"content-length: 11" in head
    writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = await _response(reader)  # a body after HEAD would have shown up here instead
    assert (status, body) == (200, b"hello world")


async def test_json_nested_too_deeply_is_a_400(server: tuple[HttpServer, int]) -> None:
    _, port = server
    reader, writer = await _connect(port)
    body = b"[" * 100_000 + b"]" * 100_000
    writer.write(b"POST /json HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
    status, _, payload = await _response(reader)
    assert status == 400 and "nested" in json.loads(payload)["message"]


async def test_a_client_closing_a_silent_stream_is_seen_at_once(server: tuple[HttpServer, int]) -> None:
    """No write fails while a stream is silent: the client's FIN itself must end it (a command would
    otherwise run on for seconds of pings after its client left)."""
    GONE.clear()
    reader, writer = await _connect(server[1])
    writer.write(b"GET /until-gone HTTP/1.1\r\nhost: x\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b"started"), 5)
    writer.close()
    await asyncio.wait_for(GONE.wait(), 1)


async def test_a_client_that_half_closes_after_its_request_still_gets_the_answer(
    server: tuple[HttpServer, int],
) -> None:
    reader, writer = await _connect(server[1])
    writer.write(b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n")
    writer.write_eof()
    status, _, body = await _response(reader)
    assert (status, body) == (200, b"hello world")
    writer.close()


def test_limits_come_from_flags_then_environment_then_defaults() -> None:
    options = cli.limit_options("EXECD", {"EXECD_MAX_CONNECTIONS": "7", "EXECD_HEADER_TIMEOUT": "2.5"})
    for argv in (["--keepalive-timeout", "9"], ["--keepalive-t", "9"]):  # the fast path and argparse's
        limits = httpserver.limits_from_args(cli.parse(argv, "execd", "", options))
        assert limits == Limits(max_connections=7, head_timeout=2.5, keep_alive_timeout=9.0)
    assert httpserver.limits_from_env("TASK_EXECUTOR", {"TASK_EXECUTOR_MAX_HEADER_BYTES": "9000"}) == Limits(
        max_head_bytes=9000
    )
    with pytest.raises(ValueError):
        Limits(max_head_bytes=100, max_request_line=1000)
