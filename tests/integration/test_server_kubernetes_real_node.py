"""The official SDK through the server's kubernetes runtime to pods on the real node (on unless OSB_REAL_NODE=0).

The controller injects execd (`--execd-image`); sandboxes run on the real node (a Pool with its
nodeSelector and toleration, and `kubernetes.defaultPodSpec` for direct mode), and the SDK talks to
execd at the pod IP. Skipped when the real node is off, like tests/integration/test_real_node.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from lightkube import Client
from lightkube.resources.core_v1 import Pod
from opensandbox import Sandbox
from opensandbox.config import ConnectionConfig
from opensandbox.exceptions import SandboxApiException

from harness.controller_process import ControllerProcess
from harness.images import TEST_IMAGE
from harness.kube import BatchSandbox, eventually, gone, idle_ready, pool_pods
from harness.kubernetes_server import SMALL, KubernetesServer, real_pool
from harness.real_node import POD_NETWORK_PREFIX, RealNode
from harness.services import LocalCluster
from opensandbox_platform.api import labels


@pytest.fixture
def pool(cluster: LocalCluster, kube: Client, namespace: str, execd_controller: ControllerProcess) -> str:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(real_pool("real", 1)))
    eventually(lambda: idle_ready(pool_pods(kube, namespace, "real")), timeout=120, what="a Ready pod on the real node")
    return "real"


def sdk_config(server: KubernetesServer) -> ConnectionConfig:
    return ConnectionConfig(domain=server.domain, disable_metrics=True)


@contextlib.asynccontextmanager
async def created(server: KubernetesServer, image: str = TEST_IMAGE, **kwargs: Any) -> AsyncIterator[Sandbox]:
    sb = await Sandbox.create(image, connection_config=sdk_config(server), resource=SMALL, **kwargs)
    try:
        yield sb
    finally:
        with contextlib.suppress(SandboxApiException):
            await sb.kill()
        await sb.close()


async def stdout_of(sb: Sandbox, command: str) -> str:
    execution = await sb.commands.run(command)
    assert execution.error is None, execution.error
    return "\n".join(m.text.rstrip("\n") for m in execution.logs.stdout)


async def eventually_stdout(sb: Sandbox, command: str, expected: str, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (out := await stdout_of(sb, command)) != expected:
        assert asyncio.get_running_loop().time() < deadline, f"{command!r} printed {out!r}, not {expected!r}"
        await asyncio.sleep(0.1)


def sandbox_pod(kube: Client, namespace: str, sandbox_id: str) -> Pod:
    (pod,) = [
        p
        for p in kube.list(Pod, namespace=namespace, labels={labels.BATCHSANDBOX: sandbox_id})
        if p.metadata.deletionTimestamp is None
    ]
    return pod


async def test_pooled_sandbox_runs_commands_with_the_requested_entrypoint_and_env(
    server: KubernetesServer, kube: Client, namespace: str, node: RealNode, pool: str
) -> None:
    entrypoint = ["sh", "-c", 'echo "main saw $GREETING" > /tmp/main.txt; exec sleep 3600']
    async with created(
        server, extensions={"poolRef": pool}, entrypoint=entrypoint, env={"GREETING": "hello-pool"}
    ) as sb:
        pod = sandbox_pod(kube, namespace, sb.id)
        assert pod.spec.nodeName == node.name and pod.status.podIP.startswith(POD_NETWORK_PREFIX)
        assert pod.metadata.labels[labels.POOL] == pool
        assert (await sb.get_endpoint(44772)).endpoint == f"{pod.status.podIP}:44772"
        # Commands see the create's env; the entrypoint runs as the sandbox's main process, with it too.
        assert await stdout_of(sb, "echo $GREETING") == "hello-pool"
        await eventually_stdout(sb, "cat /tmp/main.txt", "main saw hello-pool")
        assert "sleep 3600" in await stdout_of(sb, "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '")
        await sb.files.write_file("/tmp/note.txt", "written through the SDK")
        assert await sb.files.read_file("/tmp/note.txt") == "written through the SDK"
        assert await stdout_of(sb, "cat /tmp/note.txt") == "written through the SDK"

        await sb.kill()
        eventually(lambda: gone(kube, Pod, pod.metadata.name, namespace), timeout=60, what="the pod removed")
        assert sb.id not in {b.metadata.name for b in kube.list(BatchSandbox, namespace=namespace)}


async def test_direct_sandbox_on_the_real_node_runs_commands(
    server: KubernetesServer, kube: Client, namespace: str, node: RealNode
) -> None:
    async with created(server, entrypoint=["sleep", "infinity"], env={"GREETING": "hello-direct"}) as sb:
        info = await sb.get_info()
        assert info.status.state == "Running" and info.entrypoint == ["sleep", "infinity"]
        pod = sandbox_pod(kube, namespace, sb.id)
        assert pod.spec.nodeName == node.name and pod.status.podIP.startswith(POD_NETWORK_PREFIX)
        # execd's installer starts first; its postStart hook copies execd before the sandbox starts
        assert [c.name for c in pod.spec.containers] == ["execd-installer", "sandbox"] and not pod.spec.initContainers
        assert pod.metadata.annotations["kubectl.kubernetes.io/default-container"] == "sandbox"
        assert pod.spec.containers[1].resources.limits == {"cpu": "250m", "memory": str(128 << 20)}
        assert await stdout_of(sb, "echo $GREETING; id -u") == "hello-direct\n0"
        await sb.files.write_file("/tmp/direct.txt", "direct")
        assert await sb.files.read_file("/tmp/direct.txt") == "direct"

        await sb.kill()
        eventually(lambda: gone(kube, Pod, pod.metadata.name, namespace), timeout=60, what="the pod removed")


async def test_a_direct_sandbox_whose_entrypoint_exits_ends_beside_the_idle_installer(
    server: KubernetesServer, kube: Client, namespace: str, node: RealNode
) -> None:
    """execd's installer keeps idling in the pod (the pod stays Running): the sandbox container's exit
    is what ends the sandbox, as when an init container copied execd."""
    async with created(server, entrypoint=["sh", "-c", "sleep 8; exit 3"]) as sb:  # (Running first)
        deadline = asyncio.get_running_loop().time() + 60
        while (info := await sb.get_info()).status.state != "Failed":
            assert asyncio.get_running_loop().time() < deadline, info.status
            await asyncio.sleep(0.2)
        assert info.status.reason == "SANDBOX_EXITED_ERROR", info.status
        pod = sandbox_pod(kube, namespace, sb.id)
        statuses = {c.name: c.state for c in pod.status.containerStatuses}
        assert statuses["sandbox"].terminated.exitCode == 3 and statuses["execd-installer"].running is not None


async def test_an_entrypoint_that_cannot_start_fails_the_create_and_leaves_nothing(
    server: KubernetesServer, kube: Client, namespace: str, node: RealNode
) -> None:
    with pytest.raises(SandboxApiException) as failed:
        await Sandbox.create(
            TEST_IMAGE, connection_config=sdk_config(server), resource=SMALL, entrypoint=["/no/such/program"]
        )
    assert failed.value.status_code == 400
    assert failed.value.error.code == "SANDBOX::START_FAILED", failed.value.error
    # The failed create's BatchSandbox is deleted behind the answer (with retries), not before it.
    eventually(lambda: not list(kube.list(BatchSandbox, namespace=namespace)), what="the BatchSandbox deleted")


async def test_the_server_proxy_reaches_execd_in_the_pod(
    server: KubernetesServer, kube: Client, namespace: str, node: RealNode, pool: str
) -> None:
    proxied = ConnectionConfig(domain=server.domain, disable_metrics=True, use_server_proxy=True)
    sb = await Sandbox.create(TEST_IMAGE, connection_config=proxied, resource=SMALL, extensions={"poolRef": pool})
    try:
        endpoint = await sb.get_endpoint(44772)
        assert endpoint.endpoint == f"{server.domain}/v1/sandboxes/{sb.id}/proxy/44772"
        assert await stdout_of(sb, "echo through-the-proxy") == "through-the-proxy"
    finally:
        await sb.kill()
        await sb.close()
