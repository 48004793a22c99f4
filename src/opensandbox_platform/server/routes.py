"""The lifecycle routes (specs/sandbox-lifecycle.yml), mounted at `/` and at `/v1`."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import time
from typing import Annotated, Any, TypeVar
from urllib.parse import parse_qsl

import httpx
from fastapi import APIRouter, Body, Path, Query, Request, Response, WebSocket
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from opensandbox_platform.api import labels
from opensandbox_platform.server import errors, metrics, proxy, validation
from opensandbox_platform.server.admission import Admission, ClientGone
from opensandbox_platform.server.auth import API_KEY_CHECKED
from opensandbox_platform.server.config import Config
from opensandbox_platform.server.console.session import COOKIE as CONSOLE_COOKIE
from opensandbox_platform.server.errors import ApiError
from opensandbox_platform.server.models import (
    CreateSandboxRequest,
    CreateSandboxResponse,
    EndpointModel,
    ErrorResponse,
    ListSandboxesResponse,
    MetadataPatch,
    PaginationInfo,
    RenewRequest,
    RenewResponse,
    SandboxModel,
)
from opensandbox_platform.server.runtimes import guards
from opensandbox_platform.server.runtimes.base import Endpoint, Runtime, SandboxInfo, SandboxSpec, State
from opensandbox_platform.server.runtimes.events import Reason
from opensandbox_platform.server.signing import SECURE_ACCESS_HEADER, SECURE_ACCESS_REQUIRED, Signer

log = logging.getLogger("opensandbox.server")

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 409, 500, 503)}
router = APIRouter(tags=["sandboxes"], responses=ERRORS)  # type: ignore[arg-type]
SandboxId = Annotated[str, Path(alias="sandboxId", min_length=1)]
# The states a list filter may name (any case): the lifecycle spec's and the SDK's, including those
# no runtime here reports (Pausing, Resuming); another name (a typo) is a 400, not an empty page.
STATES = (
    State.PENDING,
    State.RUNNING,
    "Pausing",
    State.PAUSED,
    "Resuming",
    State.STOPPING,
    State.TERMINATED,
    State.FAILED,
    "Unknown",
)


T = TypeVar("T")


def any_case_pattern(names: tuple[str, ...]) -> str:
    """A regex (for the OpenAPI document) matching any of `names` in any case."""
    return "^(?:" + "|".join("".join(f"[{c.upper()}{c.lower()}]" for c in name) for name in names) + ")$"


STATE_PATTERN = any_case_pattern(STATES)
# What `_parse_metadata_filter` accepts: `k=v` pairs joined by `&` (the value may hold `=`).
METADATA_FILTER_PATTERN = r"^(?:[^&=]*=[^&]*(?:&[^&=]*=[^&]*)*)?$"
Port = Annotated[int, Path(ge=1, le=65535, description="a port of the sandbox, 1-65535")]


def as_json(model: BaseModel, status_code: int = 200) -> JSONResponse:
    """Serialize once (camelCase, absent fields omitted); FastAPI would validate a returned model
    against `response_model` again, which doubles the cost of a 200-item list."""
    return JSONResponse(model.model_dump(mode="json", by_alias=True, exclude_none=True), status_code)


def runtime_of(request: Request | WebSocket) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def config_of(request: Request | WebSocket) -> Config:
    config: Config = request.app.state.config
    return config


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: nothing else can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post(
    "/sandboxes",
    status_code=202,
    response_model=CreateSandboxResponse,
    response_model_exclude_none=True,
    responses={429: {"model": ErrorResponse, "description": "too many creates in flight; see Retry-After"}},
)
async def create_sandbox(request: Request, body: CreateSandboxRequest) -> Response:
    runtime = runtime_of(request)
    config = config_of(request)
    spec = validation.create_spec(
        body,
        config.server.max_sandbox_timeout_seconds,
        runtime.capabilities,
        config.server.allowed_host_paths,
        config.egress.max_rules,
    )
    admission: Admission = request.app.state.admission
    gone = asyncio.ensure_future(_client_gone(request))
    started, created = time.perf_counter(), False
    try:
        async with admission.slot(gone):
            info = await runtime.create(spec)
            created = True
        if gone.done():
            # Nobody will learn this sandbox's id: remove it rather than leave it running until
            # its timeout (forever with `timeout: null`).
            log.info("client went away during its create; deleting id=%s", info.id)
            await runtime.delete(info.id)
            return Response(status_code=499)  # not sent: the connection is gone
        _record_created(runtime, spec, info)
    except ClientGone:
        log.info("client went away while its create waited; nothing was created")
        return Response(status_code=499)
    finally:
        gone.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gone
        pooled = bool(spec.extensions.get(labels.EXTENSION_POOL_REF))
        metrics.observe_create(runtime.capabilities.runtime, pooled, created, time.perf_counter() - started)
    return as_json(CreateSandboxResponse.of(info), 202)


@router.get("/sandboxes", response_model=ListSandboxesResponse, response_model_exclude_none=True)
async def list_sandboxes(
    request: Request,
    state: Annotated[
        list[str],
        Query(
            description="repeatable, any case; any of them matches",
            json_schema_extra={"items": {"type": "string", "pattern": STATE_PATTERN}},  # checked below
        ),
    ] = [],  # noqa: B006 - FastAPI copies a query list's default
    metadata: Annotated[
        str | None,
        Query(
            description="URL-encoded k=v&k2=v2; all must match",
            json_schema_extra={"pattern": METADATA_FILTER_PATTERN},  # checked below, with its own error code
        ),
    ] = None,
    page: Annotated[int, Query(ge=1)] = 1,
    page_size: Annotated[int, Query(alias="pageSize", ge=1, le=200)] = 20,
) -> JSONResponse:
    wanted_states = wanted(state, STATES)
    wanted_metadata = _parse_metadata_filter(metadata)
    items = [
        info
        for info in await runtime_of(request).list()
        if (not wanted_states or info.state.lower() in wanted_states)
        and all(info.metadata.get(k) == v for k, v in wanted_metadata)
    ]
    items.sort(key=lambda info: info.created_at, reverse=True)
    window, pagination = paged(items, page, page_size)
    return as_json(ListSandboxesResponse(items=[SandboxModel.of(info) for info in window], pagination=pagination))


def wanted(states: list[str], known: tuple[str, ...]) -> set[str]:
    """A list filter's states, lowercased; one not in `known` (any case) is a 400, not an empty page."""
    found = {s.lower() for s in states}
    unknown = found - {name.lower() for name in known}
    if unknown:
        raise errors.invalid(f"state {sorted(unknown)[0]!r} is not one of {', '.join(known)}")
    return found


def paged(items: list[T], page: int, page_size: int) -> tuple[list[T], PaginationInfo]:
    """Page `page` (from 1) of `items`, and the pagination block the lists answer with."""
    total = len(items)
    pages = math.ceil(total / page_size) if total else 0
    info = PaginationInfo(
        page=page, page_size=page_size, total_items=total, total_pages=pages, has_next_page=page < pages
    )
    return items[(page - 1) * page_size : page * page_size], info


def _record_created(runtime: Runtime, spec: SandboxSpec, info: SandboxInfo) -> None:
    pool = spec.extensions.get(labels.EXTENSION_POOL_REF)
    expiry = f"expires {info.expires_at.isoformat()}" if info.expires_at else "no expiry"
    runtime.events.record(info.id, Reason.CREATED, f"image {spec.image}, {expiry}")
    if pool:
        runtime.events.record(info.id, Reason.CLAIMED, f"a warm pod of Pool {pool}")
    runtime.events.record(info.id, Reason.STARTED, f"{info.state}: {info.message or info.reason}")


def _parse_metadata_filter(raw: str | None) -> list[tuple[str, str]]:
    if not raw:
        return []
    try:
        return parse_qsl(raw, keep_blank_values=True, strict_parsing=True)
    except ValueError as exc:
        raise ApiError(400, errors.INVALID_METADATA_FORMAT, f"metadata filter {raw!r} is malformed: {exc}") from None


@router.get("/sandboxes/{sandboxId}", response_model=SandboxModel, response_model_exclude_none=True)
async def get_sandbox(request: Request, sandbox_id: SandboxId) -> JSONResponse:
    return as_json(SandboxModel.of(await runtime_of(request).get(sandbox_id)))


@router.delete("/sandboxes/{sandboxId}", status_code=204, response_class=Response)
async def delete_sandbox(request: Request, sandbox_id: SandboxId) -> Response:
    runtime = runtime_of(request)
    await runtime.delete(sandbox_id)
    runtime.events.gone(sandbox_id, Reason.DELETED, "deleted through the API")
    return Response(status_code=204)


@router.patch("/sandboxes/{sandboxId}/metadata", response_model=SandboxModel, response_model_exclude_none=True)
async def patch_metadata(
    request: Request,
    sandbox_id: SandboxId,
    patch: Annotated[MetadataPatch, Body()],
) -> JSONResponse:
    validation.check_metadata(patch)
    info: SandboxInfo = await runtime_of(request).patch_metadata(sandbox_id, patch)
    return as_json(SandboxModel.of(info))


@router.post("/sandboxes/{sandboxId}/pause", status_code=202, response_class=Response)
async def pause_sandbox(request: Request, sandbox_id: SandboxId) -> Response:
    runtime = runtime_of(request)
    await _require_pause(runtime, sandbox_id, "pause")
    await runtime.pause(sandbox_id)
    runtime.events.record(sandbox_id, Reason.PAUSED, "paused through the API")
    return Response(status_code=202)


@router.post("/sandboxes/{sandboxId}/resume", status_code=202, response_class=Response)
async def resume_sandbox(request: Request, sandbox_id: SandboxId) -> Response:
    runtime = runtime_of(request)
    await _require_pause(runtime, sandbox_id, "resume")
    await runtime.resume(sandbox_id)
    runtime.events.record(sandbox_id, Reason.RESUMED, "resumed through the API")
    return Response(status_code=202)


async def _require_pause(runtime: Runtime, sandbox_id: str, call: str) -> None:
    if not runtime.capabilities.pause:
        await runtime.get(sandbox_id)  # an unknown sandbox is a 404 first, as on every runtime
        raise guards.not_supported(call, runtime.capabilities.runtime)


@router.post("/sandboxes/{sandboxId}/renew-expiration", response_model=RenewResponse)
async def renew_expiration(request: Request, sandbox_id: SandboxId, body: RenewRequest) -> RenewResponse:
    runtime = runtime_of(request)
    try:
        expires_at = validation.renewed_expiry(
            body.expires_at, dt.datetime.now(dt.UTC), config_of(request).server.max_sandbox_timeout_seconds
        )
    except ApiError:
        await runtime.get(sandbox_id)  # an unknown sandbox is a 404 first, whatever the date
        raise
    info = await runtime.renew(sandbox_id, expires_at)
    assert info.expires_at is not None
    runtime.events.record(sandbox_id, Reason.RENEWED, f"expires {info.expires_at.isoformat()}")
    return RenewResponse(expires_at=info.expires_at)


@router.get("/sandboxes/{sandboxId}/endpoints/{port}", response_model=EndpointModel, response_model_exclude_none=True)
async def get_endpoint(
    request: Request,
    sandbox_id: SandboxId,
    port: Port,
    use_server_proxy: bool = False,
    expires: Annotated[
        str | None,
        Query(description="Unix epoch seconds: a signed URL through the server, valid without the API key until then"),
    ] = None,
) -> EndpointModel:
    runtime = runtime_of(request)
    if expires is not None:
        await runtime.get(sandbox_id)  # 404 for an unknown sandbox
        until = validation.signed_expiry(
            expires, dt.datetime.now(dt.UTC), config_of(request).server.max_signed_endpoint_seconds
        )
        token = signer_of(request).route_token(sandbox_id, port, until)
        return EndpointModel(endpoint=f"{_server_base(request)}/sandboxes/{sandbox_id}/signed/{port}/{token}")
    if use_server_proxy:
        secure = (await runtime.get(sandbox_id)).secure_access  # (404 for an unknown sandbox)
    else:
        endpoint = await runtime.endpoint(sandbox_id, port)
        if not endpoint.secure_access:
            return EndpointModel(endpoint=endpoint.address, headers=endpoint.headers or None)
        secure = True
    # Through the server. A secureAccess sandbox is reached only this way, with its token.
    signer = signer_of(request)
    headers = {SECURE_ACCESS_HEADER: signer.access_token(sandbox_id)} if secure else None
    return EndpointModel(endpoint=f"{_server_base(request)}/sandboxes/{sandbox_id}/proxy/{port}", headers=headers)


def _server_base(request: Request) -> str:
    """host[:port][/v1] of this server as the client addressed it (or server.eip)."""
    base = config_of(request).server.eip or request.url.netloc
    return base + ("/v1" if request.url.path.startswith("/v1/") else "")


def signer_of(request: Request | WebSocket) -> Signer:
    signer: Signer = request.app.state.signer
    return signer


def _check_access(connection: Request | WebSocket, sandbox_id: str, upstream: Endpoint) -> None:
    """The proxy's own check: a secureAccess sandbox needs its token (the API key is not enough);
    a request that came without the API key (it showed a token instead) needs a valid one."""
    token = connection.headers.get(SECURE_ACCESS_HEADER)
    key_checked = bool(connection.scope["state"].get(API_KEY_CHECKED))
    if token is None:
        if upstream.secure_access:
            raise ApiError(
                403,
                SECURE_ACCESS_REQUIRED,
                f"sandbox {sandbox_id} was created with secureAccess: send its endpoint's "
                f"{SECURE_ACCESS_HEADER} header, or use a signed endpoint",
            )
        if not key_checked:  # (the middleware lets a request without the key through only with a token)
            raise ApiError(401, errors.MISSING_API_KEY, "the API key or a secure-access token is needed")
        return
    if upstream.secure_access or not key_checked:
        signer_of(connection).check_access(sandbox_id, token, dt.datetime.now(dt.UTC))


PROXY_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


async def proxy_http(request: Request, sandbox_id: SandboxId, port: Port, path: str = "") -> Response:
    """HTTP into the sandbox's port: status, headers and body are the sandbox's, streamed both ways."""
    upstream = await runtime_of(request).upstream(sandbox_id, port)
    _check_access(request, sandbox_id, upstream)
    client: httpx.AsyncClient = request.app.state.http
    tail = proxy.raw_tail(request, port)
    return await proxy.forward_http(client, request, upstream, tail, **proxy_isolation(request))


def proxy_isolation(request: Request) -> dict[str, Any]:
    """With the web console on this origin, what the proxy relays may not act as it (proxy.py)."""
    if not config_of(request).console.enabled:
        return {}
    return {"isolate": True, "protected_cookies": frozenset({CONSOLE_COOKIE})}


# One route per method, each with its own operationId; the form without a path is the same relay.
for _method in PROXY_METHODS:
    router.add_api_route(
        "/sandboxes/{sandboxId}/proxy/{port}/{path:path}",
        proxy_http,
        methods=[_method],
        tags=["proxy"],
        operation_id=f"proxy_{_method.lower()}",
        responses={502: {"model": ErrorResponse}, 504: {"model": ErrorResponse}},
    )
router.add_api_route("/sandboxes/{sandboxId}/proxy/{port}", proxy_http, methods=PROXY_METHODS, include_in_schema=False)


@router.websocket("/sandboxes/{sandboxId}/proxy/{port}")
@router.websocket("/sandboxes/{sandboxId}/proxy/{port}/{path:path}")
async def proxy_websocket(websocket: WebSocket, sandbox_id: SandboxId, port: int, path: str = "") -> None:
    try:
        if not 1 <= port <= 65535:
            raise ApiError(400, errors.INVALID_PORT, f"port {port} is outside 1-65535")
        upstream = await runtime_of(websocket).upstream(sandbox_id, port)
        _check_access(websocket, sandbox_id, upstream)
    except ApiError as exc:
        await websocket.close(code=1008, reason=exc.code)
        return
    await proxy.forward_websocket(websocket, upstream, proxy.raw_tail(websocket, port))


async def signed_http(request: Request, sandbox_id: SandboxId, port: Port, token: str, path: str = "") -> Response:
    """A signed endpoint: the proxy, authorized by the token in the path instead of the API key."""
    signer_of(request).check_route(sandbox_id, port, token, dt.datetime.now(dt.UTC))
    upstream = await runtime_of(request).upstream(sandbox_id, port)
    client: httpx.AsyncClient = request.app.state.http
    tail = proxy.raw_tail(request, port, proxy.SIGNED_SEGMENTS)
    return await proxy.forward_http(client, request, upstream, tail, proxy.SIGNED_SEGMENTS, **proxy_isolation(request))


SIGNED_PATH = "/sandboxes/{sandboxId}/signed/{port}/{token}"
for _method in PROXY_METHODS:  # one operationId per method, as the proxy's
    router.add_api_route(
        SIGNED_PATH + "/{path:path}",
        signed_http,
        methods=[_method],
        tags=["proxy"],
        operation_id=f"signed_{_method.lower()}",
        responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}, 502: {"model": ErrorResponse}},
    )
router.add_api_route(SIGNED_PATH, signed_http, methods=PROXY_METHODS, include_in_schema=False)


@router.websocket(SIGNED_PATH)
@router.websocket(SIGNED_PATH + "/{path:path}")
async def signed_websocket(websocket: WebSocket, sandbox_id: SandboxId, port: int, token: str, path: str = "") -> None:
    try:
        signer_of(websocket).check_route(sandbox_id, port, token, dt.datetime.now(dt.UTC))
        upstream = await runtime_of(websocket).upstream(sandbox_id, port)
    except ApiError as exc:
        await websocket.close(code=1008, reason=exc.code)
        return
    await proxy.forward_websocket(websocket, upstream, proxy.raw_tail(websocket, port, proxy.SIGNED_SEGMENTS))


@router.post("/metrics/events", status_code=204, response_class=Response, tags=["metrics"])
async def metrics_event(request: Request, body: Annotated[dict[str, object] | None, Body()] = None) -> Response:
    """SDK telemetry: a `sandbox.create` event's `createDurationMs` goes into the histogram
    `opensandbox_sdk_sandbox_create_duration_seconds` of `GET /metrics`."""
    metrics.record_sdk_event(body, request.headers.get("user-agent", ""))
    return Response(status_code=204)
