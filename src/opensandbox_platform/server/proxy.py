"""`/sandboxes/{id}/proxy/{port}/{path}`: HTTP and WebSocket into a sandbox through the server.

Bodies are streamed both ways (an SSE command stream reaches the client event by event; an
upload is never held in memory). The runtime says where port N of the sandbox is and which
headers to add (the local runtime adds execd's access token, so a client of the proxy needs only
the server's API key). Hop-by-hop headers and the client's credentials are not forwarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import websockets
from fastapi import Request, WebSocket
from starlette.background import BackgroundTask
from starlette.requests import HTTPConnection
from starlette.responses import Response, StreamingResponse
from starlette.websockets import WebSocketDisconnect
from websockets.asyncio.client import ClientConnection

from opensandbox_platform.server import errors, metrics
from opensandbox_platform.server.errors import ApiError, StreamAborted
from opensandbox_platform.server.runtimes.base import Endpoint

log = logging.getLogger("opensandbox.proxy")

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}
NOT_FORWARDED = HOP_BY_HOP | {"open-sandbox-api-key", "authorization", "cookie", "opensandbox-secure-access"}
WS_NOT_FORWARDED = NOT_FORWARDED | {
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-protocol",
    "sec-websocket-accept",
}
TIMEOUT = httpx.Timeout(180.0, connect=10.0)
# With the web console on this origin, a page a sandbox serves through the proxy must not act as
# the console (its script could read /console/api with the user's cookie): it runs in an opaque
# origin, as an iframe's sandbox would (no same-origin reads, no SameSite cookies, Origin "null").
ISOLATED_PAGE = "sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads"


def new_client() -> httpx.AsyncClient:
    # No pool limit: every open SSE stream holds a connection for as long as its command runs.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    return httpx.AsyncClient(timeout=TIMEOUT, limits=limits, follow_redirects=False, trust_env=False)


# Segments of `/sandboxes/{id}/proxy/{port}` when a path is split at "/" (the empty one before the
# first slash included), plus one under /v1; a signed route has its token too.
_PREFIX_SEGMENTS = 5
SIGNED_SEGMENTS = 6


def raw_tail(connection: HTTPConnection, port: int, prefix_segments: int = _PREFIX_SEGMENTS) -> str:
    """The path after `/proxy/{port}` exactly as the client sent it (still percent-encoded), so
    the sandbox receives the same bytes: decoding and re-encoding would turn `%2F` into `/`, and
    a decoded control character cannot be put back into a URL at all."""
    raw = connection.scope.get("raw_path") or connection.url.path.encode()
    segments = bytes(raw).split(b"/")
    skip = prefix_segments + (1 if connection.url.path.startswith("/v1/") else 0)
    return b"/".join(segments[skip:]).decode("latin-1")


def _prefix(connection: HTTPConnection, prefix_segments: int = _PREFIX_SEGMENTS) -> str:
    """`[/v1]/sandboxes/{id}/proxy/{port}` as the client addressed it (decoded)."""
    segments = connection.url.path.split("/")
    return "/".join(segments[: prefix_segments + (1 if connection.url.path.startswith("/v1/") else 0)])


def _target(upstream: Endpoint, path: str, query: str, scheme: str) -> str:
    if any(ord(c) < 0x21 or ord(c) > 0x7E for c in path + query):
        raise errors.invalid("the proxied path and query must be URL-encoded (no spaces or control characters)")
    url = f"{scheme}://{upstream.address}/{path.lstrip('/')}"
    return f"{url}?{query}" if query else url


async def forward_http(
    client: httpx.AsyncClient,
    request: Request,
    upstream: Endpoint,
    path: str,
    prefix_segments: int = _PREFIX_SEGMENTS,
    *,
    isolate: bool = False,
    protected_cookies: frozenset[str] = frozenset(),
) -> Response:
    """Relay `request` to `path` of `upstream`; `isolate`: the answer is confined to an opaque origin
    (ISOLATED_PAGE), and Set-Cookie of `protected_cookies` is dropped (the server's own)."""
    if request.headers.get("upgrade", "").lower() == "websocket":
        raise errors.invalid("a WebSocket upgrade must be sent as a WebSocket request")
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in NOT_FORWARDED]
    headers += list(upstream.headers.items())
    client_host = request.client.host if request.client else ""
    headers += [
        ("x-forwarded-proto", request.url.scheme),
        ("x-forwarded-host", request.headers.get("host", "")),
        ("x-forwarded-for", client_host),
    ]
    has_body = request.method not in ("GET", "HEAD", "OPTIONS")
    try:
        outgoing = client.build_request(
            request.method,
            _target(upstream, path, request.url.query, "http"),
            headers=headers,
            content=_counted(request.stream(), metrics.PROXY_BYTES.labels("http", "to_sandbox")) if has_body else None,
        )
    except (httpx.InvalidURL, UnicodeError) as exc:
        raise errors.invalid(f"cannot proxy this request: {exc}") from None
    try:
        response = await client.send(outgoing, stream=True)
    except httpx.ConnectError as exc:
        raise ApiError(502, errors.BACKEND_CONNECTION_FAILED, f"cannot connect to the sandbox: {exc}") from None
    except httpx.TimeoutException:
        raise ApiError(504, errors.BACKEND_TIMEOUT, "the sandbox did not answer in time") from None
    except httpx.HTTPError as exc:
        raise ApiError(502, errors.BACKEND_RESPONSE_FAILED, f"bad response from the sandbox: {exc}") from None
    relayed = StreamingResponse(
        relay_body(response), status_code=response.status_code, background=BackgroundTask(response.aclose)
    )
    relayed.raw_headers = [
        (k.encode("latin-1"), v.encode("latin-1"))
        for k, v in _response_headers(response, _prefix(request, prefix_segments), isolate, protected_cookies)
    ]
    return relayed


def _response_headers(
    response: httpx.Response, prefix: str, isolate: bool, protected_cookies: frozenset[str]
) -> list[tuple[str, str]]:
    """The sandbox's headers as relayed: each Set-Cookie on its own (but none named as one of the
    server's `protected_cookies`), redirects kept inside the proxy prefix, and with `isolate`
    the page confined to an opaque origin."""
    relayed = []
    for key, value in response.headers.multi_items():
        name = key.lower()
        if name in HOP_BY_HOP:
            continue
        if name == "set-cookie" and value.split("=", 1)[0].strip() in protected_cookies:
            continue
        if name == "location" and value.startswith("/"):
            value = prefix + value
        relayed.append((name, value))
    if isolate:
        relayed.append(("content-security-policy", ISOLATED_PAGE))
    return relayed


async def _counted(chunks: AsyncIterator[bytes], counter: Any) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        counter.inc(len(chunk))
        yield chunk


async def relay_body(response: httpx.Response) -> AsyncIterator[bytes]:
    """The response's body as it comes, counted as bytes from the sandbox."""
    counter = metrics.PROXY_BYTES.labels("http", "from_sandbox")
    try:
        async for chunk in response.aiter_raw():
            counter.inc(len(chunk))
            yield chunk
    except httpx.HTTPError as exc:
        # The sandbox broke its stream (execd died, the sandbox was deleted): break ours too,
        # without the end-of-body marker, so the client sees an error and not a short success.
        raise StreamAborted(f"the sandbox's stream broke: {exc}") from None


async def forward_websocket(websocket: WebSocket, upstream: Endpoint, path: str) -> None:
    headers = [(k, v) for k, v in websocket.headers.items() if k.lower() not in WS_NOT_FORWARDED]
    headers += list(upstream.headers.items())
    subprotocols = [p.strip() for p in websocket.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    url = _target(upstream, path, websocket.url.query, "ws")
    try:
        backend = await websockets.connect(
            url,
            additional_headers=headers,
            subprotocols=subprotocols or None,  # type: ignore[arg-type]
            max_size=None,
            open_timeout=10,
        )
    except (OSError, websockets.InvalidHandshake, TimeoutError) as exc:
        log.info("websocket backend unavailable url=%s error=%s", url, exc)
        await websocket.close(code=1011, reason="sandbox unavailable")
        return
    async with backend:
        await websocket.accept(subprotocol=backend.subprotocol)
        await relay_frames(websocket, backend)


async def relay_frames(websocket: WebSocket, backend: ClientConnection, max_client_message: int = 0) -> None:
    """Relays messages both ways until either side closes (the other is then closed with its code).
    With `max_client_message`, a larger message from the client closes both with 1009."""
    to_sandbox = metrics.PROXY_BYTES.labels("websocket", "to_sandbox")
    from_sandbox = metrics.PROXY_BYTES.labels("websocket", "from_sandbox")

    async def client_to_backend() -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                await backend.close(message.get("code", 1000))
                return
            data = message.get("bytes") or message.get("text") or b""
            if max_client_message and len(data) > max_client_message:
                await backend.close(1009)
                with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                    await websocket.close(code=1009, reason="message too big")
                return
            if message.get("bytes") is not None:
                to_sandbox.inc(len(message["bytes"]))
                await backend.send(message["bytes"])
            elif message.get("text") is not None:
                to_sandbox.inc(len(message["text"].encode()))
                await backend.send(message["text"])

    async def backend_to_client() -> None:
        try:
            async for frame in backend:
                from_sandbox.inc(len(frame) if isinstance(frame, bytes) else len(frame.encode()))
                if isinstance(frame, bytes):
                    await websocket.send_bytes(frame)
                else:
                    await websocket.send_text(frame)
        except websockets.ConnectionClosed:
            pass
        code = backend.close_code or 1000
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await websocket.close(code=code if code != 1005 else 1000)

    tasks = [asyncio.create_task(client_to_backend()), asyncio.create_task(backend_to_client())]
    metrics.PROXY_WEBSOCKETS.inc()
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        metrics.PROXY_WEBSOCKETS.dec()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
