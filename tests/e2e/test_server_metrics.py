"""The server's /metrics after a scripted session against a real server (local runtime) and the
official SDK: creates (and the SDK's own create event), a command, a download through the proxy, a
create shed by admission control; each shows up with its labels and counts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest
from opensandbox import SandboxSync
from opensandbox.config.connection_sync import ConnectionConfigSync
from prometheus_client.parser import text_string_to_metric_families

from harness.server_process import ServerProcess, running_server
from opensandbox_platform.api import labels

KEY = "metrics-key"
TOKEN = "scrape-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # One create at a time and no queue: a second create at once is shed (429).
    admission = f'metricsToken = "{TOKEN}"\ncreateConcurrency = 1\ncreateQueueSize = 0'
    with running_server(tmp_path_factory.mktemp("metrics"), api_key=KEY, server_config=admission) as srv:
        yield srv


def scrape(server: ServerProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels_: str) -> float:
    return samples.get((name, frozenset(labels_.items())), 0.0)


async def create_at_once(server: ServerProcess, n: int) -> list[httpx.Response]:
    body = {"image": {"uri": server.image}, "entrypoint": ["tail", "-f", "/dev/null"], "timeout": 600,
            "resourceLimits": {}}  # fmt: skip
    async with httpx.AsyncClient(base_url=server.url, headers={"OPEN-SANDBOX-API-KEY": KEY}, timeout=120) as client:
        return list(await asyncio.gather(*(client.post("/v1/sandboxes", json=body) for _ in range(n))))


def test_a_scripted_session_shows_in_the_metrics(server: ServerProcess) -> None:
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    config = ConnectionConfigSync(
        domain=server.domain, protocol="http", api_key=KEY, request_timeout=timedelta(seconds=120)
    )
    sandbox = SandboxSync.create(
        server.image, connection_config=config, entrypoint=["tail", "-f", "/dev/null"], timeout=timedelta(minutes=10)
    )
    try:
        assert sandbox.commands.run("echo ok").logs.stdout[0].text == "ok"
        sandbox.files.write_file("/tmp/payload", "x" * 100_000)
        download = httpx.get(
            f"{server.url}/sandboxes/{sandbox.id}/proxy/{labels.EXECD_PORT}/files/download",
            params={"path": "/tmp/payload"},
            headers={"OPEN-SANDBOX-API-KEY": KEY},
        )
        assert download.status_code == 200 and len(download.content) == 100_000
        responses = asyncio.run(create_at_once(server, 4))
        statuses = sorted(r.status_code for r in responses)
        assert 429 in statuses and 202 in statuses, statuses
        made = [r.json()["id"] for r in responses if r.status_code == 202]

        deadline = time.monotonic() + 15  # the SDK reports its create event from a thread of its own
        while True:
            samples = scrape(server)
            sdk = value(samples, "opensandbox_sdk_sandbox_create_duration_seconds_count", sdk="python", success="true")
            if sdk >= 1 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert sdk == 1
        assert value(samples, "opensandbox_sdk_events_total", event_type="sandbox.create") == 1
        created = value(
            samples, "opensandbox_server_sandbox_create_duration_seconds_count",
            runtime="local", mode="direct", outcome="success",
        )  # fmt: skip
        assert created == 1 + len(made)
        assert value(samples, "opensandbox_server_creates_shed_total", reason="queue_full") == statuses.count(429)
        assert value(samples, "opensandbox_server_http_requests_total", route="/sandboxes", method="POST",
                     status="429") == statuses.count(429)  # fmt: skip
        assert value(samples, "opensandbox_server_http_requests_total", route="/sandboxes", method="POST",
                     status="202") == 1 + len(made)  # fmt: skip
        assert value(samples, "opensandbox_server_http_requests_total", route="/metrics/events", method="POST",
                     status="204") == 1  # fmt: skip
        proxied = value(samples, "opensandbox_server_proxy_bytes_total", protocol="http", direction="from_sandbox")
        assert proxied >= 100_000
        assert value(samples, "opensandbox_server_sandboxes", runtime="local", state="Running") == 1 + len(made)
        assert value(samples, "opensandbox_server_creates_running") == 0
        for sandbox_id in made:
            httpx.delete(f"{server.url}/v1/sandboxes/{sandbox_id}", headers={"OPEN-SANDBOX-API-KEY": KEY})
    finally:
        sandbox.kill()
        sandbox.close()
