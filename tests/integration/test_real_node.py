"""The real node (on unless OSB_REAL_NODE=0): pods from the test image run; logs, exec and pod IPs work.

Each test makes its own namespace (deleted afterwards, which stops its pods) and contacts only the pods
it created, at their own pod IPs.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from typing import Any

import httpx
import pytest

from harness.images import TEST_IMAGE
from harness.real_node import NODE_LABEL, NODE_TAINT_KEY, POD_NETWORK_PREFIX, REAL_NODE_PLACEMENT, RealNode
from harness.services import LocalCluster


def run_pod(
    cluster: LocalCluster, namespace: str, name: str, command: list[str], extra: str = "", timeout: int = 90
) -> dict[str, Any]:
    """Create a pod from the test image on the real node; wait until it is Ready; return it.

    `extra` is more YAML for the container (indented by 4), then `volumes:` for the pod, if any.
    """
    container_extra, _, volumes = extra.partition("volumes:")
    manifest = f"""
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  terminationGracePeriodSeconds: 1
{_indent(REAL_NODE_PLACEMENT)}
  containers:
  - name: main
    image: {TEST_IMAGE}
    imagePullPolicy: Never
    command: {json.dumps(command)}
{_indent(container_extra, 4)}
"""
    if volumes:
        manifest += f"  volumes:{volumes}"
    cluster.kubectl("apply", "-f", "-", input=manifest)
    waited = subprocess.run(
        [str(cluster.bin_dir / "kubectl"), "wait", "-n", namespace, f"pod/{name}", "--for=condition=Ready",
         f"--timeout={timeout}s"],
        env=cluster.env(), text=True, capture_output=True, check=False,
    )  # fmt: skip
    if waited.returncode != 0:
        described = cluster.kubectl("describe", "pod", name, "-n", namespace, check=False)
        pytest.fail(f"pod {name} not Ready within {timeout}s: {waited.stderr}\n{described}")
    pod: dict[str, Any] = json.loads(cluster.kubectl("get", "pod", name, "-n", namespace, "-o", "json"))
    return pod


def _indent(text: str, by: int = 2) -> str:
    return "\n".join(" " * by + line for line in text.splitlines() if line.strip())


def test_node_is_ready_labelled_and_tainted(cluster: LocalCluster, node: RealNode) -> None:
    n = json.loads(cluster.kubectl("get", "node", node.name, "-o", "json"))
    ready = [c["status"] for c in n["status"]["conditions"] if c["type"] == "Ready"]
    assert ready == ["True"]
    assert n["metadata"]["labels"][NODE_LABEL[0]] == NODE_LABEL[1]
    assert {"key": NODE_TAINT_KEY, "value": "true", "effect": "NoSchedule"} in n["spec"]["taints"]
    addresses = {a["type"]: a["address"] for a in n["status"]["addresses"]}
    assert addresses["InternalIP"].startswith(POD_NETWORK_PREFIX)
    assert n["status"]["nodeInfo"]["kubeletVersion"].startswith("v1.34.")
    assert n["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")


def test_pod_runs_and_kubectl_logs_shows_its_output(cluster: LocalCluster, node: RealNode, namespace: str) -> None:
    marker = f"hello-{uuid.uuid4().hex[:8]}"
    script = f"echo {marker}; cat /etc/debian_version; exec sleep 3600"
    pod = run_pod(cluster, namespace, "greeter", ["sh", "-c", script])
    assert pod["spec"]["nodeName"] == node.name
    assert pod["status"]["podIP"].startswith(POD_NETWORK_PREFIX)
    deadline = time.monotonic() + 30
    while marker not in (logs := cluster.kubectl("logs", "greeter", "-n", namespace)):
        assert time.monotonic() < deadline, f"{marker!r} not in the logs: {logs!r}"
        time.sleep(0.5)
    assert logs.splitlines()[0] == marker


def test_kubectl_exec_runs_a_command(cluster: LocalCluster, node: RealNode, namespace: str) -> None:
    run_pod(cluster, namespace, "shell", ["sleep", "3600"])
    out = cluster.kubectl("exec", "shell", "-n", namespace, "--", "sh", "-c", "echo $((6 * 7)); id -u; hostname")
    assert out.splitlines() == ["42", "0", "shell"]
    # stdin reaches the command, and its exit status comes back
    assert cluster.kubectl("exec", "-i", "shell", "-n", namespace, "--", "tr", "a-z", "A-Z", input="abc\n") == "ABC\n"
    failed = subprocess.run(
        [str(cluster.bin_dir / "kubectl"), "exec", "shell", "-n", namespace, "--", "sh", "-c", "exit 3"],
        env=cluster.env(), text=True, capture_output=True, check=False,
    )  # fmt: skip
    assert failed.returncode == 3, failed.stderr


def test_http_server_in_a_pod_answers_at_its_pod_ip(cluster: LocalCluster, node: RealNode, namespace: str) -> None:
    body = f"served-{uuid.uuid4().hex[:8]}"
    script = f"mkdir -p /www && echo {body} > /www/index.html && exec busybox httpd -f -p 8080 -h /www"
    pod = run_pod(cluster, namespace, "web", ["sh", "-c", script])
    ip = pod["status"]["podIP"]
    assert ip.startswith(POD_NETWORK_PREFIX)
    # trust_env=False: straight to the pod, never through a proxy from the environment
    with httpx.Client(trust_env=False, timeout=5) as http:
        deadline = time.monotonic() + 30
        while True:
            try:
                response = http.get(f"http://{ip}:8080/")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, f"nothing answers at http://{ip}:8080/"
                time.sleep(0.5)
    assert response.status_code == 200
    assert response.text.strip() == body


def test_pod_reaches_the_api_server_in_cluster(cluster: LocalCluster, node: RealNode, namespace: str) -> None:
    """In-cluster config works without kube-proxy: 10.96.0.1:443 (and the advertised endpoint) reach it."""
    kubectl = cluster.bin_dir / "kubectl"  # a static binary: mounted from the host, run in the pod
    extra = f"""volumeMounts: [{{name: kubectl, mountPath: /usr/local/bin/kubectl, readOnly: true}}]
volumes: [{{name: kubectl, hostPath: {{path: {kubectl}, type: File}}}}]
"""
    run_pod(cluster, namespace, "client", ["sleep", "3600"], extra=extra)
    env = cluster.kubectl("exec", "client", "-n", namespace, "--", "sh", "-c", "echo $KUBERNETES_SERVICE_HOST")
    assert env.strip() == "10.96.0.1"
    user = "jsonpath={.status.userInfo.username}"
    whoami = cluster.kubectl("exec", "client", "-n", namespace, "--", "kubectl", "auth", "whoami", "-o", user)
    assert whoami == f"system:serviceaccount:{namespace}:default"
