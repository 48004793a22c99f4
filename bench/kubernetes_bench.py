"""The server's kubernetes runtime on the local control plane (kwok pods): pooled creates.

  sequential   200 pooled `POST /v1/sandboxes`, one after the other: request → 202 Running (the
               sandbox's pod IP is known then); and the same plus the SDK's endpoint call
  concurrent   128 pooled creates at once from a Pool with ≥ 128 idle pods: each request → its 202

Run: `uv run python -m bench kubernetes` or `uv run python -m bench.kubernetes_bench [--sequential N]
[--concurrent N]`. One namespace with its own controller (`--concurrency 32`, as in
controller_bench) and server (`[runtime] type = "kubernetes"`) subprocesses; the namespace is
deleted at the end. Requests use a minimal raw HTTP/1.1 client on kept-alive connections (httpx
would spend more CPU per request than the server on 2 cores). Writes bench/results/kubernetes.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import controller_for, summary_ms, wait_pool_available, write  # noqa: E402
from bench.controller_bench import pool  # noqa: E402
from harness.kubernetes_server import KubernetesServer  # noqa: E402
from harness.paths import CRDS  # noqa: E402
from harness.services import LocalCluster, local_cluster  # noqa: E402
from opensandbox_platform.api.resources import POOLS  # noqa: E402
from opensandbox_platform.kube.client import KubeClient  # noqa: E402

POOL = "warm"


def create_body() -> dict[str, Any]:
    """What the SDK sends by default (keep-alive entrypoint, limits), plus the Pool."""
    return {
        "image": {"uri": "ubuntu:latest"},
        "entrypoint": ["tail", "-f", "/dev/null"],
        "timeout": 3600,
        "resourceLimits": {"cpu": "1", "memory": "2Gi"},
        "extensions": {"poolRef": POOL},
    }


class RawHttp:
    """One kept-alive HTTP/1.1 connection; requests with JSON bodies, answers as (status, JSON)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> RawHttp:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        assert self.reader is not None and self.writer is not None
        data = json.dumps(body).encode() if body is not None else b""
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nContent-Length: {len(data)}\r\n"
        if data:
            head += "Content-Type: application/json\r\n"
        self.writer.write(head.encode() + b"\r\n" + data)
        response = await self.reader.readuntil(b"\r\n\r\n")
        status = int(response.split(b" ", 2)[1])
        length = int(response.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        payload = await self.reader.readexactly(length)
        return status, json.loads(payload) if payload else None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def create_once(http: RawHttp) -> tuple[float, str]:
    started = time.perf_counter()
    status, body = await http.request("POST", "/v1/sandboxes", create_body())
    elapsed = time.perf_counter() - started
    assert status == 202 and body["status"]["state"] == "Running", (status, body)
    return elapsed, body["id"]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu_ms(server: KubernetesServer, before: float, count: int) -> float:
    assert server.proc is not None
    return round((cpu_seconds(server.proc.pid) - before) * 1000 / count, 2)


async def sequential(server: KubernetesServer, runs: int) -> dict[str, Any]:
    assert server.proc is not None
    http = await RawHttp(server.port).open()
    creates, with_endpoint = [], []
    cpu_before = cpu_seconds(server.proc.pid)
    try:
        for _ in range(runs):
            started = time.perf_counter()
            elapsed, sandbox_id = await create_once(http)
            status, endpoint = await http.request("GET", f"/v1/sandboxes/{sandbox_id}/endpoints/44772")
            assert status == 200 and endpoint["endpoint"].endswith(":44772"), (status, endpoint)
            creates.append(elapsed)
            with_endpoint.append(time.perf_counter() - started)
    finally:
        http.close()
    return {
        "create_202_running": summary_ms(creates),
        "create_and_endpoint": summary_ms(with_endpoint),
        "server_cpu_ms_per_create": server_cpu_ms(server, cpu_before, runs),
    }


async def concurrent(server: KubernetesServer, count: int) -> dict[str, Any]:
    assert server.proc is not None
    connections = [await RawHttp(server.port).open() for _ in range(count)]
    cpu_before = cpu_seconds(server.proc.pid)
    try:
        started = time.perf_counter()
        results = await asyncio.gather(*(create_once(http) for http in connections))
        wall = time.perf_counter() - started
    finally:
        for http in connections:
            http.close()
    return {
        "create_202_running": summary_ms([r[0] for r in results]),
        "all_done_ms": round(wall * 1000, 1),
        "server_cpu_ms_per_create": server_cpu_ms(server, cpu_before, count),
    }


async def run(cluster: LocalCluster, server: KubernetesServer, namespace: str, args: argparse.Namespace) -> Any:
    client = KubeClient.from_config(str(cluster.kubeconfig))
    try:
        capacity = args.sequential + args.concurrent + 200
        await client.create(POOLS, pool(POOL, 20, 40, capacity), namespace)
        await wait_pool_available(client, namespace, POOL, 20, 120)
        seq = await sequential(server, args.sequential)
        print(f"sequential {args.sequential}: {seq['create_202_running']}", flush=True)
        # Enough idle pods for the burst: the burst measures the claim path, not pod start-up.
        buffer = args.concurrent + 8
        patch = {"spec": {"minBufferSize": buffer, "maxBufferSize": buffer}}
        await client.patch(POOLS, POOL, patch, namespace)
        await wait_pool_available(client, namespace, POOL, buffer, 180)
        burst = await concurrent(server, args.concurrent)
        print(f"concurrent {args.concurrent}: {burst['create_202_running']}", flush=True)
        return {"sequential": seq, "concurrent": burst}
    finally:
        await client.aclose()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequential", type=int, default=200, help="sequential pooled creates")
    parser.add_argument("--concurrent", type=int, default=128, help="pooled creates sent at once")
    args = parser.parse_args(argv)
    namespace = f"bench-k8s-{uuid.uuid4().hex[:6]}"
    with local_cluster() as cluster, tempfile.TemporaryDirectory(prefix="k8s-bench-") as tmp:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS))
        with controller_for(cluster, namespace):
            server = KubernetesServer(Path(tmp), namespace, cluster.kubeconfig, "createTimeoutSeconds = 30\n")
            server.start()
            try:
                figures = asyncio.run(run(cluster, server, namespace, args))
            finally:
                server.stop()
    write(
        "kubernetes",
        {
            "params": vars(args),
            **figures,
            "targets": {"sequential": {"p50_ms": 50, "p99_ms": 150}, "concurrent": {"p99_ms": 500}},
            "setup": "kwok pods; Pool minBufferSize 20 refilling during the sequential run, then an idle"
            " buffer of concurrent+8 for the burst; sandboxes kept until the namespace is deleted",
        },
    )


if __name__ == "__main__":
    main(sys.argv[1:])
