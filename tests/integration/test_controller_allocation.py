"""The allocation ledger on the real control plane (kwok pods): each failure point of the exactly-once
argument in docs/controller.md, and what upstream's controller has that we add (PodFailed, Release,
the release annotation, the endpoints annotation, eviction, rate strategies)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from lightkube import Client
from lightkube.resources.core_v1 import Pod

from harness.controller_process import ControllerProcess
from harness.kube import (
    BatchSandbox,
    Pool,
    condition,
    event_reasons,
    eventually,
    idle_ready,
    pool_pods,
    pooled_batchsandbox,
    report_pod_status,
    seed_pool,
    status,
)
from harness.services import LocalCluster
from opensandbox_platform.api import labels

IMAGE_PULL_BACK_OFF: dict[str, Any] = {
    "phase": "Pending",
    "conditions": [{"type": "Ready", "status": "False"}],
    "containerStatuses": [
        {
            "name": "sandbox",
            "image": "ubuntu:latest",
            "imageID": "",
            "ready": False,
            "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}},
        }
    ],
}


def ledger(kube: Client, name: str, namespace: str) -> dict[int, str]:
    """index -> pod uid, as the BatchSandbox's allocation ledger records them."""
    entries = status(kube.get(BatchSandbox, name, namespace=namespace)).get("sandboxes") or []
    return {e["index"]: e["podUID"] for e in entries if e.get("podUID") and not e.get("released")}


def ready(kube: Client, name: str, namespace: str) -> int:
    return int(status(kube.get(BatchSandbox, name, namespace=namespace)).get("ready", 0))


def labelled_for(kube: Client, namespace: str, name: str) -> list[Pod]:
    return [
        p
        for p in kube.list(Pod, namespace=namespace, labels={labels.BATCHSANDBOX: name})
        if not p.metadata.deletionTimestamp
    ]


def test_one_status_write_allocates_and_readies_and_labels_follow(
    cluster: LocalCluster, kube: Client, namespace: str, controller: ControllerProcess
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=seed_pool(min_buffer=3, max_buffer=3, capacity=10))
    warm = eventually(lambda: (p := idle_ready(pool_pods(kube, namespace, "example-pool"))) and len(p) == 3 and p)
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=pooled_batchsandbox("batch", "example-pool", 3))
    eventually(lambda: ready(kube, "batch", namespace) == 3, what="3 Ready")
    assert set(ledger(kube, "batch", namespace).values()) == {p.metadata.uid for p in warm}
    # The claim labels, ownerReferences and the endpoints annotation come after, off the critical path.
    eventually(lambda: len(labelled_for(kube, namespace, "batch")) == 3, what="claim labels")
    bs = kube.get(BatchSandbox, "batch", namespace=namespace)
    for pod in labelled_for(kube, namespace, "batch"):
        assert [o.uid for o in pod.metadata.ownerReferences] == [bs.metadata.uid]
    ips = eventually(
        lambda: json.loads(
            (kube.get(BatchSandbox, "batch", namespace=namespace).metadata.annotations or {}).get(labels.ENDPOINTS)
            or "[]"
        ),
        what="endpoints annotation",
    )
    assert ips == [s["podIP"] for s in status(bs)["sandboxes"]] and all(ips)


def test_two_batchsandboxes_racing_for_the_last_idle_pod(
    cluster: LocalCluster, kube: Client, namespace: str, controller: ControllerProcess
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=seed_pool(min_buffer=1, max_buffer=1, capacity=1))
    eventually(lambda: len(idle_ready(pool_pods(kube, namespace, "example-pool"))) == 1)
    both = "---".join(pooled_batchsandbox(n, "example-pool") for n in ("left", "right"))
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=both)
    eventually(lambda: ready(kube, "left", namespace) + ready(kube, "right", namespace) == 1, what="one wins")
    time.sleep(1)
    winners = [n for n in ("left", "right") if ledger(kube, n, namespace)]
    assert len(winners) == 1
    loser = "right" if winners == ["left"] else "left"
    assert condition(kube.get(BatchSandbox, loser, namespace=namespace))["reason"] == "WaitingForPool"
    assert len(pool_pods(kube, namespace, "example-pool")) == 1, "capacity 1: no pod for the loser"


def test_a_controller_killed_right_after_the_ledger_write_hands_nothing_out_twice(
    cluster: LocalCluster, kube: Client, namespace: str, crds: None
) -> None:
    """The ledger write succeeded but the controller died before labelling anything: the restarted
    controller's cache (a fresh, consistent list) sees the ledger, so those pods are not free."""
    controller = ControllerProcess(cluster, namespace).start()
    try:
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=seed_pool("p", 20, 20, 40))
        eventually(lambda: len(idle_ready(pool_pods(kube, namespace, "p"))) == 20, timeout=60)
        # Kill the controller the moment a ledger appears, before labels (which follow the ledger).
        watcher = threading.Thread(target=_kill_on_first_ledger, args=(kube, namespace, "first", controller))
        watcher.start()
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=pooled_batchsandbox("first", "p", 10))
        watcher.join(timeout=30)
        held = set(ledger(kube, "first", namespace).values())
        assert held, "the ledger was written before the kill"
        unlabelled = [p for p in pool_pods(kube, namespace, "p") if p.metadata.uid in held and
                      labels.BATCHSANDBOX not in (p.metadata.labels or {})]  # fmt: skip
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=pooled_batchsandbox("second", "p", 10))
        controller.start()
        eventually(lambda: ready(kube, "first", namespace) == 10 and ready(kube, "second", namespace) == 10)
        first, second = set(ledger(kube, "first", namespace).values()), set(ledger(kube, "second", namespace).values())
        assert held <= first, "the allocation that was written is kept"
        assert not first & second, "a pod in two ledgers"
        eventually(lambda: len(labelled_for(kube, namespace, "first")) == 10, what="labels follow after the restart")
        print(f"{len(unlabelled)} pod(s) were allocated but not labelled at the kill")
    finally:
        controller.stop()


def _kill_on_first_ledger(kube: Client, namespace: str, name: str, controller: ControllerProcess) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if ledger(kube, name, namespace):
                controller.kill()
                return
        except Exception:  # not created yet
            pass
        time.sleep(0.002)


def test_a_sandbox_pod_that_cannot_run_sets_podfailed(
    cluster: LocalCluster, kube: Client, namespace: str, controller: ControllerProcess
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=seed_pool())
    eventually(lambda: len(idle_ready(pool_pods(kube, namespace, "example-pool"))) == 2)
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=pooled_batchsandbox("one", "example-pool", 1))
    eventually(lambda: ready(kube, "one", namespace) == 1)
    pod = status(kube.get(BatchSandbox, "one", namespace=namespace))["sandboxes"][0]["podName"]
    report_pod_status(cluster, namespace, pod, IMAGE_PULL_BACK_OFF)
    failed = eventually(lambda: (c := condition(kube.get(BatchSandbox, "one", namespace=namespace), "PodFailed"))
                        and c.get("status") == "True" and c)  # fmt: skip
    assert failed["reason"] == "ImagePullBackOff" and pod in failed["message"]
    assert status(kube.get(BatchSandbox, "one", namespace=namespace))["phase"] == "Failed"
    assert "PodFailed" in event_reasons(cluster, namespace, "involvedObject.name=one")


def test_pods_are_handed_back_on_request_and_not_replaced(
    cluster: LocalCluster, kube: Client, namespace: str, controller: ControllerProcess
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=seed_pool(min_buffer=3, max_buffer=3, capacity=10))
    eventually(lambda: len(idle_ready(pool_pods(kube, namespace, "example-pool"))) == 3)
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=pooled_batchsandbox("three", "example-pool", 3))
    eventually(lambda: ready(kube, "three", namespace) == 3)
    sandboxes = status(kube.get(BatchSandbox, "three", namespace=namespace))["sandboxes"]
    given_back = sandboxes[1]["podName"]
    cluster.kubectl("annotate", "bsbx", "three", "-n", namespace, f"{labels.RELEASE}={given_back}")
    eventually(lambda: given_back not in {p.metadata.name for p in pool_pods(kube, namespace, "example-pool")},
               what="released pod deleted")  # fmt: skip
    st = status(kube.get(BatchSandbox, "three", namespace=namespace))
    assert [(s["index"], s.get("released", False)) for s in st["sandboxes"]] == [(0, False), (1, True), (2, False)]
    time.sleep(1)
    assert sorted(ledger(kube, "three", namespace)) == [0, 2], "a released sandbox is not refilled"
    assert st["phase"] == "Running"


def test_idle_pods_marked_for_eviction_go_and_allocated_ones_stay(
    cluster: LocalCluster, kube: Client, namespace: str, controller: ControllerProcess
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=seed_pool())
    eventually(lambda: len(idle_ready(pool_pods(kube, namespace, "example-pool"))) == 2)
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=pooled_batchsandbox("keep", "example-pool", 1))
    eventually(lambda: len(labelled_for(kube, namespace, "keep")) == 1)
    kept = labelled_for(kube, namespace, "keep")[0].metadata.name
    idle = eventually(lambda: (p := idle_ready(pool_pods(kube, namespace, "example-pool"))) and len(p) == 2 and p)
    for name in (kept, idle[0].metadata.name):
        cluster.kubectl("label", "pod", name, "-n", namespace, f"{labels.EVICT}=true")
    evicted = idle[0].metadata.name
    eventually(lambda: evicted not in {p.metadata.name for p in pool_pods(kube, namespace, "example-pool")})
    assert kube.get(Pod, kept, namespace=namespace).metadata.deletionTimestamp is None
    assert "PodEvicted" in event_reasons(cluster, namespace, "involvedObject.kind=Pool")


def test_a_full_pool_rolls_within_its_update_budget(
    cluster: LocalCluster, kube: Client, namespace: str, controller: ControllerProcess
) -> None:
    """A pool at capacity with updateStrategy.maxUnavailable 2 of 6: the roll never leaves more than
    2 of the 6 wanted idle pods not Ready."""
    manifest = seed_pool(min_buffer=6, max_buffer=6, capacity=6) + "  updateStrategy: {maxUnavailable: 2}\n"
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)
    eventually(lambda: len(idle_ready(pool_pods(kube, namespace, "example-pool"))) == 6)
    worst = {"ready": 6}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            worst["ready"] = min(worst["ready"], len(idle_ready(pool_pods(kube, namespace, "example-pool"))))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        patch = '[{"op":"replace","path":"/spec/sandboxTemplate/spec/image","value":"ubuntu:24.04"}]'
        cluster.kubectl("patch", "sbxpool", "example-pool", "-n", namespace, "--type=json", "-p", patch)

        def rolled() -> bool:
            pods = idle_ready(pool_pods(kube, namespace, "example-pool"))
            return len(pods) == 6 and all(p.spec.containers[0].image == "ubuntu:24.04" for p in pods)

        eventually(rolled, timeout=60, what="rolled to the new template")
    finally:
        stop.set()
        sampler.join()
    assert worst["ready"] >= 4, worst
    assert status(kube.get(Pool, "example-pool", namespace=namespace))["total"] == 6
