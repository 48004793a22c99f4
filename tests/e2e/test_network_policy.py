"""Network policies through the official SDK (opensandbox 1.1.1), on the local and docker runtimes.

A fake internet (harness/fake_internet.py) in a network namespace of this module's own answers
`a.good.test`, `b.good.test`, `bad.test` and `other.test` on 203.0.113.0/24 (TEST-NET-3, linked to
this host by a veth: nothing leaves the machine) with a DNS server on .53:53 and a second, rogue one
on .54:5353. The server forwards allowed lookups to .53 (`egress.upstreamDns`). Inside the sandbox
the probes are bash only (the docker test image has no Python): `getent` resolves through the
sandbox's resolv.conf, /dev/tcp connects, /dev/udp sends a DNS query to any resolver and port of
the sandbox's choosing (what a rewritten resolv.conf or a resolver of its own would do).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from opensandbox import Sandbox
from opensandbox.config import ConnectionConfig
from opensandbox.exceptions import SandboxApiException
from opensandbox.models.sandboxes import NetworkPolicy, NetworkRule

from harness.docker_api import docker_api
from harness.egress_probes import ask_resolver, dns_query, fetch, resolves, sh
from harness.fake_internet import FakeInternet
from harness.images import EGRESS_IMAGE, built_image
from harness.server_process import ServerProcess, running_server


@pytest.fixture(scope="module")
def internet() -> Iterator[FakeInternet]:
    with FakeInternet() as net:
        yield net


@pytest.fixture(scope="module")
def policy_server(
    tmp_path_factory: pytest.TempPathFactory, runtime_name: str, internet: FakeInternet
) -> Iterator[ServerProcess]:
    egress = f'\n[egress]\nupstreamDns = ["{internet.dns}"]\n'
    if runtime_name == "docker":
        egress += f'image = "{built_image("egress", EGRESS_IMAGE)}"\n'
    with running_server(
        tmp_path_factory.mktemp(f"policy-{runtime_name}"), runtime=runtime_name, extra_config=egress
    ) as server:
        yield server


def connection(server: ServerProcess, proxy: bool = False) -> ConnectionConfig:
    return ConnectionConfig(domain=server.domain, use_server_proxy=proxy, disable_metrics=True)


@contextlib.asynccontextmanager
async def sandbox_with(server: ServerProcess, policy: NetworkPolicy | None) -> AsyncIterator[Sandbox]:
    sb = await Sandbox.create(server.image, connection_config=connection(server), network_policy=policy)
    try:
        yield sb
    finally:
        with contextlib.suppress(SandboxApiException):
            await sb.kill()
        await sb.close()


def deny_except_good() -> NetworkPolicy:
    return NetworkPolicy(default_action="deny", egress=[NetworkRule(action="allow", target="*.good.test")])


# --- default deny -----------------------------------------------------------------------------------------
async def test_default_deny_allows_only_the_allowed_names(policy_server: ServerProcess, internet: FakeInternet) -> None:
    async with sandbox_with(policy_server, deny_except_good()) as sb:
        good, bad = internet.address("a.good.test"), internet.address("bad.test")
        assert await resolves(sb, "a.good.test") == good
        assert await fetch(sb, good) == "host=a.good.test"
        assert await resolves(sb, "bad.test") == ""
        # bad.test's address, known some other way: no allowed name resolved to it
        assert await fetch(sb, bad) == "failed"
        # b.good.test was never looked up: its address is not open yet either
        assert await fetch(sb, internet.address("b.good.test")) == "failed"
        # around the filter: the upstream resolver asked directly (port 53 is redirected to the
        # filter whatever the address), and the rogue resolver on another port (refused)
        assert await ask_resolver(sb, internet.dns, 53, "bad.test") == "NXDOMAIN 0"
        assert await ask_resolver(sb, internet.rogue_dns, 53, "bad.test") == "NXDOMAIN 0"
        assert await ask_resolver(sb, internet.rogue_dns, 5353, "bad.test") == "no answer"
        assert await ask_resolver(sb, internet.dns, 53, "b.good.test") == "NOERROR 1"
        policy = await sb.get_egress_policy()
        assert policy.default_action == "deny"
        assert [(r.action, r.target) for r in policy.egress or []] == [("allow", "*.good.test")]
        # what was refused is in the sandbox's diagnostics, by address and by name
        events = (await sb.get_diagnostic_events(scope="runtime")).content or ""
        assert "EgressDenied: the network policy refused" in events and f" to {bad} so far" in events
        assert "EgressNameDenied: the network policy answered NXDOMAIN for bad.test" in events
        assert internet.address("a.good.test") not in events


async def test_a_rewritten_resolv_conf_changes_nothing(policy_server: ServerProcess, internet: FakeInternet) -> None:
    async with sandbox_with(policy_server, deny_except_good()) as sb:
        # the sandbox's root may write its own resolv.conf (docker) or not (the local jail's /etc is
        # synthesized read-only); either way, every port-53 query lands in the filter
        await sh(sb, f"echo 'nameserver {internet.rogue_dns}' > /etc/resolv.conf 2>/dev/null || true")
        assert await resolves(sb, "bad.test") == ""
        assert await resolves(sb, "a.good.test") == internet.address("a.good.test")


async def test_the_sandbox_cannot_flush_the_rules_or_change_its_policy(
    policy_server: ServerProcess, internet: FakeInternet
) -> None:
    async with sandbox_with(policy_server, deny_except_good()) as sb:
        bad = internet.address("bad.test")
        out = await sh(sb, "nft flush ruleset 2>&1; echo rc=$?; iptables -F 2>&1; echo rc=$?")
        assert "rc=0" not in out
        # the egress API in its own namespace, without the token: 401
        status = await sh(
            sb,
            "timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/18080 && printf \"PATCH /policy HTTP/1.0\\r\\n"
            'Content-Length: 37\\r\\n\\r\\n[{\\"action\\":\\"allow\\",\\"target\\":\\"bad.test\\"}]" >&3 '
            "&& head -n1 <&3' || echo unreachable",
        )
        assert "401" in status or "unreachable" in status, status
        assert await fetch(sb, bad) == "failed"
        assert await resolves(sb, "bad.test") == ""


async def test_a_dns_flood_does_not_take_the_filter_down(policy_server: ServerProcess, internet: FakeInternet) -> None:
    async with sandbox_with(policy_server, deny_except_good()) as sb:
        query = dns_query("a.good.test")
        # 4000 UDP queries as fast as bash sends them, and 300 TCP connections held open
        await sh(
            sb,
            f"exec 3<>/dev/udp/{internet.dns}/53; for i in $(seq 4000); do printf '{query}' >&3; done; "
            f"for i in $(seq 300); do (exec 4<>/dev/tcp/{internet.dns}/53; sleep 20) & done; sleep 1; echo sent",
        )
        assert await resolves(sb, "a.good.test") == internet.address("a.good.test")
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{policy_server.url}/health")).status_code == 200
        await sh(sb, "kill $(jobs -p) 2>/dev/null; pkill sleep; true")


# --- default allow --------------------------------------------------------------------------------------------
async def test_default_allow_denies_the_denied_names_and_ranges(
    policy_server: ServerProcess, internet: FakeInternet
) -> None:
    other = internet.address("other.test")
    policy = NetworkPolicy(
        default_action="allow",
        egress=[NetworkRule(action="deny", target="bad.test"), NetworkRule(action="deny", target=f"{other}/32")],
    )
    async with sandbox_with(policy_server, policy) as sb:
        bad = internet.address("bad.test")
        assert await fetch(sb, internet.address("a.good.test")) == "host=a.good.test"  # no lookup needed
        assert await resolves(sb, "bad.test") == ""
        # the rogue resolver is reachable (allow by default) and answers bad.test; its address is
        # still refused: the enforcer resolved the denied name itself
        assert await ask_resolver(sb, internet.rogue_dns, 5353, "bad.test") == "NOERROR 1"
        assert await fetch(sb, bad) == "failed"
        assert await fetch(sb, other) == "failed"  # the CIDR rule
        assert await resolves(sb, "other.test") == other  # a CIDR rule does not touch DNS


# --- changes at run time ----------------------------------------------------------------------------------------
async def test_patch_and_delete_take_effect_before_the_call_returns(
    policy_server: ServerProcess, internet: FakeInternet
) -> None:
    async with sandbox_with(policy_server, deny_except_good()) as sb:
        bad = internet.address("bad.test")
        assert await resolves(sb, "bad.test") == ""
        await sb.patch_egress_rules([NetworkRule(action="allow", target="bad.test")])
        assert await resolves(sb, "bad.test") == bad
        assert await fetch(sb, bad) == "host=bad.test"
        await sb.delete_egress_rules(["bad.test"])
        assert await resolves(sb, "bad.test") == ""
        assert await fetch(sb, bad) == "failed"
        # through the server's lifecycle route: deny a.good.test ahead of the wildcard, then replace
        url = f"{policy_server.url}/v1/sandboxes/{sb.id}/networkpolicy"
        async with httpx.AsyncClient(timeout=30) as client:
            patched = await client.patch(url, json=[{"action": "deny", "target": "a.good.test"}])
            assert patched.status_code == 200, patched.text
            assert patched.json()["enforced"] is True
            assert await fetch(sb, internet.address("a.good.test")) == "failed"
            assert await resolves(sb, "b.good.test") == internet.address("b.good.test")
            replaced = await client.put(url, json={"defaultAction": "allow", "egress": []})
            assert replaced.status_code == 200, replaced.text
            assert await fetch(sb, bad) == "host=bad.test"
            bad_body = await client.patch(url, json=[{"action": "allow", "target": "no_underscores.test"}])
            assert bad_body.status_code == 400 and bad_body.json()["code"]


async def test_no_policy_means_no_enforcer(policy_server: ServerProcess, internet: FakeInternet) -> None:
    async with sandbox_with(policy_server, None) as sb:
        assert await fetch(sb, internet.address("bad.test")) == "host=bad.test"
        async with httpx.AsyncClient(timeout=30) as client:
            url = f"{policy_server.url}/v1/sandboxes/{sb.id}/networkpolicy"
            got = (await client.get(url)).json()
            assert got["enforced"] is False and got["mode"] == "allow_all"
            refused = await client.patch(url, json=[{"action": "deny", "target": "bad.test"}])
            assert refused.status_code == 409 and refused.json()["code"]
        if policy_server.runtime == "docker":
            found = docker_api("GET", f"/containers/sandbox-{sb.id}-egress/json")
            assert found.status_code == 404


async def test_bad_policies_are_refused_with_400(policy_server: ServerProcess) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        for policy in (
            {"defaultAction": "maybe"},
            {"defaultAction": "deny", "egress": [{"action": "allow", "target": "exa mple.com"}]},
            {"defaultAction": "deny", "egress": [{"action": "allow", "target": f"n{i}.test"} for i in range(300)]},
        ):
            body = {
                "image": {"uri": policy_server.image},
                "entrypoint": ["tail", "-f", "/dev/null"],
                "timeout": 60,
                "resourceLimits": {},
                "networkPolicy": policy,
            }
            response = await client.post(f"{policy_server.url}/v1/sandboxes", json=body)
            assert response.status_code == 400, response.text
            assert response.json()["code"] and "networkPolicy" in response.json()["message"]
        credential = {**body, "networkPolicy": None, "credentialProxy": {"enabled": True}}
        response = await client.post(f"{policy_server.url}/v1/sandboxes", json=credential)
        assert response.status_code == 400 and "credentialProxy" in response.json()["message"]


async def test_the_policy_survives_a_restart_of_its_enforcer(
    policy_server: ServerProcess, internet: FakeInternet, tmp_path: Path
) -> None:
    """docker: the sidecar killed (its restart policy starts it again from its state file); local:
    the server restarted (it enforces the recorded policy again)."""
    async with sandbox_with(policy_server, deny_except_good()) as sb:
        await sb.patch_egress_rules([NetworkRule(action="allow", target="other.test")])
        if policy_server.runtime == "docker":
            name = f"sandbox-{sb.id}-egress"
            # a crash, not a stop through the engine (which a restart policy leaves stopped)
            os.kill(int(docker_api("GET", f"/containers/{name}/json").json()["State"]["Pid"]), signal.SIGKILL)
            for _ in range(100):
                found = docker_api("GET", f"/containers/{name}/json").json()
                if found["State"]["Running"] and found.get("RestartCount", 0) >= 1:
                    break
                await asyncio.sleep(0.1)
            assert found.get("RestartCount", 0) >= 1, found["State"]
        else:
            policy_server.stop(cleanup=False)
            policy_server.start()
        for _ in range(50):  # the DNS filter is back once the sidecar says it listens
            if await resolves(sb, "other.test"):
                break
            await asyncio.sleep(0.2)
        assert await resolves(sb, "other.test") == internet.address("other.test")
        assert await resolves(sb, "bad.test") == ""
        assert await fetch(sb, internet.address("bad.test")) == "failed"
        policy = await sb.get_egress_policy()
        assert [r.target for r in policy.egress or []] == ["other.test", "*.good.test"]
