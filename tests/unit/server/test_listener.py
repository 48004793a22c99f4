"""The server's listener: the head meter (pure) and uvicorn's protocol hooks it relies on."""

from __future__ import annotations

import inspect

import pytest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from opensandbox_platform.daemon.http import Limits
from opensandbox_platform.server import listener
from opensandbox_platform.server.config import ServerSection


def test_a_head_within_limits_passes_in_any_pieces() -> None:
    head = b"GET /v1/sandboxes HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\r\n"
    for size in (1, 2, 3, 7, len(head)):
        meter = listener.HeadMeter(64, 128)
        results = [meter.feed(head[i : i + size]) for i in range(0, len(head), size)]
        assert results == [None] * len(results) and meter.done


def test_a_long_request_line_is_414_even_before_its_end() -> None:
    meter = listener.HeadMeter(16, 1024)
    assert meter.feed(b"GET /0123456") is None
    assert meter.feed(b"789abcdef") == 414


def test_a_large_head_is_431_and_the_body_after_it_is_not_counted() -> None:
    meter = listener.HeadMeter(64, 100)
    assert meter.feed(b"GET / HTTP/1.1\r\n") is None
    assert meter.feed(b"X-Big: " + b"a" * 100) == 431
    meter = listener.HeadMeter(64, 100)
    assert meter.feed(b"POST / HTTP/1.1\r\nContent-Length: 500\r\n\r\n" + b"b" * 500) is None
    assert meter.done and meter.feed(b"c" * 5000) is None


def test_the_head_end_split_across_pieces_is_found() -> None:
    meter = listener.HeadMeter(64, 40)
    for piece in (b"GET / HTTP/1.1\r\nA: b\r", b"\n", b"\r", b"\nBODY-BYTES-THAT-DO-NOT-COUNT"):
        assert meter.feed(piece) is None
    assert meter.done


def test_error_responses_are_json_and_close() -> None:
    raw = listener.error_bytes(431, "request head too large")
    assert raw.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b"connection: close" in raw and raw.endswith(b'"message": "request head too large"}')
    assert b"retry-after: 1" in listener.error_bytes(503, "busy")


def test_limits_come_from_the_server_section() -> None:
    section = ServerSection(maxConnections=100, headerTimeoutSeconds=3, maxHeaderBytes=9000, maxRequestLineBytes=4000)
    assert listener.limits_of(section) == Limits(
        max_head_bytes=9000, max_request_line=4000, head_timeout=3.0, keep_alive_timeout=20.0, max_connections=100
    )


def test_a_connection_cap_above_the_descriptor_limit_is_lowered() -> None:
    assert listener.connection_cap(10**9) < 10**9
    assert listener.connection_cap(16) == 16


@pytest.mark.parametrize(
    "hook",
    [
        "connection_made",
        "connection_lost",
        "data_received",
        "on_headers_complete",
        "on_message_complete",
        "on_response_complete",
        "handle_websocket_upgrade",
        "send_400_response",
    ],
)
def test_the_uvicorn_hooks_we_extend_still_exist(hook: str) -> None:
    """server/listener.py extends these of uvicorn's HttpToolsProtocol: fail loudly if one goes."""
    assert inspect.isfunction(getattr(HttpToolsProtocol, hook))
    source = inspect.getsource(HttpToolsProtocol)
    assert "self.transport = transport" in source and "self.loop = " in source
