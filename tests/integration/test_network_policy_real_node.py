"""Network policies on the kubernetes runtime, through the official SDK, with pods on the real node.

The controller injects the egress sidecar (`--egress-image`) into the pods of sandboxes created with
a networkPolicy, and into the pods of a Pool with `spec.egress` (a pooled create's policy replaces
the Pool's in the claimed pod's sidecar). The fake internet (harness/fake_internet.py) sits on the
real node's bridge osb0 at 10.77.0.x (below the pods' range, which starts at 10.77.1.1): pods reach
it on their bridge, and nothing leaves the machine. The server tells the sidecars to forward allowed lookups to its
DNS server (`egress.upstreamDns`). Hold the cluster lock (HELPERS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from lightkube import Client
from lightkube.resources.core_v1 import Pod
from opensandbox import Sandbox
from opensandbox.config import ConnectionConfig
from opensandbox.exceptions import SandboxApiException
from opensandbox.models.sandboxes import NetworkPolicy, NetworkRule

from harness.controller_process import ControllerProcess
from harness.egress_probes import ask_resolver, fetch, resolves, sh
from harness.fake_internet import FakeInternet
from harness.images import EGRESS_IMAGE, EXECD_IMAGE, TEST_IMAGE, built_image
from harness.kube import eventually, idle_ready, pool_manifest, pool_pods
from harness.kubernetes_server import SMALL, KubernetesServer, kubernetes_server, real_node_server_config, real_pool
from harness.paths import sandbox_token_key
from harness.real_node import RealNode, real_node_pod_spec
from harness.services import LocalCluster
from opensandbox_platform.api import labels, tokens


@pytest.fixture(scope="module")
def internet(node: RealNode) -> Iterator[FakeInternet]:
    with FakeInternet(prefix="10.77.0", bridge="osb0") as net:
        yield net


@pytest.fixture(scope="module")
def images(node: RealNode) -> tuple[str, str]:
    node.load_image(built_image("execd", EXECD_IMAGE))
    node.load_image(built_image("egress", EGRESS_IMAGE))
    return EXECD_IMAGE, EGRESS_IMAGE


@pytest.fixture
def controller(
    cluster: LocalCluster, crds: None, namespace: str, images: tuple[str, str]
) -> Iterator[ControllerProcess]:
    execd, egress = images
    args = ("--execd-image", execd, "--egress-image", egress, "--egress-image-pull-policy", "Never")
    proc = ControllerProcess(cluster, namespace, *args).start()
    yield proc
    proc.stop()


@pytest.fixture
def server(
    cluster: LocalCluster, namespace: str, controller: ControllerProcess, tmp_path: Path, internet: FakeInternet
) -> Iterator[KubernetesServer]:
    config = real_node_server_config() + f'\n[egress]\nupstreamDns = ["{internet.dns}"]\n'
    with kubernetes_server(tmp_path, namespace, cluster.kubeconfig, config) as srv:
        yield srv


@contextlib.asynccontextmanager
async def created(server: KubernetesServer, kube: Client, namespace: str, **kwargs: Any) -> AsyncIterator[Sandbox]:
    # the server waits up to createTimeoutSeconds (90) for the pod; a first start of a newly loaded
    # image can take longer than the SDK's default 30 s on this shared machine
    config = ConnectionConfig(domain=server.domain, disable_metrics=True, request_timeout=timedelta(seconds=100))
    try:
        sb = await Sandbox.create(TEST_IMAGE, connection_config=config, resource=SMALL, **kwargs)
    except Exception:  # say why: the pods' container states
        pods = [(p.metadata.name, p.status.to_dict()) for p in kube.list(Pod, namespace=namespace)]
        raise AssertionError(f"create failed; pods: {pods}") from None
    try:
        yield sb
    finally:
        with contextlib.suppress(SandboxApiException):
            await sb.kill()
        await sb.close()


def sidecar_pid(token: str) -> int:
    wanted = f"OPENSANDBOX_EGRESS_TOKEN={token}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and wanted in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
    assert len(found) == 1, found
    return found[0]


def sandbox_pod(kube: Client, namespace: str, sandbox_id: str) -> Pod:
    (pod,) = [
        p
        for p in kube.list(Pod, namespace=namespace, labels={labels.BATCHSANDBOX: sandbox_id})
        if p.metadata.deletionTimestamp is None
    ]
    return pod


async def test_policy_is_enforced_in_the_pod_and_changed_at_run_time(
    server: KubernetesServer, internet: FakeInternet, kube: Client, namespace: str
) -> None:
    policy = NetworkPolicy(default_action="deny", egress=[NetworkRule(action="allow", target="*.good.test")])
    async with created(server, kube, namespace, network_policy=policy) as sb:
        pod = sandbox_pod(kube, namespace, sb.id)
        (sidecar,) = pod.spec.initContainers[:1]
        assert sidecar.name == labels.EGRESS_CONTAINER and sidecar.restartPolicy == "Always"
        main = next(c for c in pod.spec.containers if c.name == labels.SANDBOX_CONTAINER)
        assert "NET_ADMIN" not in (main.securityContext.capabilities.add or [])

        good, bad = internet.address("a.good.test"), internet.address("bad.test")
        assert await resolves(sb, "a.good.test") == good
        assert await fetch(sb, good) == "host=a.good.test"
        assert await resolves(sb, "bad.test") == ""
        assert await fetch(sb, bad) == "failed"
        assert await ask_resolver(sb, internet.rogue_dns, 5353, "bad.test") == "no answer"
        assert await ask_resolver(sb, internet.dns, 53, "bad.test") == "NXDOMAIN 0"
        out = await sh(sb, "nft flush ruleset 2>&1; echo rc=$?")
        assert "rc=0" not in out
        # the sidecar's API from inside the pod, with the sandbox's own (execd) token: refused
        status = await sh(
            sb,
            "timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/18080 && printf \"GET /policy HTTP/1.0\\r\\n"
            'OPENSANDBOX-EGRESS-AUTH: $EXECD_ACCESS_TOKEN\\r\\n\\r\\n" >&3 '
            "&& head -n1 <&3'",
        )
        assert "401" in status, status

        await sb.patch_egress_rules([NetworkRule(action="allow", target="bad.test")])
        assert await fetch(sb, bad) == "failed"  # not looked up yet: its address is not open
        assert await resolves(sb, "bad.test") == bad
        assert await fetch(sb, bad) == "host=bad.test"
        await sb.delete_egress_rules(["bad.test"])
        assert await resolves(sb, "bad.test") == ""
        assert await fetch(sb, bad) == "failed"
        got = await sb.get_egress_policy()
        assert [(r.action, r.target) for r in got.egress or []] == [("allow", "*.good.test")]

        # through the server's lifecycle route
        url = f"{server.url}/v1/sandboxes/{sb.id}/networkpolicy"
        async with httpx.AsyncClient(timeout=30) as client:
            replaced = await client.put(
                url, json={"defaultAction": "allow", "egress": [{"action": "deny", "target": "bad.test"}]}
            )
            assert replaced.status_code == 200 and replaced.json()["enforced"] is True, replaced.text
        assert await fetch(sb, internet.address("other.test")) == "host=other.test"
        assert await fetch(sb, bad) == "failed"  # the sidecar resolved the denied name itself


async def test_the_policy_survives_a_sidecar_restart(
    server: KubernetesServer, internet: FakeInternet, kube: Client, namespace: str
) -> None:
    policy = NetworkPolicy(default_action="deny", egress=[NetworkRule(action="allow", target="*.good.test")])
    async with created(server, kube, namespace, network_policy=policy) as sb:
        await sb.patch_egress_rules([NetworkRule(action="allow", target="other.test")])
        pod = sandbox_pod(kube, namespace, sb.id).metadata.name
        # the sidecar's process ends (as in a crash; the real node's containers are this machine's
        # processes, found by the sidecar's token); the kubelet starts it again in the same pod
        os.kill(sidecar_pid(tokens.egress_token(tokens.read_key(sandbox_token_key()), pod)), signal.SIGKILL)
        for _ in range(100):
            restarted = sandbox_pod(kube, namespace, sb.id).status.initContainerStatuses[0]
            if restarted.restartCount >= 1 and restarted.started:
                break
            await asyncio.sleep(0.2)
        assert restarted.restartCount >= 1
        for _ in range(50):
            if await resolves(sb, "other.test"):
                break
            await asyncio.sleep(0.2)
        assert await resolves(sb, "other.test") == internet.address("other.test")
        assert await resolves(sb, "bad.test") == ""
        assert await fetch(sb, internet.address("bad.test")) == "failed"


async def test_no_policy_no_sidecar_and_pooled_policies_need_an_egress_pool(
    server: KubernetesServer, internet: FakeInternet, kube: Client, namespace: str, cluster: LocalCluster
) -> None:
    async with created(server, kube, namespace) as sb:
        pod = sandbox_pod(kube, namespace, sb.id)
        assert labels.EGRESS_CONTAINER not in [c.name for c in pod.spec.initContainers or []]
        assert await fetch(sb, internet.address("bad.test")) == "host=bad.test"
    # a Pool without spec.egress: its pods have no sidecar, so a pooled policy is refused, naming it
    plain = pool_manifest("plain", real_node_pod_spec(), minimum=0, maximum=0, capacity=1)
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(plain))
    async with httpx.AsyncClient(timeout=30) as client:
        body = {
            "image": {"uri": TEST_IMAGE},
            "entrypoint": ["tail", "-f", "/dev/null"],
            "timeout": 60,
            "resourceLimits": {},
            "extensions": {"poolRef": "plain"},
            "networkPolicy": {"defaultAction": "deny", "egress": []},
        }
        response = await client.post(f"{server.url}/v1/sandboxes", json=body)
        assert response.status_code == 400 and response.json()["code"].endswith("API_NOT_SUPPORTED"), response.text
        assert "Pool 'plain'" in response.json()["message"] and "spec.egress" in response.json()["message"]


async def put_policy_from_inside(sb: Sandbox) -> str:
    """The status line of a PUT /policy the sandbox sends its own sidecar with the only token it holds."""
    return await sh(
        sb,
        "timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/18080 && printf \"PUT /policy HTTP/1.0\\r\\n"
        "OPENSANDBOX-EGRESS-AUTH: $EXECD_ACCESS_TOKEN\\r\\nContent-Length: 25\\r\\n\\r\\n"
        '{\\"defaultAction\\":\\"allow\\"}" >&3 && head -n1 <&3\'',
    )


async def test_pooled_sandboxes_get_their_policy_in_the_warm_pod_of_an_egress_pool(
    server: KubernetesServer, internet: FakeInternet, kube: Client, namespace: str, cluster: LocalCluster
) -> None:
    guarded = real_pool("guarded", 2)
    guarded["spec"]["egress"] = {"defaultAction": "deny", "upstreamDns": [internet.dns]}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(guarded))
    idle = eventually(
        lambda: len(ready := idle_ready(pool_pods(kube, namespace, "guarded"))) == 2 and ready,
        timeout=120,
        what="2 idle Ready pods of the egress Pool",
    )
    # an idle pod holds the Pool's policy (deny, no rules) until it is claimed
    key = tokens.read_key(sandbox_token_key())
    warm = idle[0]
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.get(
            f"http://{warm.status.podIP}:{labels.EGRESS_PORT}/policy",
            headers={labels.EGRESS_TOKEN_HEADER: tokens.egress_token(key, warm.metadata.name)},
        )
    assert answer.status_code == 200 and answer.json()["mode"] == "deny_all", answer.text
    assert answer.json()["policy"]["egress"] == []

    good = internet.address("a.good.test")
    only = NetworkPolicy(default_action="deny", egress=[NetworkRule(action="allow", target="a.good.test")])
    async with created(server, kube, namespace, network_policy=only, extensions={"poolRef": "guarded"}) as sb:
        pod = sandbox_pod(kube, namespace, sb.id)
        assert pod.metadata.labels[labels.POOL] == "guarded"
        assert labels.NETWORK_POLICY_APPLIED in pod.metadata.annotations
        assert await resolves(sb, "a.good.test") == good
        assert await fetch(sb, good) == "host=a.good.test"
        assert await resolves(sb, "b.good.test") == ""
        assert await fetch(sb, internet.address("b.good.test")) == "failed"
        assert await fetch(sb, internet.address("bad.test")) == "failed"
        # the sandbox cannot change its own policy: its execd token is not the sidecar's
        assert "401" in await put_policy_from_inside(sb)
        assert await resolves(sb, "b.good.test") == ""
        got = await sb.get_egress_policy()
        assert [(r.action, r.target) for r in got.egress or []] == [("allow", "a.good.test")]

    # without a networkPolicy, a sandbox of the Pool keeps the Pool's policy, and can be given rules
    async with created(server, kube, namespace, extensions={"poolRef": "guarded"}) as kept:
        assert await fetch(kept, good) == "failed"
        async with httpx.AsyncClient(timeout=30) as client:
            response = await client.get(f"{server.url}/v1/sandboxes/{kept.id}/networkpolicy")
        assert response.status_code == 200 and response.json()["enforced"] is True, response.text
        assert response.json()["mode"] == "deny_all"
        await kept.patch_egress_rules([NetworkRule(action="allow", target="a.good.test")])
        assert await resolves(kept, "a.good.test") == good
        assert await fetch(kept, good) == "host=a.good.test"
