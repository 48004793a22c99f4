"""API key check and X-Request-ID, as one ASGI middleware so that every response gets both,
401s and unexpected 500s included, and WebSocket upgrades are covered too."""

from __future__ import annotations

import hmac
import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from opensandbox_platform.server import errors

log = logging.getLogger("opensandbox.server")

API_KEY_HEADER = b"open-sandbox-api-key"
REQUEST_ID_HEADER = b"x-request-id"
SECURE_ACCESS_HEADER = b"opensandbox-secure-access"
OPEN_PATHS = ("/health", "/ready", "/version", "/docs", "/redoc", "/openapi.json")
# Routes that carry their own credential, checked by the route itself: a signed route's token (in
# the path), and the proxy of a secureAccess sandbox (its token in SECURE_ACCESS_HEADER).
SIGNED_PATH = re.compile(r"^(?:/v1)?/sandboxes/[^/]+/signed/")
PROXY_PATH = re.compile(r"^(?:/v1)?/sandboxes/[^/]+/proxy/")
# scope["state"][API_KEY_CHECKED]: whether this request proved the API key (or none is configured).
API_KEY_CHECKED = "api_key_checked"
# Routes that check their own credentials: /metrics (the key or a bearer token, server/metrics.py)
# and the web console (its session cookie, server/console/).
SELF_CHECKED = ("/metrics",)
SELF_CHECKED_PREFIXES = ("/console",)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def is_open(path: str) -> bool:
    if path in SELF_CHECKED or any(path == p or path.startswith(p + "/") for p in SELF_CHECKED_PREFIXES):
        return True
    return any(path == p or path.startswith(p + "/") for p in OPEN_PATHS) or path.startswith("/docs")


class AuthAndRequestId:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key.encode()

    def _check(self, scope: Scope) -> tuple[str, str] | None:
        if not self.api_key or is_open(scope["path"]):
            scope["state"][API_KEY_CHECKED] = True
            return None
        given = _header(scope, API_KEY_HEADER)
        if not given and (
            SIGNED_PATH.match(scope["path"])
            or (PROXY_PATH.match(scope["path"]) and _header(scope, SECURE_ACCESS_HEADER))
        ):
            scope["state"][API_KEY_CHECKED] = False
            return None
        if not given:
            return (
                errors.MISSING_API_KEY,
                "Authentication credentials are missing. Provide API key via OPEN-SANDBOX-API-KEY header.",
            )
        if not hmac.compare_digest(given.encode("latin-1"), self.api_key):
            return errors.INVALID_API_KEY, "Authentication credentials are invalid. Check your API key."
        scope["state"][API_KEY_CHECKED] = True
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = _header(scope, REQUEST_ID_HEADER) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        rid = (REQUEST_ID_HEADER, request_id.encode("latin-1"))
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] in ("http.response.start", "websocket.accept", "websocket.http.response.start"):
                started = True
                message["headers"] = [*message.get("headers", ()), rid]
            await send(message)

        denied = self._check(scope)
        if denied is not None:
            if scope["type"] == "websocket":
                await receive()  # websocket.connect
                await send({"type": "websocket.close", "code": 1008, "reason": denied[0]})
                return
            # Closing: the body of a request without a valid key is never read.
            await _json(send_with_id, 401, errors.error_body(*denied), close=True)
            return
        try:
            await self.app(scope, receive, send_with_id)
        except errors.StreamAborted as exc:
            # The response has begun: returning without finishing it makes uvicorn close the
            # connection without the chunked terminator.
            log.warning("response aborted on %s %s: %s", scope.get("method", "WS"), scope["path"], exc)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method", "WS"), scope["path"])
            if scope["type"] == "http" and not started:
                await _json(send_with_id, 500, errors.error_body(errors.INTERNAL_ERROR, "internal error"))


async def _json(send: Send, status: int, body: dict[str, str], close: bool = False) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
