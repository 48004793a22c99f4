"""Server benchmark (local runtime): `Sandbox.create` -> first `commands.run`, API throughput of
create / get / list with many sandboxes running, and memory per idle sandbox. Prints the figures
and writes bench/results/server.json.

Run: `uv run python bench/server_bench.py [--n 30] [--sandboxes 200]` (or `make bench
BENCH=server`). Each phase runs its own `opensandbox-server` subprocess on 127.0.0.1 with a fresh
state dir: `cold` without a warm pool (every create starts a jail), `warm_pool_2` with the default
pool of 2, the API phase without a pool (creates at concurrency 4 exhaust any pool). Every
sandbox is deleted at the end. All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from opensandbox import Sandbox  # noqa: E402
from opensandbox.config import ConnectionConfig  # noqa: E402

from bench.common import summary_ms, write  # noqa: E402
from harness.server_process import ServerProcess  # noqa: E402

CREATE = {
    "image": {"uri": "ubuntu"},
    "entrypoint": ["tail", "-f", "/dev/null"],
    "timeout": 3600,
    "resourceLimits": {"cpu": "1", "memory": "2Gi"},
}


def sdk_config(server: ServerProcess, proxy: bool = False) -> ConnectionConfig:
    return ConnectionConfig(domain=server.domain, use_server_proxy=proxy, disable_metrics=True)


async def create_to_first_command(server: ServerProcess, n: int, proxy: bool = False) -> dict[str, Any]:
    """What a user waits for: `Sandbox.create(...)` returning, then `commands.run("true")` done."""
    totals, creates, firsts = [], [], []
    for i in range(n + 2):
        t0 = time.perf_counter()
        sandbox = await Sandbox.create("ubuntu", connection_config=sdk_config(server, proxy))
        t1 = time.perf_counter()
        execution = await sandbox.commands.run("true")
        t2 = time.perf_counter()
        assert execution.exit_code == 0
        await sandbox.kill()
        await sandbox.close()
        if i >= 2:  # the first two warm up the server's and the SDK's code paths
            totals.append(t2 - t0)
            creates.append(t1 - t0)
            firsts.append(t2 - t1)
        await asyncio.sleep(0.5)  # creates spaced as a user would; a warm pool refills meanwhile
    return {
        "create_to_first_command": summary_ms(totals),
        "sdk_create": summary_ms(creates),
        "first_command": summary_ms(firsts),
    }


async def start_many(client: httpx.AsyncClient, count: int, concurrency: int) -> tuple[list[str], list[float]]:
    ids: list[str] = []
    latencies: list[float] = []
    queue = list(range(count))

    async def worker() -> None:
        while queue:
            i = queue.pop()
            t0 = time.perf_counter()
            response = await client.post("/v1/sandboxes", json={**CREATE, "metadata": {"n": str(i % 10)}})
            latencies.append(time.perf_counter() - t0)
            response.raise_for_status()
            ids.append(response.json()["id"])

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ids, latencies


async def hammer(server: ServerProcess, paths: list[str], seconds: float, concurrency: int) -> dict[str, Any]:
    """GETs on kept-alive connections for `seconds`, with a minimal raw HTTP/1.1 client: httpx
    costs more CPU per request than the server does and would measure itself on 2 cores."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            while time.perf_counter() < deadline:
                path = random.choice(paths)
                t0 = time.perf_counter()
                writer.write(f"GET {path} HTTP/1.1\r\nHost: {server.domain}\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200"), head
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - t0)
        finally:
            writer.close()

    assert server.proc is not None
    cpu_before, started = cpu_seconds(server.proc.pid), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    cpu_ms = (cpu_seconds(server.proc.pid) - cpu_before) * 1000 / max(len(latencies), 1)
    return {
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "server_cpu_ms_per_request": round(cpu_ms, 3),
        "concurrency": concurrency,
        **summary_ms(latencies),
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_of(server: ServerProcess) -> dict[str, Any]:
    """RSS and PSS of every process of every jail (outer bwrap, bwrap as PID 1, execd, the
    entrypoint, its slirp4netns), and the memory cgroups' own accounting (which adds page cache and
    tmpfs: the jail's root file system is one)."""
    rss = pss = 0
    cgroup_bytes = 0
    records = server.records()
    for record in records:
        pid = int(str(record["pid"]))
        pids = [pid, *descendants(pid)]
        parent = ppid(pid)
        if parent:
            pids.append(parent)  # the outer bwrap, which waits for the jail
        helper = int(str(record.get("helper_pid") or 0))
        if helper:
            pids.append(helper)  # slirp4netns, the jail's way out
        for p in pids:
            r, s = rss_pss_kib(p)
            rss += r
            pss += s
        cgroups = record.get("cgroups")
        if isinstance(cgroups, dict) and "memory" in cgroups:
            with contextlib.suppress(OSError):
                cgroup_bytes += int(Path(cgroups["memory"], "memory.usage_in_bytes").read_text())
    count = max(len(records), 1)
    return {
        "sandboxes": len(records),
        "rss_mib_per_sandbox": round(rss / 1024 / count, 1),
        "pss_mib_per_sandbox": round(pss / 1024 / count, 1),
        "cgroup_usage_mib_per_sandbox": round(cgroup_bytes / (1 << 20) / count, 1),
        "server_rss_mib": round(rss_pss_kib(server.proc.pid)[0] / 1024, 1) if server.proc else None,
    }


def descendants(pid: int) -> list[int]:
    found = []
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    for child in map(int, children):
        found += [child, *descendants(child)]
    return found


def ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def rss_pss_kib(pid: int) -> tuple[int, int]:
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


async def api_under_load(server: ServerProcess, count: int, seconds: float) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
        t0 = time.perf_counter()
        ids, create_latencies = await start_many(client, count, concurrency=4)
        fill_s = time.perf_counter() - t0
        results: dict[str, Any] = {
            "sandboxes_running": len(ids),
            "create_while_filling": {
                "creates_per_s": round(len(ids) / fill_s, 2),
                "concurrency": 4,
                **summary_ms(create_latencies),
            },
        }
        await asyncio.sleep(2)  # let the start-up CPU of the last jails settle
        results["memory_idle"] = memory_of(server)
        results["get"] = await hammer(server, [f"/v1/sandboxes/{i}" for i in ids], seconds, 16)
        results["list_page_20"] = await hammer(server, ["/v1/sandboxes"], seconds, 16)
        results["list_page_200"] = await hammer(server, ["/v1/sandboxes?pageSize=200"], seconds, 8)
        results["list_state_and_metadata_filter"] = await hammer(
            server, ["/v1/sandboxes?state=Running&metadata=n%3D3"], seconds, 16
        )
        extra, latencies = await start_many(client, 20, concurrency=4)
        results["create_with_many_running"] = summary_ms(latencies)
        t0 = time.perf_counter()
        for sandbox_id in ids + extra:
            (await client.delete(f"/v1/sandboxes/{sandbox_id}")).raise_for_status()
        results["delete_ms_mean"] = round((time.perf_counter() - t0) * 1000 / len(ids + extra), 2)
    return results


def with_server(workdir: Path, extra_config: str, job: Any) -> Any:
    server = ServerProcess(workdir, extra_config=extra_config).start()
    try:
        return asyncio.run(job(server))
    finally:
        server.stop()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=30, help="create -> first command samples per variant")
    parser.add_argument("--sandboxes", type=int, default=200, help="sandboxes running during the API test")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each throughput test")
    parser.add_argument("--only-cold", action="store_true", help="only the phase without a warm pool")
    args = parser.parse_args(argv)

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="server-bench-") as tmp:
        work = Path(tmp)
        results["cold"] = with_server(work / "cold", "warmPoolSize = 0", lambda s: create_to_first_command(s, args.n))
        print("cold", results["cold"]["create_to_first_command"], flush=True)
        if args.only_cold:
            write("server-cold", {"params": vars(args), **results})
            return
        results["warm_pool_2"] = with_server(
            work / "warm", "warmPoolSize = 2", lambda s: create_to_first_command(s, args.n)
        )
        print("warm pool", results["warm_pool_2"]["create_to_first_command"], flush=True)
        results["warm_pool_2_server_proxy"] = with_server(
            work / "warm-proxy", "warmPoolSize = 2", lambda s: create_to_first_command(s, args.n, proxy=True)
        )
        results["api_under_load"] = with_server(
            work / "load", "warmPoolSize = 0", lambda s: api_under_load(s, args.sandboxes, args.seconds)
        )
    write("server", {"params": vars(args), **results})


if __name__ == "__main__":
    main(sys.argv[1:])
