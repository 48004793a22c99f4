"""SDK 1.1.1 parity (issue 19) through the official SDK and CLI, on each runtime under test:
diagnostics (`get_diagnostic_logs/events`, `osb diagnostics`, `osb devops`), signed endpoints,
secureAccess, and the 501 of features no runtime serves."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from opensandbox import Sandbox, SandboxManager
from opensandbox.exceptions import SandboxApiException

from harness.server_process import ServerProcess
from tests.e2e.test_server_api import osb
from tests.e2e.test_server_sdk import config


@pytest.fixture
async def sandbox(server: ServerProcess) -> AsyncIterator[Sandbox]:
    sb = await Sandbox.create(
        server.image,
        connection_config=config(server),
        entrypoint=["sh", "-c", "echo hello-from-entrypoint; exec sleep 600"],
    )
    yield sb
    with contextlib.suppress(SandboxApiException):
        await sb.kill()
    await sb.close()


async def test_diagnostic_logs_and_events_through_the_sdk(server: ServerProcess, sandbox: Sandbox) -> None:
    logs = await sandbox.get_diagnostic_logs(scope="container")
    assert logs.delivery == "inline" and "hello-from-entrypoint" in (logs.content or "")
    await sandbox.renew(timedelta_minutes(20))
    events = await sandbox.get_diagnostic_events(scope="all")
    content = events.content or ""
    for reason in ("Created", "Started", "Renewed"):
        assert f"{reason}:" in content, content
    manager = await SandboxManager.create(config(server))
    try:
        again = await manager.get_diagnostic_events(sandbox.id, scope="lifecycle")
        assert "Renewed:" in (again.content or "")
        with pytest.raises(SandboxApiException) as err:
            await manager.get_diagnostic_logs(sandbox.id, scope="kernel")
        assert err.value.status_code == 400
        with pytest.raises(SandboxApiException) as err:
            await manager.get_diagnostic_logs("no-such-sandbox", scope="container")
        assert err.value.status_code == 404
    finally:
        await manager.close()


def timedelta_minutes(minutes: int):  # type: ignore[no-untyped-def]
    import datetime as dt

    return dt.timedelta(minutes=minutes)


async def test_osb_diagnostics_and_devops(server: ServerProcess, sandbox: Sandbox, tmp_path: Path) -> None:
    assert "hello-from-entrypoint" in osb(server, tmp_path, "diagnostics", "logs", sandbox.id, "--scope", "container")
    assert "Created:" in osb(server, tmp_path, "diagnostics", "events", sandbox.id, "--scope", "all")
    assert "hello-from-entrypoint" in osb(server, tmp_path, "devops", "logs", sandbox.id, "--tail", "50")
    assert sandbox.id in osb(server, tmp_path, "devops", "inspect", sandbox.id)
    assert "Started:" in osb(server, tmp_path, "devops", "events", sandbox.id)
    summary = osb(server, tmp_path, "devops", "summary", sandbox.id)
    assert "== events" in summary and "hello-from-entrypoint" in summary
    # Secrets stay out of inspect: execd's token is not in it.
    endpoint = await sandbox.get_endpoint(44772)
    token = next(iter(endpoint.headers.values()))
    assert token not in osb(server, tmp_path, "devops", "inspect", sandbox.id)


async def test_a_signed_endpoint_works_without_the_api_key_until_it_expires(
    server: ServerProcess, sandbox: Sandbox
) -> None:
    expires = int(time.time()) + 4
    signed = await sandbox.get_signed_endpoint(44772, expires)
    url = f"http://{signed.endpoint}"
    async with httpx.AsyncClient(timeout=10) as client:  # no API key
        assert (await client.get(f"{url}/ping")).status_code == 200
        other = await Sandbox.create(server.image, connection_config=config(server))
        try:
            forged = url.replace(sandbox.id, other.id)  # another sandbox's route, this one's signature
            assert (await client.get(f"{forged}/ping")).status_code == 401
        finally:
            await other.kill()
            await other.close()
        await asyncio.sleep(max(0.0, expires - time.time()) + 0.2)
        expired = await client.get(f"{url}/ping")
        assert expired.status_code == 403 and expired.json()["code"] == "SANDBOX::SIGNATURE_EXPIRED"
    with pytest.raises(SandboxApiException) as err:
        await sandbox.get_signed_endpoint(44772, int(time.time()) - 10)
    assert err.value.status_code == 400


@pytest.mark.parametrize("proxy", [False, True], ids=["direct", "server-proxy"])
async def test_secure_access_sandbox_needs_its_token(server: ServerProcess, proxy: bool) -> None:
    sb = await Sandbox.create(server.image, connection_config=config(server, proxy), secure_access=True)
    try:
        run = await sb.commands.run("echo secured")
        assert [m.text for m in run.logs.stdout] == ["secured"]
        endpoint = await sb.get_endpoint(44772)
        assert f"/sandboxes/{sb.id}/proxy/44772" in endpoint.endpoint
        async with httpx.AsyncClient(timeout=10, headers=server.headers()) as client:
            refused = await client.get(f"http://{endpoint.endpoint}/ping")  # the API key alone
            assert refused.status_code == 403
            assert (await client.get(f"http://{endpoint.endpoint}/ping", headers=endpoint.headers)).status_code == 200
    finally:
        await sb.kill()
        await sb.close()


@pytest.mark.parametrize(
    ("method", "path", "feature"),
    [("GET", "/v1/templates", "templates"), ("DELETE", "/v1/templates/t-1", "templates")],
)
def test_unsupported_features_are_501_naming_them(server: ServerProcess, method: str, path: str, feature: str) -> None:
    response = httpx.request(method, server.url + path, headers=server.headers())
    assert response.status_code == 501 and feature in response.json()["message"]
