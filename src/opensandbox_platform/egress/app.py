"""The egress API on port 18080 (specs/egress-api.yaml), served by the sidecar (and by the local
runtime for its jails): `GET/PATCH/DELETE /policy`, our `PUT /policy` (replace), `GET /metrics`
(Prometheus text: what was refused), `GET /denials` (the same counts as JSON, for the server's
diagnostics events), `GET /health`. Every route but /health requires the
sandbox's egress token in `OPENSANDBOX-EGRESS-AUTH`: the sandbox's own processes reach this port
on loopback and must not change their policy. The credential vault is not offered (501).
"""

from __future__ import annotations

from typing import Any

from opensandbox_platform.api.labels import EGRESS_TOKEN_HEADER
from opensandbox_platform.daemon import errors
from opensandbox_platform.daemon.errors import ApiError
from opensandbox_platform.daemon.http import AnyResponse, Request, Response, Router, require_token
from opensandbox_platform.egress import policy as P
from opensandbox_platform.egress.enforcer import Enforcer

TOKEN_HEADER = EGRESS_TOKEN_HEADER
MAX_BODY = 1 << 20
INVALID_POLICY = "INVALID_POLICY"


class EgressApp:
    def __init__(self, enforcer: Enforcer, token: str | None) -> None:
        self.enforcer = enforcer
        self.token = token
        self.router = Router()
        r = self.router
        r.add("GET", "/health", self.health)
        r.add("GET", "/policy", self.get_policy)
        r.add("PATCH", "/policy", self.patch_policy)
        r.add("PUT", "/policy", self.put_policy)
        r.add("DELETE", "/policy", self.delete_policy)
        r.add("GET", "/metrics", self.metrics)
        r.add("GET", "/denials", self.denials)
        for method in ("GET", "POST", "PATCH", "DELETE"):
            r.add(method, "/credential-vault", self.vault)
        for kind in ("credentials", "bindings"):
            r.add("GET", f"/credential-vault/{kind}", self.vault)
            r.add("GET", f"/credential-vault/{kind}/{{name}}", self.vault)

    async def dispatch(self, request: Request) -> AnyResponse:
        if request.path != "/health":
            require_token(request, TOKEN_HEADER, self.token)
        handler, request.params = self.router.resolve(request.method, request.path)
        return await handler(request)

    async def health(self, request: Request) -> AnyResponse:
        # 503 until the policy is in the kernel: a startup probe holds the sandbox back until then.
        enforced = self.enforcer.enforced
        return Response.json({"status": "ok" if enforced else "starting"}, 200 if enforced else 503)

    async def get_policy(self, request: Request) -> AnyResponse:
        return Response.json(self.enforcer.status())

    async def patch_policy(self, request: Request) -> AnyResponse:
        body = await request.json(MAX_BODY)
        rules = _checked(lambda: P.parse_rules(body, self.enforcer.limits.max_rules))
        if not rules:
            raise errors.bad_request("the body must be a non-empty list of rules", INVALID_POLICY)
        await _apply(lambda: self.enforcer.patch(rules))
        return Response.json(self.enforcer.status())

    async def put_policy(self, request: Request) -> AnyResponse:
        body = await request.json(MAX_BODY, allow_empty=True)
        policy = _checked(lambda: P.parse_policy(body, self.enforcer.limits.max_rules))
        await _apply(lambda: self.enforcer.apply(policy))
        return Response.json(self.enforcer.status())

    async def delete_policy(self, request: Request) -> AnyResponse:
        """Remove the listed targets' rules; no body (or `[]`): every rule (the default stays)."""
        body = await request.json(MAX_BODY, allow_empty=True)
        targets = None if body in ({}, []) else _checked(lambda: P.parse_targets(body))
        await _apply(lambda: self.enforcer.delete(targets))
        return Response.json(self.enforcer.status())

    async def metrics(self, request: Request) -> AnyResponse:
        text = prometheus(self.enforcer)
        return Response(text.encode(), content_type="text/plain; version=0.0.4")

    async def denials(self, request: Request) -> AnyResponse:
        """What was refused so far: `{"names": {name: queries}, "addresses": {address: packets}}`."""
        return Response.json({"names": dict(self.enforcer.denied_names), "addresses": self.enforcer.denied_addresses()})

    async def vault(self, request: Request) -> AnyResponse:
        raise ApiError(501, errors.NOT_SUPPORTED, "the credential vault is not supported (credential injection)")


def _checked(parse: Any) -> Any:
    try:
        return parse()
    except P.PolicyError as exc:
        raise errors.bad_request(str(exc), INVALID_POLICY) from None


async def _apply(change: Any) -> None:
    try:
        await change()
    except P.PolicyError as exc:
        raise errors.bad_request(str(exc), INVALID_POLICY) from None


def prometheus(enforcer: Enforcer) -> str:
    """What the enforcer refused, as Prometheus text: names the DNS filter answered NXDOMAIN and
    addresses whose connections the ruleset rejected (packets), one series each."""
    lines = [
        "# HELP opensandbox_egress_enforced 1 when the policy is in the kernel.",
        "# TYPE opensandbox_egress_enforced gauge",
        f"opensandbox_egress_enforced {int(enforcer.enforced)}",
        "# HELP opensandbox_egress_rules Rules of the policy.",
        "# TYPE opensandbox_egress_rules gauge",
        f"opensandbox_egress_rules {len(enforcer.policy.rules)}",
        "# HELP opensandbox_egress_policy_changes_total Policies applied (the first included).",
        "# TYPE opensandbox_egress_policy_changes_total counter",
        f"opensandbox_egress_policy_changes_total {enforcer.changes}",
        "# HELP opensandbox_egress_dns_queries_total DNS queries by verdict.",
        "# TYPE opensandbox_egress_dns_queries_total counter",
    ]
    for verdict in ("allowed", "denied"):
        lines.append(f'opensandbox_egress_dns_queries_total{{verdict="{verdict}"}} {enforcer.dns_answers[verdict]}')
    lines += [
        "# HELP opensandbox_egress_denied_names_total DNS queries answered NXDOMAIN, by name.",
        "# TYPE opensandbox_egress_denied_names_total counter",
    ]
    names = sorted(enforcer.denied_names.items())
    lines += [f'opensandbox_egress_denied_names_total{{name="{_label(n)}"}} {c}' for n, c in names]
    lines += [
        "# HELP opensandbox_egress_denied_packets_total Packets of refused connections, by destination address.",
        "# TYPE opensandbox_egress_denied_packets_total counter",
    ]
    denied = enforcer.denied_addresses()
    lines += [f'opensandbox_egress_denied_packets_total{{address="{a}"}} {c}' for a, c in sorted(denied.items())]
    return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
