"""Shared helpers: percentiles and result files; a controller, Pools and BatchSandboxes on the local cluster."""

from __future__ import annotations

import asyncio
import json
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness.controller_process import ControllerProcess
from harness.services import LocalCluster
from opensandbox_platform.api import labels
from opensandbox_platform.api.resources import BATCHSANDBOXES
from opensandbox_platform.kube.client import JSON, PODS, KubeClient

RESULTS = Path(__file__).parent / "results"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary_ms(samples_s: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples_s]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 2),
        "p90_ms": round(percentile(ms, 90), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
        "max_ms": round(max(ms), 2),
    }


def write(name: str, figures: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    record = {
        "benchmark": name,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        **figures,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return path


@contextmanager
def controller_for(cluster: LocalCluster, namespace: str, *flags: str) -> Iterator[ControllerProcess]:
    """A new namespace with its own controller (`--concurrency 32`, quiet logs, `flags`); both go at the end."""
    cluster.kubectl("create", "namespace", namespace)
    proc = ControllerProcess(cluster, namespace, *flags, "--concurrency", "32", "--log-level", "2").start()
    try:
        yield proc
    finally:
        proc.stop()
        cluster.kubectl("delete", "namespace", namespace, "--wait=false")


async def wait_pool_available(client: KubeClient, namespace: str, name: str, count: int, timeout: float) -> None:
    """Until the Pool is warm and quiet: at least `count` idle (unclaimed) Ready pods, and none of its
    unclaimed pods starting or terminating, twice in a row 0.3 s apart. Read from the pods: the Pool's
    status is written at most every 0.5 s, and a stale `available` let runs start with fewer idle pods
    (a create then waited for a cold one) or while the refill still competed for the API server. (A pod
    allocated a moment ago carries its claim label a moment later: call this between runs.)"""
    selector = f"{labels.POOL}={name},!{labels.BATCHSANDBOX}"
    deadline = time.monotonic() + timeout
    streak = 0
    while streak < 2:
        pods = (await client.list(PODS, namespace, labelSelector=selector))["items"]
        idle = sum(map(_idle_ready, pods))
        streak = streak + 1 if idle >= count and idle == len(pods) else 0
        if time.monotonic() > deadline:
            raise TimeoutError(f"pool {name} did not settle with {count} idle Ready pods in {timeout}s")
        await asyncio.sleep(0.3 if streak else 0.1)


def _idle_ready(pod: JSON) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
    return ready and not pod["metadata"].get("deletionTimestamp")


async def create_and_watch(
    client: KubeClient, namespace: str, obj: JSON, until: Callable[[JSON], bool], timeout: int
) -> JSON:
    """Creates the BatchSandbox `obj`, then follows it from that version on; returns the first status
    for which `until` is true (TimeoutError after `timeout` seconds)."""
    name = obj["metadata"]["name"]
    created = await client.create(BATCHSANDBOXES, obj, namespace)
    stream = client.watch(
        BATCHSANDBOXES,
        namespace,
        fieldSelector=f"metadata.name={name}",
        resourceVersion=created["metadata"]["resourceVersion"],
        timeoutSeconds=timeout,
    )
    try:
        async for event in stream:
            status: JSON = event["object"].get("status") or {}
            if until(status):
                return status
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    raise TimeoutError(f"{name}: the awaited status did not come within {timeout}s")
