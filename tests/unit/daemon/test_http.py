"""The small daemons' HTTP core: request parsing and routing."""

from __future__ import annotations

import pytest

from opensandbox_platform.daemon import http as httpserver
from opensandbox_platform.daemon.errors import ApiError


def test_parse_head() -> None:
    head = b"\r\nPOST /files/info?path=a HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\n\r\n"
    method, target, version, headers = httpserver._parse_head(head)
    assert (method, target, version) == ("POST", "/files/info?path=a", "HTTP/1.1")
    assert headers == {"host": "x", "x-a": "1, 2"}


@pytest.mark.parametrize(
    "head",
    [
        b"GET /\r\n\r\n",
        b"GET / HTTP/1.1\r\n folded: header\r\n\r\n",
        b"GET / HTTP/1.1\r\nno-colon\r\n\r\n",
        b"GET / HTTP/1.1\r\nbad name : x\r\n\r\n",
        b"G3T / HTTP/1.1\r\n\r\n",
    ],
)
def test_parse_head_rejects_malformed(head: bytes) -> None:
    with pytest.raises(ApiError) as err:
        httpserver._parse_head(head)
    assert err.value.status == 400


def test_router_matches_params_and_reports_404_and_405() -> None:
    async def handler(request: httpserver.Request) -> httpserver.Response:
        return httpserver.Response()

    router = httpserver.Router()
    router.add("GET", "/command/status/{id}", handler)
    router.add("GET", "/command/{id}/logs", handler)
    assert router.resolve("GET", "/command/status/abc")[1] == {"id": "abc"}
    assert router.resolve("GET", "/command/x1/logs")[1] == {"id": "x1"}
    with pytest.raises(ApiError) as missing:
        router.resolve("GET", "/command/status/")
    assert missing.value.status == 404
    with pytest.raises(ApiError) as wrong_method:
        router.resolve("POST", "/command/status/abc")
    assert wrong_method.value.status == 405 and wrong_method.value.headers == {"allow": "GET, HEAD"}
