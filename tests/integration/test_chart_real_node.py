"""The chart's images, running (on unless OSB_REAL_NODE=0): the controller and the server installed by the chart
on the real node, with the images built here (tools/build-image.sh) loaded into its containerd.

- scripts/e2e-test.sh passes (Pool, BatchSandbox from a template and from the Pool);
- the official SDK, against the chart's server, creates pooled and direct sandboxes and runs commands;
- the metrics endpoint answers a scraper bound to the metrics-reader role, over the chart's certificate,
  and refuses one that is not;
- the controller's memory stays well under the chart's 128Mi limit.
Skipped when the real node is off, like tests/integration/test_real_node.py.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from opensandbox import Sandbox, SandboxManager
from opensandbox.config import ConnectionConfig
from opensandbox.exceptions import SandboxApiException
from opensandbox.models import SandboxFilter

from harness.images import TEST_IMAGE, built_image
from harness.paths import ROOT
from harness.ports import free_port
from harness.real_node import NODE_LABEL, NODE_TAINT_KEY, PLACEMENT, RealNode
from harness.services import LocalCluster

CHART = ROOT / "charts" / "opensandbox-controller"
# The chart's default image names; an unqualified name is docker.io/<name> to the kubelet, and
# tools/build-image.sh tags it so.
IMAGES = {
    "controller": "opensandbox/controller:dev",
    "server": "opensandbox/server:v0.1.0",
    "execd": "opensandbox/execd:v1.0.5",
}
SMALL = {"cpu": "250m", "memory": "128Mi"}
MEMORY_BUDGET = 100 * 2**20  # the chart's limit is 128Mi: keep headroom


@pytest.fixture(scope="session")
def chart_images(node: RealNode) -> RealNode:
    """The real node with the chart's images, built here when missing or older than the sources."""
    for program, image in IMAGES.items():
        node.load_image(built_image(program, image))
    return node


def helm(cluster: LocalCluster, *args: str) -> str:
    result = subprocess.run([str(cluster.bin_dir / "helm"), *args], env=cluster.env(), text=True, capture_output=True)
    assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stderr}"
    return result.stdout


def place_on_real_node(cluster: LocalCluster, namespace: str, release: str) -> None:
    """The chart has no placement values (the seed's keys only); a patch puts its pods on the real node."""
    patch = json.dumps({"spec": {"template": {"spec": PLACEMENT}}})
    for deploy in cluster.kubectl("get", "deploy", "-n", namespace, "-o", "name").split():
        cluster.kubectl("patch", "-n", namespace, deploy, "-p", patch)
    for deploy in cluster.kubectl("get", "deploy", "-n", namespace, "-o", "name").split():
        cluster.kubectl("rollout", "status", "-n", namespace, deploy, "--timeout=180s")


def pod_of(cluster: LocalCluster, namespace: str, selector: str) -> dict[str, Any]:
    pods = yaml.safe_load(cluster.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "yaml"))["items"]
    running = [p for p in pods if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]
    assert len(running) == 1, [p["metadata"]["name"] for p in pods]
    pod: dict[str, Any] = running[0]
    return pod


@pytest.fixture
def installed(cluster: LocalCluster, namespace: str, chart_images: RealNode) -> Iterator[str]:
    """The chart with its defaults (images included), in this test's namespace, on the real node;
    direct-mode sandboxes go to the real node too (server.config.kubernetes.defaultPodSpec)."""
    release = f"r{namespace.removeprefix('t-')}"
    helm(
        cluster, "install", release, str(CHART), "-n", namespace,
        "--set", f"namespaceOverride={namespace}",
        "--set-json", f"server.config.kubernetes.defaultPodSpec={json.dumps(PLACEMENT)}",
    )  # fmt: skip
    try:
        place_on_real_node(cluster, namespace, release)
        yield release
    finally:
        subprocess.run(
            [str(cluster.bin_dir / "helm"), "uninstall", release, "-n", namespace, "--wait"],
            env=cluster.env(),
            capture_output=True,
            check=False,
        )


def test_e2e_script_passes(cluster: LocalCluster, chart_images: RealNode) -> None:
    result = subprocess.run(
        [
            str(CHART / "scripts" / "e2e-test.sh"),
            "--node-selector", "=".join(NODE_LABEL),
            "--toleration", f"{NODE_TAINT_KEY}=true:NoSchedule",
        ],
        env=cluster.env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-6000:]
    for step in ("Pool example-pool has 2 available pods", "3 ready sandboxes", "came from the Pool", "e2e passed"):
        assert step in result.stderr, result.stderr


async def stdout_of(sandbox: Sandbox, command: str) -> str:
    execution = await sandbox.commands.run(command)
    assert execution.error is None, execution.error
    return "".join(m.text for m in execution.logs.stdout).strip()


@contextlib.asynccontextmanager
async def sandbox_of(**kwargs: Any) -> Any:
    sandbox = await Sandbox.create(**kwargs)
    try:
        yield sandbox
    finally:
        with contextlib.suppress(SandboxApiException):
            await sandbox.kill()
        await sandbox.close()


@contextlib.contextmanager
def port_forward(cluster: LocalCluster, namespace: str, target: str, port: int) -> Iterator[int]:
    """`kubectl port-forward` to a local port; yields it once it accepts connections."""
    local = free_port()
    proc = subprocess.Popen(
        [str(cluster.bin_dir / "kubectl"), "port-forward", "-n", namespace, target, f"{local}:{port}"],
        env=cluster.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", local), timeout=1):
                break
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "kubectl port-forward did not listen"
            time.sleep(0.1)
        yield local
    finally:
        proc.terminate()
        proc.wait(10)


def wait_pool_available(cluster: LocalCluster, namespace: str, pool: str, count: int) -> None:
    deadline = time.monotonic() + 120
    while True:
        got = cluster.kubectl("get", "sbxpool", pool, "-n", namespace, "-o", "jsonpath={.status.available}")
        if got and int(got) >= count:
            return
        assert time.monotonic() < deadline, f"Pool {pool}: {got or 0} available"
        time.sleep(0.5)


async def test_sdk_through_the_chart_installed_server(cluster: LocalCluster, namespace: str, installed: str) -> None:
    container = {"name": "sandbox", "image": TEST_IMAGE, "imagePullPolicy": "Never", "resources": {"limits": SMALL}}
    pool = {
        "apiVersion": "sandbox.opensandbox.io/v1alpha1",
        "kind": "Pool",
        "metadata": {"name": "agent-pool"},
        "spec": {
            "minBufferSize": 1,
            "maxBufferSize": 1,
            "capacity": 3,
            "sandboxTemplate": {"spec": {**PLACEMENT, "containers": [container]}},
        },
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pool))
    wait_pool_available(cluster, namespace, "agent-pool", 1)
    server_ip = pod_of(cluster, namespace, "app.kubernetes.io/component=server")["status"]["podIP"]
    config = ConnectionConfig(domain=f"{server_ip}:8080", disable_metrics=True)
    proxied = ConnectionConfig(domain=f"{server_ip}:8080", disable_metrics=True, use_server_proxy=True)

    # Pooled: the Pool's pod is claimed; the entrypoint and env apply.
    async with sandbox_of(
        image="ignored:latest",
        entrypoint=["sleep", "infinity"],
        env={"GREETING": "from-the-pool"},
        connection_config=config,
        extensions={"poolRef": "agent-pool"},
    ) as pooled:
        deadline = time.monotonic() + 15
        while (out := await stdout_of(pooled, "echo $GREETING")) != "from-the-pool":
            assert time.monotonic() < deadline, out
        claimed = cluster.kubectl(
            "get", "pods", "-n", namespace, "-l", f"sandbox.opensandbox.io/batchsandbox={pooled.id}",
            "-o", "jsonpath={.items[0].metadata.labels.sandbox\\.opensandbox\\.io/pool}",
        )  # fmt: skip
        assert claimed == "agent-pool"

    # Direct: a pod for the sandbox, on the real node through defaultPodSpec; also through the proxy.
    async with sandbox_of(image=TEST_IMAGE, resource=SMALL, connection_config=config) as direct:
        assert await stdout_of(direct, "echo direct") == "direct"
        # examples/README.md: list, reconnect, renew.
        manager = await SandboxManager.create(connection_config=config)
        try:
            page = await manager.list_sandbox_infos(SandboxFilter(states=["Running"]))
            assert direct.id in [info.id for info in page.sandbox_infos]
        finally:
            await manager.close()
        await direct.renew(timedelta(minutes=30))
        via_proxy = await Sandbox.connect(direct.id, connection_config=proxied)
        try:
            assert await stdout_of(via_proxy, "echo proxied") == "proxied"
        finally:
            await via_proxy.close()
    assert cluster.kubectl("get", "bsbx", "-n", namespace, "-o", "name").strip() == ""  # kill deleted them

    # The README's way from a laptop: kubectl port-forward to the Service, the SDK through the server proxy.
    with port_forward(cluster, namespace, f"svc/{installed}-server", 8080) as local:
        async with httpx.AsyncClient(timeout=10) as http:
            health = (await http.get(f"http://127.0.0.1:{local}/health")).json()
            assert health["status"] == "healthy" and health["runtime"]["type"] == "kubernetes", health
            assert health["runtime"]["ready"] is True, health
        forwarded = ConnectionConfig(domain=f"127.0.0.1:{local}", disable_metrics=True, use_server_proxy=True)
        async with sandbox_of(
            image="ignored:latest",
            entrypoint=["sleep", "infinity"],
            connection_config=forwarded,
            extensions={"poolRef": "agent-pool"},
        ) as through_forward:
            assert await stdout_of(through_forward, "echo forwarded") == "forwarded"

    # The README's log command shows the controller's JSON log lines.
    logs = cluster.kubectl("logs", "-n", namespace, "-l", "control-plane=controller-manager", "--tail=-1")
    messages = [json.loads(line)["msg"] for line in logs.splitlines() if line]
    assert "starting" in messages and "caches synced; reconciling" in messages, messages[:20]


def scrape(ip: str, port: int, token: str, ca: str, server_name: str) -> int:
    """GET /metrics as Prometheus does with the ServiceMonitor: dial the pod, verify the certificate
    against the chart's CA and the Service's name (tlsConfig.serverName), send the bearer token."""
    context = ssl.create_default_context(cadata=ca)
    request = (
        f"GET /metrics HTTP/1.1\r\nHost: {server_name}\r\nAuthorization: Bearer {token}\r\n"
        "Connection: close\r\n\r\n"  # (read until the server closes)
    )
    with (
        socket.create_connection((ip, port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        tls.sendall(request.encode())
        response = b""
        while chunk := tls.recv(65536):
            response += chunk
    status = int(response.split(b" ", 2)[1])
    if status == 200:
        assert b"controller_runtime_reconcile_total" in response
    return status


def test_metrics_and_memory_of_the_chart_installed_controller(
    cluster: LocalCluster, namespace: str, installed: str
) -> None:
    release = installed
    pod = pod_of(cluster, namespace, "control-plane=controller-manager")
    secret = yaml.safe_load(cluster.kubectl("get", "secret", f"{release}-metrics-cert", "-n", namespace, "-o", "yaml"))
    ca = base64.b64decode(secret["data"]["ca.crt"]).decode()
    server_name = f"{release}-controller-manager-metrics-service.{namespace}.svc"
    ip = pod["status"]["podIP"]
    for account in ("scraper", "stranger"):
        cluster.kubectl("create", "serviceaccount", account, "-n", namespace)
    binding = f"{namespace}-scraper"
    cluster.kubectl(
        "create", "clusterrolebinding", binding, f"--clusterrole=sandbox-k8s-{release}-metrics-reader",
        f"--serviceaccount={namespace}:scraper",
    )  # fmt: skip
    try:
        token = cluster.kubectl("create", "token", "scraper", "-n", namespace).strip()
        stranger = cluster.kubectl("create", "token", "stranger", "-n", namespace).strip()
        assert scrape(ip, 8443, token, ca, server_name) == 200
        assert scrape(ip, 8443, stranger, ca, server_name) == 403
        assert scrape(ip, 8443, "not-a-token", ca, server_name) == 401
    finally:
        cluster.kubectl("delete", "clusterrolebinding", binding)

    node = pod["spec"]["nodeName"]
    summary = json.loads(cluster.kubectl("get", "--raw", f"/api/v1/nodes/{node}/proxy/stats/summary"))
    stats = next(p for p in summary["pods"] if p["podRef"]["name"] == pod["metadata"]["name"])
    memory = stats["containers"][0]["memory"]
    rss, working_set = memory.get("rssBytes", 0), memory["workingSetBytes"]
    print(f"controller memory: rss {rss / 2**20:.1f} MiB, working set {working_set / 2**20:.1f} MiB")
    assert max(rss, working_set) < MEMORY_BUDGET
    Path(ROOT / ".cluster" / "logs" / "chart-controller-memory.json").write_text(
        json.dumps({"rss_bytes": rss, "working_set_bytes": working_set})
    )
