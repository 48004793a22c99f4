"""Helpers for tests against the local cluster: our resources for lightkube, waiting, listing."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

from lightkube import Client
from lightkube.core.exceptions import ApiError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.core_v1 import Pod

from harness.services import LocalCluster
from opensandbox_platform.api import labels

Pool = create_namespaced_resource(labels.GROUP, labels.VERSION, "Pool", "pools")
BatchSandbox = create_namespaced_resource(labels.GROUP, labels.VERSION, "BatchSandbox", "batchsandboxes")

T = TypeVar("T")

# The pod spec of the upstream seed Pool: kwok runs nothing, so any image will do.
SEED_POD_SPEC: dict[str, Any] = {"image": "ubuntu:latest", "command": ["sleep", "infinity"]}


def eventually(check: Callable[[], T], timeout: float = 30, what: str = "condition", interval: float = 0.1) -> T:
    """Poll `check` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        time.sleep(interval)


def pods_of(kube: Client, namespace: str, **selector: str) -> list[Pod]:
    return [p for p in kube.list(Pod, namespace=namespace, labels=selector) if not p.metadata.deletionTimestamp]


def pool_pods(kube: Client, namespace: str, pool: str) -> list[Pod]:
    return pods_of(kube, namespace, **{labels.POOL: pool})


def idle_ready(pods: list[Pod]) -> list[Pod]:
    return [p for p in pods if labels.BATCHSANDBOX not in (p.metadata.labels or {}) and is_ready(p)]


def is_ready(pod: Pod) -> bool:
    conditions = (pod.status.conditions if pod.status else None) or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def status(obj: Any) -> dict[str, Any]:
    return dict(obj.status or {})


def gone(kube: Client, resource: Any, name: str, namespace: str) -> bool:
    """True once the object is deleted (404)."""
    try:
        kube.get(resource, name, namespace=namespace)
        return False
    except ApiError as err:
        return err.status.code == 404


def pool_manifest(
    name: str, pod_spec: dict[str, Any], minimum: int, maximum: int, capacity: int, **spec: Any
) -> dict[str, Any]:
    """A Pool as JSON (for KubeClient.create, or `kubectl apply` as JSON); `spec` adds fields."""
    return {
        "apiVersion": labels.API_VERSION,
        "kind": "Pool",
        "metadata": {"name": name},
        "spec": {
            "minBufferSize": minimum,
            "maxBufferSize": maximum,
            "capacity": capacity,
            **spec,
            "sandboxTemplate": {"spec": pod_spec},
        },
    }


def batchsandbox_manifest(name: str, replicas: int, **spec: Any) -> dict[str, Any]:
    """A BatchSandbox as JSON; `spec` says the rest (poolRef or sandboxTemplate, taskTemplate, ...)."""
    return {
        "apiVersion": labels.API_VERSION,
        "kind": "BatchSandbox",
        "metadata": {"name": name},
        "spec": {"replicas": replicas, **spec},
    }


def seed_pool(name: str = "example-pool", min_buffer: int = 2, max_buffer: int = 5, capacity: int = 10) -> str:
    return f"""
apiVersion: sandbox.opensandbox.io/v1alpha1
kind: Pool
metadata:
  name: {name}
spec:
  minBufferSize: {min_buffer}
  maxBufferSize: {max_buffer}
  capacity: {capacity}
  sandboxTemplate:
    spec:
      image: ubuntu:latest
      command: ["sleep", "infinity"]
"""


def pooled_batchsandbox(name: str, pool: str, replicas: int = 1) -> str:
    return f"""
apiVersion: sandbox.opensandbox.io/v1alpha1
kind: BatchSandbox
metadata:
  name: {name}
spec:
  replicas: {replicas}
  poolRef: {pool}
"""


def report_pod_status(cluster: LocalCluster, namespace: str, pod: str, status: dict[str, Any]) -> None:
    """Write a pod's status as a kubelet would (kwok runs nothing, and leaves a pod alone once it
    has an IP, so the status we write stays)."""
    patch = json.dumps({"status": status})
    cluster.kubectl("patch", "pod", pod, "-n", namespace, "--subresource=status", "--type=merge", "-p", patch)


EVICTED: dict[str, Any] = {"phase": "Failed", "reason": "Evicted", "conditions": []}


def condition(obj: Any, type_: str = "Ready") -> dict[str, Any]:
    """The status condition of that type (empty when absent)."""
    return next((c for c in status(obj).get("conditions") or [] if c["type"] == type_), {})


def event_reasons(cluster: LocalCluster, namespace: str, field_selector: str) -> list[str]:
    """Reasons of the Events about the objects the field selector picks (e.g. involvedObject.kind=Pool)."""
    out = cluster.kubectl(
        "get", "events", "-n", namespace, "--field-selector", field_selector, "-o", "jsonpath={.items[*].reason}"
    )
    return out.split()
