"""The FastAPI application of the server: `create_app(config, runtime)`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from opensandbox_platform import __version__
from opensandbox_platform.server import diagnostics, errors, metrics, networkpolicy, openapi, proxy, unsupported
from opensandbox_platform.server.admission import Admission, default_concurrency
from opensandbox_platform.server.auth import AuthAndRequestId
from opensandbox_platform.server.config import Config
from opensandbox_platform.server.models import ErrorResponse
from opensandbox_platform.server.routes import router
from opensandbox_platform.server.runtimes.base import Runtime
from opensandbox_platform.server.signing import Signer, SigningKey
from opensandbox_platform.server.snapshot_routes import router as snapshot_router
from opensandbox_platform.server.stallwatch import StallWatch

log = logging.getLogger("opensandbox.server")

RUNTIME_UNAVAILABLE = "SANDBOX::RUNTIME_UNAVAILABLE"


def default_runtime(config: Config, config_path: str | None = None) -> Runtime:
    """The runtime `runtime.type` names; imported lazily so each pulls in only its own dependencies."""
    if config.runtime.type == "docker":
        from opensandbox_platform.server.runtimes.docker import DockerRuntime

        return DockerRuntime(config)
    if config.runtime.type == "kubernetes":
        from opensandbox_platform.server.runtimes.kubernetes import KubernetesRuntime

        return KubernetesRuntime(config)
    from opensandbox_platform.server.runtimes.local import LocalRuntime

    return LocalRuntime(config, config_path)


def signer_of(config: Config) -> Signer:
    keys = [SigningKey(k.id, k.secret.encode(), k.retire_at) for k in config.server.signing_keys]
    if keys:
        return Signer(keys)
    log.warning(
        "server.signingKeys is empty: signed endpoints and secureAccess tokens use a random key of this process"
    )
    return Signer.ephemeral()


async def _states(runtime: Runtime) -> list[str]:
    return [info.state for info in await runtime.list()]


def create_app(config: Config | None = None, runtime: Runtime | None = None) -> FastAPI:
    """The app; the runtime is started and closed with the app's lifespan."""
    config = config or Config()
    runtime = runtime or default_runtime(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.http = proxy.new_client()
        stalls = StallWatch()
        stalls.start()
        await runtime.start()
        try:
            yield
        finally:
            await runtime.close()
            await app.state.http.aclose()
            stalls.close()

    app = FastAPI(
        title="OpenSandbox server",
        version=__version__,
        description="The sandbox lifecycle API of the official opensandbox SDK, under / and /v1.",
        lifespan=lifespan,
    )
    app.state.config = config
    app.state.signer = signer_of(config)
    app.state.runtime = runtime
    app.state.admission = Admission(
        config.server.create_concurrency or default_concurrency(config.runtime.type),
        config.server.create_queue_size,
        config.server.create_queue_timeout_seconds,
    )
    errors.install(app)
    if config.console.enabled:  # the web console (server/console/)
        from opensandbox_platform.server.console import routes as console
        from opensandbox_platform.server.console.session import Signer

        app.state.console_signer = Signer(config.server.api_key, config.console.session_hours * 3600)
        app.include_router(console.router)
        app.mount("/console/static", console.static_files(), name="console-static")
        app.add_middleware(console.SecurityHeaders)

    app.add_middleware(AuthAndRequestId, api_key=config.server.api_key)
    app.add_middleware(metrics.RequestMetrics)  # outermost: 401s are counted too

    @app.get("/health", tags=["health"])
    async def health() -> dict[str, Any]:
        """The server is up (always 200); `runtime` says whether its engine answers."""
        state = runtime.health()
        return {"status": "healthy", "runtime": {"type": config.runtime.type, "ready": state.ready, **state.detail}}

    @app.get("/ready", tags=["health"], responses={503: {"model": ErrorResponse}})
    async def ready() -> JSONResponse:
        """200 while the runtime can serve sandboxes; 503 while its engine is unreachable."""
        state = runtime.health()
        if not state.ready:
            message = str(state.detail.get("message") or f"the {config.runtime.type} runtime is not ready")
            return JSONResponse(errors.error_body(RUNTIME_UNAVAILABLE, message), 503, headers={"Retry-After": "5"})
        return JSONResponse({"status": "ready"})

    @app.get("/version", tags=["health"])
    async def version() -> dict[str, str]:
        return {"version": __version__}

    if config.server.metrics:

        @app.get("/metrics", tags=["health"], response_class=Response, responses={401: {"model": ErrorResponse}})
        async def prometheus(request: Request) -> Response:
            """Prometheus metrics (docs/observability.md): the API key or `server.metricsToken` as a
            bearer token, when either is configured."""
            if not metrics.authorized(dict(request.headers), config.server.api_key, config.server.metrics_token):
                body = errors.error_body(errors.INVALID_API_KEY, "metrics need the API key or server.metricsToken")
                return JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})
            await metrics.refresh_sandboxes(config.runtime.type, lambda: _states(runtime))
            admission: Admission = app.state.admission
            metrics.CREATES_RUNNING.set(admission.running)
            metrics.CREATES_WAITING.set(admission.waiting)
            payload, content_type = metrics.exposition()
            return Response(payload, media_type=content_type)

    for routes in (router, snapshot_router, networkpolicy.router, diagnostics.router, unsupported.router):
        app.include_router(routes, prefix="/v1")
        app.include_router(routes, include_in_schema=False)
    generate = app.openapi

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi.refine(generate(), config, runtime.capabilities)
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]
    return app
