"""BatchSandbox tasks on the real node (on unless OSB_REAL_NODE=0): the controller injects the task-executor
sidecar, dispatches one task per replica, follows it, and counts it in status.

The pods run the test image and the task-executor image built from this tree (loaded into the
node's containerd); the controller talks only to the pods it created, at their pod IPs.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from lightkube import Client
from lightkube.resources.core_v1 import Pod

from harness.controller_process import ControllerProcess
from harness.images import load_task_executor_image
from harness.kube import (
    SEED_POD_SPEC,
    BatchSandbox,
    Pool,
    batchsandbox_manifest,
    condition,
    eventually,
    gone,
    pool_manifest,
    seed_pool,
    status,
)
from harness.paths import ROOT
from harness.real_node import RealNode, real_node_pod_spec
from harness.services import LocalCluster
from opensandbox_platform.api import labels

CONTAINERD = ROOT / ".cluster" / "node" / "containerd.sock"

# The pod template: the test image (imagePullPolicy Never: nothing can be pulled) on the real node.
SANDBOX_SPEC = real_node_pod_spec(command=["sleep", "infinity"])


@pytest.fixture(scope="session")
def task_executor_image(node: RealNode) -> str:
    """The task-executor image of this tree, loaded into the real node (built when missing or stale)."""
    return load_task_executor_image(node)


@pytest.fixture
def task_controller(
    cluster: LocalCluster, crds: None, namespace: str, task_executor_image: str
) -> Iterator[ControllerProcess]:
    proc = ControllerProcess(cluster, namespace, "--task-executor-image", task_executor_image).start()
    yield proc
    proc.stop()


def pool(name: str, size: int) -> str:
    return json.dumps(pool_manifest(name, SANDBOX_SPEC, size, size, size * 2, taskExecutor={"enabled": True}))


def batch(name: str, replicas: int, task: dict[str, Any], *, pool_name: str | None = None, **spec: Any) -> str:
    source = {"poolRef": pool_name} if pool_name else {"sandboxTemplate": {"spec": SANDBOX_SPEC}}
    return json.dumps(batchsandbox_manifest(name, replicas, **source, taskTemplate=task, **spec))


def bs_status(kube: Client, name: str, namespace: str) -> dict[str, Any]:
    return status(kube.get(BatchSandbox, name, namespace=namespace))


def tasks_of(kube: Client, name: str, namespace: str) -> dict[str, int]:
    return dict(bs_status(kube, name, namespace).get("tasks") or {})


def processes_with(argv: list[str]) -> list[int]:
    """Host pids whose command line is exactly `argv` (the real node's containers share our /proc)."""
    wanted = ("\0".join(argv) + "\0").encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes() == wanted:
                found.append(int(pid))
        except OSError:
            continue
    return found


def test_pooled_tasks_run_in_the_main_container_and_the_ttl_deletes_the_batchsandbox(
    cluster: LocalCluster, kube: Client, namespace: str, task_controller: ControllerProcess
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=pool("workers", 3))
    task = {
        "command": ["sh", "-c", 'echo "done $GREETING" > /tmp/task-out && cat /tmp/task-out'],
        "env": [{"name": "GREETING", "value": "hello"}],
    }
    manifest = batch("jobs", 3, task, pool_name="workers", ttlSecondsAfterFinished=4)
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)
    eventually(lambda: tasks_of(kube, "jobs", namespace).get("succeeded") == 3, timeout=120, what="3 tasks succeeded")
    st = bs_status(kube, "jobs", namespace)
    assert st["phase"] == "Succeeded" and st["finishedAt"]
    assert st["tasks"] == {"pending": 0, "running": 0, "succeeded": 3, "failed": 0}
    for sandbox in st["sandboxes"]:
        assert sandbox["task"]["state"] == "succeeded" and sandbox["task"]["exitCode"] == 0
        # The task ran inside the main container: its file is there, not in the sidecar.
        out = cluster.kubectl(
            "exec", "-n", namespace, sandbox["podName"], "-c", "sandbox", "--", "cat", "/tmp/task-out"
        )
        assert out == "done hello\n"
    pod = kube.get(Pod, st["sandboxes"][0]["podName"], namespace=namespace)
    assert pod.spec.shareProcessNamespace
    sidecar = next(c for c in pod.spec.containers if c.name == labels.TASK_EXECUTOR_CONTAINER)
    assert sidecar.securityContext.capabilities.add == ["SYS_ADMIN"]
    assert sidecar.resources.limits == {"cpu": "500m", "memory": "256Mi"}
    row = cluster.kubectl("get", "bsbx", "jobs", "-n", namespace, "-o", "wide").splitlines()
    assert row[0].split()[-2:] == ["TASKS-SUCCEEDED", "TASKS-FAILED"]
    assert row[1].split()[:5] == ["jobs", "3", "3", "workers", "Succeeded"] and row[1].split()[-2:] == ["3", "0"]

    eventually(lambda: gone(kube, BatchSandbox, "jobs", namespace), timeout=20, what="deleted after the TTL")
    finished = datetime.fromisoformat(st["finishedAt"].replace("Z", "+00:00"))
    elapsed = (datetime.now(UTC) - finished).total_seconds()
    assert 3.0 <= elapsed < 7.5, f"deleted {elapsed:.1f}s after finishing, TTL 4s"


def test_a_failing_task_and_a_timed_out_task_count_as_failed(
    cluster: LocalCluster, kube: Client, namespace: str, task_controller: ControllerProcess
) -> None:
    # Direct mode (the sidecar comes with the BatchSandbox's own pods); sandbox 0 exits 1, sandbox 1
    # sleeps past timeoutSeconds.
    task = {"command": ["sh", "-c", "case $HOSTNAME in *-0) exit 1;; *) exec sleep 3171;; esac"], "timeoutSeconds": 3}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=batch("mixed", 2, task))
    eventually(lambda: tasks_of(kube, "mixed", namespace).get("failed") == 2, timeout=120, what="2 failed tasks")
    st = bs_status(kube, "mixed", namespace)
    assert st["phase"] == "Failed"
    first, second = (s["task"] for s in sorted(st["sandboxes"], key=lambda s: s["index"]))
    assert (first["exitCode"], first["reason"]) == (1, "Error")
    assert second["reason"] == "Timeout" and second["exitCode"] in (137, 143)
    started = datetime.fromisoformat(second["startedAt"].replace("Z", "+00:00"))
    ended = datetime.fromisoformat(second["finishedAt"].replace("Z", "+00:00"))
    assert 3.0 <= (ended - started).total_seconds() < 7.0
    assert not processes_with(["sleep", "3171"]), "the timed-out task's process is gone"


def test_deleting_the_batchsandbox_stops_its_running_task(
    cluster: LocalCluster, kube: Client, namespace: str, task_controller: ControllerProcess
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=batch("long", 1, {"command": ["sleep", "3173"]}))
    eventually(lambda: tasks_of(kube, "long", namespace).get("running") == 1, timeout=120, what="task running")
    assert processes_with(["sleep", "3173"])
    cluster.kubectl("delete", "bsbx", "long", "-n", namespace, "--wait=false")
    eventually(lambda: not processes_with(["sleep", "3173"]), timeout=30, what="task process gone")


def test_the_counts_are_right_after_the_sidecar_is_killed_mid_task(
    cluster: LocalCluster, kube: Client, namespace: str, task_controller: ControllerProcess
) -> None:
    task = {"command": ["sh", "-c", "sleep 3; echo ok >> /tmp/runs"]}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=batch("restart", 1, task))
    eventually(lambda: tasks_of(kube, "restart", namespace).get("running") == 1, timeout=120, what="task running")
    pod_name = bs_status(kube, "restart", namespace)["sandboxes"][0]["podName"]
    pod = kube.get(Pod, pod_name, namespace=namespace)
    sidecar = next(c for c in pod.status.containerStatuses if c.name == labels.TASK_EXECUTOR_CONTAINER)
    container_id = sidecar.containerID.split("://", 1)[1]
    subprocess.run(
        ["ctr", "--address", str(CONTAINERD), "-n", "k8s.io", "tasks", "kill", "-s", "SIGKILL", container_id],
        check=True, capture_output=True,
    )  # fmt: skip

    def restarted() -> bool:
        p = kube.get(Pod, pod_name, namespace=namespace)
        return any(c.name == labels.TASK_EXECUTOR_CONTAINER and c.restartCount >= 1 for c in p.status.containerStatuses)

    eventually(restarted, timeout=60, what="sidecar restarted")
    eventually(lambda: tasks_of(kube, "restart", namespace).get("succeeded") == 1, timeout=60, what="task succeeded")
    st = bs_status(kube, "restart", namespace)
    assert st["tasks"] == {"pending": 0, "running": 0, "succeeded": 1, "failed": 0} and st["phase"] == "Succeeded"
    # The interrupted run never wrote; the re-run did, once.
    assert cluster.kubectl("exec", "-n", namespace, pod_name, "-c", "sandbox", "--", "cat", "/tmp/runs") == "ok\n"


def test_a_controller_restart_neither_reruns_nor_loses_tasks(
    cluster: LocalCluster, kube: Client, namespace: str, task_controller: ControllerProcess
) -> None:
    task = {"command": ["sh", "-c", "echo run >> /tmp/runs; case $HOSTNAME in *-0) exit 0;; esac; sleep 4"]}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=batch("steady", 2, task))
    eventually(
        lambda: tasks_of(kube, "steady", namespace) == {"pending": 0, "running": 1, "succeeded": 1, "failed": 0},
        timeout=120,
        what="one task done, one running",
    )
    task_controller.kill()  # as a crash: the running task goes on without it
    task_controller.start()
    eventually(lambda: tasks_of(kube, "steady", namespace).get("succeeded") == 2, timeout=60, what="both succeeded")
    for i in range(2):
        runs = cluster.kubectl("exec", "-n", namespace, f"steady-{i}", "-c", "sandbox", "--", "cat", "/tmp/runs")
        assert runs == "run\n", f"task {i} ran once"


# --- without the real node (kwok pods) -----------------------------------------------------------
def ready_condition(kube: Client, name: str, namespace: str) -> dict[str, Any]:
    return condition(kube.get(BatchSandbox, name, namespace=namespace))


def test_tasks_need_a_pool_with_the_sidecar_and_an_executor_image(
    cluster: LocalCluster, kube: Client, namespace: str, controller: ControllerProcess
) -> None:
    # The `controller` fixture has no --task-executor-image.
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=seed_pool("plain", 1, 2, 4))
    task = {"command": ["true"]}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=batch("pooled", 1, task, pool_name="plain"))
    eventually(lambda: ready_condition(kube, "pooled", namespace).get("reason") == "TaskExecutorMissing")
    assert bs_status(kube, "pooled", namespace)["tasks"] == {"pending": 1, "running": 0, "succeeded": 0, "failed": 0}

    direct = json.dumps(batchsandbox_manifest("direct", 1, sandboxTemplate={"spec": SEED_POD_SPEC}, taskTemplate=task))
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=direct)
    eventually(lambda: "--task-executor-image" in ready_condition(kube, "direct", namespace).get("message", ""))

    # A Pool that enables the sidecar without any image says so too.
    enabled = json.dumps(pool_manifest("sidecar", SEED_POD_SPEC, 1, 2, 4, taskExecutor={"enabled": True}))
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=enabled)

    def pool_reason() -> str:
        conditions = status(kube.get(Pool, "sidecar", namespace=namespace)).get("conditions") or []
        return next((c["message"] for c in conditions if c["reason"] == "FailedCreate"), "")

    assert "--task-executor-image" in eventually(pool_reason, what="FailedCreate on the Pool")


def test_release_hands_each_pod_back_as_soon_as_its_task_completed(
    cluster: LocalCluster, kube: Client, namespace: str, task_controller: ControllerProcess
) -> None:
    """taskResourcePolicyWhenCompleted: Release (upstream's name): a finished sandbox's pod is deleted at
    once (the Pool makes a fresh one), its result stays in status, and it is not run again."""
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=pool("workers", 2))
    task = {"command": ["sh", "-c", 'test "$(hostname)" != never']}
    manifest = batch("quick", 2, task, pool_name="workers", taskResourcePolicyWhenCompleted="Release")
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)
    eventually(lambda: tasks_of(kube, "quick", namespace).get("succeeded") == 2, timeout=120, what="2 tasks done")
    used = {s["podName"] for s in bs_status(kube, "quick", namespace)["sandboxes"]}
    eventually(
        lambda: not used & {p.metadata.name for p in kube.list(Pod, namespace=namespace)
                            if not p.metadata.deletionTimestamp},
        timeout=60,
        what="released pods deleted",
    )  # fmt: skip
    st = bs_status(kube, "quick", namespace)
    assert st["phase"] == "Succeeded" and st["tasks"]["succeeded"] == 2
    assert all(s["task"]["state"] == "succeeded" for s in st["sandboxes"])
    assert {s["podName"] for s in st["sandboxes"]} == used, "the record of where each task ran stays"
