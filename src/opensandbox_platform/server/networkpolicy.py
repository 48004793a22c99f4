"""`GET/PATCH/PUT/DELETE /sandboxes/{id}/networkpolicy`: a sandbox's egress policy through the server.

The body is checked here (400 before anything is sent), then the call goes to the sandbox's egress
API (the sidecar, or the local runtime's own enforcer) with its token; that API answers once the
kernel holds the new ruleset, so a change is enforced when this call returns. PATCH merges rules
(incoming first, first per target wins), PUT replaces the policy, DELETE removes the listed
targets' rules (no body or `[]`: every rule; the default action stays). A sandbox created without
a policy reports allow-all, not enforced, and refuses changes (409): it has no enforcer.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Annotated, Any, Literal

import httpx
from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from opensandbox_platform.daemon import times
from opensandbox_platform.egress import policy as P
from opensandbox_platform.server import errors
from opensandbox_platform.server.errors import ApiError
from opensandbox_platform.server.models import ErrorResponse
from opensandbox_platform.server.routes import SandboxId, config_of, runtime_of
from opensandbox_platform.server.runtimes import guards
from opensandbox_platform.server.runtimes.base import Runtime
from opensandbox_platform.server.runtimes.events import Reason, SandboxEvent

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 409, 500, 502, 503)}
router = APIRouter(tags=["networkpolicy"], responses=ERRORS)  # type: ignore[arg-type]
PATH = "/sandboxes/{sandboxId}/networkpolicy"
TIMEOUT = httpx.Timeout(30.0, connect=5.0)
DENIALS_SHOWN = 20  # addresses and names each, the most refused first
NO_POLICY = {
    "status": "ok",
    "mode": "allow_all",
    "enforcementMode": "none",
    "enforced": False,
    "reason": "the sandbox was created without a networkPolicy: no egress enforcer runs in it",
    "policy": {"defaultAction": "allow", "egress": []},
}


class NetworkRuleBody(BaseModel):
    """One egress rule as the SDK sends it (the document's shape; egress/policy.py checks the target)."""

    model_config = ConfigDict(extra="forbid")
    action: Literal["allow", "deny"]
    target: str = Field(min_length=1, max_length=255, description="an FQDN, *.wildcard, IP address or CIDR")


class NetworkPolicyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    defaultAction: Literal["allow", "deny"] | None = Field(default=None, description="default deny")
    egress: list[NetworkRuleBody] | None = None


RuleList = Annotated[list[NetworkRuleBody], Body(description="rules to merge: [{action, target}]")]


@router.get(PATH)
async def get_network_policy(request: Request, sandbox_id: SandboxId) -> JSONResponse:
    """The policy in force and whether it is enforced."""
    return await _call(request, sandbox_id, "GET", None)


@router.patch(PATH)
async def patch_network_policy(request: Request, sandbox_id: SandboxId, rules: RuleList) -> JSONResponse:
    """Merge rules: incoming rules first, the first of a target wins; others stay."""
    raw = [rule.model_dump() for rule in rules]
    _checked(lambda: P.parse_rules(raw, _max_rules(request)))
    if not raw:
        raise errors.invalid("the body must be a non-empty list of rules")
    return await _call(request, sandbox_id, "PATCH", raw)


@router.put(PATH)
async def replace_network_policy(
    request: Request, sandbox_id: SandboxId, policy: Annotated[NetworkPolicyBody, Body()]
) -> JSONResponse:
    """Replace the whole policy ({defaultAction, egress})."""
    raw = policy.model_dump(exclude_unset=True)  # (a null given stays: parse_policy reads it)
    _checked(lambda: P.parse_policy(raw, _max_rules(request)))
    return await _call(request, sandbox_id, "PUT", raw)


@router.delete(PATH)
async def delete_network_policy_rules(request: Request, sandbox_id: SandboxId) -> JSONResponse:
    """Remove the listed targets' rules (a JSON list); no body or `[]`: every rule."""
    raw = await request.body()
    try:
        targets = json.loads(raw) if raw.strip() else []
    except ValueError:
        raise errors.invalid("the body must be a JSON list of targets") from None
    if targets != []:
        _checked(lambda: P.parse_targets(targets))
    return await _call(request, sandbox_id, "DELETE", targets)


def _max_rules(request: Request) -> int:
    return config_of(request).egress.max_rules


def _checked(parse: Any) -> None:
    try:
        parse()
    except P.PolicyError as exc:
        raise errors.invalid(str(exc)) from None


async def _call(request: Request, sandbox_id: str, method: str, body: object) -> JSONResponse:
    runtime = runtime_of(request)
    if not runtime.capabilities.network_policy:
        await runtime.get(sandbox_id)  # an unknown sandbox is a 404 first
        raise guards.not_supported("networkPolicy", runtime.capabilities.runtime)
    endpoint = await runtime.egress(sandbox_id)
    if endpoint is None:
        if method == "GET":
            return JSONResponse(NO_POLICY)
        raise ApiError(
            409,
            errors.INVALID_STATE,
            f"sandbox {sandbox_id} was created without a networkPolicy: it has no egress enforcer to change"
            " (create it with networkPolicy, {} allows everything)",
        )
    client: httpx.AsyncClient = request.app.state.http
    try:
        response = await client.request(
            method,
            f"http://{endpoint.address}/policy",
            headers=endpoint.headers,
            content=None if body is None else json.dumps(body).encode(),
            timeout=TIMEOUT,
        )
    except httpx.HTTPError as exc:
        raise ApiError(
            503, errors.EGRESS_UNAVAILABLE, f"the egress enforcer of sandbox {sandbox_id} is not answering: {exc!r}"
        ) from None
    payload = _json(response)
    if response.status_code == 400:
        raise errors.invalid(str(payload.get("message") or response.text))
    if response.status_code != 200:
        message = payload.get("message") or response.text[:500]
        status = response.status_code
        raise ApiError(502, errors.BACKEND_RESPONSE_FAILED, f"egress enforcer answered {status}: {message}")
    return JSONResponse(payload)


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        value = response.json()
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


async def denial_events(client: httpx.AsyncClient, runtime: Runtime, sandbox_id: str) -> list[SandboxEvent]:
    """What the sandbox's network policy refused so far, as Warning events (one per address and per
    name, the most refused first); none without a policy or while its enforcer does not answer."""
    if not runtime.capabilities.network_policy:
        return []
    try:
        endpoint = await runtime.egress(sandbox_id)
        if endpoint is None:
            return []
        response = await client.get(f"http://{endpoint.address}/denials", headers=endpoint.headers, timeout=TIMEOUT)
    except (ApiError, httpx.HTTPError):
        return []
    return denials_as_events(_json(response) if response.status_code == 200 else {}, times.now())


def denials_as_events(denials: dict[str, Any], at: dt.datetime) -> list[SandboxEvent]:
    """The egress API's `/denials` body as events at `at` (counts are totals, not times)."""
    found = []
    for address, count in _most(denials.get("addresses")):
        message = f"the network policy refused {count} packet(s) to {address} so far"
        found.append(SandboxEvent(at, Reason.EGRESS_DENIED, message, source="egress", type="Warning"))
    for name, count in _most(denials.get("names")):
        message = f"the network policy answered NXDOMAIN for {name} ({count} queries so far)"
        found.append(SandboxEvent(at, Reason.EGRESS_NAME_DENIED, message, source="egress", type="Warning"))
    return found


def _most(counts: object) -> list[tuple[str, int]]:
    if not isinstance(counts, dict):
        return []
    valid = [(str(k), v) for k, v in counts.items() if isinstance(v, int) and v > 0]
    return sorted(valid, key=lambda item: (-item[1], item[0]))[:DENIALS_SHOWN]
