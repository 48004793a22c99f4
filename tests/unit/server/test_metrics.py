"""The server's metrics: labels from bounded sets, the SDK's events kept, engine calls timed over real
HTTP (aiohttp and aiodocker against a loopback/unix-socket server), and /metrics' credentials.
Counters are process-wide (prometheus_client's default registry): tests compare before and after."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiodocker
import aiohttp
import pytest
from aiohttp import web
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from opensandbox_platform.server import metrics
from opensandbox_platform.server.app import create_app
from opensandbox_platform.server.config import Config
from opensandbox_platform.server.runtimes import docker_api
from tests.unit.server.test_routes import MemoryRuntime

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_labels_come_from_bounded_sets() -> None:
    assert metrics.sdk_language("OpenSandbox-Python-SDK/1.1.1 httpx") == "python"
    assert metrics.sdk_language("curl/8") == metrics.sdk_language("OpenSandbox-Evil" + "x" * 100 + "-SDK/1") == "other"
    assert metrics.docker_resource("/v1.43/containers/abc/json") == "containers"
    assert metrics.docker_resource("/_ping") == "_ping"
    assert metrics.kubernetes_resource("/apis/sandbox.opensandbox.io/v1alpha1/namespaces/ns/batchsandboxes/x") == (
        "batchsandboxes"
    )
    assert metrics.kubernetes_resource("/api/v1/namespaces/ns/pods") == "pods"
    assert metrics.kubernetes_resource("/version") == "version"


def test_the_sdks_create_event_lands_in_its_histogram_and_junk_is_only_counted() -> None:
    before = value("opensandbox_sdk_sandbox_create_duration_seconds_count", sdk="python", success="true")
    sum_before = value("opensandbox_sdk_sandbox_create_duration_seconds_sum", sdk="python", success="true")
    other_before = value("opensandbox_sdk_events_total", event_type="other")
    event = {"eventType": "sandbox.create", "sandboxId": "x", "createDurationMs": 250, "success": True}
    metrics.record_sdk_event(event, "OpenSandbox-Python-SDK/1.1.1")
    for junk in ([1], {"eventType": "x" * 500}, {"eventType": "sandbox.create", "createDurationMs": "soon"}):
        metrics.record_sdk_event(junk, "OpenSandbox-Python-SDK/1.1.1")
    metrics.record_sdk_event({"eventType": "sandbox.create", "createDurationMs": -5}, "")
    assert value("opensandbox_sdk_sandbox_create_duration_seconds_count", sdk="python", success="true") == before + 1
    assert value("opensandbox_sdk_sandbox_create_duration_seconds_sum", sdk="python", success="true") == pytest.approx(
        sum_before + 0.25
    )
    assert value("opensandbox_sdk_events_total", event_type="other") == other_before + 2


@pytest.fixture
def client() -> Iterator[TestClient]:
    config = Config.model_validate({"server": {"apiKey": "k", "metricsToken": "scrape"}})
    runtime = MemoryRuntime()
    runtime.add("a", "Running", {}, 1)
    runtime.add("b", "Paused", {}, 2)
    with TestClient(create_app(config, runtime)) as c:
        yield c


def test_metrics_need_the_key_or_the_token_and_count_routes_by_template(client: TestClient) -> None:
    assert client.get("/metrics").status_code == 401
    assert client.get("/v1/sandboxes/a").status_code == 401  # refused before routing
    assert client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    key = {"OPEN-SANDBOX-API-KEY": "k"}
    assert client.get("/v1/sandboxes/a", headers=key).status_code == 200
    assert client.get("/sandboxes/zz", headers=key).status_code == 404
    scrape = client.get("/metrics", headers={"Authorization": "Bearer scrape"})
    assert scrape.status_code == 200 and scrape.headers["content-type"].startswith("text/plain")
    assert client.get("/metrics", headers=key).status_code == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(scrape.text)
        for s in family.samples
    }
    route = ("route", "/sandboxes/{sandboxId}")
    assert samples[("opensandbox_server_http_requests_total", (("method", "GET"), route, ("status", "200")))] >= 1
    assert samples[("opensandbox_server_http_requests_total", (("method", "GET"), route, ("status", "404")))] >= 1
    unmatched = (("method", "GET"), ("route", "unmatched"), ("status", "401"))
    assert samples[("opensandbox_server_http_requests_total", unmatched)] >= 1
    refused_scrape = (("method", "GET"), ("route", "/metrics"), ("status", "401"))
    assert samples[("opensandbox_server_http_requests_total", refused_scrape)] >= 1
    assert samples[("opensandbox_server_sandboxes", (("runtime", "local"), ("state", "Running")))] == 1
    assert samples[("opensandbox_server_sandboxes", (("runtime", "local"), ("state", "Paused")))] == 1
    assert samples[("opensandbox_server_sandboxes", (("runtime", "local"), ("state", "Failed")))] == 0
    assert not any(name.startswith("opensandbox_server_http") and "zz" in str(labels) for name, labels in samples)


def test_metrics_can_be_switched_off() -> None:
    config = Config.model_validate({"server": {"metrics": False}})
    with TestClient(create_app(config, MemoryRuntime())) as c:
        assert c.get("/metrics").status_code == 404


def test_a_create_is_timed_by_runtime_and_mode(client: TestClient) -> None:
    labels = {"runtime": "memory", "mode": "direct", "outcome": "success"}
    before = value("opensandbox_server_sandbox_create_duration_seconds_count", **labels)
    body = {"image": {"uri": "x"}, "entrypoint": ["true"], "timeout": 60}
    assert client.post("/v1/sandboxes", json=body, headers={"OPEN-SANDBOX-API-KEY": "k"}).status_code == 202
    assert value("opensandbox_server_sandbox_create_duration_seconds_count", **labels) == before + 1


def answer(status: int = 200, **body: str) -> Handler:
    async def handler(_: web.Request) -> web.StreamResponse:
        return web.json_response(body, status=status)

    return handler


async def _serve(app: web.Application, **where: object) -> web.AppRunner:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.UnixSite(runner, str(where["path"])) if "path" in where else web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner


async def test_engine_calls_are_timed_and_failures_counted() -> None:
    app = web.Application()
    app.router.add_get("/api/v1/namespaces/ns/pods", answer())
    app.router.add_get("/api/v1/namespaces/ns/pods/broken", answer(503))
    runner = await _serve(app)
    port = runner.addresses[0][1]
    labels = {"engine": "kubernetes", "method": "GET", "resource": "pods"}
    count = value("opensandbox_server_engine_request_duration_seconds_count", **labels)
    errors = {
        kind: value("opensandbox_server_engine_request_errors_total", **labels, error=kind)
        for kind in ("server_error", "connection")
    }
    trace = metrics.engine_trace("kubernetes", metrics.kubernetes_resource)
    async with aiohttp.ClientSession(trace_configs=[trace]) as session:
        async with session.get(f"http://127.0.0.1:{port}/api/v1/namespaces/ns/pods") as ok:
            assert ok.status == 200
        async with session.get(f"http://127.0.0.1:{port}/api/v1/namespaces/ns/pods/broken") as bad:
            assert bad.status == 503
        await runner.cleanup()
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(f"http://127.0.0.1:{port}/api/v1/namespaces/ns/pods")
    assert value("opensandbox_server_engine_request_duration_seconds_count", **labels) == count + 3
    assert value("opensandbox_server_engine_request_errors_total", **labels, error="server_error") == (
        errors["server_error"] + 1
    )
    assert value("opensandbox_server_engine_request_errors_total", **labels, error="connection") == (
        errors["connection"] + 1
    )


async def test_aiodocker_requests_reach_the_trace(tmp_path: Path) -> None:
    """docker_api.add_trace adds to aiohttp's private list: this fails if aiohttp stops reading it."""
    app = web.Application()
    app.router.add_get("/{version}/version", answer(Version="x", ApiVersion="1.43"))
    app.router.add_get("/version", answer(Version="x", ApiVersion="1.43"))
    runner = await _serve(app, path=tmp_path / "docker.sock")
    labels = {"engine": "docker", "method": "GET", "resource": "version"}
    before = value("opensandbox_server_engine_request_duration_seconds_count", **labels)
    docker = aiodocker.Docker(url=f"unix://{tmp_path / 'docker.sock'}", api_version="v1.43")
    try:
        docker_api.add_trace(docker, metrics.engine_trace("docker", metrics.docker_resource))
        assert (await docker.version())["Version"] == "x"
    finally:
        await docker.close()
        await runner.cleanup()
    assert value("opensandbox_server_engine_request_duration_seconds_count", **labels) == before + 1
