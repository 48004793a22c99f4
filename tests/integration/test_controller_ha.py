"""Leader election, crashes mid-burst, exactly-once claims, and the metrics endpoint."""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import datetime

import httpx
from lightkube import Client
from lightkube.resources.core_v1 import Pod

from harness.controller_process import ControllerProcess
from harness.kube import BatchSandbox, eventually, idle_ready, pool_pods, pooled_batchsandbox, seed_pool
from harness.ports import free_port
from harness.services import LocalCluster
from opensandbox_platform.api import labels


def became_leader_at(proc: ControllerProcess) -> float | None:
    for line in proc.logs().splitlines():
        if '"became leader"' in line:
            entry = json.loads(line)
            return datetime.fromisoformat(entry["ts"]).timestamp()
    return None


def test_only_the_leader_acts_and_a_standby_takes_over_within_15s(
    cluster: LocalCluster, kube: Client, namespace: str, crds: None
) -> None:
    le = ("--leader-elect", "--leader-election-namespace", namespace, "--leader-election-id", "osb-test")
    first = ControllerProcess(cluster, namespace, *le).start()
    eventually(lambda: became_leader_at(first), what="first replica leads")
    second = ControllerProcess(cluster, namespace, *le).start()
    try:
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=seed_pool())
        eventually(lambda: len(idle_ready(pool_pods(kube, namespace, "example-pool"))) == 2)
        time.sleep(1)
        assert "SuccessfulCreate" in first.logs()
        assert became_leader_at(second) is None and "SuccessfulCreate" not in second.logs(), "the standby acted"

        lease = json.loads(cluster.kubectl("get", "lease", "osb-test", "-n", namespace, "-o", "json"))
        killed_at = time.time()
        first.kill()
        took_over = eventually(lambda: became_leader_at(second), timeout=25, what="standby takes over")
        # The lease lasts 15 s from the leader's last renewal (every 2 s), so a standby takes over at
        # most 15 s after the crash (plus the time to write the lease and log it).
        assert took_over - killed_at < 15.5, f"takeover took {took_over - killed_at:.1f}s"
        renewed = datetime.fromisoformat(lease["spec"]["renewTime"].replace("Z", "+00:00")).timestamp()
        assert took_over - renewed < 17.5, "the lease was renewed every 2 s and expires 15 s after"
        # The new leader acts: a deleted pod is replaced.
        victim = pool_pods(kube, namespace, "example-pool")[0].metadata.name
        kube.delete(Pod, victim, namespace=namespace)
        eventually(
            lambda: (
                len(idle_ready(pool_pods(kube, namespace, "example-pool"))) == 2
                and victim not in {p.metadata.name for p in pool_pods(kube, namespace, "example-pool")}
            )
        )
    finally:
        first.kill()
        second.stop()
    # A clean stop releases the lease: a new replica leads at once.
    third = ControllerProcess(cluster, namespace, *le).start()
    try:
        eventually(lambda: became_leader_at(third), timeout=5, what="lease released on clean stop")
    finally:
        third.stop()


def claimed_pods(kube: Client, namespace: str) -> dict[str, str]:
    """pod name -> BatchSandbox, for every claimed pod."""
    return {
        p.metadata.name: p.metadata.labels[labels.BATCHSANDBOX]
        for p in kube.list(Pod, namespace=namespace, labels={labels.BATCHSANDBOX: None})
        if not p.metadata.deletionTimestamp
    }


def apply_many(cluster: LocalCluster, namespace: str, names: list[str], pool: str) -> None:
    manifest = "---".join(pooled_batchsandbox(n, pool) for n in names)
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)


def all_ready(kube: Client, namespace: str, names: set[str]) -> bool:
    items = [b for b in kube.list(BatchSandbox, namespace=namespace) if b.metadata.name in names]
    return len(items) == len(names) and all((b.status or {}).get("ready") == 1 for b in items)


def assert_exactly_once(kube: Client, namespace: str, names: set[str]) -> None:
    # The truth first: the allocation ledgers (status.sandboxes[].podUID) never name a pod twice.
    ledgers = {
        b.metadata.name: b.status["sandboxes"][0]["podUID"]
        for b in kube.list(BatchSandbox, namespace=namespace)
        if b.metadata.name in names
    }
    assert len(set(ledgers.values())) == len(ledgers) == len(names), "a pod allocated twice"
    # Claim labels and ownerReferences follow the ledger, off the critical path: wait for them.
    eventually(lambda: set(Counter(claimed_pods(kube, namespace).values())) >= names, what="claim labels written")
    claims = claimed_pods(kube, namespace)
    per_bs = Counter(claims.values())
    assert set(per_bs) >= names
    assert all(per_bs[n] == 1 for n in names), {n: c for n, c in per_bs.items() if c != 1}
    for bs in kube.list(BatchSandbox, namespace=namespace):
        if bs.metadata.name in names:
            pod = bs.status["sandboxes"][0]["podName"]
            assert claims[pod] == bs.metadata.name, (
                f"{pod} is reported by {bs.metadata.name} but claimed by {claims[pod]}"
            )
            owners = kube.get(Pod, pod, namespace=namespace).metadata.ownerReferences
            assert [o.uid for o in owners] == [bs.metadata.uid]


def test_burst_of_200_claims_exactly_once_even_across_controller_crashes(
    cluster: LocalCluster, kube: Client, namespace: str, crds: None
) -> None:
    controller = ControllerProcess(cluster, namespace, "--concurrency", "32").start()
    try:
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=seed_pool("big", 200, 250, 250))
        eventually(lambda: len(idle_ready(pool_pods(kube, namespace, "big"))) == 200, timeout=60, what="200 warm")

        first = [f"a{i}" for i in range(200)]
        apply_many(cluster, namespace, first, "big")
        eventually(lambda: all_ready(kube, namespace, set(first)), timeout=60, what="200 claims")
        assert_exactly_once(kube, namespace, set(first))
        assert len(pool_pods(kube, namespace, "big")) <= 250

        # Free the capacity, then a second burst with the controller killed twice in the middle.
        cluster.kubectl("delete", "bsbx", "--all", "-n", namespace, "--wait=false")
        eventually(lambda: not claimed_pods(kube, namespace), timeout=60, what="first burst released")
        eventually(lambda: len(idle_ready(pool_pods(kube, namespace, "big"))) >= 150, timeout=60, what="pool refilled")
        second = [f"b{i}" for i in range(200)]
        apply_many(cluster, namespace, second[:100], "big")
        time.sleep(0.3)
        controller.kill()
        apply_many(cluster, namespace, second[100:], "big")
        controller.start(wait_ready=False)
        time.sleep(1.0)
        controller.kill()
        controller.start()
        eventually(lambda: all_ready(kube, namespace, set(second)), timeout=90, what="second burst converges")
        assert_exactly_once(kube, namespace, set(second))
        assert len(pool_pods(kube, namespace, "big")) <= 250
    finally:
        controller.stop()


def test_metrics_are_served_over_https_to_authorized_callers_only(
    cluster: LocalCluster, kube: Client, namespace: str, crds: None
) -> None:
    port = free_port()
    # The extra flag comes after the helper's `--metrics-bind-address 0`; argparse keeps the last.
    proc = ControllerProcess(cluster, namespace, "--metrics-bind-address", f"127.0.0.1:{port}").start()
    try:
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=seed_pool())
        eventually(lambda: len(idle_ready(pool_pods(kube, namespace, "example-pool"))) == 2)
        url = f"https://127.0.0.1:{port}/metrics"
        assert httpx.get(url, verify=False).status_code == 401
        cluster.kubectl("create", "serviceaccount", "scraper", "-n", namespace)
        token = cluster.kubectl("create", "token", "scraper", "-n", namespace).strip()
        assert httpx.get(url, verify=False, headers={"Authorization": f"Bearer {token}"}).status_code == 403
        cluster.kubectl("create", "clusterrole", f"{namespace}-metrics", "--verb=get", "--non-resource-url=/metrics")
        cluster.kubectl(
            "create",
            "clusterrolebinding",
            f"{namespace}-metrics",
            f"--clusterrole={namespace}-metrics",
            f"--serviceaccount={namespace}:scraper",
        )
        try:
            body = eventually(
                lambda: (
                    (r := httpx.get(url, verify=False, headers={"Authorization": f"Bearer {token}"})).status_code == 200
                    and r.text
                ),
                timeout=90,
                interval=1,
                what="authorized scrape",
            )
        finally:
            cluster.kubectl("delete", "clusterrolebinding", f"{namespace}-metrics", check=False)
            cluster.kubectl("delete", "clusterrole", f"{namespace}-metrics", check=False)
        for name in (
            "controller_runtime_reconcile_total",
            "controller_runtime_reconcile_time_seconds",
            "workqueue_depth",
            "workqueue_adds_total",
            "workqueue_queue_duration_seconds",
            "workqueue_retries_total",
            "opensandbox_pool_pods",
            "opensandbox_claim_duration_seconds",
            "opensandbox_sandbox_ready_duration_seconds",
        ):
            assert name in body, name
        assert f'opensandbox_pool_pods{{namespace="{namespace}",pool="example-pool",state="available"}} 2.0' in body
    finally:
        proc.stop()
