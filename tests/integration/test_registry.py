"""The test cluster's registry (tools/registry.sh): podman on the host pushes over HTTPS (the cluster CA),
the real node's containerd pulls from it for pods, and htpasswd auth refuses a wrong password and
accepts the right one given as an image pull secret.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from harness.images import TEST_IMAGE
from harness.kube import eventually
from harness.real_node import PLACEMENT, RealNode
from harness.registry import Registry, cluster_registry, private_registry
from harness.services import LocalCluster

AUTH_PORT = 5001
CREDENTIALS = ("osb-user", "right-password")


@pytest.fixture(scope="module")
def registry(node: RealNode) -> Registry:
    return cluster_registry()


def pod(name: str, image: str, pull_secret: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": 1,
        **PLACEMENT,
        "containers": [{"name": "main", "image": image, "imagePullPolicy": "Always", "command": ["sleep", "3600"]}],
    }
    if pull_secret:
        spec["imagePullSecrets"] = [{"name": pull_secret}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def apply(cluster: LocalCluster, namespace: str, manifest: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))


def pod_state(cluster: LocalCluster, namespace: str, name: str) -> dict[str, Any]:
    got = json.loads(cluster.kubectl("get", "pod", name, "-n", namespace, "-o", "json"))
    statuses = got.get("status", {}).get("containerStatuses") or [{}]
    state: dict[str, Any] = statuses[0].get("state") or {}
    return state


def running(cluster: LocalCluster, namespace: str, name: str) -> bool:
    return "running" in pod_state(cluster, namespace, name)


def pull_refused(cluster: LocalCluster, namespace: str, name: str) -> str:
    waiting = pod_state(cluster, namespace, name).get("waiting") or {}
    if waiting.get("reason") in ("ErrImagePull", "ImagePullBackOff"):
        return str(waiting.get("message", ""))
    return ""


def test_push_over_https_then_a_pod_pulls_it(cluster: LocalCluster, namespace: str, registry: Registry) -> None:
    tag = uuid.uuid4().hex[:10]
    reference = registry.reference("osb-tests/base", tag)
    registry.push(TEST_IMAGE, reference)
    assert tag in registry.tags("osb-tests/base")
    with registry.client() as client:  # HTTPS verified against the cluster CA (httpx would refuse otherwise)
        assert client.get("/v2/").status_code == 200

    apply(cluster, namespace, pod("pulled", reference))
    eventually(lambda: running(cluster, namespace, "pulled"), timeout=90, what="the pod pulled from the registry")
    events = cluster.kubectl("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=pulled")
    assert "Pulled" in events  # really pulled (imagePullPolicy Always), not found on the node


def test_htpasswd_auth_refuses_a_wrong_password_and_takes_the_right_one(
    cluster: LocalCluster, namespace: str, node: RealNode
) -> None:
    with private_registry("auth-test", AUTH_PORT, CREDENTIALS) as registry:
        with registry.client(credentials=("osb-user", "wrong")) as wrong:
            assert wrong.get("/v2/").status_code == 401
        with registry.client() as right:
            assert right.get("/v2/").status_code == 200
        reference = registry.reference("osb-tests/private", uuid.uuid4().hex[:10])
        with pytest.raises(RuntimeError, match=r"(?i)unauthorized|authentication"):
            registry.push(TEST_IMAGE, reference, credentials=("osb-user", "wrong"))
        registry.push(TEST_IMAGE, reference)

        apply(cluster, namespace, registry.pull_secret("wrong", ("osb-user", "wrong")))
        apply(cluster, namespace, registry.pull_secret("right", CREDENTIALS))
        apply(cluster, namespace, pod("no-secret", reference))
        apply(cluster, namespace, pod("wrong-secret", reference, pull_secret="wrong"))
        apply(cluster, namespace, pod("right-secret", reference, pull_secret="right"))

        eventually(lambda: running(cluster, namespace, "right-secret"), timeout=90, what="the pull with the secret")
        for refused in ("no-secret", "wrong-secret"):
            message = eventually(lambda r=refused: pull_refused(cluster, namespace, r), timeout=60, what=refused)
            assert "401" in message or "unauthorized" in message.lower()
