"""The server's Prometheus metrics (`GET /metrics`), every name in one place.

Requests by route, creates (server-side latency, admission), sandboxes by state, what the proxy
carries, the engine calls behind a runtime (Docker Engine API, Kubernetes API) and the SDK's own
create-latency reports (`POST /v1/metrics/events`). Names follow Prometheus' conventions (base units,
`_seconds`, `_bytes`, `_total`); labels take values from small fixed sets (route templates, not
paths; a resource kind, not an object's name), so a hostile client cannot grow the series without
bound. docs/observability.md lists them with the dashboard that charts them.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, MutableMapping
from types import SimpleNamespace
from typing import Any

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger("opensandbox.server.metrics")

# Creates and engine calls: from a warm claim (ms) to an image pull (minutes).
SLOW_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
FAST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

REQUESTS = Counter(
    "opensandbox_server_http_requests_total",
    "HTTP requests answered, by route template, method and status code.",
    ["route", "method", "status"],
)
REQUEST_DURATION = Histogram(
    "opensandbox_server_http_request_duration_seconds",
    "Time from a request's arrival to the last byte of its response (a streamed response: its whole stream).",
    ["route", "method"],
    buckets=FAST_BUCKETS,
)
SANDBOXES = Gauge("opensandbox_server_sandboxes", "Sandboxes the runtime holds, by state.", ["runtime", "state"])
CREATE_DURATION = Histogram(
    "opensandbox_server_sandbox_create_duration_seconds",
    "Server-side time of a create (admission wait included), by runtime, mode (pooled: extensions.poolRef;"
    " direct) and outcome (success, error).",
    ["runtime", "mode", "outcome"],
    buckets=SLOW_BUCKETS,
)
CREATES_QUEUED = Counter(
    "opensandbox_server_creates_queued_total", "Creates that had to wait for a slot (server.createConcurrency)."
)
CREATES_SHED = Counter(
    "opensandbox_server_creates_shed_total",
    "Creates refused by admission control: queue_full (429) or queue_timeout (503).",
    ["reason"],
)
CREATE_QUEUE_WAIT = Histogram(
    "opensandbox_server_create_queue_wait_seconds",
    "How long a queued create waited before it got a slot, was refused or its client left.",
    buckets=SLOW_BUCKETS,
)
CREATES_RUNNING = Gauge("opensandbox_server_creates_running", "Creates holding a slot now.")
CREATES_WAITING = Gauge("opensandbox_server_creates_waiting", "Creates waiting for a slot now.")
PROXY_BYTES = Counter(
    "opensandbox_server_proxy_bytes_total",
    "Body and frame bytes the proxy carried, by protocol (http, websocket) and direction (to_sandbox, from_sandbox).",
    ["protocol", "direction"],
)
PROXY_WEBSOCKETS = Gauge(
    "opensandbox_server_proxy_websockets_open", "WebSockets relayed to sandboxes now (the console's terminal included)."
)
ENGINE_DURATION = Histogram(
    "opensandbox_server_engine_request_duration_seconds",
    "Time to the response head of a call to the engine behind the runtime (docker: the Docker Engine API,"
    " kubernetes: the API server), by method and resource kind.",
    ["engine", "method", "resource"],
    buckets=FAST_BUCKETS,
)
ENGINE_ERRORS = Counter(
    "opensandbox_server_engine_request_errors_total",
    "Engine calls that failed: timeout, connection (refused, reset) or server_error (a 5xx answer).",
    ["engine", "method", "resource", "error"],
)
SDK_CREATE_DURATION = Histogram(
    "opensandbox_sdk_sandbox_create_duration_seconds",
    "Client-side create latency the SDK reports (POST /v1/metrics/events), by SDK language and success.",
    ["sdk", "success"],
    buckets=SLOW_BUCKETS,
)
SDK_EVENTS = Counter(
    "opensandbox_sdk_events_total", "Events the SDK reported, by type (unknown types: other).", ["event_type"]
)

SDK_EVENT_TYPES = ("sandbox.create",)
KNOWN_STATES = ("Pending", "Running", "Paused", "Stopping", "Terminated", "Failed")
_SDK_AGENT = re.compile(r"OpenSandbox-([A-Za-z#+]{1,16})-SDK/", re.IGNORECASE)
_SDK_LANGUAGES = ("python", "javascript", "typescript", "java", "kotlin", "go", "c#", "csharp", "dotnet")


# --- requests --------------------------------------------------------------------------------------------------
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def route_label(scope: Scope) -> str:
    """The matched route's template without the `/v1` prefix (both mounts are one route), or
    `unmatched`: never the raw path, whose ids would make a series per sandbox."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if not isinstance(path, str):
        return "unmatched"
    return path[3:] if path.startswith("/v1/") else path


class RequestMetrics:
    """ASGI middleware: counts and times every HTTP request (WebSockets are the proxy gauge's)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route, method = route_label(scope), str(scope.get("method", ""))
            REQUESTS.labels(route, method, str(status)).inc()
            REQUEST_DURATION.labels(route, method).observe(time.perf_counter() - started)


# --- creates -------------------------------------------------------------------------------------------------
def observe_create(runtime: str, pooled: bool, ok: bool, seconds: float) -> None:
    CREATE_DURATION.labels(runtime, "pooled" if pooled else "direct", "success" if ok else "error").observe(seconds)


# --- the SDK's events ----------------------------------------------------------------------------------------
def sdk_language(user_agent: str) -> str:
    """`OpenSandbox-Python-SDK/1.1.1` → `python`; anything else → `other` (a bounded label)."""
    found = _SDK_AGENT.search(user_agent)
    language = found.group(1).lower() if found else ""
    return language if language in _SDK_LANGUAGES else "other"


def record_sdk_event(body: object, user_agent: str) -> None:
    """Keeps what the SDK reports: a `sandbox.create` event's `createDurationMs` in its histogram.
    A malformed event is counted (as its type) and otherwise ignored: telemetry never fails a client."""
    if not isinstance(body, dict):
        SDK_EVENTS.labels("other").inc()
        return
    event_type = body.get("eventType")
    SDK_EVENTS.labels(event_type if event_type in SDK_EVENT_TYPES else "other").inc()
    duration = body.get("createDurationMs")
    if event_type != "sandbox.create" or isinstance(duration, bool) or not isinstance(duration, int | float):
        return
    if not 0 <= duration < 86_400_000:
        return
    success = "true" if body.get("success", True) is True else "false"
    SDK_CREATE_DURATION.labels(sdk_language(user_agent), success).observe(duration / 1000)


# --- engine calls --------------------------------------------------------------------------------------------
_DOCKER_VERSION = re.compile(r"^v\d+(\.\d+)?$")


def docker_resource(path: str) -> str:
    """`/v1.43/containers/abc/json` → `containers`."""
    parts = [p for p in path.split("/") if p]
    if parts and _DOCKER_VERSION.match(parts[0]):
        parts = parts[1:]
    return parts[0] if parts else "-"


def kubernetes_resource(path: str) -> str:
    """`/apis/g/v1alpha1/namespaces/ns/batchsandboxes/x` → `batchsandboxes`; `/version` → `version`."""
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"]:
        parts = parts[2:]
    elif parts[:1] == ["apis"]:
        parts = parts[3:]
    if len(parts) >= 3 and parts[0] == "namespaces":
        parts = parts[2:]
    return parts[0] if parts else "-"


def engine_trace(engine: str, resource_of: Callable[[str], str]) -> aiohttp.TraceConfig:
    """An aiohttp trace that times every request of a runtime's engine client and counts failures."""
    trace = aiohttp.TraceConfig()

    def labels(params: Any) -> tuple[str, str, str]:
        method = str(params.method)
        if method == "GET" and params.url.query.get("watch") in ("1", "true"):
            method = "WATCH"  # a stream: its head comes at once, its body for minutes
        return engine, method, resource_of(params.url.path)

    async def on_start(_: aiohttp.ClientSession, context: SimpleNamespace, params: Any) -> None:
        context.started = time.perf_counter()

    async def on_end(_: aiohttp.ClientSession, context: SimpleNamespace, params: Any) -> None:
        names = labels(params)
        ENGINE_DURATION.labels(*names).observe(time.perf_counter() - context.started)
        if params.response.status >= 500:
            ENGINE_ERRORS.labels(*names, "server_error").inc()

    async def on_error(_: aiohttp.ClientSession, context: SimpleNamespace, params: Any) -> None:
        names = labels(params)
        ENGINE_DURATION.labels(*names).observe(time.perf_counter() - context.started)
        timeout = isinstance(params.exception, TimeoutError | asyncio.TimeoutError)
        ENGINE_ERRORS.labels(*names, "timeout" if timeout else "connection").inc()

    trace.on_request_start.append(on_start)
    trace.on_request_end.append(on_end)
    trace.on_request_exception.append(on_error)
    return trace


# --- the scrape ----------------------------------------------------------------------------------------------
def authorized(headers: dict[str, str], api_key: str, metrics_token: str) -> bool:
    """Whether a scrape may read /metrics: with no key and no token configured anyone may; else the
    API key (OPEN-SANDBOX-API-KEY, or as a bearer token) or server.metricsToken as a bearer token."""
    if not api_key and not metrics_token:
        return True
    bearer = headers.get("authorization", "")
    given = bearer[7:].strip() if bearer.lower().startswith("bearer ") else ""
    candidates = [headers.get("open-sandbox-api-key", ""), given]
    secrets = [s for s in (api_key, metrics_token) if s]
    return any(c and hmac.compare_digest(c.encode(), s.encode()) for c in candidates for s in secrets)


async def refresh_sandboxes(runtime_type: str, list_states: Callable[[], Awaitable[list[str]]]) -> None:
    """Sets the sandboxes gauge from the runtime's own list (a runtime that cannot answer within a
    few seconds leaves the last values: a scrape must not hang on a dead engine)."""
    try:
        async with asyncio.timeout(5):
            states = Tally(await list_states())
    except Exception as exc:
        log.info("sandboxes gauge not refreshed: %s", exc)
        return
    SANDBOXES.clear()
    for state in (*KNOWN_STATES, *states):  # the usual states always have a series, 0 included
        SANDBOXES.labels(runtime_type, state).set(states.get(state, 0))


def exposition() -> tuple[bytes, str]:
    return generate_latest(), CONTENT_TYPE_LATEST
