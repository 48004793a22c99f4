"""Routes against an in-memory runtime: filtering, paging, endpoints, auth, error shapes."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from opensandbox_platform.server.app import create_app
from opensandbox_platform.server.config import Config
from opensandbox_platform.server.errors import not_found
from opensandbox_platform.server.runtimes.base import (
    Capabilities,
    Endpoint,
    LogText,
    RuntimeHealth,
    SandboxInfo,
    SandboxSpec,
)
from opensandbox_platform.server.runtimes.events import EventList, EventLog, SandboxEvent

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


PAUSES = Capabilities("memory", pause=True)


class MemoryRuntime:
    def __init__(self, capabilities: Capabilities = PAUSES) -> None:
        self.capabilities = capabilities
        self.sandboxes: dict[str, SandboxInfo] = {}
        self.paused: list[str] = []
        self.events = EventLog()
        self.output = "line 1\nline 2\nline 3\n"

    def add(self, sandbox_id: str, state: str, metadata: dict[str, str], minute: int) -> None:
        created = T0 + dt.timedelta(minutes=minute)
        self.sandboxes[sandbox_id] = SandboxInfo(
            sandbox_id, "ubuntu", ["true"], metadata, {}, created, None, state, "", "", created
        )

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def health(self) -> RuntimeHealth:
        return RuntimeHealth(ready=True)

    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        self.add(f"sb-{len(self.sandboxes)}", "Running", spec.metadata, len(self.sandboxes))
        return list(self.sandboxes.values())[-1]

    async def get(self, sandbox_id: str) -> SandboxInfo:
        if sandbox_id not in self.sandboxes:
            raise not_found(sandbox_id)
        return self.sandboxes[sandbox_id]

    async def list(self) -> list[SandboxInfo]:
        return list(self.sandboxes.values())

    async def delete(self, sandbox_id: str) -> None:
        await self.get(sandbox_id)
        del self.sandboxes[sandbox_id]

    async def pause(self, sandbox_id: str) -> None:
        self.paused.append(sandbox_id)

    async def resume(self, sandbox_id: str) -> None: ...

    async def renew(self, sandbox_id: str, expires_at: dt.datetime) -> SandboxInfo:
        info = await self.get(sandbox_id)
        info.expires_at = expires_at
        return info

    async def patch_metadata(self, sandbox_id: str, patch: dict[str, str | None]) -> SandboxInfo:
        return await self.get(sandbox_id)

    async def endpoint(self, sandbox_id: str, port: int) -> Endpoint:
        await self.get(sandbox_id)
        return Endpoint(f"10.0.0.1:{port}", {"X-Token": "t"})

    async def upstream(self, sandbox_id: str, port: int) -> Endpoint:
        return await self.endpoint(sandbox_id, port)

    async def logs(self, sandbox_id: str, tail: int | None, since: dt.datetime | None, scope: str) -> LogText:
        await self.get(sandbox_id)
        lines = self.output.splitlines(keepends=True)
        return LogText("".join(lines[-tail:] if tail else lines), warnings=["since ignored"] if since else [])

    async def runtime_events(self, sandbox_id: str) -> EventList:
        return [SandboxEvent(T0, "ContainerStarted", "from the engine", "container")]

    async def inspect(self, sandbox_id: str) -> dict[str, object]:
        return {"id": sandbox_id}


@pytest.fixture
def runtime() -> MemoryRuntime:
    rt = MemoryRuntime()
    rt.add("a", "Running", {"team": "t1", "tag": "x"}, 1)
    rt.add("b", "Paused", {"team": "t1", "tag": "x"}, 2)
    rt.add("c", "Running", {"team": "t2", "tag": "x", "note": "Demo Test"}, 3)
    return rt


def client_for(runtime: MemoryRuntime, **server: object) -> Iterator[TestClient]:
    config = Config.model_validate({"server": server})
    with TestClient(create_app(config, runtime)) as client:
        yield client


@pytest.fixture
def client(runtime: MemoryRuntime) -> Iterator[TestClient]:
    yield from client_for(runtime)


def ids(client: TestClient, query: str) -> list[str]:
    response = client.get(f"/v1/sandboxes?{query}")
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


def test_list_is_newest_first_with_or_states_and_and_metadata(client: TestClient) -> None:
    assert ids(client, "") == ["c", "b", "a"]
    assert ids(client, "state=running") == ["c", "a"]
    assert ids(client, "state=Running&state=PAUSED") == ["c", "b", "a"]
    assert ids(client, "metadata=team%3Dt1") == ["b", "a"]
    assert ids(client, "metadata=team%3Dt1%26tag%3Dx&state=Paused") == ["b"]
    assert ids(client, "metadata=note%3DDemo%2520Test") == ["c"]
    assert ids(client, "metadata=team%3Dt3") == []


def test_pagination(client: TestClient) -> None:
    first = client.get("/v1/sandboxes?pageSize=2").json()
    assert [i["id"] for i in first["items"]] == ["c", "b"]
    assert first["pagination"] == {"page": 1, "pageSize": 2, "totalItems": 3, "totalPages": 2, "hasNextPage": True}
    last = client.get("/sandboxes?pageSize=2&page=2").json()
    assert [i["id"] for i in last["items"]] == ["a"] and last["pagination"]["hasNextPage"] is False
    assert client.get("/v1/sandboxes?page=5").json()["items"] == []


def test_malformed_metadata_filter_is_400(client: TestClient) -> None:
    response = client.get("/v1/sandboxes?metadata=novalue")
    assert response.status_code == 400 and response.json()["code"] == "INVALID_METADATA_FORMAT"


def test_responses_omit_absent_fields(client: TestClient) -> None:
    body = client.get("/v1/sandboxes/a").json()
    assert "expiresAt" not in body and body["createdAt"] == "2026-01-01T00:01:00Z"
    assert body["status"] == {"state": "Running", "lastTransitionAt": "2026-01-01T00:01:00Z"}


def test_endpoints_direct_and_through_the_server(client: TestClient) -> None:
    direct = client.get("/v1/sandboxes/a/endpoints/44772").json()
    assert direct == {"endpoint": "10.0.0.1:44772", "headers": {"X-Token": "t"}}
    proxied = client.get("/v1/sandboxes/a/endpoints/8080?use_server_proxy=true").json()
    assert proxied == {"endpoint": "testserver/v1/sandboxes/a/proxy/8080"}
    root = client.get("/sandboxes/a/endpoints/8080?use_server_proxy=true").json()
    assert root == {"endpoint": "testserver/sandboxes/a/proxy/8080"}


def test_eip_is_the_proxy_host(runtime: MemoryRuntime) -> None:
    for client in client_for(runtime, eip="sandbox.example.com:443"):
        endpoint = client.get("/v1/sandboxes/a/endpoints/18080?use_server_proxy=true").json()["endpoint"]
        assert endpoint == "sandbox.example.com:443/v1/sandboxes/a/proxy/18080"


def test_api_key_and_request_id(runtime: MemoryRuntime) -> None:
    for client in client_for(runtime, api_key="secret"):
        missing = client.get("/v1/sandboxes", headers={"X-Request-ID": "rid-1"})
        assert missing.status_code == 401 and missing.json()["code"] == "MISSING_API_KEY"
        assert missing.headers["x-request-id"] == "rid-1"
        wrong = client.get("/v1/sandboxes", headers={"OPEN-SANDBOX-API-KEY": "secreT"})
        assert wrong.status_code == 401 and wrong.json()["code"] == "INVALID_API_KEY"
        assert client.get("/v1/sandboxes", headers={"OPEN-SANDBOX-API-KEY": "secret"}).status_code == 200
        assert client.get("/health").status_code == 200
        assert client.get("/version").json()["version"]
        assert client.get("/docs").status_code == 200


def test_schema_errors_are_400_with_code_and_message(client: TestClient) -> None:
    response = client.post("/v1/sandboxes", json={"image": {"uri": "x"}, "entrypoint": ["true"], "timeout": "x"})
    assert response.status_code == 400
    assert response.json()["code"] == "SANDBOX::INVALID_PARAMETER" and "timeout" in response.json()["message"]


def test_create_delete_and_metrics_events(client: TestClient) -> None:
    created = client.post(
        "/v1/sandboxes", json={"image": {"uri": "x"}, "entrypoint": ["true"], "timeout": None, "metadata": {"k": "v"}}
    )
    assert created.status_code == 202
    body = created.json()
    assert body["metadata"] == {"k": "v"} and "expiresAt" not in body and "image" not in body
    assert client.delete(f"/v1/sandboxes/{body['id']}").status_code == 204
    assert client.get(f"/v1/sandboxes/{body['id']}").status_code == 404
    event = {"eventType": "sandbox.create", "sandboxId": "x", "createDurationMs": 5, "success": True}
    assert client.post("/v1/metrics/events", json=event).status_code == 204


def test_an_unexpected_error_is_a_json_500(runtime: MemoryRuntime) -> None:
    async def broken() -> list[SandboxInfo]:
        raise RuntimeError("boom")

    runtime.list = broken  # type: ignore[method-assign]
    for client in client_for(runtime):
        response = client.get("/v1/sandboxes", headers={"X-Request-ID": "r-500"})
        assert response.status_code == 500
        assert response.json() == {"code": "SANDBOX::INTERNAL_ERROR", "message": "internal error"}
        assert response.headers["x-request-id"] == "r-500"


def test_create_is_checked_against_the_runtimes_capabilities(client: TestClient) -> None:
    body = {"image": {"uri": "x"}, "entrypoint": ["true"], "resourceRequests": {"cpu": "1"}}
    refused = client.post("/v1/sandboxes", json=body)
    assert refused.status_code == 400
    assert refused.json() == {
        "code": "SANDBOX::API_NOT_SUPPORTED",
        "message": "resourceRequests is not supported by the memory runtime",
    }


def test_pause_without_the_capability_is_refused_after_the_404_of_an_unknown_sandbox() -> None:
    runtime = MemoryRuntime(Capabilities("memory", pause=False))
    runtime.add("a", "Running", {}, 1)
    for client in client_for(runtime):
        assert client.post("/v1/sandboxes/nope/pause").json()["code"] == "SANDBOX::NOT_FOUND"
        for call in ("pause", "resume"):
            refused = client.post(f"/v1/sandboxes/a/{call}")
            assert refused.status_code == 400 and refused.json()["code"] == "SANDBOX::API_NOT_SUPPORTED"
            assert refused.json()["message"] == f"{call} is not supported by the memory runtime"
    assert runtime.paused == []


def test_pause_with_the_capability_reaches_the_runtime(client: TestClient, runtime: MemoryRuntime) -> None:
    assert client.post("/v1/sandboxes/a/pause").status_code == 202
    assert runtime.paused == ["a"]


def test_snapshots_without_the_capability_are_501_naming_the_runtime(client: TestClient) -> None:
    """The kubernetes runtime's answer (it declares no snapshots), after a 404 for an unknown sandbox."""
    assert client.post("/v1/sandboxes/nope/snapshots", json={}).json()["code"] == "SANDBOX::NOT_FOUND"
    for method, path in [
        ("POST", "/v1/sandboxes/a/snapshots"),
        ("GET", "/v1/snapshots"),
        ("GET", "/snapshots/snap-x"),
        ("DELETE", "/v1/snapshots/snap-x"),
    ]:
        refused = client.request(method, path, json={} if method == "POST" else None)
        assert refused.status_code == 501, (path, refused.text)
        assert refused.json() == {
            "code": "SANDBOX::API_NOT_SUPPORTED",
            "message": "snapshots are not supported by the memory runtime",
        }
    create = client.post("/v1/sandboxes", json={"snapshotId": "snap-x", "entrypoint": ["true"]})
    assert create.status_code == 400 and create.json()["code"] == "SANDBOX::API_NOT_SUPPORTED"
    assert "snapshotId" in create.json()["message"]


def create_schema(runtime: MemoryRuntime) -> dict[str, Any]:
    for client in client_for(runtime):
        schema: dict[str, Any] = client.get("/openapi.json").json()["components"]["schemas"]["CreateSandboxRequest"]
    return schema


def test_the_document_requires_an_image_where_snapshots_are_not_served(runtime: MemoryRuntime) -> None:
    without = create_schema(runtime)
    assert "snapshotId" not in without["properties"] and {"image", "entrypoint"} <= set(without["required"])
    runtime.capabilities = Capabilities("memory", snapshots=True)
    with_snapshots = create_schema(runtime)
    assert "snapshotId" in with_snapshots["properties"]
    assert not {"image", "entrypoint"} & set(with_snapshots.get("required", []))  # either: validation.py
