"""The web console's routes under `/console` (docs/observability.md, "Web console").

Pages: `/console` (the sandbox list and a sandbox's page, one small script) and `/console/login`.
JSON (and the diagnostics' plain text) for the page under `/console/api/` (the lifecycle and
diagnostics routes' own handlers, behind the session cookie instead of the API key header;
credentials in their answers left out), and the terminal: a WebSocket that opens a shell on a PTY of
the sandbox's execd (`POST /pty`) and relays execd's terminal protocol (`/pty/{id}/ws`) both ways.

Every console response carries a strict Content-Security-Policy (scripts only from /console/static,
no inline script); the page builds its DOM with textContent, never HTML from data, so what a sandbox
prints or puts in its metadata is shown as text.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlsplit

import httpx
import websockets
from fastapi import APIRouter, Depends, Query, Request, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.requests import HTTPConnection
from starlette.staticfiles import StaticFiles

from opensandbox_platform.api import labels
from opensandbox_platform.server import diagnostics, errors, metrics, proxy, routes
from opensandbox_platform.server.console.session import COOKIE, CSRF_HEADER, Signer
from opensandbox_platform.server.errors import ApiError
from opensandbox_platform.server.models import RenewRequest

log = logging.getLogger("opensandbox.console")

STATIC = Path(__file__).parent / "static"
VENDOR = STATIC / "vendor"
PREFIX = "/console"
MAX_LOGIN_BODY = 4096
MAX_TERMINAL_MESSAGE = 64 * 1024  # execd's own limit for one client message (execd/pty.py)
MAX_EXECD_JSON = 4 * 1024 * 1024  # a directory listing or a metrics sample from the sandbox's execd
MAX_ENTRIES = 2000  # entries of one directory shown
CSP = (
    "default-src 'none'; script-src 'self'; connect-src 'self'; img-src 'self'; font-src 'self'; "
    # xterm.js sizes its rows with <style> elements it creates: inline styles, never inline script.
    "style-src 'self' 'unsafe-inline'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),  # no-referrer would make a form's Origin "null"
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
]

router = APIRouter(prefix=PREFIX, include_in_schema=False)


def signer_of(connection: HTTPConnection) -> Signer:
    signer: Signer = connection.app.state.console_signer
    return signer


def _same_origin(connection: HTTPConnection) -> bool:
    """A browser's Origin (sent on every POST and WebSocket) names this server; absent: not a browser."""
    origin = connection.headers.get("origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc == connection.headers.get("host", "")


def require_login(request: Request) -> Signer:
    signer = signer_of(request)
    if not signer.valid(request.cookies.get(COOKIE)):
        raise ApiError(401, errors.MISSING_API_KEY, "log in to the console first (/console/login)")
    return signer


def require_csrf(request: Request, signer: Annotated[Signer, Depends(require_login)]) -> Signer:
    if not _same_origin(request) or not signer.csrf_ok(request.cookies.get(COOKIE), request.headers.get(CSRF_HEADER)):
        raise ApiError(403, errors.INVALID_API_KEY, f"a console call that changes something needs {CSRF_HEADER}")
    return signer


def _page(name: str, status: int = 200, replace: tuple[str, str] | None = None) -> HTMLResponse:
    html = (STATIC / name).read_text()
    if replace is not None:
        html = html.replace(*replace)
    return HTMLResponse(html, status, headers={"cache-control": "no-store"})


# -- pages ------------------------------------------------------------------------------------


@router.get("")
@router.get("/")
async def console_page(request: Request) -> Response:
    if not signer_of(request).valid(request.cookies.get(COOKIE)):
        return RedirectResponse(f"{PREFIX}/login", 303)
    return _page("index.html")


@router.get("/login")
async def login_page(request: Request) -> Response:
    if signer_of(request).open:
        return RedirectResponse(f"{PREFIX}/", 303)
    return _page("login.html")


@router.post("/login")
async def login(request: Request) -> Response:
    signer = signer_of(request)
    if not _same_origin(request):
        return _page("login.html", 403, ("<!--message-->", "<p class=error>Log in from this server's own page.</p>"))
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_LOGIN_BODY:
            return _page("login.html", 413, ("<!--message-->", "<p class=error>That key is too long.</p>"))
    given = parse_qs(body.decode("latin-1")).get("api_key", [""])[0]
    if not signer.key_matches(given):
        return _page("login.html", 401, ("<!--message-->", "<p class=error>Wrong API key.</p>"))
    response = RedirectResponse(f"{PREFIX}/", 303)
    config = routes.config_of(request).console
    response.set_cookie(
        COOKIE,
        signer.issue(),
        max_age=int(signer.lifetime),
        path=PREFIX,
        secure=config.secure_cookie,
        httponly=True,
        samesite="strict",
    )
    return response


@router.post("/logout", status_code=204)
async def logout(request: Request, _: Annotated[Signer, Depends(require_csrf)]) -> Response:
    response = Response(status_code=204)
    response.delete_cookie(COOKIE, path=PREFIX, secure=routes.config_of(request).console.secure_cookie, httponly=True)
    return response


# -- JSON for the page ------------------------------------------------------------------------


@router.get("/api/session")
async def session(request: Request, signer: Annotated[Signer, Depends(require_login)]) -> JSONResponse:
    config = routes.config_of(request)
    return JSONResponse(
        {
            "csrf": signer.csrf(request.cookies.get(COOKIE)),
            "open": signer.open,
            "runtime": config.runtime.type,
            "terminal": config.console.terminal and (VENDOR / "xterm.js").is_file(),
            "terminalMissing": "" if (VENDOR / "xterm.js").is_file() else "tools/vendor-console.sh was not run",
        },
        headers={"cache-control": "no-store"},
    )


@router.get("/api/sandboxes", dependencies=[Depends(require_login)])
async def list_sandboxes(
    request: Request,
    state: Annotated[list[str], Query()] = [],  # noqa: B006 - FastAPI copies a query list's default
    metadata: str | None = None,
    page: Annotated[int, Query(ge=1)] = 1,
    page_size: Annotated[int, Query(alias="pageSize", ge=1, le=200)] = 20,
) -> JSONResponse:
    return await routes.list_sandboxes(request, state=state, metadata=metadata, page=page, page_size=page_size)


@router.get("/api/sandboxes/{sandboxId}", dependencies=[Depends(require_login)])
async def get_sandbox(request: Request, sandbox_id: routes.SandboxId) -> JSONResponse:
    return await routes.get_sandbox(request, sandbox_id)


@router.post("/api/sandboxes/{sandboxId}/renew", dependencies=[Depends(require_csrf)])
async def renew(request: Request, sandbox_id: routes.SandboxId) -> JSONResponse:
    """`{"seconds": N}`: the expiry becomes now + N (the lifecycle API's own checks apply)."""
    body = await request.json()
    seconds = body.get("seconds") if isinstance(body, dict) else None
    if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds <= 0:
        raise errors.invalid('renew needs {"seconds": N} with N > 0')
    expires_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)
    renewed = await routes.renew_expiration(request, sandbox_id, RenewRequest(expires_at=expires_at))
    return JSONResponse(renewed.model_dump(mode="json", by_alias=True))


# -- endpoints and diagnostics: the API's own answers, without the credentials they may carry ---


@router.get("/api/sandboxes/{sandboxId}/endpoints/{port}", dependencies=[Depends(require_login)])
async def endpoint(
    request: Request,
    sandbox_id: routes.SandboxId,
    port: routes.Port,
    use_server_proxy: bool = False,
    expires_in: Annotated[int | None, Query(alias="expiresIn", ge=1)] = None,
) -> JSONResponse:
    """Where port N of the sandbox is reached (`GET /sandboxes/{id}/endpoints/{port}`, its checks),
    or with `expiresIn` a signed URL through the server valid that many seconds. The headers of the
    answer are credentials (execd's access token, a secureAccess token): the page gets their names."""
    expires = int(time.time()) + expires_in if expires_in is not None else None
    found = await routes.get_endpoint(
        request, sandbox_id, port, use_server_proxy=use_server_proxy, expires=None if expires is None else str(expires)
    )
    return JSONResponse(
        {
            "port": port,
            "endpoint": found.endpoint,
            "headerNames": sorted(found.headers or {}),
            "expiresAt": dt.datetime.fromtimestamp(expires, dt.UTC).isoformat() if expires is not None else None,
        },
        headers={"cache-control": "no-store"},
    )


@router.get("/api/sandboxes/{sandboxId}/diagnostics/logs", dependencies=[Depends(require_login)])
async def logs(
    request: Request, sandbox_id: routes.SandboxId, tail: Annotated[int, Query(ge=1, le=100_000)] = 200
) -> Response:
    """The sandbox's last `tail` lines of output, as the API's plain text (the page shows it as text)."""
    return _no_store(await diagnostics.diagnostic_logs(request, sandbox_id, scope=None, tail=tail, since=None))


@router.get("/api/sandboxes/{sandboxId}/diagnostics/events", dependencies=[Depends(require_login)])
async def events(
    request: Request, sandbox_id: routes.SandboxId, limit: Annotated[int, Query(ge=1, le=10_000)] = 200
) -> Response:
    """The sandbox's lifecycle events (the server's and the runtime's), as the API's plain text."""
    return _no_store(await diagnostics.diagnostic_events(request, sandbox_id, scope=None, limit=limit))


def _no_store(response: Response) -> Response:
    response.headers["cache-control"] = "no-store"  # a sandbox's output may hold its secrets
    return response


# -- files and resources, from the sandbox's execd -----------------------------------------------
# execd runs inside the sandbox, so its answers are the sandbox's: sizes are capped, JSON is
# checked and reduced to known fields, and a download is always an attachment of opaque bytes.


async def _execd_get(request: Request, sandbox_id: str, path: str, params: dict[str, str]) -> Any:
    """execd's JSON answer to GET `path` (at most MAX_EXECD_JSON bytes); its own 4xx passed on."""
    upstream = await routes.runtime_of(request).upstream(sandbox_id, labels.EXECD_PORT)
    client: httpx.AsyncClient = request.app.state.http
    try:
        async with client.stream(
            "GET", f"http://{upstream.address}{path}", params=params, headers=upstream.headers, timeout=30
        ) as response:
            body = b""
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_EXECD_JSON:
                    raise ApiError(502, errors.BACKEND_RESPONSE_FAILED, "execd's answer is too large to show")
    except httpx.HTTPError as exc:
        raise ApiError(502, errors.BACKEND_CONNECTION_FAILED, f"cannot reach the sandbox's execd: {exc}") from None
    try:
        data = json.loads(body)
    except ValueError:
        raise ApiError(502, errors.BACKEND_RESPONSE_FAILED, "execd answered with something that is not JSON") from None
    if response.status_code != 200:
        _raise_execd_error(response.status_code, data)
    return data


def _raise_execd_error(status: int, data: Any) -> None:
    known = isinstance(data, dict) and isinstance(data.get("code"), str) and isinstance(data.get("message"), str)
    if 400 <= status < 500 and known:
        raise ApiError(status, data["code"][:100], data["message"][:500])
    raise ApiError(502, errors.BACKEND_RESPONSE_FAILED, f"execd answered {status}")


def _entry(raw: Any) -> dict[str, Any] | None:
    if not isinstance(raw, dict) or not isinstance(raw.get("path"), str):
        return None
    size = raw.get("size")
    return {
        "path": raw["path"],
        "type": raw.get("type") if raw.get("type") in ("file", "directory", "symlink", "other") else "other",
        "size": size if isinstance(size, int) and not isinstance(size, bool) else None,
        "modifiedAt": raw.get("modified_at") if isinstance(raw.get("modified_at"), str) else None,
        "mode": raw.get("mode") if isinstance(raw.get("mode"), int) else None,
    }


@router.get("/api/sandboxes/{sandboxId}/files", dependencies=[Depends(require_login)])
async def list_files(
    request: Request, sandbox_id: routes.SandboxId, path: Annotated[str, Query(min_length=1)]
) -> JSONResponse:
    """One directory's entries (execd's `/directories/list`, depth 1), at most MAX_ENTRIES."""
    raw = await _execd_get(request, sandbox_id, "/directories/list", {"path": path, "depth": "1"})
    entries = [e for e in map(_entry, raw if isinstance(raw, list) else []) if e is not None]
    return JSONResponse({"path": path, "entries": entries[:MAX_ENTRIES], "truncated": len(entries) > MAX_ENTRIES})


@router.get("/api/sandboxes/{sandboxId}/files/download", dependencies=[Depends(require_login)])
async def download(
    request: Request, sandbox_id: routes.SandboxId, path: Annotated[str, Query(min_length=1)]
) -> StreamingResponse:
    """The file's bytes, streamed, always as an attachment of opaque type: never shown in the page."""
    upstream = await routes.runtime_of(request).upstream(sandbox_id, labels.EXECD_PORT)
    client: httpx.AsyncClient = request.app.state.http
    outgoing = client.build_request(
        "GET", f"http://{upstream.address}/files/download", params={"path": path}, headers=upstream.headers
    )
    try:
        response = await client.send(outgoing, stream=True)
    except httpx.HTTPError as exc:
        raise ApiError(502, errors.BACKEND_CONNECTION_FAILED, f"cannot reach the sandbox's execd: {exc}") from None
    if response.status_code != 200:
        body = await response.aread()
        await response.aclose()
        with contextlib.suppress(ValueError):
            _raise_execd_error(response.status_code, json.loads(body[:MAX_EXECD_JSON]))
        raise ApiError(502, errors.BACKEND_RESPONSE_FAILED, f"execd answered {response.status_code}")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", path.rstrip("/").rsplit("/", 1)[-1])[:100] or "download"
    headers = {"content-disposition": f'attachment; filename="{name}"', "cache-control": "no-store"}
    if response.headers.get("content-length", "").isdigit():
        headers["content-length"] = response.headers["content-length"]
    return StreamingResponse(
        proxy.relay_body(response),
        media_type="application/octet-stream",
        headers=headers,
        background=BackgroundTask(response.aclose),
    )


@router.post("/api/sandboxes/{sandboxId}/files/upload", dependencies=[Depends(require_csrf)], response_class=Response)
async def upload(request: Request, sandbox_id: routes.SandboxId, path: Annotated[str, Query(min_length=1)]) -> Response:
    """The request's body becomes the file `path` (execd's multipart upload, streamed: never held)."""
    if not path.startswith("/") or "\x00" in path:
        raise errors.invalid("upload needs an absolute path")
    upstream = await routes.runtime_of(request).upstream(sandbox_id, labels.EXECD_PORT)
    client: httpx.AsyncClient = request.app.state.http
    boundary = secrets.token_hex(16)
    head = (
        f'--{boundary}\r\ncontent-disposition: form-data; name="metadata"\r\ncontent-type: application/json\r\n\r\n'
        f"{json.dumps({'path': path})}\r\n"
        f'--{boundary}\r\ncontent-disposition: form-data; name="file"; filename="upload"\r\n'
        "content-type: application/octet-stream\r\n\r\n"
    ).encode()

    async def body() -> AsyncIterator[bytes]:
        yield head
        async for chunk in request.stream():
            metrics.PROXY_BYTES.labels("http", "to_sandbox").inc(len(chunk))
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    try:
        response = await client.post(
            f"http://{upstream.address}/files/upload",
            content=body(),
            headers={**upstream.headers, "content-type": f"multipart/form-data; boundary={boundary}"},
        )
    except httpx.HTTPError as exc:
        raise ApiError(502, errors.BACKEND_CONNECTION_FAILED, f"cannot reach the sandbox's execd: {exc}") from None
    if response.status_code not in (200, 204):
        with contextlib.suppress(ValueError):
            _raise_execd_error(response.status_code, json.loads(response.content[:MAX_EXECD_JSON]))
        raise ApiError(502, errors.BACKEND_RESPONSE_FAILED, f"execd answered {response.status_code}")
    return Response(status_code=204)


@router.get("/api/sandboxes/{sandboxId}/resources", dependencies=[Depends(require_login)])
async def resources(request: Request, sandbox_id: routes.SandboxId) -> JSONResponse:
    """A CPU and memory sample (execd's `/metrics`), its numbers only."""
    raw = await _execd_get(request, sandbox_id, "/metrics", {})
    fields = ("cpu_count", "cpu_used_pct", "mem_total_mib", "mem_used_mib", "timestamp")
    sample = {k: raw.get(k) for k in fields} if isinstance(raw, dict) else {}
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in sample.values()) or len(sample) < 5:
        raise ApiError(502, errors.BACKEND_RESPONSE_FAILED, "execd's metrics are not what they should be")
    return JSONResponse(sample, headers={"cache-control": "no-store"})


# -- the terminal -----------------------------------------------------------------------------


@router.websocket("/api/sandboxes/{sandboxId}/terminal")
async def terminal(websocket: WebSocket, sandbox_id: routes.SandboxId) -> None:
    """A shell on a new PTY of the sandbox's execd, for as long as this WebSocket lives."""
    signer = signer_of(websocket)
    if not signer.valid(websocket.cookies.get(COOKIE)) or not _same_origin(websocket):
        await websocket.close(code=1008, reason="log in to the console first")
        return
    if not routes.config_of(websocket).console.terminal:
        await websocket.close(code=1008, reason="the console's terminal is off (console.terminal)")
        return
    client: httpx.AsyncClient = websocket.app.state.http
    try:
        upstream = await routes.runtime_of(websocket).upstream(sandbox_id, labels.EXECD_PORT)
        pty_id = await _create_pty(client, upstream)
    except ApiError as exc:
        await websocket.close(code=1011, reason=exc.code[:100])
        return
    base = f"{upstream.address}/pty/{pty_id}"
    try:
        async with websockets.connect(
            f"ws://{base}/ws",
            additional_headers=list(upstream.headers.items()),
            max_size=4 * 1024 * 1024,  # one output frame of execd is at most 16 KiB; replay 256 KiB
            open_timeout=10,
        ) as backend:
            await websocket.accept()
            await proxy.relay_frames(websocket, backend, max_client_message=MAX_TERMINAL_MESSAGE)
    except (OSError, websockets.InvalidHandshake, TimeoutError) as exc:
        log.info("terminal of %s unavailable: %s", sandbox_id, exc)
        with contextlib.suppress(RuntimeError):
            await websocket.close(code=1011, reason="the sandbox's terminal is unavailable")
    finally:
        with contextlib.suppress(httpx.HTTPError):
            await client.delete(f"http://{base}", headers=upstream.headers, timeout=5)


async def _create_pty(client: httpx.AsyncClient, upstream: Any) -> str:
    try:
        response = await client.post(f"http://{upstream.address}/pty", json={}, headers=upstream.headers, timeout=10)
    except httpx.HTTPError as exc:
        raise ApiError(502, errors.BACKEND_CONNECTION_FAILED, f"cannot reach the sandbox's execd: {exc}") from None
    if response.status_code != 200:
        raise ApiError(502, errors.BACKEND_RESPONSE_FAILED, f"execd refused a terminal: {response.text[:200]}")
    session_id = response.json().get("session_id")
    if not isinstance(session_id, str) or not session_id.isalnum():
        raise ApiError(502, errors.BACKEND_RESPONSE_FAILED, "execd answered without a terminal id")
    return session_id


# -- headers and static files -----------------------------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


class SecurityHeaders:
    """ASGI middleware: the console's responses carry the CSP and its companions."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]], send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == PREFIX or path.startswith(PREFIX + "/")):
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


def static_files() -> StaticFiles:
    """/console/static: the page's script and style, and the vendored xterm.js (when vendored)."""
    return StaticFiles(directory=STATIC, check_dir=True)
