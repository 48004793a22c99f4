"""Starting a sandbox's lifecycle hooks through execd's `POST /lifecycle` (docker and kubernetes;
the local runtime hands them to its jail init with the claim). execd runs preStart while the
bootstrap script holds the entrypoint back at its start gate, opens the gate once it succeeded,
and schedules the periodic hooks (execd/hooks.py)."""

from __future__ import annotations

from typing import Any

import httpx

from opensandbox_platform.execd import lifecycle
from opensandbox_platform.server import errors
from opensandbox_platform.server.errors import ApiError
from opensandbox_platform.server.runtimes.base import Endpoint


async def begin_lifecycle(execd: Endpoint, hooks: dict[str, Any], grace_seconds: float) -> None:
    """400 `SANDBOX::PRESTART_FAILED` (its exit code and output's end) when preStart failed; the
    caller removes the sandbox on any error."""
    timeout = httpx.Timeout(lifecycle.pre_start_seconds(hooks) + grace_seconds, connect=5.0)
    try:
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
            answer = await client.post(f"http://{execd.address}/lifecycle", json=hooks, headers=execd.headers)
    except httpx.HTTPError as exc:
        raise ApiError(500, errors.START_FAILED, f"cannot run the lifecycle hooks: {exc!r}") from None
    if answer.status_code != 200:
        raise ApiError(500, errors.START_FAILED, f"execd refused the lifecycle hooks: {answer.text[:500]}")
    why = lifecycle.failure(answer.json().get("preStart") or {"exitCode": 0})
    if why is not None:
        raise ApiError(400, errors.PRESTART_FAILED, why)
