"""The server's kubernetes runtime against the real control plane, the real controller and kwok pods.

Each test has its own namespace, controller and server (`[runtime] type = "kubernetes"`). kwok pods
get IPs but run nothing, so the SDK is used with `skip_health_check=True` and nothing talks to execd;
nor do pooled creates here carry an entrypoint or env (the controller would start them through execd
at a kwok pod's IP, an address off this machine). tests/integration/test_server_kubernetes_real_node.py
runs commands in real pods.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from lightkube import Client
from lightkube.resources.core_v1 import Pod
from opensandbox import Sandbox
from opensandbox.config import ConnectionConfig
from opensandbox.exceptions import SandboxApiException

from harness.controller_process import ControllerProcess
from harness.kube import BatchSandbox, eventually, idle_ready, pool_pods, seed_pool
from harness.kubernetes_server import KubernetesServer, kubernetes_server
from harness.services import LocalCluster
from opensandbox_platform.api import labels

CREATE_TIMEOUT = 8  # seconds: [kubernetes] createTimeoutSeconds of the test server


@pytest.fixture
def server(
    cluster: LocalCluster, namespace: str, controller: ControllerProcess, tmp_path: Path
) -> Iterator[KubernetesServer]:
    extra = f"createTimeoutSeconds = {CREATE_TIMEOUT}\n"
    with kubernetes_server(tmp_path, namespace, cluster.kubeconfig, extra) as srv:
        yield srv


@pytest.fixture
def api(server: KubernetesServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{server.url}/v1", timeout=30, trust_env=False) as client:
        yield client


@pytest.fixture
def pool(cluster: LocalCluster, kube: Client, namespace: str, controller: ControllerProcess) -> str:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=seed_pool("warm", min_buffer=3, max_buffer=6))
    eventually(lambda: len(idle_ready(pool_pods(kube, namespace, "warm"))) >= 3, what="3 idle Ready pool pods")
    return "warm"


def sdk_config(server: KubernetesServer) -> ConnectionConfig:
    return ConnectionConfig(domain=server.domain, disable_metrics=True)


def batchsandboxes(kube: Client, namespace: str) -> dict[str, Any]:
    return {b.metadata.name: b for b in kube.list(BatchSandbox, namespace=namespace)}


def create_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "image": {"uri": "localhost/opensandbox-test-base:latest"},
        "entrypoint": ["tail", "-f", "/dev/null"],
        "timeout": 600,
        "resourceLimits": {"cpu": "250m", "memory": "64Mi"},
    }
    body.update(overrides)
    return body


async def test_pooled_create_claims_a_warm_pod_and_its_endpoint_is_the_pod_ip(
    server: KubernetesServer, kube: Client, namespace: str, pool: str
) -> None:
    sb = await Sandbox.create(
        "ignored:in-pooled-mode",
        connection_config=sdk_config(server),
        extensions={"poolRef": pool},
        metadata={"suite": "k8s"},
        skip_health_check=True,
    )
    try:
        info = await sb.get_info()
        assert info.status.state == "Running"
        assert info.metadata == {"suite": "k8s"}
        assert info.image is not None and info.image.image == "ubuntu:latest"  # the Pool's image
        assert info.entrypoint == ["tail", "-f", "/dev/null"]
        assert info.expires_at is not None and 590 <= (info.expires_at - info.created_at).total_seconds() <= 610

        bs = batchsandboxes(kube, namespace)[sb.id]
        assert bs.spec["poolRef"] == pool and bs.spec["replicas"] == 1
        assert "sandboxTemplate" not in bs.spec  # the SDK's keep-alive entrypoint needs nothing started
        (pod,) = [p for p in pool_pods(kube, namespace, pool) if p.metadata.labels.get(labels.BATCHSANDBOX) == sb.id]
        endpoint = await sb.get_endpoint(44772)
        assert endpoint.endpoint == f"{pod.status.podIP}:44772"
        assert (await sb.get_endpoint(8080)).endpoint == f"{pod.status.podIP}:8080"

        await sb.kill()
        assert sb.id not in batchsandboxes(kube, namespace)
        eventually(lambda: not _pod_alive(kube, namespace, pod.metadata.name), what="the claimed pod deleted")
        with pytest.raises(SandboxApiException) as gone:
            await sb.get_info()
        assert gone.value.status_code == 404
    finally:
        await sb.close()


def _pod_alive(kube: Client, namespace: str, name: str) -> bool:
    pods = kube.list(Pod, namespace=namespace, fields={"metadata.name": name})
    return any(p.metadata.deletionTimestamp is None for p in pods)


def test_a_sandbox_that_never_runs_is_a_504_after_the_create_timeout_and_is_deleted(
    api: httpx.Client, kube: Client, namespace: str
) -> None:
    """A pod no node can take (more memory than any has) stays Pending. (Not a pooled entrypoint: the
    controller would start it through execd at a kwok pod's IP, which leads off this machine.)"""
    started = time.monotonic()
    response = api.post("/sandboxes", json=create_body(resourceLimits={"memory": "1000Ti"}))
    assert response.status_code == 504, response.text
    assert response.json()["code"] == "KUBERNETES::POD_READY_TIMEOUT"
    assert CREATE_TIMEOUT - 0.5 <= time.monotonic() - started <= CREATE_TIMEOUT + 5
    assert batchsandboxes(kube, namespace) == {}


async def test_direct_create_builds_the_pod_from_the_request(
    server: KubernetesServer, kube: Client, namespace: str
) -> None:
    sb = await Sandbox.create(
        "localhost/opensandbox-test-base:latest",
        connection_config=sdk_config(server),
        entrypoint=["sleep", "infinity"],
        env={"GREETING": "hello"},
        resource={"cpu": "500m", "memory": "256Mi"},
        timeout=None,
        skip_health_check=True,
    )
    try:
        info = await sb.get_info()
        assert info.status.state == "Running" and info.expires_at is None
        assert info.image is not None and info.image.image == "localhost/opensandbox-test-base:latest"
        template = batchsandboxes(kube, namespace)[sb.id].spec["sandboxTemplate"]["spec"]
        (container,) = template["containers"]
        assert container["image"] == "localhost/opensandbox-test-base:latest"
        assert container["command"] == ["sleep", "infinity"]
        assert {"name": "GREETING", "value": "hello"} in container["env"]
        assert container["resources"] == {"limits": {"cpu": "500m", "memory": str(256 << 20)}}
        pod = kube.get(Pod, f"{sb.id}-0", namespace=namespace)
        assert pod.spec.restartPolicy == "Never" and pod.spec.automountServiceAccountToken is False
        assert (await sb.get_endpoint(44772)).endpoint == f"{pod.status.podIP}:44772"
    finally:
        await sb.kill()
        await sb.close()


def test_resource_requests_are_the_direct_pods_and_refused_in_pooled_mode(
    api: httpx.Client, kube: Client, namespace: str
) -> None:
    requests = {"cpu": "100m", "memory": "32Mi"}
    created = api.post("/sandboxes", json=create_body(resourceRequests=requests))
    assert created.status_code == 202, created.text
    sandbox_id = created.json()["id"]
    (container,) = batchsandboxes(kube, namespace)[sandbox_id].spec["sandboxTemplate"]["spec"]["containers"]
    assert container["resources"] == {
        "limits": {"cpu": "250m", "memory": str(64 << 20)},
        "requests": {"cpu": "100m", "memory": str(32 << 20)},
    }
    pod = kube.get(Pod, f"{sandbox_id}-0", namespace=namespace)
    assert pod.spec.containers[0].resources.requests == {"cpu": "100m", "memory": str(32 << 20)}
    assert api.delete(f"/sandboxes/{sandbox_id}").status_code == 204

    # Refused before the Pool is looked up: a claimed pod's resources are the Pool's.
    pooled = api.post("/sandboxes", json=create_body(extensions={"poolRef": "warm"}, resourceRequests=requests))
    assert pooled.status_code == 400, pooled.text
    assert pooled.json()["code"] == "SANDBOX::API_NOT_SUPPORTED" and "resourceRequests" in pooled.json()["message"]
    above = api.post("/sandboxes", json=create_body(resourceRequests={"cpu": "1"}))  # more than the 250m limit
    assert above.status_code == 400 and above.json()["code"] == "SANDBOX::INVALID_PARAMETER"
    assert batchsandboxes(kube, namespace) == {}


def test_list_filters_metadata_and_renew(api: httpx.Client, pool: str) -> None:
    ids = []
    for team, extra in (("a", {}), ("a", {"extensions": {"poolRef": pool}}), ("b", {})):
        response = api.post("/sandboxes", json=create_body(metadata={"team": team}, **extra))
        assert response.status_code == 202, response.text
        assert response.json()["status"]["state"] == "Running"
        ids.append(response.json()["id"])

    def listed(**params: Any) -> list[str]:
        response = api.get("/sandboxes", params=params)
        assert response.status_code == 200, response.text
        return [item["id"] for item in response.json()["items"]]

    assert listed() == ids[::-1]  # newest first
    assert listed(metadata="team=a") == ids[1::-1]
    assert listed(metadata="team=a", state="running") == ids[1::-1]
    assert listed(state="Paused") == []
    assert listed(pageSize=1, page=2) == [ids[1]]

    patched = api.patch(f"/sandboxes/{ids[2]}/metadata", json={"team": "a", "extra": "x"})
    assert patched.status_code == 200 and patched.json()["metadata"] == {"team": "a", "extra": "x"}
    assert api.patch(f"/sandboxes/{ids[2]}/metadata", json={"extra": None}).json()["metadata"] == {"team": "a"}
    assert listed(metadata="team=a") == ids[::-1]

    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=3)
    renewed = api.post(f"/sandboxes/{ids[0]}/renew-expiration", json={"expiresAt": later.isoformat()})
    assert renewed.status_code == 200, renewed.text
    got = api.get(f"/sandboxes/{ids[0]}").json()
    assert abs(dt.datetime.fromisoformat(got["expiresAt"].replace("Z", "+00:00")) - later) < dt.timedelta(seconds=1)


def test_the_controller_deletes_an_expired_sandbox(api: httpx.Client, kube: Client, namespace: str) -> None:
    created = api.post("/sandboxes", json=create_body())
    assert created.status_code == 202, created.text
    sandbox_id = created.json()["id"]
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)
    assert api.post(f"/sandboxes/{sandbox_id}/renew-expiration", json={"expiresAt": soon.isoformat()}).is_success
    eventually(lambda: api.get(f"/sandboxes/{sandbox_id}").status_code == 404, timeout=15, what="expiry")
    assert dt.datetime.now(dt.UTC) >= soon
    assert sandbox_id not in batchsandboxes(kube, namespace)


def test_bad_input_is_a_4xx_and_creates_nothing(api: httpx.Client, kube: Client, namespace: str) -> None:
    def error(response: httpx.Response, status: int) -> str:
        assert response.status_code == status, response.text
        body = response.json()
        assert set(body) == {"code", "message"} and body["message"]
        return str(body["code"])

    unknown_pool = api.post("/sandboxes", json=create_body(extensions={"poolRef": "no-such-pool"}))
    assert error(unknown_pool, 400) == "KUBERNETES::POOL_NOT_FOUND"
    assert "no-such-pool" in unknown_pool.json()["message"]
    bad_pool_name = api.post("/sandboxes", json=create_body(extensions={"poolRef": "Not A Name"}))
    assert error(bad_pool_name, 400) == "KUBERNETES::POOL_NOT_FOUND"
    reserved = api.post("/sandboxes", json=create_body(metadata={f"{labels.PREFIX}x": "y"}))
    assert error(reserved, 400) == "SANDBOX::INVALID_METADATA_LABEL"
    assert error(api.post("/sandboxes", json=create_body(timeout=5)), 400) == "SANDBOX::INVALID_PARAMETER"
    assert error(api.post("/sandboxes", json=create_body(entrypoint=[])), 400) == "SANDBOX::INVALID_PARAMETER"
    assert batchsandboxes(kube, namespace) == {}

    assert error(api.get("/sandboxes/nope"), 404) == "SANDBOX::NOT_FOUND"
    assert error(api.delete("/sandboxes/nope"), 404) == "SANDBOX::NOT_FOUND"
    created = api.post("/sandboxes", json=create_body(timeout=None))
    assert created.status_code == 202, created.text
    sandbox_id = created.json()["id"]
    assert error(api.post(f"/sandboxes/{sandbox_id}/pause"), 400) == "SANDBOX::API_NOT_SUPPORTED"
    assert error(api.post(f"/sandboxes/{sandbox_id}/resume"), 400) == "SANDBOX::API_NOT_SUPPORTED"
    # snapshots: 501 naming the feature (404 first for an unknown sandbox), snapshotId 400 (docs/snapshots.md)
    assert error(api.post("/sandboxes/nope/snapshots", json={}), 404) == "SANDBOX::NOT_FOUND"
    for answer in (api.post(f"/sandboxes/{sandbox_id}/snapshots", json={}), api.get("/snapshots")):
        assert error(answer, 501) == "SANDBOX::API_NOT_SUPPORTED"
        assert answer.json()["message"] == "snapshots are not supported by the kubernetes runtime"
    from_snapshot = api.post("/sandboxes", json={"snapshotId": "snap-x", "resourceLimits": {"cpu": "1"}})
    assert error(from_snapshot, 400) == "SANDBOX::API_NOT_SUPPORTED" and "snapshotId" in from_snapshot.text
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
    renew = api.post(f"/sandboxes/{sandbox_id}/renew-expiration", json={"expiresAt": later})
    assert error(renew, 409) == "SANDBOX::INVALID_EXPIRATION"
    patch = api.patch(f"/sandboxes/{sandbox_id}/metadata", json={f"{labels.PREFIX}created-by": None})
    assert error(patch, 400) == "SANDBOX::INVALID_METADATA_LABEL"
    assert api.delete(f"/sandboxes/{sandbox_id}").status_code == 204
    assert error(api.get(f"/sandboxes/{sandbox_id}"), 404) == "SANDBOX::NOT_FOUND"
    assert batchsandboxes(kube, namespace) == {}


def test_an_empty_pool_is_429_after_the_create_timeout(
    cluster: LocalCluster, api: httpx.Client, kube: Client, namespace: str
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=seed_pool("empty", 0, 0, 0))
    response = api.post("/sandboxes", json=create_body(extensions={"poolRef": "empty"}))
    assert response.status_code == 429, response.text
    assert response.json()["code"] == "KUBERNETES::POOL_CAPACITY_EXHAUSTED"
    assert batchsandboxes(kube, namespace) == {}


def leave_after_sending(url: str, path: str, body: dict[str, Any]) -> None:
    """POST the whole request, then close the connection without reading the answer (a client with a
    short timeout may give up before its request is even sent on a busy machine)."""
    data = json.dumps(body).encode()
    address = httpx.URL(url)
    with socket.create_connection((address.host, address.port or 80)) as sock:
        sock.sendall(
            b"POST %b HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
            % (path.encode(), len(data), data)
        )
        time.sleep(0.05)  # the create has begun; the client goes away


def test_a_client_that_goes_away_leaves_no_half_made_sandbox(
    cluster: LocalCluster, server: KubernetesServer, api: httpx.Client, kube: Client, namespace: str
) -> None:
    # A create whose client went away runs to the end, then is deleted: nobody holds its id
    # (docs/reliability.md).
    leave_after_sending(server.url, "/v1/sandboxes", create_body(metadata={"n": "1"}))
    # (a pooled create can finish, and be deleted, between two polls of the API: the server's log
    # names the sandbox it made for nobody)
    abandoned = eventually(
        lambda: re.search(r'client went away during its create; deleting" id=([0-9a-f-]+)', server.logs()),
        timeout=CREATE_TIMEOUT + 5,
        what="the abandoned create finished",
    )
    eventually(
        lambda: abandoned.group(1) not in batchsandboxes(kube, namespace),
        timeout=CREATE_TIMEOUT + 5,
        what="the abandoned create's BatchSandbox deleted",
    )

    # A create that cannot succeed is deleted at its timeout, though nobody waits for the answer.
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=seed_pool("empty", 0, 0, 0))
    with pytest.raises(httpx.TimeoutException):
        httpx.post(
            f"{server.url}/v1/sandboxes",
            json=create_body(extensions={"poolRef": "empty"}, metadata={"n": "2"}),
            timeout=1,
        )
    waiting = [b for b in batchsandboxes(kube, namespace).values() if b.metadata.labels.get("n") == "2"]
    assert len(waiting) == 1  # it exists while the create waits for the pool
    eventually(
        lambda: not [b for b in batchsandboxes(kube, namespace).values() if b.metadata.labels.get("n") == "2"],
        timeout=CREATE_TIMEOUT + 5,
        what="the timed-out create's BatchSandbox deleted",
    )
    assert json.loads(api.get("/sandboxes").text)["pagination"]["totalItems"] == 0


def test_a_restarted_server_lists_the_sandboxes_it_made(
    cluster: LocalCluster, namespace: str, controller: ControllerProcess, tmp_path: Path
) -> None:
    with kubernetes_server(tmp_path / "first", namespace, cluster.kubeconfig) as first:
        created = httpx.post(f"{first.url}/v1/sandboxes", json=create_body(metadata={"keep": "me"}), timeout=30)
        assert created.status_code == 202, created.text
    with kubernetes_server(tmp_path / "second", namespace, cluster.kubeconfig) as second:
        listed = httpx.get(f"{second.url}/v1/sandboxes", timeout=10).json()["items"]
        assert [(s["id"], s["status"]["state"], s["metadata"]) for s in listed] == [
            (created.json()["id"], "Running", {"keep": "me"})
        ]
        assert listed[0]["createdAt"] == created.json()["createdAt"]
