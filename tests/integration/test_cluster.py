"""The local control plane behaves like a real cluster: API, CRDs, scheduling on kwok, GC, auth, RBAC."""

from __future__ import annotations

import ssl
import time
import uuid
from collections.abc import Callable

import httpx
import pytest
from lightkube import Client
from lightkube.models.apps_v1 import DeploymentSpec
from lightkube.models.core_v1 import Container, PodSpec, PodTemplateSpec
from lightkube.models.meta_v1 import LabelSelector, ObjectMeta
from lightkube.models.rbac_v1 import PolicyRule, RoleRef, Subject
from lightkube.resources.apps_v1 import Deployment, ReplicaSet
from lightkube.resources.core_v1 import Pod, ServiceAccount
from lightkube.resources.rbac_authorization_v1 import Role, RoleBinding

from harness.services import LocalCluster


def eventually(check: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        time.sleep(0.2)


def api_server_url(cluster: LocalCluster) -> str:
    return cluster.kubectl("config", "view", "--minify", "-o", "jsonpath={.clusters[0].cluster.server}")


def ca_context(cluster: LocalCluster) -> ssl.SSLContext:
    ca = cluster.kubectl("config", "view", "--minify", "-o", "jsonpath={.clusters[0].cluster.certificate-authority}")
    return ssl.create_default_context(cafile=ca)


def test_api_server_is_ready(cluster: LocalCluster) -> None:
    assert cluster.kubectl("get", "--raw", "/readyz").strip() == "ok"
    version = cluster.kubectl("version", "-o", "json")
    assert '"gitVersion": "v1.34.' in version


def test_applied_crd_is_served(cluster: LocalCluster, namespace: str) -> None:
    group = f"g{uuid.uuid4().hex[:8]}.test.opensandbox.io"
    crd = f"""
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {{name: widgets.{group}}}
spec:
  group: {group}
  scope: Namespaced
  names: {{plural: widgets, singular: widget, kind: Widget}}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec: {{type: object, properties: {{size: {{type: integer, minimum: 1}}}}}}
"""
    cluster.kubectl("apply", "-f", "-", input=crd)
    try:
        cluster.kubectl("wait", "--for=condition=Established", f"crd/widgets.{group}", "--timeout=30s")
        widget = (
            f"apiVersion: {group}/v1\nkind: Widget\nmetadata: {{name: w1, namespace: {namespace}}}\nspec: {{size: 3}}\n"
        )
        cluster.kubectl("apply", "-f", "-", input=widget)
        assert cluster.kubectl("get", f"widgets.{group}", "w1", "-n", namespace, "-o", "jsonpath={.spec.size}") == "3"
        bad = widget.replace("size: 3", "size: 0")
        with pytest.raises(RuntimeError, match="should be greater than or equal to 1"):
            cluster.kubectl("apply", "-f", "-", input=bad.replace("w1", "w2"))
    finally:
        cluster.kubectl("delete", "crd", f"widgets.{group}", "--wait=false")


def test_deployment_pods_run_on_kwok_nodes_and_are_garbage_collected(kube: Client, namespace: str) -> None:
    labels = {"app": "web"}
    kube.create(
        Deployment(
            metadata=ObjectMeta(name="web", namespace=namespace),
            spec=DeploymentSpec(
                replicas=3,
                selector=LabelSelector(matchLabels=labels),
                template=PodTemplateSpec(
                    metadata=ObjectMeta(labels=labels),
                    spec=PodSpec(containers=[Container(name="web", image="ubuntu:latest")]),
                ),
            ),
        )
    )

    def running() -> list[Pod]:
        pods = list(kube.list(Pod, namespace=namespace, labels=labels))
        ok = [p for p in pods if p.status and p.status.phase == "Running" and p.status.podIP]
        return ok if len(ok) == 3 else []

    eventually(lambda: bool(running()), what="3 Running pods")
    for pod in running():
        assert pod.spec and pod.spec.nodeName and pod.spec.nodeName.startswith("kwok-node-")

    kube.delete(Deployment, "web", namespace=namespace)  # background propagation: GC does the rest
    eventually(lambda: not list(kube.list(ReplicaSet, namespace=namespace)), what="ReplicaSet collected")
    eventually(lambda: not list(kube.list(Pod, namespace=namespace)), what="pods collected")


def test_service_account_token_authenticates_and_rbac_denies(
    cluster: LocalCluster, kube: Client, namespace: str
) -> None:
    kube.create(ServiceAccount(metadata=ObjectMeta(name="robot", namespace=namespace)))
    token = cluster.kubectl("create", "token", "robot", "-n", namespace, "--duration=10m").strip()
    api = httpx.Client(
        base_url=api_server_url(cluster), verify=ca_context(cluster), headers={"Authorization": f"Bearer {token}"}
    )
    pods_url = f"/api/v1/namespaces/{namespace}/pods"

    review = api.get("/apis/authentication.k8s.io/v1")  # discovery is open to authenticated users
    assert review.status_code == 200
    denied = api.get(pods_url)
    assert denied.status_code == 403
    assert f"system:serviceaccount:{namespace}:robot" in denied.json()["message"]
    assert httpx.get(api_server_url(cluster) + pods_url, verify=ca_context(cluster)).status_code in (401, 403)

    kube.create(
        Role(
            metadata=ObjectMeta(name="pod-reader", namespace=namespace),
            rules=[PolicyRule(apiGroups=[""], resources=["pods"], verbs=["list"])],
        )
    )
    kube.create(
        RoleBinding(
            metadata=ObjectMeta(name="robot-reads-pods", namespace=namespace),
            roleRef=RoleRef(apiGroup="rbac.authorization.k8s.io", kind="Role", name="pod-reader"),
            subjects=[Subject(kind="ServiceAccount", name="robot", namespace=namespace)],
        )
    )
    eventually(lambda: api.get(pods_url).status_code == 200, timeout=10, what="RBAC grant")
    assert api.get(f"/api/v1/namespaces/{namespace}/secrets").status_code == 403
    assert api.delete(f"{pods_url}/anything").status_code == 403


@pytest.mark.parametrize("address", ["10.244.0.7", "10.96.0.10"])
def test_fake_pod_and_service_addresses_never_leave_the_host(cluster: LocalCluster, address: str) -> None:
    """kwok pod IPs and service IPs are fenced: a connection fails at once instead of going out."""
    started = time.monotonic()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://{address}:44772/ping", timeout=5)
    assert time.monotonic() - started < 1
