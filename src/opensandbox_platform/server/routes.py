"""The lifecycle routes (specs/sandbox-lifecycle.yml), mounted at `/` and at `/v1`."""

from __future__ import annotations

import datetime as dt
import math
from typing import Annotated
from urllib.parse import parse_qsl

import httpx
from fastapi import APIRouter, Body, Path, Query, Request, Response, WebSocket
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from opensandbox_platform.server import errors, proxy, validation
from opensandbox_platform.server.config import Config
from opensandbox_platform.server.errors import ApiError
from opensandbox_platform.server.models import (
    CreateSandboxRequest,
    CreateSandboxResponse,
    EndpointModel,
    ErrorResponse,
    ListSandboxesResponse,
    PaginationInfo,
    RenewRequest,
    RenewResponse,
    SandboxModel,
)
from opensandbox_platform.server.runtimes import guards
from opensandbox_platform.server.runtimes.base import Runtime, SandboxInfo

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 409, 500)}
router = APIRouter(tags=["sandboxes"], responses=ERRORS)  # type: ignore[arg-type]
SandboxId = Annotated[str, Path(alias="sandboxId", min_length=1)]


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


@router.post("/sandboxes", status_code=202, response_model=CreateSandboxResponse, response_model_exclude_none=True)
async def create_sandbox(request: Request, body: CreateSandboxRequest) -> JSONResponse:
    runtime = runtime_of(request)
    spec = validation.create_spec(body, config_of(request).server.max_sandbox_timeout_seconds, runtime.capabilities)
    return as_json(CreateSandboxResponse.of(await runtime.create(spec)), 202)


@router.get("/sandboxes", response_model=ListSandboxesResponse, response_model_exclude_none=True)
async def list_sandboxes(
    request: Request,
    state: Annotated[list[str] | None, Query(description="repeatable; any of them matches")] = None,
    metadata: Annotated[str | None, Query(description="URL-encoded k=v&k2=v2; all must match")] = None,
    page: Annotated[int, Query(ge=1)] = 1,
    page_size: Annotated[int, Query(alias="pageSize", ge=1, le=200)] = 20,
) -> JSONResponse:
    wanted_states = {s.lower() for s in state or [] if s}
    wanted_metadata = _parse_metadata_filter(metadata)
    items = [
        info
        for info in await runtime_of(request).list()
        if (not wanted_states or info.state.lower() in wanted_states)
        and all(info.metadata.get(k) == v for k, v in wanted_metadata)
    ]
    items.sort(key=lambda info: info.created_at, reverse=True)
    total = len(items)
    total_pages = math.ceil(total / page_size) if total else 0
    window = items[(page - 1) * page_size : page * page_size]
    return as_json(
        ListSandboxesResponse(
            items=[SandboxModel.of(info) for info in window],
            pagination=PaginationInfo(
                page=page,
                page_size=page_size,
                total_items=total,
                total_pages=total_pages,
                has_next_page=page < total_pages,
            ),
        )
    )


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
    await runtime_of(request).delete(sandbox_id)
    return Response(status_code=204)


@router.patch("/sandboxes/{sandboxId}/metadata", response_model=SandboxModel, response_model_exclude_none=True)
async def patch_metadata(
    request: Request,
    sandbox_id: SandboxId,
    patch: Annotated[dict[str, str | None], Body(description="JSON merge patch: null deletes a key")],
) -> JSONResponse:
    validation.check_metadata(patch)
    info: SandboxInfo = await runtime_of(request).patch_metadata(sandbox_id, patch)
    return as_json(SandboxModel.of(info))


@router.post("/sandboxes/{sandboxId}/pause", status_code=202, response_class=Response)
async def pause_sandbox(request: Request, sandbox_id: SandboxId) -> Response:
    runtime = runtime_of(request)
    await _require_pause(runtime, sandbox_id, "pause")
    await runtime.pause(sandbox_id)
    return Response(status_code=202)


@router.post("/sandboxes/{sandboxId}/resume", status_code=202, response_class=Response)
async def resume_sandbox(request: Request, sandbox_id: SandboxId) -> Response:
    runtime = runtime_of(request)
    await _require_pause(runtime, sandbox_id, "resume")
    await runtime.resume(sandbox_id)
    return Response(status_code=202)


async def _require_pause(runtime: Runtime, sandbox_id: str, call: str) -> None:
    if not runtime.capabilities.pause:
        await runtime.get(sandbox_id)  # an unknown sandbox is a 404 first, as on every runtime
        raise guards.not_supported(call, runtime.capabilities.runtime)


@router.post("/sandboxes/{sandboxId}/renew-expiration", response_model=RenewResponse)
async def renew_expiration(request: Request, sandbox_id: SandboxId, body: RenewRequest) -> RenewResponse:
    expires_at = body.expires_at if body.expires_at.tzinfo else body.expires_at.replace(tzinfo=dt.UTC)
    if expires_at <= dt.datetime.now(dt.UTC):
        raise ApiError(400, errors.INVALID_EXPIRATION, "expiresAt must be in the future")
    info = await runtime_of(request).renew(sandbox_id, expires_at)
    assert info.expires_at is not None
    return RenewResponse(expires_at=info.expires_at)


@router.get("/sandboxes/{sandboxId}/endpoints/{port}", response_model=EndpointModel, response_model_exclude_none=True)
async def get_endpoint(
    request: Request,
    sandbox_id: SandboxId,
    port: Annotated[int, Path()],
    use_server_proxy: bool = False,
    expires: int | None = None,
) -> EndpointModel:
    if not 1 <= port <= 65535:
        raise ApiError(400, errors.INVALID_PORT, f"port {port} is outside 1-65535")
    if expires is not None:
        raise ApiError(400, errors.API_NOT_SUPPORTED, "signed endpoints need the kubernetes gateway ingress")
    runtime = runtime_of(request)
    if use_server_proxy:
        await runtime.get(sandbox_id)  # 404 for an unknown sandbox
        base = config_of(request).server.eip or request.url.netloc
        prefix = "/v1" if request.url.path.startswith("/v1/") else ""
        return EndpointModel(endpoint=f"{base}{prefix}/sandboxes/{sandbox_id}/proxy/{port}")
    endpoint = await runtime.endpoint(sandbox_id, port)
    return EndpointModel(endpoint=endpoint.address, headers=endpoint.headers or None)


PROXY_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


@router.api_route("/sandboxes/{sandboxId}/proxy/{port}", methods=PROXY_METHODS, include_in_schema=False)
@router.api_route("/sandboxes/{sandboxId}/proxy/{port}/{path:path}", methods=PROXY_METHODS, tags=["proxy"])
async def proxy_http(request: Request, sandbox_id: SandboxId, port: int, path: str = "") -> Response:
    upstream = await runtime_of(request).upstream(sandbox_id, port)
    client: httpx.AsyncClient = request.app.state.http
    return await proxy.forward_http(client, request, upstream, path)


@router.websocket("/sandboxes/{sandboxId}/proxy/{port}")
@router.websocket("/sandboxes/{sandboxId}/proxy/{port}/{path:path}")
async def proxy_websocket(websocket: WebSocket, sandbox_id: SandboxId, port: int, path: str = "") -> None:
    try:
        upstream = await runtime_of(websocket).upstream(sandbox_id, port)
    except ApiError as exc:
        await websocket.close(code=1008, reason=exc.code)
        return
    await proxy.forward_websocket(websocket, upstream, path)


@router.post("/metrics/events", status_code=204, response_class=Response, tags=["metrics"])
async def metrics_event(body: Annotated[dict[str, object] | None, Body()] = None) -> Response:
    """SDK create-latency telemetry: accepted and dropped (nothing exports it yet)."""
    return Response(status_code=204)
