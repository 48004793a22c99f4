"""BatchSandbox tasks on the real node (on unless OSB_REAL_NODE=0): a pooled BatchSandbox with N replicas and a
trivial task (`true`), from the create request to the watch event whose status counts N succeeded
tasks. The Pool (taskExecutor enabled) holds N warm, Ready pods first.

N is 100, or as many as the real node still has room for: allocatable pods minus the pods on it, and
its free CPU divided by the sidecar's request. The sidecar's requests are lowered for this bench
(`--task-executor-cpu-request 5m`, memory 32Mi: the executor idles at ~0 CPU and ~21 MiB): with the
default 100m, a 2-CPU node holds fewer than 20 such pods.

Run: `uv run python -m bench task [--replicas N] [--runs R]` (also `python -m bench.task_bench`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from datetime import datetime

from bench.common import controller_for, create_and_watch, summary_ms, wait_pool_available, write
from harness.images import load_task_executor_image
from harness.kube import batchsandbox_manifest, pool_manifest
from harness.paths import CRDS
from harness.real_node import RealNodeUnavailable, real_node, real_node_pod_spec
from harness.real_node import enabled as real_node_enabled
from harness.services import LocalCluster, local_cluster
from opensandbox_platform.api.resources import BATCHSANDBOXES, POOLS
from opensandbox_platform.kube.client import JSON, KubeClient

TARGET_MS = 2000
SIDECAR_CPU_MILLI = 5
SIDECAR_FLAGS = ("--task-executor-cpu-request", f"{SIDECAR_CPU_MILLI}m", "--task-executor-memory-request", "32Mi")


def pool(name: str, size: int) -> JSON:
    pod_spec = real_node_pod_spec(command=["sleep", "infinity"])
    return pool_manifest(name, pod_spec, size, size, size, taskExecutor={"enabled": True})


def batch(name: str, pool_name: str, replicas: int) -> JSON:
    return batchsandbox_manifest(name, replicas, poolRef=pool_name, taskTemplate={"command": ["true"]})


def milli_cpu(quantity: str) -> int:
    return int(quantity[:-1]) if quantity.endswith("m") else int(float(quantity) * 1000)


def room_on_node(cluster: LocalCluster, node: str) -> tuple[int, int, int]:
    """(allocatable pods, pods that still fit, free CPU in millicores)."""
    allocatable = json.loads(cluster.kubectl("get", "node", node, "-o", "json"))["status"]["allocatable"]
    listed = cluster.kubectl("get", "pods", "-A", "--field-selector", f"spec.nodeName={node}", "-o", "json")
    live = [p for p in json.loads(listed)["items"] if p["status"].get("phase") not in ("Succeeded", "Failed")]
    requests = [c.get("resources", {}).get("requests", {}) for p in live for c in p["spec"]["containers"]]
    free_cpu = milli_cpu(allocatable["cpu"]) - sum(milli_cpu(r.get("cpu", "0")) for r in requests)
    return int(allocatable["pods"]), int(allocatable["pods"]) - len(live), free_cpu


def since(wall_start: float, stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() - wall_start


async def create_and_wait_tasks(client: KubeClient, namespace: str, obj: JSON, n: int) -> dict[str, float]:
    """Seconds from the create request to: every sandbox Ready, the first and last task start and end
    (the executors' clocks: same machine), every task Succeeded in status."""
    wall_start = time.time()
    start = time.perf_counter()
    ready_at = None

    def succeeded(status: JSON) -> bool:
        nonlocal ready_at
        if ready_at is None and status.get("ready") == n:
            ready_at = time.perf_counter() - start
        return bool((status.get("tasks") or {}).get("succeeded") == n and status.get("phase") == "Succeeded")

    status = await create_and_watch(client, namespace, obj, succeeded, 120)
    done = time.perf_counter() - start
    tasks = [s["task"] for s in status["sandboxes"]]
    started = sorted(since(wall_start, t["startedAt"]) for t in tasks)
    ended = sorted(since(wall_start, t["finishedAt"]) for t in tasks)
    return {
        "ready": ready_at or done,
        "first_task_started": started[0],
        "last_task_started": started[-1],
        "last_task_finished": ended[-1],
        "status_succeeded": done,
    }


async def run(cluster: LocalCluster, image: str, node: str, replicas: int, runs: int) -> dict[str, object]:
    allocatable, room, free_cpu = room_on_node(cluster, node)
    n = min(replicas, room - 2, free_cpu // SIDECAR_CPU_MILLI - 2)  # a little room for whatever else lands there
    namespace = f"bench-task-{uuid.uuid4().hex[:6]}"
    with controller_for(cluster, namespace, "--task-executor-image", image, *SIDECAR_FLAGS):
        client = KubeClient.from_config(str(cluster.kubeconfig))
        try:
            await client.create(POOLS, pool("workers", n), namespace)
            phases: dict[str, list[float]] = {}
            warm_s = []
            for i in range(runs):
                started = time.monotonic()
                await wait_pool_available(client, namespace, "workers", n, 600)
                warm_s.append(time.monotonic() - started)
                times = await create_and_wait_tasks(client, namespace, batch(f"b{i}", "workers", n), n)
                for phase, seconds in times.items():
                    phases.setdefault(phase, []).append(seconds)
                print(f"run {i}: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in times.items()))
                await client.delete(BATCHSANDBOXES, f"b{i}", namespace)
        finally:
            await client.aclose()
    return {
        "replicas": n,
        "node": {"name": node, "allocatable_pods": allocatable, "free_pods_before": room, "free_cpu_m": free_cpu},
        "sidecar_requests": {"cpu": f"{SIDECAR_CPU_MILLI}m", "memory": "32Mi"},
        "create_to_all_tasks_succeeded": summary_ms(phases["status_succeeded"]),
        "breakdown_from_create": {k: summary_ms(v) for k, v in phases.items()},
        "pool_fill_seconds": [round(s, 1) for s in warm_s],
        "setup": f"pooled BatchSandbox, {n} warm Ready pods with the task-executor sidecar, task `true`",
        "target_ms": TARGET_MS,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.task_bench", description=__doc__)
    parser.add_argument("--replicas", type=int, default=100, help="replicas (capped by the node's room)")
    parser.add_argument("--runs", type=int, default=1, help="runs (the pool refills in between)")
    args = parser.parse_args(argv)
    if not real_node_enabled():
        print("task bench skipped: it needs the real node (switched off by OSB_REAL_NODE=0)")
        return
    with local_cluster() as cluster:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS))
        try:
            with real_node(cluster) as node:
                image = load_task_executor_image(node)
                figures = asyncio.run(run(cluster, image, node.name, args.replicas, args.runs))
        except RealNodeUnavailable as off:
            print(f"task bench skipped: {off}", file=sys.stderr)
            return
    write("task", figures)


if __name__ == "__main__":
    main(sys.argv[1:])
