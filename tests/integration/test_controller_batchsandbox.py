"""The BatchSandbox reconciler against the real control plane (kwok pods)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from lightkube import Client
from lightkube.resources.core_v1 import Pod

from harness.controller_process import ControllerProcess
from harness.kube import (
    EVICTED,
    BatchSandbox,
    condition,
    event_reasons,
    eventually,
    gone,
    idle_ready,
    pods_of,
    pool_pods,
    pooled_batchsandbox,
    report_pod_status,
    seed_pool,
    status,
)
from harness.services import LocalCluster
from opensandbox_platform.api import labels

FINISHED = {  # the sandbox container exited 0 (restartPolicy Never)
    "phase": "Succeeded",
    "conditions": [{"type": "Ready", "status": "False"}],
    "containerStatuses": [
        {
            "name": "sandbox",
            "image": "ubuntu:latest",
            "imageID": "",
            "ready": False,
            "restartCount": 0,
            "state": {"terminated": {"exitCode": 0, "reason": "Completed"}},
        }
    ],
}
SEED_BATCHSANDBOX = """
apiVersion: sandbox.opensandbox.io/v1alpha1
kind: BatchSandbox
metadata:
  name: example-batchsandbox
spec:
  replicas: 3
  ttlSecondsAfterFinished: 3600
  sandboxTemplate:
    spec:
      image: ubuntu:latest
      command: ["sleep", "infinity"]
"""


def ready_count(kube: Client, name: str, namespace: str) -> int:
    return int(status(kube.get(BatchSandbox, name, namespace=namespace)).get("ready", 0))


def test_seed_batchsandbox_runs_three_pods_from_its_template(
    cluster: LocalCluster, kube: Client, namespace: str, controller: ControllerProcess
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=SEED_BATCHSANDBOX)
    eventually(lambda: ready_count(kube, "example-batchsandbox", namespace) == 3, what="3 Ready sandboxes")
    bs = kube.get(BatchSandbox, "example-batchsandbox", namespace=namespace)
    st = status(bs)
    assert st["phase"] == "Running" and st["replicas"] == 3
    assert [s["index"] for s in st["sandboxes"]] == [0, 1, 2]
    assert [s["podName"] for s in st["sandboxes"]] == [f"example-batchsandbox-{i}" for i in range(3)]
    assert all(s["podIP"] and s["nodeName"].startswith("kwok-node-") and s["ready"] for s in st["sandboxes"])
    for pod in pods_of(kube, namespace, **{labels.BATCHSANDBOX: "example-batchsandbox"}):
        owner = pod.metadata.ownerReferences[0]
        assert owner.kind == "BatchSandbox" and owner.uid == bs.metadata.uid and owner.controller
        assert pod.spec.containers[0].name == "sandbox" and pod.spec.containers[0].command == ["sleep", "infinity"]

    table = cluster.kubectl("get", "bsbx", "-n", namespace).splitlines()
    assert table[0].split() == ["NAME", "DESIRED", "READY", "POOL", "PHASE", "EXPIRE", "AGE"]
    assert table[1].split()[:4] == ["example-batchsandbox", "3", "3", "Running"]

    # Scale down and up.
    cluster.kubectl(
        "patch", "bsbx", "example-batchsandbox", "-n", namespace, "--type=merge", "-p", '{"spec":{"replicas":1}}'
    )
    eventually(lambda: len(pods_of(kube, namespace, **{labels.BATCHSANDBOX: "example-batchsandbox"})) == 1)
    assert pods_of(kube, namespace, **{labels.BATCHSANDBOX: "example-batchsandbox"})[0].metadata.name.endswith("-0")


def grace_of_deletion(kube: Client, namespace: str, pod_name: str, act: Callable[[], None]) -> int | None:
    """The grace period the pod was deleted with after `act` (the API server marks a pod deleting with
    it, 0 for at once, before the pod goes); None when it was not deleted within 30 s."""
    version = kube.get(Pod, pod_name, namespace=namespace).metadata.resourceVersion
    act()
    watch = kube.watch(
        Pod, namespace=namespace, fields={"metadata.name": pod_name}, resource_version=version, server_timeout=30
    )
    for _, pod in watch:
        if pod.metadata.deletionTimestamp is not None:
            return pod.metadata.deletionGracePeriodSeconds
    return None


def test_a_paused_batchsandboxs_pod_is_deleted_at_once_a_scaled_down_one_gracefully(
    cluster: LocalCluster, kube: Client, namespace: str, controller: ControllerProcess
) -> None:
    """A paused sandbox's pod holds nothing its snapshot did not take, and the resume makes a pod of the
    same name: no grace period to wait for. Any other scale-down keeps the pod's grace period."""
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=SEED_BATCHSANDBOX.replace("replicas: 3", "replicas: 2"))
    eventually(lambda: ready_count(kube, "example-batchsandbox", namespace) == 2)

    def scale(replicas: int, annotations: dict[str, str] | None = None) -> Callable[[], None]:
        patch = {"metadata": {"annotations": annotations or {}}, "spec": {"replicas": replicas}}
        args = ("patch", "bsbx", "example-batchsandbox", "-n", namespace, "--type=merge", "-p", json.dumps(patch))
        return lambda: cluster.kubectl(*args)

    assert grace_of_deletion(kube, namespace, "example-batchsandbox-1", scale(1)) == 30  # the pod's default
    paused = scale(0, {labels.PAUSED: "snap-1"})
    assert grace_of_deletion(kube, namespace, "example-batchsandbox-0", paused) == 0
    eventually(lambda: gone(kube, Pod, "example-batchsandbox-0", namespace), what="the paused pod gone")


def test_expire_time_deletes_the_batchsandbox_on_time(
    cluster: LocalCluster, kube: Client, namespace: str, controller: ControllerProcess
) -> None:
    expire = datetime.now(UTC) + timedelta(seconds=4)
    manifest = SEED_BATCHSANDBOX.replace("replicas: 3", f'replicas: 1\n  expireTime: "{expire:%Y-%m-%dT%H:%M:%SZ}"')
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)
    eventually(lambda: ready_count(kube, "example-batchsandbox", namespace) == 1)
    assert cluster.kubectl("get", "bsbx", "-n", namespace).splitlines()[1].split()[4] == f"{expire:%Y-%m-%dT%H:%M:%SZ}"
    eventually(
        lambda: gone(kube, BatchSandbox, "example-batchsandbox", namespace), timeout=15, what="deleted at expireTime"
    )
    late = (datetime.now(UTC) - expire).total_seconds()
    assert -1.0 <= late < 3.0, f"deleted {late:.1f}s after expireTime"
    eventually(lambda: not pods_of(kube, namespace), timeout=30, what="pods garbage-collected")


def test_ttl_after_finished_deletes_a_finished_batchsandbox(
    cluster: LocalCluster, kube: Client, namespace: str, controller: ControllerProcess
) -> None:
    manifest = SEED_BATCHSANDBOX.replace("replicas: 3", "replicas: 2").replace("3600", "3")
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)
    eventually(lambda: ready_count(kube, "example-batchsandbox", namespace) == 2)
    # Each sandbox's main container exits 0, as a kubelet would report it (kwok runs nothing).
    for pod in pods_of(kube, namespace):
        report_pod_status(cluster, namespace, pod.metadata.name, FINISHED)
    finished = eventually(
        lambda: status(kube.get(BatchSandbox, "example-batchsandbox", namespace=namespace)).get("finishedAt"),
        what="finishedAt",
    )
    assert status(kube.get(BatchSandbox, "example-batchsandbox", namespace=namespace))["phase"] == "Succeeded"
    eventually(
        lambda: gone(kube, BatchSandbox, "example-batchsandbox", namespace), timeout=15, what="deleted after the TTL"
    )
    elapsed = (datetime.now(UTC) - datetime.fromisoformat(finished.replace("Z", "+00:00"))).total_seconds()
    assert 2.0 <= elapsed < 6.0, f"deleted {elapsed:.1f}s after finishing, TTL 3s"


def test_pooled_batchsandbox_claims_idle_pods_and_the_pool_refills(
    cluster: LocalCluster, kube: Client, namespace: str, controller: ControllerProcess
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=seed_pool(min_buffer=3, max_buffer=5))
    idle_before = eventually(
        lambda: (p := idle_ready(pool_pods(kube, namespace, "example-pool"))) and len(p) == 3 and p
    )
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=pooled_batchsandbox("agents", "example-pool", 3))
    eventually(lambda: ready_count(kube, "agents", namespace) == 3, what="3 claimed sandboxes")
    bs = kube.get(BatchSandbox, "agents", namespace=namespace)
    claimed = {s["podName"] for s in status(bs)["sandboxes"]}
    assert claimed == {p.metadata.name for p in idle_before}, "the warm pods are claimed, not new ones"
    # The claim labels follow the allocation ledger, off the critical path (docs/controller.md).
    eventually(
        lambda: all(
            labels.BATCHSANDBOX in (kube.get(Pod, n, namespace=namespace).metadata.labels or {}) for n in claimed
        ),
        what="claim labels",
    )
    for name in claimed:
        pod = kube.get(Pod, name, namespace=namespace)
        assert pod.metadata.labels[labels.BATCHSANDBOX] == "agents"
        assert [o.uid for o in pod.metadata.ownerReferences] == [bs.metadata.uid]
    eventually(lambda: len(idle_ready(pool_pods(kube, namespace, "example-pool"))) == 3, what="pool refilled")
    table = cluster.kubectl("get", "bsbx", "agents", "-n", namespace).splitlines()[1].split()
    assert table[:5] == ["agents", "3", "3", "example-pool", "Running"]

    # Deleting the BatchSandbox deletes its pods (recycleStrategy Delete).
    cluster.kubectl("delete", "bsbx", "agents", "-n", namespace)
    eventually(lambda: not (claimed & {p.metadata.name for p in pods_of(kube, namespace)}), what="claimed pods deleted")


def test_a_lost_claimed_pod_is_replaced_and_reported(
    cluster: LocalCluster, kube: Client, namespace: str, controller: ControllerProcess
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=seed_pool())
    eventually(lambda: len(idle_ready(pool_pods(kube, namespace, "example-pool"))) == 2)
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=pooled_batchsandbox("one", "example-pool", 1))
    eventually(lambda: ready_count(kube, "one", namespace) == 1)
    victim = status(kube.get(BatchSandbox, "one", namespace=namespace))["sandboxes"][0]["podName"]
    kube.delete(Pod, victim, namespace=namespace)

    def replaced() -> bool:
        st = status(kube.get(BatchSandbox, "one", namespace=namespace))
        return st.get("ready") == 1 and st["sandboxes"][0]["podName"] != victim

    eventually(replaced, what="replacement claimed")
    conditions = {c["type"]: c for c in status(kube.get(BatchSandbox, "one", namespace=namespace))["conditions"]}
    assert conditions["SandboxReplaced"]["status"] == "True" and victim in conditions["SandboxReplaced"]["message"]
    events = event_reasons(cluster, namespace, "involvedObject.name=one")
    assert "SandboxLost" in events

    # An evicted pod (kubelet sets phase Failed, reason Evicted) is replaced too.
    evicted = status(kube.get(BatchSandbox, "one", namespace=namespace))["sandboxes"][0]["podName"]
    report_pod_status(cluster, namespace, evicted, EVICTED)
    eventually(
        lambda: (
            status(kube.get(BatchSandbox, "one", namespace=namespace))["sandboxes"][0]["podName"]
            not in (victim, evicted)
            and ready_count(kube, "one", namespace) == 1
        ),
        what="evicted pod replaced",
    )


def test_unknown_pool_is_reported_and_resolved_when_the_pool_appears(
    cluster: LocalCluster, kube: Client, namespace: str, controller: ControllerProcess
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=pooled_batchsandbox("early", "later-pool", 1))

    def reason() -> str:
        return str(condition(kube.get(BatchSandbox, "early", namespace=namespace)).get("reason", ""))

    eventually(lambda: reason() == "PoolNotFound", what="PoolNotFound condition")
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=seed_pool("later-pool", 0, 2, 4))
    eventually(lambda: ready_count(kube, "early", namespace) == 1, what="claimed once the pool exists")
    assert reason() == "SandboxesReady"
    time.sleep(0.5)
    assert len(pool_pods(kube, namespace, "later-pool")) == 1, "minBufferSize 0: nothing idle is kept"


def test_a_template_the_api_server_refuses_is_reported_on_the_batchsandbox(
    cluster: LocalCluster, kube: Client, namespace: str, controller: ControllerProcess
) -> None:
    bad = SEED_BATCHSANDBOX.replace(
        'command: ["sleep", "infinity"]', 'command: ["sleep"]\n      resources: {limits: {cpu: lots}}'
    )
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=bad)

    def ready_condition() -> dict[str, str]:
        return condition(kube.get(BatchSandbox, "example-batchsandbox", namespace=namespace))

    failed = eventually(lambda: ready_condition().get("reason") == "FailedCreate" and ready_condition())
    assert failed["status"] == "False" and "quantities must match the regular expression" in failed["message"]
    events = event_reasons(cluster, namespace, "involvedObject.name=example-batchsandbox")
    assert "FailedCreate" in events
    assert pods_of(kube, namespace) == []
