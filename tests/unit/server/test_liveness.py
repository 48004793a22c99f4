"""Noticing dead parts: the engine monitor, execd's ping probe (against a real listener on 127.0.0.1),
the 503 of an engine call, and the kubernetes runtime's readiness from its informers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from opensandbox_platform.daemon.http import HttpServer, Request, Response
from opensandbox_platform.server.config import Config
from opensandbox_platform.server.errors import ApiError
from opensandbox_platform.server.runtimes.base import Endpoint
from opensandbox_platform.server.runtimes.kubernetes import KubernetesRuntime
from opensandbox_platform.server.runtimes.liveness import EngineMonitor, ExecdProbe, engine_call, ping_execd


async def test_the_engine_monitor_follows_checks_and_calls() -> None:
    answer: list[str] = ["ok"]

    async def check() -> None:
        if answer[0] == "stall":
            await asyncio.sleep(10)
        if answer[0] == "down":
            raise ConnectionRefusedError("refused")

    monitor = EngineMonitor("the engine", check, interval=60, timeout=0.05)
    await monitor.check_now()
    assert monitor.health().ready and monitor.health().detail["engine"] == "reachable"
    answer[0] = "stall"
    await monitor.check_now()
    health = monitor.health()
    assert not health.ready and "no answer within 0.05s" in str(health.detail["message"])
    answer[0] = "down"
    await monitor.check_now()
    assert "refused" in str(monitor.health().detail["message"])
    monitor.ok()
    assert monitor.health().ready and "message" not in monitor.health().detail
    assert not monitor.health(informer=False).ready  # a part reported False makes it not ready


class _Engine:
    def __init__(self) -> None:
        self.monitor = EngineMonitor("engine", asyncio.sleep, 1, 1)

    def unavailable_error(self, exc: BaseException) -> ApiError | None:
        if isinstance(exc, TimeoutError):
            return ApiError(503, "ENGINE_UNAVAILABLE", "no answer")
        return None

    @engine_call
    async def call(self, outcome: BaseException | None) -> str:
        if outcome is not None:
            raise outcome
        return "done"


async def test_an_engine_call_turns_unavailability_into_503_and_leaves_other_errors() -> None:
    engine = _Engine()
    assert await engine.call(None) == "done"
    with pytest.raises(ApiError) as unavailable:
        await engine.call(TimeoutError())
    assert unavailable.value.status == 503
    with pytest.raises(KeyError):
        await engine.call(KeyError("a bug stays a bug"))


async def test_the_execd_probe_reports_a_dead_execd_once_after_repeated_failures() -> None:
    async def ping(request: Request) -> Response:
        if request.headers.get("x-token") != "t":
            return Response(b"", 401)
        return Response()

    server = HttpServer(ping)
    listener = await server.start("127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    alive = Endpoint(f"127.0.0.1:{port}", {"X-Token": "t"})
    assert await ping_execd(alive, 2) is None
    assert "401" in str(await ping_execd(Endpoint(alive.address), 2))
    listener.close()
    await server.close()
    await listener.wait_closed()
    assert "cannot reach execd" in str(await ping_execd(alive, 2))

    dead: list[tuple[str, str]] = []
    probe = ExecdProbe(lambda: [("sb", alive)], lambda sid, why: dead.append((sid, why)), interval=1, failures=2)
    for _ in range(4):
        await probe.probe_all()
    assert len(dead) == 1 and dead[0][0] == "sb"


class _Informer:
    def __init__(self, connected: bool) -> None:
        self.connected = connected
        self.synced = asyncio.Event()
        self.synced.set()


def test_kubernetes_readiness_needs_the_api_server_and_both_informers() -> None:
    runtime = KubernetesRuntime(Config())
    informers: Any = runtime
    informers._sandboxes, informers._pools = _Informer(True), _Informer(True)
    assert runtime.health().ready
    informers._pools.connected = False
    health = runtime.health()
    assert not health.ready and health.detail["poolInformer"] is False and health.detail["engine"] == "reachable"
    informers._pools.connected = True
    error = runtime.unavailable_error(TimeoutError())
    assert error is not None and error.status == 503 and error.code == "KUBERNETES::API_UNAVAILABLE"
    assert not runtime.health().ready
    assert runtime.unavailable_error(ValueError("not the engine's")) is None
