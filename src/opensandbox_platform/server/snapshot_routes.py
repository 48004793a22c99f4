"""The snapshot routes (specs/sandbox-lifecycle.yml, tag Snapshots), mounted at `/` and at `/v1`.

A runtime that cannot take snapshots answers every one of them 501 `SANDBOX::API_NOT_SUPPORTED`
(after a 404 for an unknown sandbox). What a snapshot holds, per runtime: docs/snapshots.md.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path, Query, Request, Response
from fastapi.responses import JSONResponse

from opensandbox_platform.server import errors
from opensandbox_platform.server.errors import ApiError
from opensandbox_platform.server.models import (
    CreateSnapshotRequest,
    ErrorResponse,
    ListSnapshotsResponse,
    SnapshotModel,
)
from opensandbox_platform.server.routes import any_case_pattern, as_json, paged, runtime_of, wanted
from opensandbox_platform.server.runtimes.base import Runtime, SnapshotState

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 409, 500, 501, 503)}
router = APIRouter(tags=["snapshots"], responses=ERRORS)  # type: ignore[arg-type]
SandboxId = Annotated[str, Path(alias="sandboxId", min_length=1)]
SnapshotId = Annotated[str, Path(alias="snapshotId", min_length=1)]
STATES = (SnapshotState.CREATING, SnapshotState.READY, SnapshotState.FAILED, SnapshotState.DELETING)
STATE_PATTERN = any_case_pattern(STATES)


def _supported(runtime: Runtime) -> None:
    if not runtime.capabilities.snapshots:
        raise ApiError(
            501, errors.API_NOT_SUPPORTED, f"snapshots are not supported by the {runtime.capabilities.runtime} runtime"
        )


@router.post("/sandboxes/{sandboxId}/snapshots", status_code=202, response_model=SnapshotModel)
async def create_snapshot(
    request: Request,
    sandbox_id: SandboxId,
    body: Annotated[CreateSnapshotRequest | None, Body()] = None,
) -> JSONResponse:
    runtime = runtime_of(request)
    if not runtime.capabilities.snapshots:
        await runtime.get(sandbox_id)  # an unknown sandbox is a 404 first, as on every runtime
        _supported(runtime)
    info = await runtime.create_snapshot(sandbox_id, body.name if body else None)
    answer = as_json(SnapshotModel.of(info), 202)
    answer.headers["Location"] = f"/v1/snapshots/{info.id}"  # where to poll (the spec's header)
    return answer


@router.get("/snapshots", response_model=ListSnapshotsResponse, response_model_exclude_none=True)
async def list_snapshots(
    request: Request,
    sandbox_id: Annotated[str | None, Query(alias="sandboxId")] = None,
    name: str | None = None,
    state: Annotated[
        list[str],
        Query(
            description="repeatable, any case; any of them matches",
            json_schema_extra={"items": {"type": "string", "pattern": STATE_PATTERN}},  # checked below
        ),
    ] = [],  # noqa: B006 - FastAPI copies a query list's default
    page: Annotated[int, Query(ge=1)] = 1,
    page_size: Annotated[int, Query(alias="pageSize", ge=1, le=200)] = 20,
) -> JSONResponse:
    runtime = runtime_of(request)
    _supported(runtime)
    states = wanted(state, STATES)
    items = [
        info
        for info in await runtime.list_snapshots()
        if (sandbox_id is None or info.sandbox_id == sandbox_id)
        and (name is None or info.name == name)
        and (not states or info.state.lower() in states)
    ]
    items.sort(key=lambda info: info.created_at, reverse=True)
    window, pagination = paged(items, page, page_size)
    return as_json(ListSnapshotsResponse(items=[SnapshotModel.of(info) for info in window], pagination=pagination))


@router.get("/snapshots/{snapshotId}", response_model=SnapshotModel, response_model_exclude_none=True)
async def get_snapshot(request: Request, snapshot_id: SnapshotId) -> JSONResponse:
    runtime = runtime_of(request)
    _supported(runtime)
    return as_json(SnapshotModel.of(await runtime.get_snapshot(snapshot_id)))


@router.delete("/snapshots/{snapshotId}", status_code=204, response_class=Response)
async def delete_snapshot(request: Request, snapshot_id: SnapshotId) -> Response:
    runtime = runtime_of(request)
    _supported(runtime)
    await runtime.delete_snapshot(snapshot_id)
    return Response(status_code=204)
