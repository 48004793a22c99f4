"""Diagnostics routes (SDK descriptor and `osb devops` plain text) and the 501s of unsupported
features, against the in-memory runtime of test_routes."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from opensandbox_platform.server import networkpolicy
from opensandbox_platform.server.diagnostics import clip, since_time
from tests.unit.server.test_routes import MemoryRuntime, client_for


@pytest.fixture
def runtime() -> MemoryRuntime:
    rt = MemoryRuntime()
    rt.add("a", "Running", {}, 1)
    return rt


@pytest.fixture
def client(runtime: MemoryRuntime) -> Iterator[TestClient]:
    yield from client_for(runtime)


def test_logs_with_a_scope_are_the_sdk_descriptor(client: TestClient) -> None:
    body = client.get("/v1/sandboxes/a/diagnostics/logs?scope=container").json()
    assert body == {
        "sandboxId": "a",
        "kind": "logs",
        "scope": "container",
        "delivery": "inline",
        "contentType": "text/plain; charset=utf-8",
        "content": "line 1\nline 2\nline 3\n",
        "contentLength": 21,
        "truncated": False,
    }


def test_logs_without_a_scope_are_plain_text_with_tail(client: TestClient) -> None:
    response = client.get("/v1/sandboxes/a/diagnostics/logs?tail=2&since=10m")
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == "line 2\nline 3\n"


def test_events_merge_the_servers_and_the_engines(client: TestClient, runtime: MemoryRuntime) -> None:
    client.post("/v1/sandboxes", json={"image": {"uri": "x"}, "entrypoint": ["true"]})
    sandbox_id = list(runtime.sandboxes)[-1]
    client.post(f"/v1/sandboxes/{sandbox_id}/pause")
    text = client.get(f"/v1/sandboxes/{sandbox_id}/diagnostics/events?scope=all").json()["content"]
    reasons = [line.split()[3].rstrip(":") for line in text.splitlines()]
    assert reasons == ["ContainerStarted", "Created", "Started", "Paused"]
    runtime_only = client.get(f"/v1/sandboxes/{sandbox_id}/diagnostics/events?scope=runtime").json()["content"]
    assert "Created" not in runtime_only and "ContainerStarted" in runtime_only
    assert client.get(f"/v1/sandboxes/{sandbox_id}/diagnostics/events?limit=1").text.count("\n") == 1


def test_events_of_a_deleted_sandbox_stay_readable(client: TestClient, runtime: MemoryRuntime) -> None:
    client.post("/v1/sandboxes", json={"image": {"uri": "x"}, "entrypoint": ["true"]})
    sandbox_id = list(runtime.sandboxes)[-1]
    assert client.delete(f"/v1/sandboxes/{sandbox_id}").status_code == 204
    body = client.get(f"/v1/sandboxes/{sandbox_id}/diagnostics/events?scope=all").json()
    assert "Deleted" in body["content"] and body["warnings"]
    assert client.get(f"/v1/sandboxes/{sandbox_id}/diagnostics/logs?scope=all").status_code == 404


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v1/sandboxes/nope/diagnostics/logs?scope=container", 404),
        ("/v1/sandboxes/nope/diagnostics/events?scope=all", 404),
        ("/v1/sandboxes/nope/diagnostics/inspect", 404),
        ("/v1/sandboxes/a/diagnostics/logs?scope=kernel", 400),
        ("/v1/sandboxes/a/diagnostics/events?scope=container", 400),
        ("/v1/sandboxes/a/diagnostics/logs?since=yesterday", 400),
        ("/v1/sandboxes/a/diagnostics/logs?tail=0", 400),
    ],
)
def test_bad_diagnostics_requests(client: TestClient, path: str, status: int) -> None:
    response = client.get(path)
    assert response.status_code == status and set(response.json()) == {"code", "message"}


def test_inspect_and_summary_are_text(client: TestClient) -> None:
    assert '"id": "a"' in client.get("/v1/sandboxes/a/diagnostics/inspect").text
    summary = client.get("/sandboxes/a/diagnostics/summary?tail=1&event_limit=1").text
    assert "== events" in summary and summary.rstrip().endswith("line 3")


@pytest.mark.parametrize(
    ("method", "path", "feature"),
    [
        ("POST", "/v1/templates", "templates"),
        ("GET", "/v1/templates/t1", "templates"),
        ("DELETE", "/templates/t1", "templates"),
        ("GET", "/v1/snapshots", "snapshots"),
        ("POST", "/v1/sandboxes/a/snapshots", "snapshots"),
        ("DELETE", "/v1/snapshots/s1", "snapshots"),
    ],
)
def test_known_unsupported_routes_are_501_naming_the_feature(
    client: TestClient, method: str, path: str, feature: str
) -> None:
    response = client.request(method, path)
    assert response.status_code == 501
    assert response.json()["code"] == "SANDBOX::API_NOT_SUPPORTED" and feature in response.json()["message"]


def test_since_and_clip() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert since_time("90s", now) == now - dt.timedelta(seconds=90)
    assert since_time("2h", now) == now - dt.timedelta(hours=2)
    assert since_time(None, now) is None
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    assert since_time("027723507287613s", now) == epoch == since_time("99999999999999999999d", now)  # (fuzzed)
    text, cut = clip("a" * 10 + "\n" + "b" * 10, 15)
    assert cut and text == "b" * 10
    assert clip("short", 15) == ("short", False)


def test_hook_runs_become_events_oldest_first() -> None:
    from opensandbox_platform.server.hook_events import events_of_status

    run = {"durationMs": 12, "timedOut": False, "skipped": False, "outputTruncated": False}
    status = {
        "preStart": {**run, "startedAt": "2026-11-30T10:00:00.000Z", "exitCode": 0, "output": "ready\n"},
        "periodic": [
            {
                "name": "tick",
                "schedule": "@every 1s",
                "skipped": 1,
                "runs": [
                    {**run, "startedAt": "2026-11-30T10:00:02.000Z", "exitCode": 0, "skipped": True, "output": ""},
                    {**run, "startedAt": "2026-11-30T10:00:01.000Z", "exitCode": 137, "timedOut": True, "output": ""},
                ],
            }
        ],
    }
    lines = [f"{event.reason}: {event.message}" for event in events_of_status(status)]
    assert lines == [
        "HookSucceeded: preStart hook: exited with code 0 after 12 ms; output: ready",
        "HookFailed: periodic hook tick (@every 1s): timed out and was killed with code 137 after 12 ms",
        "HookSkipped: periodic hook tick (@every 1s): skipped, its previous run was still going (1 skipped so far)",
    ]
    assert [e.type for e in events_of_status(status)] == ["Normal", "Warning", "Warning"]


def test_denials_become_warning_events_most_refused_first() -> None:
    at = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    body = {"addresses": {"10.0.0.1": 3, "10.0.0.2": 9, "10.0.0.3": 0}, "names": {"evil.test": 2, "bad": "x"}}
    events = networkpolicy.denials_as_events(body, at)
    assert [(e.reason, e.type, e.at) for e in events] == [
        ("EgressDenied", "Warning", at),
        ("EgressDenied", "Warning", at),
        ("EgressNameDenied", "Warning", at),
    ]
    assert "9 packet(s) to 10.0.0.2" in events[0].message and "10.0.0.1" in events[1].message
    assert "evil.test (2 queries" in events[2].message
    assert networkpolicy.denials_as_events({"addresses": [1], "names": None}, at) == []
