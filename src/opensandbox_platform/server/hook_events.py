"""A sandbox's lifecycle hook runs as `diagnostics/events` tells them: read from execd's
`GET /lifecycle` (execd/hooks.py keeps the preStart run and the last runs of each periodic hook)."""

from __future__ import annotations

import logging
from typing import Any

import httpx

from opensandbox_platform.api import labels
from opensandbox_platform.daemon import times
from opensandbox_platform.server.errors import ApiError
from opensandbox_platform.server.runtimes.base import Runtime
from opensandbox_platform.server.runtimes.events import Reason, SandboxEvent

log = logging.getLogger("opensandbox.diagnostics")
TIMEOUT = httpx.Timeout(3.0)
OUTPUT_CHARS = 300  # of a run's output, in its event


async def hook_events(runtime: Runtime, client: httpx.AsyncClient, sandbox_id: str) -> list[SandboxEvent]:
    """The hook runs execd reports; none when the runtime has no hooks or execd cannot be asked
    (the sandbox is paused or gone, execd does not answer)."""
    if not runtime.capabilities.lifecycle:
        return []
    try:
        endpoint = await runtime.upstream(sandbox_id, labels.EXECD_PORT)
        answer = await client.get(f"http://{endpoint.address}/lifecycle", headers=endpoint.headers, timeout=TIMEOUT)
        answer.raise_for_status()
        status = answer.json()
    except (ApiError, httpx.HTTPError, ValueError) as exc:
        log.debug("no hook runs of %s: %r", sandbox_id, exc)
        return []
    return events_of_status(status)


def events_of_status(status: dict[str, Any]) -> list[SandboxEvent]:
    """execd's `GET /lifecycle` answer as events, oldest first."""
    found: list[SandboxEvent] = []
    if status.get("preStart"):
        found.append(_event("preStart hook", status["preStart"]))
    for hook in status.get("periodic") or []:
        what = f"periodic hook {hook.get('name')} ({hook.get('schedule')})"
        for run in hook.get("runs") or []:
            if run.get("skipped"):
                message = f"{what}: skipped, its previous run was still going ({hook.get('skipped')} skipped so far)"
                found.append(_at(run, Reason.HOOK_SKIPPED, message, "Warning"))
            else:
                found.append(_event(what, run))
    return sorted(found, key=lambda event: event.at)


def _event(what: str, run: dict[str, Any]) -> SandboxEvent:
    output = str(run.get("output") or "").strip()
    shown = ("…" + output[-OUTPUT_CHARS:]) if len(output) > OUTPUT_CHARS else output
    code = run.get("exitCode")
    ended = "timed out and was killed" if run.get("timedOut") else "exited"
    message = f"{what}: {ended} with code {code} after {run.get('durationMs')} ms" + (
        f"; output: {shown}" if shown else ""
    )
    ok = code == 0 and not run.get("timedOut")
    return _at(run, Reason.HOOK_SUCCEEDED if ok else Reason.HOOK_FAILED, message, "Normal" if ok else "Warning")


def _at(run: dict[str, Any], reason: str, message: str, kind: str) -> SandboxEvent:
    try:
        at = times.parse(str(run.get("startedAt")))
    except ValueError:
        at = times.now()
    return SandboxEvent(at, reason, message, source="execd", type=kind)
