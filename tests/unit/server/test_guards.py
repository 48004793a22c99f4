"""The refusals every runtime shares."""

from __future__ import annotations

import datetime as dt

import pytest

from opensandbox_platform.server.errors import ApiError
from opensandbox_platform.server.runtimes import guards


@pytest.mark.parametrize("state", ["Paused", "Pending", "Terminated", "Failed"])
def test_only_a_running_sandbox_is_proxied(state: str) -> None:
    guards.require_running("s1", "Running")
    with pytest.raises(ApiError) as err:
        guards.require_running("s1", state)
    assert (err.value.status, err.value.code, err.value.message) == (
        409,
        "SANDBOX::INVALID_STATE",
        f"sandbox s1 is {state}",
    )


def test_only_a_sandbox_with_an_expiry_is_renewed() -> None:
    guards.require_expiry("s1", dt.datetime.now(dt.UTC))
    guards.require_expiry("s1", "2026-01-01T00:00:00Z")  # the local runtime's records keep text
    with pytest.raises(ApiError) as err:
        guards.require_expiry("s1", None)
    assert (err.value.status, err.value.code) == (409, "SANDBOX::INVALID_EXPIRATION")
    assert err.value.message == "sandbox s1 does not have automatic expiration enabled"


def test_not_supported_names_the_field_and_the_runtime() -> None:
    err = guards.not_supported("resourceRequests", "local")
    assert (err.status, err.code, err.message) == (
        400,
        "SANDBOX::API_NOT_SUPPORTED",
        "resourceRequests is not supported by the local runtime",
    )
