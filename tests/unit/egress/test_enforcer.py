"""The enforcer with a recording nftables stand-in; the DNS filter's decisions; the egress API's
token and errors (served on loopback)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import dns.rrset
import httpx
import pytest

from opensandbox_platform.daemon.http import HttpServer
from opensandbox_platform.egress import policy as P
from opensandbox_platform.egress.app import TOKEN_HEADER, EgressApp, prometheus
from opensandbox_platform.egress.dns import DnsFilter
from opensandbox_platform.egress.enforcer import Answer, Enforcer, Limits


class FakeNft:
    def __init__(self) -> None:
        self.commands: list[str] = []
        self.closed = False

    def run(self, commands: str) -> str:
        self.commands.append(commands)
        return ""

    def json(self, command: str) -> Any:
        return {}

    def close(self) -> None:
        self.closed = True


def deny_except_good() -> P.Policy:
    return P.parse_policy({"defaultAction": "deny", "egress": [{"action": "allow", "target": "*.good.test"}]})


def make(tmp_path: Path | None = None, resolve: Any = None) -> tuple[Enforcer, FakeNft]:
    nft = FakeNft()
    state = tmp_path / "state.json" if tmp_path else None
    return Enforcer(nft, limits=Limits(min_ttl=60), state_path=state, resolve=resolve), nft  # type: ignore[arg-type]


async def test_apply_is_one_transaction_and_marks_the_policy_enforced(tmp_path: Path) -> None:
    enforcer, nft = make(tmp_path)
    assert not enforcer.enforced
    await enforcer.apply(deny_except_good())
    assert enforcer.enforced and len(nft.commands) == 1 and "delete table" in nft.commands[0]
    assert json.loads((tmp_path / "state.json").read_text())["policy"] == deny_except_good().to_json()


async def test_an_allowed_answer_joins_its_rule_set_before_it_is_returned() -> None:
    enforcer, nft = make()
    await enforcer.apply(deny_except_good())
    assert enforcer.admit("a.good.test", [("203.0.113.10", 5)]) is True
    assert nft.commands[-1] == "add element inet opensandbox_egress r0v4 { 203.0.113.10 }\n"
    expiry = enforcer.resolved["a.good.test"]["203.0.113.10"]
    assert expiry >= time.time() + 59  # a short TTL is held for min_ttl
    assert enforcer.admit("bad.test", [("203.0.113.20", 300)]) is False
    assert enforcer.denied_names == {"bad.test": 1}
    assert "203.0.113.20" not in nft.commands[-1]


async def test_a_new_policy_keeps_known_addresses_of_names_it_still_allows() -> None:
    enforcer, nft = make()
    await enforcer.apply(deny_except_good())
    enforcer.admit("a.good.test", [("203.0.113.10", 300)])
    await enforcer.patch(P.parse_rules([{"action": "deny", "target": "b.good.test"}]))
    # rule 1 is now the wildcard: its set is written with the address in the new table
    assert "r1v4 {\n    type ipv4_addr;\n    elements = { 203.0.113.10 }" in nft.commands[-1]
    await enforcer.delete(None)
    assert enforcer.policy == P.Policy("deny") and "203.0.113.10" not in nft.commands[-1]


async def test_names_denied_outright_are_resolved_by_the_enforcer() -> None:
    async def resolve(name: str) -> Answer:
        return [("203.0.113.20", 300)] if name == "bad.test" else []

    enforcer, nft = make(resolve=resolve)
    await enforcer.apply(
        P.parse_policy({"defaultAction": "allow", "egress": [{"action": "deny", "target": "bad.test"}]})
    )
    assert nft.commands[-1] == "add element inet opensandbox_egress r0v4 { 203.0.113.20 }\n"
    enforcer.close()


async def test_expired_addresses_leave_the_sets() -> None:
    enforcer, nft = make()
    enforcer.limits = Limits(min_ttl=0.1)
    await enforcer.apply(deny_except_good())
    enforcer.admit("a.good.test", [("203.0.113.10", 0)])
    enforcer._schedule_expiry()
    await asyncio.sleep(0.4)
    assert nft.commands[-1] == "delete element inet opensandbox_egress r0v4 { 203.0.113.10 }\n"
    assert enforcer.resolved == {}


async def test_a_restarted_enforcer_starts_from_its_state(tmp_path: Path) -> None:
    first, _ = make(tmp_path)
    await first.apply(deny_except_good())
    first.admit("a.good.test", [("203.0.113.10", 300)])
    second, nft = make(tmp_path)
    restored = second.load_state()
    assert restored == deny_except_good()
    await second.apply(restored)
    assert "elements = { 203.0.113.10 }" in nft.commands[0]
    (tmp_path / "state.json").write_text("{not json")
    assert make(tmp_path)[0].load_state() is None


# --- the DNS filter -----------------------------------------------------------------------------------------
class Upstream(DnsFilter):
    """A filter whose upstream answers every name with one address (and counts what it forwarded)."""

    forwarded: list[str]
    gate: asyncio.Event | None = None

    async def forward(self, wire: bytes, tcp: bool) -> bytes:
        query = dns.message.from_wire(wire)
        self.forwarded.append(query.question[0].name.to_text(omit_final_dot=True))
        if self.gate is not None:
            await self.gate.wait()
        response = dns.message.make_response(query)
        response.answer.append(dns.rrset.from_text(query.question[0].name, 300, "IN", "A", "203.0.113.10"))
        return response.to_wire()


def upstream_filter(enforcer: Enforcer, max_in_flight: int = 128) -> Upstream:
    dns_filter = Upstream(enforcer, [("192.0.2.53", 53)], max_in_flight=max_in_flight)
    dns_filter.forwarded = []
    return dns_filter


async def test_the_filter_answers_denied_names_itself_and_forwards_the_others() -> None:
    enforcer, nft = make()
    await enforcer.apply(deny_except_good())
    dns_filter = upstream_filter(enforcer)
    denied = await dns_filter.answer(dns.message.make_query("bad.test", "A").to_wire())
    assert denied is not None and dns.message.from_wire(denied).rcode() == dns.rcode.NXDOMAIN
    assert dns_filter.forwarded == []  # a denied name never reaches a resolver (no exfiltration by lookup)
    allowed = await dns_filter.answer(dns.message.make_query("a.good.test", "A").to_wire())
    assert allowed is not None and dns.message.from_wire(allowed).answer
    assert "203.0.113.10" in nft.commands[-1]
    assert await dns_filter.answer(b"garbage") is None


async def test_the_filter_drops_queries_above_its_bound() -> None:
    enforcer, _ = make()
    await enforcer.apply(deny_except_good())
    dns_filter = upstream_filter(enforcer, max_in_flight=4)
    dns_filter.gate = asyncio.Event()
    wire = dns.message.make_query("a.good.test", "A").to_wire()
    pending = [asyncio.ensure_future(dns_filter.answer(wire)) for _ in range(10)]
    await asyncio.sleep(0.05)
    assert len(dns_filter.forwarded) == 4 and dns_filter.dropped == 6
    dns_filter.gate.set()
    results = await asyncio.gather(*pending)
    assert sum(r is not None for r in results) == 4 and dns_filter.in_flight == 0


# --- the API ------------------------------------------------------------------------------------------------
@pytest.fixture
async def api() -> Any:
    enforcer, _ = make()
    await enforcer.apply(deny_except_good())
    server = HttpServer(EgressApp(enforcer, "secret").dispatch)
    listener = await server.start("127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        yield client, enforcer
    await server.close()


async def test_every_route_but_health_needs_the_token(api: Any) -> None:
    client, enforcer = api
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/policy")).status_code == 401
    wrong = await client.patch("/policy", json=[{"action": "allow", "target": "bad.test"}], headers={TOKEN_HEADER: "x"})
    assert wrong.status_code == 401 and enforcer.policy == deny_except_good()
    got = await client.get("/policy", headers={TOKEN_HEADER: "secret"})
    assert got.json()["enforced"] is True and got.json()["policy"] == deny_except_good().to_json()


async def test_changes_answer_the_policy_in_force_and_bad_bodies_are_400(api: Any) -> None:
    client, enforcer = api
    auth = {TOKEN_HEADER: "secret"}
    patched = await client.patch("/policy", json=[{"action": "allow", "target": "bad.test"}], headers=auth)
    assert patched.status_code == 200 and patched.json()["policy"]["egress"][0]["target"] == "bad.test"
    deleted = await client.request("DELETE", "/policy", json=["bad.test"], headers=auth)
    assert deleted.json()["policy"] == deny_except_good().to_json()
    for method, body in (("PATCH", []), ("PATCH", [{"action": "allow"}]), ("PUT", {"defaultAction": 1})):
        response = await client.request(method, "/policy", json=body, headers=auth)
        assert response.status_code == 400 and response.json()["code"], (method, body)
    assert (await client.get("/credential-vault", headers=auth)).status_code == 501
    enforcer.admit("bad.test", [])
    assert 'opensandbox_egress_denied_names_total{name="bad.test"} 1' in prometheus(enforcer)
