"""The Pool reconciler against the real control plane (kwok pods): buffer, capacity, repair, rollout."""

from __future__ import annotations

import threading
import time

from lightkube import Client
from lightkube.resources.core_v1 import Pod

from harness.controller_process import ControllerProcess
from harness.kube import (
    EVICTED,
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


def test_seed_pool_keeps_two_idle_ready_pods_and_respects_its_bounds(
    cluster: LocalCluster, kube: Client, namespace: str, controller: ControllerProcess
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=seed_pool())
    eventually(lambda: len(idle_ready(pool_pods(kube, namespace, "example-pool"))) == 2, what="2 idle Ready pods")
    pool = eventually(
        lambda: (p := kube.get(Pool, "example-pool", namespace=namespace)) and status(p).get("available") == 2 and p,
        what="status.available=2",
    )
    assert status(pool)["total"] == 2 and status(pool)["allocated"] == 0 and status(pool)["revision"]
    ready = next(c for c in status(pool)["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    printed = cluster.kubectl("get", "sbxpool", "-n", namespace)
    assert printed.split("\n")[0].split() == [
        "NAME",
        "MIN",
        "MAX",
        "CAPACITY",
        "TOTAL",
        "AVAILABLE",
        "ALLOCATED",
        "AGE",
    ]

    time.sleep(1)  # settled: nothing more is created
    assert len(pool_pods(kube, namespace, "example-pool")) == 2

    # Demand beyond capacity: 12 sandboxes wanted, capacity 10. Sample the pool while it works: pods made
    # for the demand are idle only until they are claimed, but the total never passes capacity.
    worst = {"idle": 0, "total": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            pods = pool_pods(kube, namespace, "example-pool")
            idle = [p for p in pods if labels.BATCHSANDBOX not in (p.metadata.labels or {})]
            worst["idle"] = max(worst["idle"], len(idle))
            worst["total"] = max(worst["total"], len(pods))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=pooled_batchsandbox("big", "example-pool", 12))
        eventually(lambda: len(pool_pods(kube, namespace, "example-pool")) == 10, what="pool at capacity")
        time.sleep(2)
    finally:
        stop.set()
        sampler.join()
    assert worst["total"] <= 10, worst
    from harness.kube import BatchSandbox

    bs = kube.get(BatchSandbox, "big", namespace=namespace)
    assert status(bs)["ready"] == 10
    waiting = next(c for c in status(bs)["conditions"] if c["type"] == "Ready")
    assert waiting["status"] == "False" and waiting["reason"] == "WaitingForPool"

    # Capacity freed: the BatchSandbox shrinks to 8, the pool refills idle pods up to minBufferSize.
    cluster.kubectl("patch", "bsbx", "big", "-n", namespace, "--type=merge", "-p", '{"spec":{"replicas":8}}')
    eventually(lambda: len(idle_ready(pool_pods(kube, namespace, "example-pool"))) == 2, what="refill to 2")
    time.sleep(1)
    pods = pool_pods(kube, namespace, "example-pool")
    assert len(pods) == 10 and len(idle_ready(pods)) == 2

    # No demand left: surplus idle pods above maxBufferSize go, and idle stays within [min, max].
    cluster.kubectl("delete", "bsbx", "big", "-n", namespace)
    eventually(lambda: len(pool_pods(kube, namespace, "example-pool")) == 2, timeout=30, what="claimed pods deleted")
    assert 2 <= len(idle_ready(pool_pods(kube, namespace, "example-pool"))) <= 5


def test_surplus_idle_pods_are_deleted_oldest_first(
    cluster: LocalCluster, kube: Client, namespace: str, controller: ControllerProcess
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=seed_pool(min_buffer=2, max_buffer=5))
    old = eventually(lambda: (p := idle_ready(pool_pods(kube, namespace, "example-pool"))) and len(p) == 2 and p)
    time.sleep(1.1)  # creationTimestamp has 1 s resolution
    cluster.kubectl(
        "patch", "sbxpool", "example-pool", "-n", namespace, "--type=merge", "-p", '{"spec":{"minBufferSize":4}}'
    )
    eventually(lambda: len(idle_ready(pool_pods(kube, namespace, "example-pool"))) == 4, what="4 idle pods")
    cluster.kubectl(
        "patch",
        "sbxpool",
        "example-pool",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"minBufferSize":1,"maxBufferSize":2}}',
    )
    survivors = eventually(
        lambda: (pods := pool_pods(kube, namespace, "example-pool")) and len(pods) == 2 and pods,
        what="idle pods trimmed to maxBufferSize",
    )
    assert not {p.metadata.name for p in survivors} & {p.metadata.name for p in old}, "the oldest must go first"


def test_lost_and_stuck_pods_are_replaced(cluster: LocalCluster, kube: Client, namespace: str, crds: None) -> None:
    proc = ControllerProcess(cluster, namespace, "--pod-ready-deadline", "3").start()
    try:
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=seed_pool())
        pods = eventually(lambda: (p := idle_ready(pool_pods(kube, namespace, "example-pool"))) and len(p) == 2 and p)
        kube.delete(Pod, pods[0].metadata.name, namespace=namespace)
        eventually(
            lambda: (
                len(idle_ready(pool_pods(kube, namespace, "example-pool"))) == 2
                and pods[0].metadata.name not in {p.metadata.name for p in pool_pods(kube, namespace, "example-pool")}
            ),
            what="deleted pod replaced",
        )

        # A pod that fails (as a crash with restartPolicy Never would): replaced.
        victim = idle_ready(pool_pods(kube, namespace, "example-pool"))[0].metadata.name
        report_pod_status(cluster, namespace, victim, EVICTED)
        eventually(
            lambda: victim not in {p.metadata.name for p in pool_pods(kube, namespace, "example-pool")},
            what="failed pod deleted",
        )
        eventually(lambda: len(idle_ready(pool_pods(kube, namespace, "example-pool"))) == 2, what="refilled")

        # A pod stuck not Ready (image pull back-off, crash loop) past the deadline: replaced.
        stuck = idle_ready(pool_pods(kube, namespace, "example-pool"))[0].metadata.name
        report_pod_status(cluster, namespace, stuck, {"conditions": [{"type": "Ready", "status": "False"}]})
        eventually(
            lambda: stuck not in {p.metadata.name for p in pool_pods(kube, namespace, "example-pool")},
            timeout=20,
            what="stuck pod replaced",
        )
        events = event_reasons(cluster, namespace, "involvedObject.kind=Pool")
        assert "PodReplaced" in events and "SuccessfulCreate" in events
    finally:
        proc.stop()


def test_changed_template_rolls_idle_pods_and_leaves_claimed_ones(
    cluster: LocalCluster, kube: Client, namespace: str, controller: ControllerProcess
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=seed_pool())
    eventually(lambda: len(idle_ready(pool_pods(kube, namespace, "example-pool"))) == 2)
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=pooled_batchsandbox("keep", "example-pool"))
    claimed = eventually(
        lambda: (
            pool_pods(kube, namespace, "example-pool")
            and [
                p
                for p in pool_pods(kube, namespace, "example-pool")
                if labels.BATCHSANDBOX in (p.metadata.labels or {})
            ]
        )
    )
    old_revision = kube.get(Pool, "example-pool", namespace=namespace).status["revision"]

    cluster.kubectl(
        "patch",
        "sbxpool",
        "example-pool",
        "-n",
        namespace,
        "--type=json",
        "-p",
        '[{"op":"replace","path":"/spec/sandboxTemplate/spec/image","value":"ubuntu:24.04"}]',
    )

    def rolled() -> bool:
        idle = idle_ready(pool_pods(kube, namespace, "example-pool"))
        return len(idle) == 2 and all(p.spec.containers[0].image == "ubuntu:24.04" for p in idle)

    eventually(rolled, what="idle pods on the new template")
    eventually(
        lambda: kube.get(Pool, "example-pool", namespace=namespace).status["revision"] != old_revision,
        what="status.revision updated",
    )
    still = kube.get(Pod, claimed[0].metadata.name, namespace=namespace)
    assert still.metadata.uid == claimed[0].metadata.uid and still.spec.containers[0].image == "ubuntu:latest"


def test_a_template_the_api_server_refuses_is_reported_on_the_pool(
    cluster: LocalCluster, kube: Client, namespace: str, controller: ControllerProcess
) -> None:
    manifest = seed_pool().replace(
        'command: ["sleep", "infinity"]', 'command: ["sleep"]\n      resources: {limits: {cpu: lots}}'
    )
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)

    def ready_condition() -> dict[str, str]:
        return condition(kube.get(Pool, "example-pool", namespace=namespace))

    failed = eventually(lambda: ready_condition().get("reason") == "FailedCreate" and ready_condition())
    assert failed["status"] == "False" and "quantities must match the regular expression" in failed["message"]
    events = event_reasons(cluster, namespace, "involvedObject.kind=Pool")
    assert "FailedCreate" in events
    assert pool_pods(kube, namespace, "example-pool") == []

    # Fixing the template recovers the pool.
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=seed_pool())
    eventually(lambda: len(idle_ready(pool_pods(kube, namespace, "example-pool"))) == 2, what="pool recovered")
    eventually(lambda: ready_condition().get("reason") == "BufferFilled", what="Ready again")


def test_an_egress_pool_without_the_controllers_egress_image_says_so_and_makes_no_pods(
    cluster: LocalCluster, kube: Client, namespace: str, controller: ControllerProcess
) -> None:
    # `controller` runs without --egress-image: pods without the sidecar the Pool asks for must not be made
    manifest = seed_pool().replace("  minBufferSize: 2", "  egress: {defaultAction: deny}\n  minBufferSize: 2")
    assert "egress:" in manifest
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)
    ready = eventually(
        lambda: (
            (c := condition(kube.get(Pool, "example-pool", namespace=namespace))).get("reason") == "EgressNotConfigured"
            and c
        ),
        what="the EgressNotConfigured condition",
    )
    assert ready["status"] == "False" and "--egress-image" in ready["message"]
    assert "EgressNotConfigured" in event_reasons(cluster, namespace, "involvedObject.kind=Pool")
    assert pool_pods(kube, namespace, "example-pool") == []
    assert controller.proc is not None and controller.proc.poll() is None  # no crash
