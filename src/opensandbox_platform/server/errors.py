"""Every error leaves the server as `{code, message}` with a fitting status (the SDK reads both)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from opensandbox_platform.daemon.errors import ApiError

__all__ = ["ApiError", "StreamAborted", "error_body", "install", "invalid", "not_found", "snapshot_not_found"]

NOT_FOUND = "SANDBOX::NOT_FOUND"
INVALID_PARAMETER = "SANDBOX::INVALID_PARAMETER"
INVALID_METADATA_LABEL = "SANDBOX::INVALID_METADATA_LABEL"
INVALID_METADATA_FORMAT = "INVALID_METADATA_FORMAT"
INVALID_EXPIRATION = "SANDBOX::INVALID_EXPIRATION"
INVALID_PORT = "SANDBOX::INVALID_PORT"
INVALID_STATE = "SANDBOX::INVALID_STATE"
API_NOT_SUPPORTED = "SANDBOX::API_NOT_SUPPORTED"
START_FAILED = "SANDBOX::START_FAILED"
PRESTART_FAILED = "SANDBOX::PRESTART_FAILED"  # the lifecycle.preStart hook exited non-zero or timed out
IMAGE_PULL_FAILED = "SANDBOX::IMAGE_PULL_FAILED"
INTERNAL_ERROR = "SANDBOX::INTERNAL_ERROR"
SNAPSHOT_NOT_FOUND = "SNAPSHOT::NOT_FOUND"
SNAPSHOT_INVALID_STATE = "SNAPSHOT::INVALID_STATE"  # still Creating, or Failed
SNAPSHOT_INVALID_SOURCE_STATE = "SNAPSHOT::INVALID_SOURCE_STATE"  # the sandbox is not Running
SNAPSHOT_IN_USE = "SNAPSHOT::IN_USE"  # a sandbox restored from it still exists
MISSING_API_KEY = "MISSING_API_KEY"
INVALID_API_KEY = "INVALID_API_KEY"
BACKEND_CONNECTION_FAILED = "BACKEND_CONNECTION_FAILED"
BACKEND_TIMEOUT = "BACKEND_TIMEOUT"
BACKEND_RESPONSE_FAILED = "BACKEND_RESPONSE_FAILED"
EGRESS_UNAVAILABLE = "SANDBOX::EGRESS_UNAVAILABLE"  # a sandbox's egress enforcer did not answer


class StreamAborted(Exception):
    """Raised inside a streamed response body: the response ends without its end-of-body marker
    and the connection is closed, so the client sees an error instead of a clean, short body."""


def not_found(sandbox_id: str) -> ApiError:
    return ApiError(404, NOT_FOUND, f"sandbox {sandbox_id} not found")


def snapshot_not_found(snapshot_id: str) -> ApiError:
    return ApiError(404, SNAPSHOT_NOT_FOUND, f"snapshot {snapshot_id} not found")


def invalid(message: str) -> ApiError:
    return ApiError(400, INVALID_PARAMETER, message)


def error_body(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


def _readable(exc: RequestValidationError) -> str:
    """`body.timeout: Input should be a valid integer; query.page: ...`, one clause per error."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message), exc.status, headers=exc.headers or None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(INVALID_PARAMETER, _readable(exc)), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "GENERAL::UNKNOWN_ERROR")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return JSONResponse(error_body(code, str(exc.detail)), exc.status_code, headers=headers or None)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette's 405 names only the first route's)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)
