"""The refusals every runtime makes the same way, each written once."""

from __future__ import annotations

import datetime as dt

from opensandbox_platform.server import errors
from opensandbox_platform.server.errors import ApiError
from opensandbox_platform.server.runtimes.base import State


def require_running(sandbox_id: str, state: str) -> None:
    """Before proxying: a frozen execd would accept the connection and never answer, and a sandbox
    that is not Running has nothing to answer with, so fail fast (409)."""
    if state != State.RUNNING:
        raise ApiError(409, errors.INVALID_STATE, f"sandbox {sandbox_id} is {state}")


def require_expiry(sandbox_id: str, expires_at: dt.datetime | str | None) -> None:
    """A renew moves an expiry; a sandbox created with `timeout: null` has none to move (409)."""
    if expires_at is None:
        raise ApiError(
            409, errors.INVALID_EXPIRATION, f"sandbox {sandbox_id} does not have automatic expiration enabled"
        )


def not_supported(what: str, runtime: str) -> ApiError:
    """400 for a request field or call the runtime cannot honour (`Capabilities`)."""
    return ApiError(400, errors.API_NOT_SUPPORTED, f"{what} is not supported by the {runtime} runtime")
