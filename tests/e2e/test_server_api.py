"""The server's contract beyond the happy path: bad input, API keys, restarts and expiry, the proxy
(HTTP, WebSocket, streaming), and the official CLI (`osb`) and MCP server against it."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from opensandbox import Sandbox
from opensandbox.config import ConnectionConfig
from opensandbox.models.execd import RunCommandOpts

from harness.images import TEST_IMAGE
from harness.jails import live_processes_mentioning, live_processes_with_hostname_arg
from harness.ports import free_port
from harness.server_process import ServerProcess, only_local, running_server
from harness.stale_nat import ephemeral_ports, ephemeral_ports_taken

CREATE = {"image": {"uri": "ubuntu"}, "entrypoint": ["tail", "-f", "/dev/null"], "timeout": 600}


def for_runtime(server: ServerProcess, body: Any) -> Any:
    """The body with the image this server's runtime is tested with."""
    if isinstance(body, dict) and "image" in body:
        return {**body, "image": {"uri": server.image}}
    return body


def create(server: ServerProcess, **overrides: Any) -> dict[str, Any]:
    request = for_runtime(server, {**CREATE, **overrides})
    response = httpx.post(f"{server.url}/v1/sandboxes", json=request, headers=server.headers())
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


def delete(server: ServerProcess, sandbox_id: str) -> None:
    response = httpx.delete(f"{server.url}/v1/sandboxes/{sandbox_id}", headers=server.headers(), timeout=30)
    assert response.status_code == 204, response.text


@pytest.fixture(scope="module")
def cold_server(tmp_path_factory: pytest.TempPathFactory, runtime_name: str) -> Iterator[ServerProcess]:
    """Local: no warm pool, so every create starts its own jail and the state dir holds exactly
    the sandboxes. Other runtimes have no pool: the shared server's config."""
    extra = "warmPoolSize = 0" if runtime_name == "local" else ""
    with running_server(tmp_path_factory.mktemp("cold"), extra_config=extra, runtime=runtime_name) as srv:
        yield srv


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"code", "message"} and body["message"], body
    if code is not None:
        assert body["code"] == code
    assert response.headers["x-request-id"]


# -- bad input ---------------------------------------------------------------------------------

BAD_CREATES: list[tuple[str, Any, str]] = [
    ("missing body", None, "SANDBOX::INVALID_PARAMETER"),
    ("malformed json", b"{not json", "SANDBOX::INVALID_PARAMETER"),
    ("body not an object", [1, 2], "SANDBOX::INVALID_PARAMETER"),
    ("timeout negative", {**CREATE, "timeout": -5}, "SANDBOX::INVALID_PARAMETER"),
    ("timeout below 60", {**CREATE, "timeout": 30}, "SANDBOX::INVALID_PARAMETER"),
    ("timeout too large", {**CREATE, "timeout": 10**9}, "SANDBOX::INVALID_PARAMETER"),
    ("timeout not a number", {**CREATE, "timeout": "soon"}, "SANDBOX::INVALID_PARAMETER"),
    ("no image", {"entrypoint": ["true"], "timeout": 60}, "SANDBOX::INVALID_PARAMETER"),
    ("empty entrypoint", {**CREATE, "entrypoint": []}, "SANDBOX::INVALID_PARAMETER"),
    ("reserved metadata", {**CREATE, "metadata": {"opensandbox.io/x": "y"}}, "SANDBOX::INVALID_METADATA_LABEL"),
    ("bad metadata value", {**CREATE, "metadata": {"k": "has space"}}, "SANDBOX::INVALID_METADATA_LABEL"),
    ("bad cpu", {**CREATE, "resourceLimits": {"cpu": "lots"}}, "SANDBOX::INVALID_PARAMETER"),
    ("bad memory", {**CREATE, "resourceLimits": {"memory": "2 apples"}}, "SANDBOX::INVALID_PARAMETER"),
    (
        "host volume not allowed",
        {**CREATE, "volumes": [{"name": "v", "mountPath": "/v", "host": {"path": "/"}}]},
        "SANDBOX::INVALID_PARAMETER",
    ),
    (
        "volume backend unsupported",
        {**CREATE, "volumes": [{"name": "v", "mountPath": "/v", "nfs": {"server": "x"}}]},
        "SANDBOX::API_NOT_SUPPORTED",
    ),
    ("entrypoint not found", {**CREATE, "entrypoint": ["/no/such/program"]}, "SANDBOX::INVALID_PARAMETER"),
]


@pytest.mark.parametrize(("case", "body", "code"), BAD_CREATES, ids=[c[0] for c in BAD_CREATES])
def test_bad_creates_are_4xx_and_leave_nothing(cold_server: ServerProcess, case: str, body: Any, code: str) -> None:
    server = cold_server
    before_dirs, before_list = server.sandboxes_on_host(), httpx.get(f"{server.url}/v1/sandboxes").json()
    kwargs: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": for_runtime(server, body)}
    if body is None:
        kwargs = {}
    response = httpx.post(
        f"{server.url}/v1/sandboxes", headers={"content-type": "application/json"}, timeout=30, **kwargs
    )
    assert_error(response, 400, code)
    assert server.sandboxes_on_host() == before_dirs
    assert httpx.get(f"{server.url}/v1/sandboxes").json()["pagination"] == before_list["pagination"]


BAD_REQUESTS = [
    ("GET", "/v1/sandboxes/no-such-id", None, 404),
    ("GET", "/sandboxes/no-such-id", None, 404),
    ("DELETE", "/v1/sandboxes/no-such-id", None, 404),
    ("POST", "/v1/sandboxes/no-such-id/pause", None, 404),
    ("POST", "/v1/sandboxes/no-such-id/resume", None, 404),
    ("PATCH", "/v1/sandboxes/no-such-id/metadata", {"a": "b"}, 404),
    ("GET", "/v1/sandboxes/no-such-id/endpoints/44772", None, 404),
    ("GET", "/v1/sandboxes/no-such-id/endpoints/44772?use_server_proxy=true", None, 404),
    ("GET", "/v1/sandboxes/no-such-id/proxy/44772/ping", None, 404),
    ("POST", "/v1/sandboxes/no-such-id/renew-expiration", {"expiresAt": "2099-01-01T00:00:00Z"}, 404),
    ("GET", "/v1/sandboxes?metadata=novalue", None, 400),
    ("GET", "/v1/sandboxes?pageSize=500", None, 400),
    ("GET", "/v1/sandboxes?page=0", None, 400),
    ("GET", "/v1/sandboxes?page=x", None, 400),
    ("GET", "/v1/no/such/route", None, 404),
    ("PUT", "/v1/sandboxes", None, 405),
]


@pytest.mark.parametrize(("method", "path", "body", "status"), BAD_REQUESTS)
def test_bad_requests_get_code_and_message(
    server: ServerProcess, method: str, path: str, body: Any, status: int
) -> None:
    assert_error(httpx.request(method, server.url + path, json=body), status)


def test_bad_input_on_an_existing_sandbox(server: ServerProcess) -> None:
    sandbox = create(server)
    base = f"{server.url}/v1/sandboxes/{sandbox['id']}"
    try:
        past = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)).isoformat()
        assert_error(httpx.post(f"{base}/renew-expiration", json={"expiresAt": past}), 400)
        assert_error(httpx.post(f"{base}/renew-expiration", json={}), 400)
        assert_error(httpx.post(f"{base}/renew-expiration", json={"expiresAt": "tomorrow"}), 400)
        assert_error(httpx.patch(f"{base}/metadata", json={"opensandbox.io/x": "y"}), 400)
        assert_error(httpx.patch(f"{base}/metadata", json=["not", "a", "map"]), 400)
        assert_error(httpx.get(f"{base}/endpoints/0"), 400)
        assert_error(httpx.get(f"{base}/endpoints/70000"), 400)
        assert_error(httpx.get(f"{base}/endpoints/http"), 400)
        assert_error(httpx.post(f"{base}/resume"), 409, "SANDBOX::INVALID_STATE")
        assert httpx.post(f"{base}/pause").status_code == 202
        assert_error(httpx.post(f"{base}/pause"), 409, "SANDBOX::INVALID_STATE")
        assert_error(httpx.get(f"{base}/proxy/44772/ping"), 409, "SANDBOX::INVALID_STATE")
        assert httpx.get(base).json()["status"]["state"] == "Paused"
    finally:
        delete(server, sandbox["id"])
    manual = create(server, timeout=None)
    try:
        assert "expiresAt" not in manual
        future = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
        renew = httpx.post(f"{server.url}/v1/sandboxes/{manual['id']}/renew-expiration", json={"expiresAt": future})
        assert_error(renew, 409)
    finally:
        delete(server, manual["id"])


def test_a_failed_claim_of_a_warm_jail_leaves_nothing_and_the_pool_recovers(server: ServerProcess) -> None:
    only_local(server, "the warm pool and its records")
    before = {r["id"] for r in server.records()}
    response = httpx.post(f"{server.url}/v1/sandboxes", json=for_runtime(server, {**CREATE, "entrypoint": ["/x"]}))
    assert_error(response, 400)
    assert {r["id"] for r in server.records()} == before
    created = create(server, env={"WARM": "claimed"})
    try:

        async def probe() -> list[str]:
            sb = await Sandbox.connect(created["id"], connection_config=ConnectionConfig(domain=server.domain))
            run = await sb.commands.run("hostname; echo $WARM")
            await sb.close()
            return [m.text for m in run.logs.stdout]

        assert asyncio.run(probe()) == [created["id"], "claimed"]
    finally:
        delete(server, created["id"])


def test_a_cold_create_gives_the_same_jail(cold_server: ServerProcess) -> None:
    created = create(cold_server, env={"COLD": "1"})
    try:

        async def probe() -> list[str]:
            config = ConnectionConfig(domain=cold_server.domain)
            sb = await Sandbox.connect(created["id"], connection_config=config)
            run = await sb.commands.run("hostname; echo $COLD; pwd")
            await sb.close()
            return [m.text for m in run.logs.stdout]

        assert asyncio.run(probe()) == [created["id"], "1", "/workspace"]
    finally:
        delete(cold_server, created["id"])


def test_request_id_is_echoed_or_generated(server: ServerProcess) -> None:
    echoed = httpx.get(f"{server.url}/v1/sandboxes", headers={"X-Request-ID": "abc-123"})
    assert echoed.headers["x-request-id"] == "abc-123"
    generated = [httpx.get(f"{server.url}/health").headers["x-request-id"] for _ in range(2)]
    assert generated[0] and generated[0] != generated[1]


def test_openapi_docs_are_served(server: ServerProcess) -> None:
    assert httpx.get(f"{server.url}/docs").status_code == 200
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert "/v1/sandboxes" in paths and "/v1/sandboxes/{sandboxId}/endpoints/{port}" in paths


# -- API key -----------------------------------------------------------------------------------


def test_api_key_is_required_when_configured(tmp_path: Path, runtime_name: str) -> None:
    with running_server(tmp_path, api_key="k3y-for-tests", runtime=runtime_name) as server:
        url = f"{server.url}/v1/sandboxes"
        assert_error(httpx.get(url), 401, "MISSING_API_KEY")
        assert_error(httpx.get(url, headers={"OPEN-SANDBOX-API-KEY": "wrong"}), 401, "INVALID_API_KEY")
        assert_error(httpx.post(url, json=CREATE, headers={"OPEN-SANDBOX-API-KEY": "k3y-for-test"}), 401)
        assert_error(httpx.get(f"{server.url}/v1/sandboxes/x/proxy/44772/ping"), 401, "MISSING_API_KEY")
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert httpx.get(url, headers=server.headers()).status_code == 200
        assert httpx.get(url, headers=server.headers()).json()["items"] == []

        async def with_the_sdk(proxy: bool) -> list[str]:
            config = ConnectionConfig(domain=server.domain, api_key=server.api_key, use_server_proxy=proxy)
            sb = await Sandbox.create(server.image, connection_config=config)
            try:
                return [m.text for m in (await sb.commands.run("echo keyed")).logs.stdout]
            finally:
                await sb.kill()
                await sb.close()

        assert asyncio.run(with_the_sdk(False)) == ["keyed"]
        assert asyncio.run(with_the_sdk(True)) == ["keyed"]


# -- restart and expiry ------------------------------------------------------------------------


def test_a_second_server_on_the_same_state_dir_refuses_to_start(server: ServerProcess, tmp_path: Path) -> None:
    only_local(server, "the state dir lock")
    config = tmp_path / "same-state.toml"
    config.write_text(f'[local]\nstateDir = "{server.state_dir}"\n')
    result = subprocess.run(
        [sys.executable, "-m", "opensandbox_platform.server.main", "--config", str(config), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "another opensandbox-server uses the state dir" in result.stderr
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_stopping_the_server_kills_warm_jails_but_not_sandboxes(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, extra_config="warmPoolSize = 2").start()
    try:
        kept = create(server)
        # Stop while the pool is refilling: a jail half-started must not leak either.
        time.sleep(0.35)
        server.stop(cleanup=False)
        jail_dirs = {p.name for p in (server.state_dir / "sandboxes").iterdir()}
        assert jail_dirs == {kept["id"]}
        strays = [
            pid
            for pid in live_processes_mentioning(str(server.state_dir))
            if kept["id"] not in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
        ]
        assert strays == []
        assert live_processes_with_hostname_arg(kept["id"])
    finally:
        server.stop()


def test_sandboxes_survive_a_restart_and_are_still_reaped_on_time(tmp_path: Path, runtime_name: str) -> None:
    server = ServerProcess(tmp_path, runtime=runtime_name).start()
    try:
        kept = create(server, metadata={"role": "kept"})
        paused = create(server, metadata={"role": "paused"})
        doomed = create(server, metadata={"role": "doomed"})
        assert httpx.post(f"{server.url}/v1/sandboxes/{paused['id']}/pause").status_code == 202
        # Far enough ahead to outlast a restart on a loaded machine (a docker restart alone takes ~4 s).
        due = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=10)
        renew = httpx.post(
            f"{server.url}/v1/sandboxes/{doomed['id']}/renew-expiration", json={"expiresAt": due.isoformat()}
        )
        assert renew.status_code == 200

        server.stop(cleanup=False)
        for sandbox in (kept, paused, doomed):
            assert live_processes_with_hostname_arg(sandbox["id"]), "a sandbox died with the server"

        server.port = free_port()
        server.start()
        listed = httpx.get(f"{server.url}/v1/sandboxes").json()["items"]
        assert {s["id"]: s["status"]["state"] for s in listed} == {
            kept["id"]: "Running",
            paused["id"]: "Paused",
            doomed["id"]: "Running",
        }

        async def still_usable() -> list[str]:
            config = ConnectionConfig(domain=server.domain)
            sb = await Sandbox.connect(kept["id"], connection_config=config)
            run = await sb.commands.run("echo after-restart")
            resumed = await Sandbox.resume(paused["id"], connection_config=config)
            run2 = await resumed.commands.run("echo resumed-after-restart")
            await sb.close()
            await resumed.close()
            return [m.text for m in run.logs.stdout + run2.logs.stdout]

        assert asyncio.run(still_usable()) == ["after-restart", "resumed-after-restart"]

        deadline = due + dt.timedelta(seconds=10)
        while httpx.get(f"{server.url}/v1/sandboxes/{doomed['id']}").status_code != 404:
            assert dt.datetime.now(dt.UTC) < deadline, "the expired sandbox was not reaped"
            time.sleep(0.1)
        assert dt.datetime.now(dt.UTC) >= due
        assert live_processes_with_hostname_arg(doomed["id"]) == []
        assert doomed["id"] not in server.sandboxes_on_host()
    finally:
        server.stop()


# -- proxy -------------------------------------------------------------------------------------

WS_ECHO = """
import asyncio, sys
from websockets.asyncio.server import serve
async def echo(ws):
    async for message in ws:
        await ws.send(message)
async def main():
    async with serve(echo, "127.0.0.1", int(sys.argv[1])):
        await asyncio.Future()
asyncio.run(main())
"""


async def test_proxy_relays_http_websocket_and_large_bodies(server: ServerProcess) -> None:
    config = ConnectionConfig(domain=server.domain, use_server_proxy=True)
    sb = await Sandbox.create(server.image, connection_config=config)
    # The local runtime's jails have a Python; the docker test image has busybox only, so
    # there the HTTP server is busybox's and the WebSocket relay (runtime-independent) is not run.
    with_python = server.runtime == "local"
    try:
        http_port, ws_port = free_port(), free_port()
        await sb.files.write_file("/workspace/ws_echo.py", WS_ECHO)
        await sb.files.write_file("/workspace/site/index.html", "hello from the jail")
        background = RunCommandOpts(background=True, working_directory="/workspace/site")
        if with_python:
            # The jail's root has the host's /usr but not the server's virtual environment: the
            # interpreter and packages execd runs on are at /opt/opensandbox (read-only).
            python = f"PYTHONPATH=/opt/opensandbox/site /opt/opensandbox/python/bin/python{sys.version_info[0]}"
            await sb.commands.run(f"{python} -m http.server {http_port} --bind 127.0.0.1", opts=background)
            await sb.commands.run(f"{python} /workspace/ws_echo.py {ws_port}", opts=background)
        else:
            await sb.commands.run(f"busybox httpd -f -p {http_port} -h /workspace/site", opts=background)

        base = f"{server.url}/v1/sandboxes/{sb.id}/proxy"
        async with httpx.AsyncClient(timeout=30) as client:
            for _ in range(100):  # 502 until the server in the jail listens
                page = await client.get(f"{base}/{http_port}/index.html")
                if page.status_code != 502:
                    break
                await asyncio.sleep(0.1)
            assert page.status_code == 200 and page.text == "hello from the jail"

        ws_url = f"ws://{server.domain}/v1/sandboxes/{sb.id}/proxy/{ws_port}/echo"
        for _ in range(100 if with_python else 0):
            try:
                async with websockets.connect(ws_url) as ws:
                    await ws.send("text frame")
                    assert await ws.recv() == "text frame"
                    await ws.send(b"\x00\x01binary")
                    assert await ws.recv() == b"\x00\x01binary"
                break
            except (OSError, websockets.InvalidHandshake, websockets.ConnectionClosedError):
                await asyncio.sleep(0.1)
        else:
            if with_python:
                raise AssertionError("the WebSocket echo server never answered through the proxy")

        # 64 MiB each way through the proxy: streamed, so the server's memory stays flat.
        rss_before = rss_kib(server)
        payload = os.urandom(1 << 20) * 64
        await sb.files.write_file("/tmp/big.bin", payload)
        assert await sb.files.read_bytes("/tmp/big.bin") == payload
        assert rss_kib(server) - rss_before < 48 * 1024
    finally:
        await sb.kill()
        await sb.close()


def rss_kib(server: ServerProcess) -> int:
    assert server.proc is not None
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):  # the peak: a buffered body would show here
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


# -- the official CLI and MCP server -----------------------------------------------------------


def osb(server: ServerProcess, tmp_path: Path, *args: str) -> str:
    bindir = Path(sys.executable).parent
    result = subprocess.run(
        [str(bindir / "osb"), "--domain", server.domain, "--config", str(tmp_path / "osb.toml"), "--no-color", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_osb_cli_creates_runs_and_kills(server: ServerProcess, tmp_path: Path) -> None:
    created = json.loads(osb(server, tmp_path, "sandbox", "create", "-i", server.image, "-o", "json"))
    sandbox_id = created["id"]
    assert osb(server, tmp_path, "command", "run", sandbox_id, "-o", "raw", "--", "echo", "hi-from-osb").strip() == (
        "hi-from-osb"
    )
    osb(server, tmp_path, "sandbox", "kill", sandbox_id)
    assert httpx.get(f"{server.url}/v1/sandboxes/{sandbox_id}").status_code == 404


async def test_mcp_server_lists_tools_and_runs_a_command(server: ServerProcess) -> None:
    bindir = Path(sys.executable).parent
    params = StdioServerParameters(
        command=str(bindir / "opensandbox-mcp"),
        args=["--domain", server.domain, "--protocol", "http"],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        tools = {tool.name for tool in (await session.list_tools()).tools}
        assert {"sandbox_create", "command_run", "sandbox_kill", "file_read", "file_write"} <= tools
        created = await session.call_tool("sandbox_create", {"image": server.image})
        assert not created.is_error, created.content
        sandbox_id = created.structured_content["sandbox_id"]  # type: ignore[index]
        try:
            ran = await session.call_tool("command_run", {"sandbox_id": sandbox_id, "command": "echo hi-from-mcp"})
            assert not ran.is_error and "hi-from-mcp" in json.dumps(ran.structured_content)
        finally:
            killed = await session.call_tool("sandbox_kill", {"sandbox_id": sandbox_id})
            assert not killed.is_error
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{server.url}/v1/sandboxes/{sandbox_id}")).status_code == 404


# -- the jail: limits, entrypoint exit, what it cannot see -------------------------------------


def wait_for_state(server: ServerProcess, sandbox_id: str, wanted: str, timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = httpx.get(f"{server.url}/v1/sandboxes/{sandbox_id}").json()
        if body["status"]["state"] == wanted:
            return body
        assert time.monotonic() < deadline, f"state stayed {body['status']}"
        time.sleep(0.1)


def test_the_sandbox_ends_when_its_entrypoint_exits(server: ServerProcess) -> None:
    # Long enough for execd to start first (a container's execd takes ~0.3 s, more on a busy host).
    runs = "0.5" if server.runtime == "local" else "3"
    ok = create(server, entrypoint=["sleep", runs])
    failed = create(server, entrypoint=["sh", "-c", f"sleep {runs}; exit 3"])
    try:
        assert wait_for_state(server, ok["id"], "Terminated")["status"]["reason"] == server.flavor.exited_reason
        assert "code 3" in wait_for_state(server, failed["id"], "Failed")["status"]["message"]
        assert live_processes_with_hostname_arg(ok["id"]) == []
    finally:
        delete(server, ok["id"])
        delete(server, failed["id"])


async def test_the_memory_limit_is_enforced(server: ServerProcess) -> None:
    config = ConnectionConfig(domain=server.domain)
    sb = await Sandbox.create(server.image, connection_config=config, resource={"cpu": "1", "memory": "64Mi"})
    try:
        if server.runtime == "docker":  # no Python in the image: a shell holding 256 MiB in a variable
            hog = await sb.commands.run("x=$(head -c 268435456 /dev/zero | tr '\\0' a); echo ${#x}")
            assert hog.exit_code == 137  # SIGKILL from the container's OOM killer
            assert (await sb.commands.run("x=$(head -c 4194304 /dev/zero | tr '\\0' a)")).exit_code == 0
            return
        hog = await sb.commands.run("python3 -c 'x = bytearray(256 << 20); print(len(x))'")
        (record,) = [r for r in server.records() if r["id"] == sb.id]
        if "memory" in record["cgroups"]:  # type: ignore[operator]
            assert hog.exit_code == 137  # SIGKILL from the cgroup's OOM killer
        else:  # no writable memory cgroup on this host: RLIMIT_AS makes the allocation fail
            assert hog.exit_code not in (0, None)
        small = await sb.commands.run("python3 -c 'x = bytearray(8 << 20); print(len(x))'")
        assert small.exit_code == 0
    finally:
        await sb.kill()
        await sb.close()


def test_the_state_dir_and_config_are_hidden_from_sandboxes(tmp_path: Path) -> None:
    # A state dir outside /tmp and /root (both private in a jail) is visible unless hidden.
    visible = Path("/var/tmp") / f"osb-e2e-{os.getpid()}-{time.monotonic_ns()}"
    with running_server(visible, api_key="hidden-key", extra_config="warmPoolSize = 0") as server:
        try:
            first, second = create(server), create(server)

            async def look() -> list[str]:
                config = ConnectionConfig(domain=server.domain, api_key=server.api_key)
                sb = await Sandbox.connect(first["id"], connection_config=config)
                run = await sb.commands.run(
                    f"ls -A {server.state_dir} | wc -l; cat {server.config_path} 2>/dev/null | wc -c; "
                    f"cat {server.state_dir}/sandboxes/{second['id']}/sandbox.json 2>/dev/null || echo hidden"
                )
                await sb.close()
                return [m.text for m in run.logs.stdout]

            assert asyncio.run(look()) == ["0", "0", "hidden"]
            assert server.config_path.read_text() and (server.state_dir / "sandboxes" / second["id"]).is_dir()
        finally:
            server.stop()
            shutil.rmtree(visible, ignore_errors=True)


def process_states(server: ServerProcess, sandbox_id: str) -> set[str]:
    """The states (R, S, T, ...) of the processes in the sandbox's PID namespace."""
    (record,) = [r for r in server.records() if r["id"] == sandbox_id]
    namespace = os.readlink(f"/proc/{record['pid']}/ns/pid")
    states = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{entry}/ns/pid") == namespace:
                states.add(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0])
    return states


def test_without_cgroups_pause_stops_every_process_and_memory_is_an_rlimit(tmp_path: Path) -> None:
    with running_server(tmp_path, extra_config="useCgroups = false\nwarmPoolSize = 0") as server:
        created = create(server, resourceLimits={"memory": "256Mi"})
        base = f"{server.url}/v1/sandboxes/{created['id']}"
        try:

            async def run(command: str) -> Any:
                sb = await Sandbox.connect(created["id"], connection_config=ConnectionConfig(domain=server.domain))
                try:
                    return await sb.commands.run(command)
                finally:
                    await sb.close()

            limit = asyncio.run(run("ulimit -v"))
            assert [m.text for m in limit.logs.stdout] == [str(256 * 1024)]  # RLIMIT_AS, in KiB
            assert asyncio.run(run("sleep 1000 >/dev/null 2>&1 &")).exit_code == 0

            assert httpx.post(f"{base}/pause").status_code == 202
            assert process_states(server, created["id"]) == {"T"}  # bwrap, execd, tail, sleep: all stopped
            assert httpx.post(f"{base}/resume").status_code == 202
            assert "T" not in process_states(server, created["id"])
            assert [m.text for m in asyncio.run(run("echo awake")).logs.stdout] == ["awake"]
        finally:
            delete(server, created["id"])
        assert live_processes_with_hostname_arg(created["id"]) == []


def test_starting_and_deleting_sandboxes_leaves_the_hosts_shared_mounts_alone(
    server: ServerProcess, tmp_path: Path
) -> None:
    """A jail's namespaces are made from copies of the host's mounts: nothing done in them (nor
    in slirp4netns' sandbox) may unmount anything of the host's, shared mounts included (podman's
    network namespaces in /run/netns, a kubelet's volumes)."""
    only_local(server, "the local runtime's mount namespaces")
    shared, inner = tmp_path / "shared", tmp_path / "shared" / "inner"
    shared.mkdir()
    subprocess.run(["mount", "--bind", str(shared), str(shared)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(shared)], check=True)
        inner.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "canary", str(inner)], check=True)
        created = create(server)
        delete(server, created["id"])
        mounts = Path("/proc/self/mounts").read_text()
        assert f" {inner} tmpfs " in mounts, "a jail unmounted a shared mount of the host"
    finally:
        subprocess.run(["umount", "-R", str(shared)], check=False)


def test_an_image_in_containers_storage_is_the_local_sandboxs_root(tmp_path: Path, docker_host: str) -> None:
    """The test image (a Debian minbase podman has) as the root: its files (owned by the sandbox's
    root through an idmapped mount), writable through a private upper layer of its own quota."""
    if shutil.which("podman") is None or subprocess.run(["podman", "image", "exists", TEST_IMAGE]).returncode:
        pytest.skip(f"podman or {TEST_IMAGE} is missing")
    with running_server(tmp_path, extra_config="warmPoolSize = 0\ndiskSizeMib = 64") as server:
        created = httpx.post(f"{server.url}/v1/sandboxes", json={**CREATE, "image": {"uri": TEST_IMAGE}}, timeout=120)
        assert created.status_code == 202, created.text
        sandbox = created.json()
        assert sandbox["status"]["message"].startswith(f"root: image {TEST_IMAGE} (sha256:")
        try:

            async def look() -> list[str]:
                sb = await Sandbox.connect(sandbox["id"], connection_config=ConnectionConfig(domain=server.domain))
                run = await sb.commands.run(
                    "cat /etc/debian_version >/dev/null && echo debian; stat -c %u /etc/passwd; busybox true && echo"
                    " busybox; echo x > /etc/written && cat /etc/written; pwd;"
                    " head -c 100000000 /dev/zero > /tmp/big 2>/dev/null || echo quota"
                )
                await sb.close()
                return [m.text for m in run.logs.stdout]

            assert asyncio.run(look()) == ["debian", "0", "busybox", "x", "/workspace", "quota"]
            other = create(server)  # a create whose image is not there gets the minimal root
            assert other["status"]["message"].startswith("root: minimal")
            delete(server, other["id"])
        finally:
            delete(server, sandbox["id"])


def test_require_image_refuses_an_absent_image_and_leaves_nothing(tmp_path: Path) -> None:
    with running_server(tmp_path, extra_config="warmPoolSize = 0\nrequireImage = true") as server:
        response = httpx.post(f"{server.url}/v1/sandboxes", json={**CREATE, "image": {"uri": "no-such-image:1"}})
        assert_error(response, 400, "SANDBOX::INVALID_PARAMETER")
        assert "no-such-image:1" in response.json()["message"]
        assert server.records() == [] and list((server.state_dir / "sandboxes").iterdir()) == []


@contextlib.contextmanager
def fake_internet() -> Iterator[str]:
    """A host on "the internet" that is a network namespace of this test's own behind a veth pair:
    203.0.113.x (TEST-NET-3, not a range sandboxes are denied) answering on port 8080. Traffic to it
    never leaves this machine (checked before the address is handed out)."""
    tag = f"osbt{os.getpid() % 100000}"
    subnet = os.getpid() % 60 * 4  # a /30 of 203.0.113.0/24 of our own
    host_ip, far_ip = f"203.0.113.{subnet + 1}", f"203.0.113.{subnet + 2}"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    ip("netns", "add", tag)
    server = None
    try:
        ip("link", "add", f"{tag}a", "type", "veth", "peer", "name", f"{tag}b", "netns", tag)
        ip("addr", "add", f"{host_ip}/30", "dev", f"{tag}a")
        ip("link", "set", f"{tag}a", "up")
        ip("-n", tag, "addr", "add", f"{far_ip}/30", "dev", f"{tag}b")
        ip("-n", tag, "link", "set", f"{tag}b", "up")
        ip("-n", tag, "link", "set", "lo", "up")
        route = subprocess.run(["ip", "route", "get", far_ip], capture_output=True, text=True, check=True).stdout
        assert f"dev {tag}a" in route, f"{far_ip} would not stay on this machine: {route}"
        server = subprocess.Popen(
            ["ip", "netns", "exec", tag, sys.executable, "-c", FAR_SERVER, far_ip], stdout=subprocess.PIPE
        )
        assert server.stdout is not None and server.stdout.readline().strip() == b"listening"
        yield far_ip
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "del", f"{tag}a"], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", tag], capture_output=True, check=False)


FAR_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((sys.argv[1], 8080)); s.listen()
print("listening", flush=True)
while True:
    c, _ = s.accept(); c.sendall(b"hello from the internet\\n"); c.close()
"""


PROBE = """
import socket
for host, port in {targets!r}:
    try:
        print(socket.create_connection((host, port), timeout=3).recv(100).decode().strip())
    except OSError as exc:
        print(type(exc).__name__)
"""


def test_a_sandbox_reaches_the_internet_but_not_the_host(server: ServerProcess) -> None:
    only_local(server, "the local runtime's outbound network")
    created = create(server)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        with fake_internet() as far:

            async def probe() -> list[str]:
                sb = await Sandbox.connect(created["id"], connection_config=ConnectionConfig(domain=server.domain))
                port = listener.getsockname()[1]
                script = PROBE.format(targets=[(far, 8080), ("127.0.0.1", port), ("10.0.2.2", port)])
                await sb.files.write_file("/tmp/probe.py", script)
                run = await sb.commands.run("python3 /tmp/probe.py")
                await sb.close()
                return [m.text for m in run.logs.stdout]

            lines = asyncio.run(probe())
        assert lines[0] == "hello from the internet", lines
        assert lines[1] in ("ConnectionRefusedError", "OSError") and lines[2] != "hello", lines  # not the host's
    finally:
        listener.close()
        delete(server, created["id"])


def test_two_sandboxes_listen_on_the_same_port_and_each_endpoint_reaches_its_own(server: ServerProcess) -> None:
    only_local(server, "ports of the local runtime's network namespaces")
    first, second = create(server), create(server)
    try:

        async def serve_and_fetch() -> list[str]:
            config = ConnectionConfig(domain=server.domain)
            answers = []
            for created in (first, second):
                sb = await Sandbox.connect(created["id"], connection_config=config)
                await sb.files.write_file("/workspace/site/who", created["id"])
                background = RunCommandOpts(background=True, working_directory="/workspace/site")
                await sb.commands.run("python3 -m http.server 8000 --bind 0.0.0.0", opts=background)
                endpoint = await sb.get_endpoint(8000)
                assert not endpoint.endpoint.endswith(":8000")  # a port of the host's loopback of its own
                async with httpx.AsyncClient(timeout=10) as client:
                    for _ in range(100):
                        with contextlib.suppress(httpx.TransportError):
                            page = await client.get(f"http://{endpoint.endpoint}/who")
                            answers.append(page.text)
                            break
                        await asyncio.sleep(0.1)
                await sb.close()
            return answers

        assert asyncio.run(serve_and_fetch()) == [first["id"], second["id"]]
    finally:
        delete(server, first["id"])
        delete(server, second["id"])


def test_a_nat_rule_on_ephemeral_ports_does_not_take_a_sandboxs_connections(tmp_path: Path) -> None:
    # A container engine's NAT rules for published ports (a live container's, or ones the engine left
    # behind, as podman does) take every local connection to such a port, whoever listens on it.
    low, high = ephemeral_ports()
    with ephemeral_ports_taken(), running_server(tmp_path / "server", extra_config="warmPoolSize = 0") as server:

        async def use() -> tuple[list[str], str]:
            sb = await Sandbox.create(server.image, connection_config=ConnectionConfig(domain=server.domain))
            try:
                run = await sb.commands.run("echo reached")
                endpoint = await sb.get_endpoint(8080)
                return [m.text for m in run.logs.stdout], endpoint.endpoint
            finally:
                await sb.kill()
                await sb.close()

        said, endpoint = asyncio.run(use())
        assert said == ["reached"]
        assert not low <= int(endpoint.rsplit(":", 1)[1]) <= high, endpoint
