"""`/sandboxes/{id}/diagnostics/{logs,events,inspect,summary}`: what a user reads when a sandbox
misbehaves (the SDK's `get_diagnostic_logs` / `get_diagnostic_events`, `osb diagnostics`, and the
older `osb devops` commands).

With `scope` the answer is the SDK's JSON descriptor (inline text); without it, plain text, as
`osb devops` reads it (`tail`, `since`, `limit`).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from opensandbox_platform.server import errors, networkpolicy
from opensandbox_platform.server.errors import ApiError
from opensandbox_platform.server.hook_events import hook_events
from opensandbox_platform.server.models import ErrorResponse
from opensandbox_platform.server.runtimes.base import LogText, Runtime
from opensandbox_platform.server.runtimes.events import SandboxEvent, merged

router = APIRouter(tags=["diagnostics"], responses={s: {"model": ErrorResponse} for s in (400, 401, 404)})
SandboxId = Annotated[str, Path(alias="sandboxId", min_length=1)]
LOG_SCOPES = ("container", "all")
EVENT_SCOPES = ("runtime", "lifecycle", "all")
# The most text one answer carries inline (the end of it is kept: the latest output matters).
MAX_INLINE_BYTES = 1 << 20
_DURATION = re.compile(r"^([0-9]+)(s|m|h|d)$")
# 200 answers are plain text (or, with `scope`, the SDK's JSON descriptor); errors are JSON.
TEXT: dict[int | str, dict[str, Any]] = {200: {"content": {"text/plain": {"schema": {"type": "string"}}}}}


def one_of(values: tuple[str, ...]) -> str:
    return "^(" + "|".join(re.escape(v) for v in values) + ")$"


_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def since_time(value: str | None, now: dt.datetime) -> dt.datetime | None:
    """`osb devops logs --since 10m`: a duration (s, m, h, d) before now."""
    if value is None:
        return None
    match = _DURATION.fullmatch(value.strip())
    if not match:
        raise errors.invalid(f"since {value!r} is not a duration such as 30s, 10m, 1h or 2d")
    seconds = int(match.group(1)) * _SECONDS[match.group(2)]
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    if seconds >= (now - epoch).total_seconds():
        return epoch  # longer ago than anything a sandbox logged: all of it
    return now - dt.timedelta(seconds=seconds)


def clip(text: str, limit: int = MAX_INLINE_BYTES) -> tuple[str, bool]:
    """The last `limit` bytes of `text` (cut at a line start when one is near), and whether it was cut."""
    data = text.encode()
    if len(data) <= limit:
        return text, False
    tail = data[-limit:]
    newline = tail.find(b"\n")
    if 0 <= newline < 4096:
        tail = tail[newline + 1 :]
    return tail.decode(errors="replace"), True


def _check_scope(scope: str, known: tuple[str, ...], kind: str) -> None:
    if scope not in known:
        raise ApiError(
            400, errors.INVALID_PARAMETER, f"diagnostic {kind} scope {scope!r} is not one of {', '.join(known)}"
        )


async def events_of(request: Request, sandbox_id: str, scope: str) -> list[SandboxEvent]:
    runtime = _runtime(request)
    server = runtime.events.of(sandbox_id) if scope in ("lifecycle", "all") else []
    engine, refused = [], []
    if scope in ("runtime", "all"):
        engine = await runtime.runtime_events(sandbox_id)
        refused = await networkpolicy.denial_events(request.app.state.http, runtime, sandbox_id)
    hooks = await hook_events(runtime, request.app.state.http, sandbox_id) if scope in ("lifecycle", "all") else []
    return merged(server, engine, refused, hooks)


def render_events(events: list[SandboxEvent], limit: int | None = None) -> str:
    chosen = events[-limit:] if limit else events
    return "\n".join(event.line() for event in chosen) + ("\n" if chosen else "")


def descriptor(sandbox_id: str, kind: str, scope: str, text: str, truncated: bool, warnings: list[str]) -> JSONResponse:
    content, clipped = clip(text)
    body: dict[str, Any] = {
        "sandboxId": sandbox_id,
        "kind": kind,
        "scope": scope,
        "delivery": "inline",
        "contentType": "text/plain; charset=utf-8",
        "content": content,
        "contentLength": len(content.encode()),
        "truncated": truncated or clipped,
    }
    if warnings:
        body["warnings"] = warnings
    return JSONResponse(body)


async def _require_known(runtime: Runtime, sandbox_id: str) -> bool:
    """True while the sandbox exists; False for one deleted a moment ago whose events the server
    still holds (its events stay readable); 404 otherwise."""
    try:
        await runtime.get(sandbox_id)
        return True
    except ApiError as exc:
        if exc.status == 404 and runtime.events.knows(sandbox_id):
            return False
        raise


@router.get("/sandboxes/{sandboxId}/diagnostics/logs", response_model=None, responses=TEXT)
async def diagnostic_logs(
    request: Request,
    sandbox_id: SandboxId,
    scope: Annotated[
        str | None, Query(pattern=one_of(LOG_SCOPES), description=f"one of {', '.join(LOG_SCOPES)}; absent: plain text")
    ] = None,
    tail: Annotated[int | None, Query(ge=1, le=100_000, description="only the last N lines")] = None,
    since: Annotated[
        str | None, Query(pattern=_DURATION.pattern, description="only lines newer than this duration (30s, 10m, 1h)")
    ] = None,
) -> Response:
    runtime = _runtime(request)
    if scope is not None:
        _check_scope(scope, LOG_SCOPES, "logs")
    wanted_since = since_time(since, dt.datetime.now(dt.UTC))
    await runtime.get(sandbox_id)
    logs: LogText = await runtime.logs(sandbox_id, tail, wanted_since, scope or "container")
    if scope is None:
        return PlainTextResponse(clip(logs.text)[0])
    return descriptor(sandbox_id, "logs", scope, logs.text, logs.truncated, logs.warnings)


@router.get("/sandboxes/{sandboxId}/diagnostics/events", response_model=None, responses=TEXT)
async def diagnostic_events(
    request: Request,
    sandbox_id: SandboxId,
    scope: Annotated[
        str | None,
        Query(pattern=one_of(EVENT_SCOPES), description=f"one of {', '.join(EVENT_SCOPES)}; absent: plain text"),
    ] = None,
    limit: Annotated[int | None, Query(ge=1, le=10_000, description="only the last N events")] = None,
) -> Response:
    runtime = _runtime(request)
    if scope is not None:
        _check_scope(scope, EVENT_SCOPES, "events")
    alive = await _require_known(runtime, sandbox_id)
    chosen = scope or "all"
    events = await events_of(request, sandbox_id, chosen) if alive else runtime.events.of(sandbox_id)
    text = render_events(events, limit)
    if scope is None:
        return PlainTextResponse(text)
    warnings = [] if alive else ["the sandbox is gone: only the server's own events remain"]
    return descriptor(sandbox_id, "events", scope, text, False, warnings)


@router.get("/sandboxes/{sandboxId}/diagnostics/inspect", response_model=None, responses=TEXT)
async def diagnostic_inspect(request: Request, sandbox_id: SandboxId) -> PlainTextResponse:
    """The engine's description of the sandbox (container, pod and BatchSandbox, jail record) as JSON
    text; tokens and secrets are left out."""
    runtime = _runtime(request)
    await runtime.get(sandbox_id)
    return PlainTextResponse(json.dumps(await runtime.inspect(sandbox_id), indent=2, default=str) + "\n")


@router.get("/sandboxes/{sandboxId}/diagnostics/summary", response_model=None, responses=TEXT)
async def diagnostic_summary(
    request: Request,
    sandbox_id: SandboxId,
    tail: Annotated[int, Query(ge=1, le=100_000)] = 50,
    event_limit: Annotated[int, Query(ge=1, le=10_000)] = 20,
) -> PlainTextResponse:
    runtime = _runtime(request)
    info = await runtime.get(sandbox_id)
    events = await events_of(request, sandbox_id, "all")
    logs = await runtime.logs(sandbox_id, tail, None, "container")
    parts = [
        f"== sandbox {sandbox_id}: {info.state} ({info.reason}) {info.message}".rstrip(),
        "== inspect",
        json.dumps(await runtime.inspect(sandbox_id), indent=2, default=str),
        f"== events (last {event_limit})",
        render_events(events, event_limit).rstrip(),
        f"== logs (last {tail} lines)",
        clip(logs.text)[0].rstrip(),
    ]
    return PlainTextResponse("\n".join(parts) + "\n")
