"""Reliability under abuse and faults (issue 16): one test per attack or fault, each against a real
server subprocess (and real execd, jails, containers), on loopback only.

Listener limits (huge header, slowloris, idle sockets without a key), a dead execd seen directly and
through the proxy, 150 concurrent creates, the Docker engine stopped (SIGSTOP of a podman service
of the test's own), HEAD and control characters through the proxy, renew bounds, a client that goes
away mid-create, and execd's session cap. The figures of the same attacks come from
bench/reliability_bench.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opensandbox import Sandbox
from opensandbox.config import ConnectionConfig

from harness.abuse import attack_process, probing
from harness.execd_process import run_execd
from harness.server_process import ServerProcess, running_server
from harness.services import private_podman_service

KEY = "reliability-key"
LIMITS = "headerTimeoutSeconds = 1.0\nkeepAliveTimeoutSeconds = 2.0\nmaxConnections = 64\n"


def create_body(server: ServerProcess, **overrides: Any) -> dict[str, Any]:
    return {"image": {"uri": server.image}, "entrypoint": ["tail", "-f", "/dev/null"], "timeout": 600, **overrides}


def create(server: ServerProcess, **overrides: Any) -> str:
    response = httpx.post(f"{server.url}/v1/sandboxes", json=create_body(server, **overrides), headers=server.headers())
    assert response.status_code == 202, response.text
    sandbox_id: str = response.json()["id"]
    return sandbox_id


def status_of(server: ServerProcess, sandbox_id: str) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/v1/sandboxes/{sandbox_id}", headers=server.headers())
    assert response.status_code == 200, response.text
    status: dict[str, Any] = response.json()["status"]
    return status


def wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A local-runtime server with an API key and small listener limits."""
    with running_server(
        tmp_path_factory.mktemp("guarded"), api_key=KEY, extra_config="warmPoolSize = 0", server_config=LIMITS
    ) as server:
        yield server


def assert_error_body(raw: bytes, status: int) -> None:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d" % status), raw[:200]
    assert set(json.loads(body)) == {"code", "message"}


# -- listener limits ----------------------------------------------------------------------------


def test_a_huge_header_is_refused_early_and_other_clients_do_not_notice(guarded: ServerProcess) -> None:
    assert guarded.proc is not None
    rss_before = rss_mib(guarded.proc.pid)
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.settimeout(10)
        sock.sendall(b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 65536)
        with contextlib.suppress(ConnectionError):  # the server closes while we would go on sending
            for _ in range(95):
                sock.sendall(b"a" * (1 << 20))
        answer = sock.recv(4096)
    assert_error_body(answer, 431)
    with probing(guarded.port) as probe:
        attack = attack_process("huge-header", guarded.port, 3, size=96 << 20)
        counts = json.loads(attack.communicate(timeout=60)[0].strip().splitlines()[-1])
    assert counts.get("431", 0) >= 1 and set(counts) <= {"431", "reset"}, counts
    assert probe.failures == 0 and probe.summary()["n"] > 20, probe.summary()
    assert rss_mib(guarded.proc.pid) - rss_before < 50  # the header is never held


def test_a_slow_head_is_cut_off_and_others_are_served(guarded: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.settimeout(10)
        started = time.monotonic()
        sock.sendall(b"GET /v1/sandboxes HTTP/1.1\r\nHost: x\r\n")
        answer = b""
        with contextlib.suppress(ConnectionError):
            for byte in b"X-Slow: " + b"a" * 100:
                sock.sendall(bytes([byte]))
                time.sleep(0.05)
        with contextlib.suppress(ConnectionError):
            answer = sock.recv(4096)
    assert_error_body(answer, 408)
    assert time.monotonic() - started < 3  # headerTimeoutSeconds = 1
    with probing(guarded.port) as probe:
        attack = attack_process("slowloris", guarded.port, 4, connections=40, interval=0.2)
        counts = json.loads(attack.communicate(timeout=60)[0].strip().splitlines()[-1])
    assert counts["closed_by_server"] >= 40, counts
    assert probe.failures == 0 and probe.summary()["n"] > 20, probe.summary()


def test_idle_sockets_without_a_key_cannot_exhaust_the_server(guarded: ServerProcess) -> None:
    """More idle connections than maxConnections (64): the longest idle is closed for each new one,
    so descriptors stay bounded and authorised clients keep being served."""
    assert guarded.proc is not None
    with probing(guarded.port) as probe:
        attack = attack_process("idle", guarded.port, 4, connections=300)
        time.sleep(2)
        fds_under_attack = open_fds(guarded.proc.pid)
        listed = httpx.get(f"{guarded.url}/v1/sandboxes", headers={"OPEN-SANDBOX-API-KEY": KEY}, timeout=10)
        counts = json.loads(attack.communicate(timeout=60)[0].strip().splitlines()[-1])
    assert listed.status_code == 200
    assert fds_under_attack < 64 + 100, fds_under_attack
    assert counts["closed_by_server"] > 300, counts  # evicted and reopened, over and over
    assert probe.failures == 0 and probe.summary()["n"] > 20, probe.summary()


def test_a_request_without_a_key_is_answered_before_its_body_and_closed(guarded: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.settimeout(5)
        sock.sendall(b"POST /v1/sandboxes HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n{")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert b"401" in answer.split(b"\r\n")[0] and b"connection: close" in answer.lower()


# -- dead execd ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lively(tmp_path_factory: pytest.TempPathFactory, runtime_name: str) -> Iterator[ServerProcess]:
    """A server whose docker runtime probes execd every second (local: execd's exit is an event)."""
    extra = "livenessIntervalSeconds = 1" if runtime_name == "docker" else ""
    with running_server(tmp_path_factory.mktemp("lively"), extra_config=extra, runtime=runtime_name) as server:
        yield server


KILL_EXECD = "echo before; sleep 0.3; kill -9 $PPID; sleep 5"


def _failed_for_execd(server: ServerProcess, sandbox_id: str) -> dict[str, Any]:
    status: dict[str, Any] = wait_for(
        lambda: (s := status_of(server, sandbox_id))["state"] == "Failed" and s, 30, "the sandbox to be Failed"
    )
    assert status["reason"] in ("EXECD_EXITED", "EXECD_UNREACHABLE") and "execd" in status["message"]
    return status


def test_a_dead_execd_is_an_error_through_the_proxy_and_fails_the_sandbox(lively: ServerProcess) -> None:
    sandbox_id = create(lively)
    url = f"{lively.url}/v1/sandboxes/{sandbox_id}/proxy/44772"
    seen: list[str] = []
    with (
        pytest.raises(httpx.RemoteProtocolError, match="incomplete"),
        httpx.stream("POST", f"{url}/command", json={"command": KILL_EXECD}, timeout=30) as response,
    ):
        assert response.status_code == 200
        for line in response.iter_lines():
            seen.append(line)
    assert any('"before"' in line for line in seen)
    assert not any("execution_complete" in line for line in seen)
    _failed_for_execd(lively, sandbox_id)
    after = httpx.get(f"{url}/ping")
    assert after.status_code == 409 and after.json()["code"] == "SANDBOX::INVALID_STATE"
    assert httpx.delete(f"{lively.url}/v1/sandboxes/{sandbox_id}").status_code == 204


def test_a_dead_execd_is_an_error_for_the_sdk_directly_and_fails_the_sandbox(lively: ServerProcess) -> None:
    async def scenario() -> str:
        config = ConnectionConfig(domain=lively.domain, protocol="http")
        sandbox = await Sandbox.create(lively.image, entrypoint=["tail", "-f", "/dev/null"], connection_config=config)
        try:
            await sandbox.commands.run(KILL_EXECD)
        except Exception as exc:  # the SDK's own exception for a broken stream
            assert "incomplete" in repr(exc) or "closed" in repr(exc).lower(), repr(exc)
        else:
            raise AssertionError("the command's stream broke, yet the SDK reported success")
        finally:
            await sandbox.close()
        return sandbox.id

    sandbox_id = asyncio.run(scenario())
    _failed_for_execd(lively, sandbox_id)
    assert httpx.delete(f"{lively.url}/v1/sandboxes/{sandbox_id}").status_code == 204


# -- load ----------------------------------------------------------------------------------------


def test_150_concurrent_creates_end_in_successes_or_fast_clean_refusals(tmp_path: Path) -> None:
    async def burst(server: ServerProcess) -> list[tuple[int, float, dict[str, Any], dict[str, str]]]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:

            async def one() -> tuple[int, float, dict[str, Any], dict[str, str]]:
                started = time.monotonic()
                response = await client.post(f"{server.url}/v1/sandboxes", json=create_body(server))
                return response.status_code, time.monotonic() - started, response.json(), dict(response.headers)

            return await asyncio.gather(*(one() for _ in range(150)))

    with running_server(tmp_path / "burst") as server:
        started = time.monotonic()
        results = asyncio.run(burst(server))
        wall = time.monotonic() - started
        statuses = [status for status, _, _, _ in results]
        created = [body["id"] for status, _, body, _ in results if status == 202]
        try:
            assert set(statuses) <= {202, 429, 503}, sorted(set(statuses))
            assert len(created) >= 4
            for status, seconds, body, headers in results:
                if status != 202:
                    assert set(body) == {"code", "message"} and int(headers["retry-after"]) >= 1
                    assert seconds < 15  # createQueueTimeoutSeconds = 10, plus the machine's noise
            assert wall < 60
            listed = httpx.get(f"{server.url}/v1/sandboxes", params={"pageSize": 200}).json()
            assert {item["id"] for item in listed["items"]} == set(created)
        finally:
            for sandbox_id in created:
                httpx.delete(f"{server.url}/v1/sandboxes/{sandbox_id}", timeout=30)


def test_a_create_whose_client_went_away_is_deleted_once_done(runtime_name: str, tmp_path: Path) -> None:
    extra = "warmPoolSize = 0" if runtime_name == "local" else ""
    with running_server(tmp_path / "gone", extra_config=extra, runtime=runtime_name) as server:
        body = json.dumps(create_body(server)).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(
                b"POST /v1/sandboxes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
            )
            time.sleep(0.05)  # the create has begun; the client goes away
        wait_for(lambda: "client went away" in server.logs(), 60, "the server to notice")
        wait_for(lambda: not server.sandboxes_on_host(), 30, "the sandbox to be removed")
        assert httpx.get(f"{server.url}/v1/sandboxes").json()["items"] == []


# -- the docker engine stalled ----------------------------------------------------------------------


def test_a_stopped_docker_engine_gives_503_within_the_bound_and_readiness_fails(
    runtime_name: str, tmp_path: Path
) -> None:
    if runtime_name != "docker":
        pytest.skip("the docker runtime's engine")
    with private_podman_service(tmp_path / "engine") as engine:
        extra = "apiTimeoutSeconds = 2\nhealthIntervalSeconds = 0.5\n"
        server = ServerProcess(tmp_path / "server", extra_config=extra, runtime="docker", engine_host=engine.host)
        server.start()
        sandbox_id = ""
        try:
            sandbox_id = create(server)
            os.kill(engine.proc.pid, signal.SIGSTOP)
            try:
                calls = {
                    "get": lambda: httpx.get(f"{server.url}/v1/sandboxes/{sandbox_id}", timeout=30),
                    "list": lambda: httpx.get(f"{server.url}/v1/sandboxes", timeout=30),
                    "get unknown": lambda: httpx.get(f"{server.url}/v1/sandboxes/nope", timeout=30),
                    "create": lambda: httpx.post(f"{server.url}/v1/sandboxes", json=create_body(server), timeout=30),
                    "renew": lambda: httpx.post(
                        f"{server.url}/v1/sandboxes/{sandbox_id}/renew-expiration",
                        json={"expiresAt": "2099-01-01T00:00:00Z"},
                        timeout=30,
                    ),
                }
                for name, call in calls.items():
                    started = time.monotonic()
                    response = call()
                    elapsed = time.monotonic() - started
                    if name == "renew" and response.status_code == 400:
                        continue  # refused before the engine is asked (the date is too far ahead)
                    assert response.status_code == 503, (name, response.text)
                    assert response.json()["code"] == "DOCKER::ENGINE_UNAVAILABLE" and response.headers["retry-after"]
                    assert elapsed < 2 * 2 + 2, (name, elapsed)  # apiTimeoutSeconds = 2
                health = httpx.get(f"{server.url}/health").json()
                assert health["status"] == "healthy" and health["runtime"]["engine"] == "unreachable"
                ready = httpx.get(f"{server.url}/ready")
                assert ready.status_code == 503 and ready.json()["code"] == "SANDBOX::RUNTIME_UNAVAILABLE"
            finally:
                os.kill(engine.proc.pid, signal.SIGCONT)
            wait_for(lambda: httpx.get(f"{server.url}/ready").status_code == 200, 20, "readiness to come back")
            assert status_of(server, sandbox_id)["state"] == "Running"
            # The create the stalled engine served after waking up leaves nothing behind.
            wait_for(lambda: server.sandboxes_on_host() == {sandbox_id}, 30, "the abandoned container to go")
        finally:
            if sandbox_id:
                httpx.delete(f"{server.url}/v1/sandboxes/{sandbox_id}", timeout=30)
            server.stop()


# -- the proxy and the API ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox(server: ServerProcess) -> Iterator[str]:
    sandbox_id = create(server)
    yield sandbox_id
    httpx.delete(f"{server.url}/v1/sandboxes/{sandbox_id}", timeout=30)


def test_head_through_the_proxy_leaves_the_pooled_connection_usable(server: ServerProcess, sandbox: str) -> None:
    url = f"{server.url}/v1/sandboxes/{sandbox}/proxy/44772"
    with httpx.Client(timeout=10) as client:
        for _ in range(5):
            head = client.head(f"{url}/nope")
            assert head.status_code == 404 and head.content == b""
            assert client.get(f"{url}/ping").status_code == 200
            assert client.head(f"{url}/ping").status_code == 200


@pytest.mark.parametrize("path", ["%7F", "%00", "a%0Db", "%FF%FE", "x/%2F/y", "%25%"])
def test_control_characters_in_a_proxied_path_are_a_4xx(server: ServerProcess, sandbox: str, path: str) -> None:
    response = httpx.get(f"{server.url}/v1/sandboxes/{sandbox}/proxy/44772/{path}")
    assert 400 <= response.status_code < 500, response.text
    assert set(response.json()) == {"code", "message"}


def test_a_raw_control_character_in_the_request_line_is_a_400(server: ServerProcess, sandbox: str) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(5)
        sock.sendall(b"GET /v1/sandboxes/" + sandbox.encode() + b"/proxy/44772/a\x7fb HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:100]


@pytest.mark.parametrize(
    ("expires_at", "status"),
    [("9999-12-31T00:00:00Z", 400), ("2000-01-01T00:00:00Z", 400), ("not a date", 400), (None, 200)],
)
def test_renew_bounds(server: ServerProcess, sandbox: str, expires_at: str | None, status: int) -> None:
    if expires_at is None:
        expires_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    response = httpx.post(
        f"{server.url}/v1/sandboxes/{sandbox}/renew-expiration", json={"expiresAt": expires_at}, timeout=30
    )
    assert response.status_code == status, response.text
    if status == 400:
        assert response.json()["code"] in ("SANDBOX::INVALID_EXPIRATION", "SANDBOX::INVALID_PARAMETER")


@pytest.mark.parametrize(
    ("field", "value"),
    [("cpu", "1000000000"), ("memory", "99999999999Ti"), ("cpu", "-1"), ("memory", "1Ki")],
)
def test_absurd_resource_limits_are_a_400(server: ServerProcess, field: str, value: str) -> None:
    response = httpx.post(f"{server.url}/v1/sandboxes", json=create_body(server, resourceLimits={field: value}))
    assert response.status_code == 400, response.text


# -- execd ----------------------------------------------------------------------------------------


def test_execd_caps_sessions_and_reaps_idle_ones(tmp_path: Path) -> None:
    env = {"EXECD_MAX_SESSIONS": "3", "EXECD_SESSION_IDLE_TIMEOUT": "1.5"}
    with run_execd(tmp_path / "execd", extra_env=env) as execd, httpx.Client(base_url=execd.url, timeout=10) as client:
        sessions = [client.post("/session", json={}).json()["session_id"] for _ in range(3)]
        refused = client.post("/session", json={})
        assert refused.status_code == 429 and refused.json()["code"] == "TOO_MANY_SESSIONS"
        assert refused.headers["retry-after"]
        assert client.delete(f"/session/{sessions[0]}").status_code == 200
        kept = client.post("/session", json={}).json()["session_id"]
        time.sleep(3)  # every session idle for longer than 1.5 s: reaped
        for session_id in [*sessions[1:], kept]:
            assert client.post(f"/session/{session_id}/run", json={"command": "true"}).status_code == 404
        assert client.post("/session", json={}).status_code == 200


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/session", {"cwd": "/tmp/a\u0000b"}),
        ("/command", {"command": "true", "cwd": "/tmp\u0000"}),
        ("/command", {"command": "true", "uid": 2**40}),
        ("/command", {"command": "true", "gid": -1, "uid": 0}),
        ("/command", {"command": "true", "timeout": 2**63}),
    ],
)
def test_execd_refuses_out_of_range_input_with_a_4xx(tmp_path: Path, path: str, body: dict[str, Any]) -> None:
    with run_execd(tmp_path / "execd") as execd:
        response = httpx.post(f"{execd.url}{path}", json=body, timeout=10)
        assert response.status_code == 400, response.text
        deep = httpx.post(f"{execd.url}/command", content=b"[" * 100_000 + b"]" * 100_000, timeout=10)
        assert deep.status_code == 400 and deep.json()["code"] == "INVALID_REQUEST_BODY"
