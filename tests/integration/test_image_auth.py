"""`image.auth` through the official SDK against a registry with htpasswd auth (tools/registry.sh, at the
real node's bridge address): the docker runtime pulls with the credentials (podman's X-Registry-Auth),
the kubernetes runtime gives the pod a pull Secret of the sandbox's own, owned by its BatchSandbox. A
wrong password is a 400 naming the refusal, and the create leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from lightkube import Client
from lightkube.resources.core_v1 import Secret
from opensandbox import Sandbox
from opensandbox.config import ConnectionConfig
from opensandbox.exceptions import SandboxApiException
from opensandbox.models.sandboxes import SandboxImageAuth, SandboxImageSpec

from harness.controller_process import ControllerProcess
from harness.docker_api import docker_containers
from harness.images import TEST_IMAGE
from harness.kube import BatchSandbox, eventually, gone
from harness.kubernetes_server import SMALL, KubernetesServer, kubernetes_server, real_node_server_config
from harness.real_node import RealNode
from harness.registry import Registry, private_registry
from harness.server_process import ServerProcess, running_server
from harness.services import LocalCluster
from opensandbox_platform.api import labels
from tests.e2e.test_server_sdk import config
from tests.integration.test_server_kubernetes_real_node import stdout_of

PORT = 5002  # test_registry.py's private registry uses 5001
CREDENTIALS = ("osb-user", "right-password")
WRONG = ("osb-user", "wrong-password")
PODMAN_CERTS = Path("/etc/containers/certs.d")


@pytest.fixture(scope="module")
def registry(node: RealNode) -> Iterator[Registry]:
    with private_registry("image-auth", PORT, CREDENTIALS) as found:
        yield found


@pytest.fixture
def private_image(registry: Registry) -> Iterator[str]:
    """A new tag of the test image in the private registry, not in podman's store."""
    reference = registry.reference("osb-tests/private", uuid.uuid4().hex[:10])
    registry.push(TEST_IMAGE, reference)
    yield reference
    subprocess.run(["podman", "rmi", "--force", reference], capture_output=True, check=False)


def sdk_config(server: KubernetesServer) -> ConnectionConfig:
    """A create waits for the pull (and its refusal) on the node: longer than the SDK's default 30 s
    when the machine is busy."""
    return ConnectionConfig(domain=server.domain, disable_metrics=True, request_timeout=timedelta(seconds=120))


def image(reference: str, credentials: tuple[str, str] | None) -> SandboxImageSpec:
    if credentials is None:
        return SandboxImageSpec(reference)
    return SandboxImageSpec(reference, auth=SandboxImageAuth(username=credentials[0], password=credentials[1]))


# --- docker ---------------------------------------------------------------------------------------------
@pytest.fixture
def podman_trusts(registry: Registry) -> Iterator[None]:
    """podman's engine trusts the cluster CA for this registry's address only, while the test runs."""
    directory = PODMAN_CERTS / registry.address
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(registry.ca, directory / "ca.crt")
    yield
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def docker_server(tmp_path: Path, docker_host: str) -> Iterator[ServerProcess]:
    with running_server(tmp_path, runtime="docker") as server:
        yield server


async def test_docker_pulls_with_the_credentials_and_refuses_a_wrong_password(
    docker_server: ServerProcess, private_image: str, podman_trusts: None
) -> None:
    for credentials, why in ((WRONG, "wrong password"), (None, "no credentials")):
        with pytest.raises(SandboxApiException) as refused:
            await Sandbox.create(image(private_image, credentials), connection_config=config(docker_server))
        assert refused.value.status_code == 400, why
        assert refused.value.error.code == "SANDBOX::IMAGE_PULL_FAILED", refused.value.error
        assert "unauthorized" in str(refused.value.error.message).lower(), refused.value.error
    # Nothing of the refused creates (the engine is shared: other servers' sandboxes come and go meanwhile).
    assert docker_containers(f"{labels.DOCKER_IMAGE}={private_image}") == []

    sb = await Sandbox.create(image(private_image, CREDENTIALS), connection_config=config(docker_server))
    try:
        assert (await sb.get_info()).image.image == private_image
        assert (await sb.commands.run("echo pulled")).logs.stdout[0].text.strip() == "pulled"
    finally:
        await sb.kill()
        await sb.close()


# --- kubernetes -----------------------------------------------------------------------------------------
@pytest.fixture
def server(
    cluster: LocalCluster, namespace: str, execd_controller: ControllerProcess, tmp_path: Path
) -> Iterator[KubernetesServer]:
    # imagePullPolicy Always: a real pull with the pod's secret, even when the node has the image.
    settings = real_node_server_config().replace('imagePullPolicy = "Never"', 'imagePullPolicy = "Always"')
    assert "Always" in settings
    with kubernetes_server(tmp_path, namespace, cluster.kubeconfig, settings) as srv:
        yield srv


async def test_kubernetes_pulls_with_a_secret_of_the_sandbox_and_refuses_a_wrong_password(
    server: KubernetesServer, kube: Client, namespace: str, private_image: str
) -> None:
    with pytest.raises(SandboxApiException) as refused:
        await Sandbox.create(image(private_image, WRONG), connection_config=sdk_config(server), resource=SMALL)
    assert refused.value.status_code == 400
    assert refused.value.error.code == "SANDBOX::START_FAILED", refused.value.error
    assert "401" in str(refused.value.error.message) or "unauthorized" in str(refused.value.error.message).lower()
    eventually(lambda: not list(kube.list(BatchSandbox, namespace=namespace)), timeout=60, what="no BatchSandbox")
    eventually(lambda: not list(kube.list(Secret, namespace=namespace, labels={"opensandbox.io/created-by": None})),
               timeout=60, what="no pull Secret")  # fmt: skip

    sb = await Sandbox.create(image(private_image, CREDENTIALS), connection_config=sdk_config(server), resource=SMALL)
    try:
        assert await stdout_of(sb, "echo pulled") == "pulled"
        secret = kube.get(Secret, f"{sb.id}-pull", namespace=namespace)
        assert secret.type == "kubernetes.io/dockerconfigjson"
        (owner,) = secret.metadata.ownerReferences
        assert (owner.kind, owner.name) == ("BatchSandbox", sb.id)
    finally:
        with contextlib.suppress(SandboxApiException):
            await sb.kill()
        await sb.close()
    eventually(lambda: gone(kube, Secret, f"{sb.id}-pull", namespace), timeout=90, what="the Secret deleted with it")
