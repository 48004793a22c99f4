"""execd benchmark: command round trip, small-file write+read, download/upload throughput, output
streaming, start-up time and idle memory. Prints the figures and writes bench/results/execd.json.

Run: `uv run python bench/execd_bench.py` (the packaged build, build/execd/opensandbox/execd, is
measured too when it exists; `--binary PATH` names another). All traffic goes to 127.0.0.1.
bench/coldstart_bench.py measures start-up more closely (next to python3 -m http.server).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from opensandbox import Sandbox, SandboxSync  # noqa: E402
from opensandbox.config import ConnectionConfig  # noqa: E402
from opensandbox.config.connection_sync import ConnectionConfigSync  # noqa: E402

from harness.execd_process import run_execd  # noqa: E402
from harness.lifecycle_stub import run_lifecycle  # noqa: E402
from harness.paths import EXECD_BINARY  # noqa: E402
from harness.ports import free_port  # noqa: E402

MiB = 1024 * 1024


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples_s)
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 3),
        "p90_ms": round(ms[int(len(ms) * 0.9) - 1], 3),
        "p99_ms": round(ms[int(len(ms) * 0.99) - 1], 3),
        "mean_ms": round(statistics.fmean(ms), 3),
    }


async def bench_sdk_async(domain: str, work: Path, n: int) -> dict[str, Any]:
    config = ConnectionConfig(domain=domain, protocol="http", request_timeout=timedelta(seconds=120))
    sandbox = await Sandbox.create("bench", connection_config=config, entrypoint=["true"])
    try:
        for _ in range(20):  # warm up the kept-alive connections
            await sandbox.commands.run("true")
        runs = []
        for _ in range(n):
            t0 = time.perf_counter()
            execution = await sandbox.commands.run("true")
            runs.append(time.perf_counter() - t0)
            assert execution.exit_code == 0

        payload = os.urandom(4096)
        path = str(work / "small.bin")
        await sandbox.files.write_file(path, payload)
        write_read, writes, reads = [], [], []
        for _ in range(n):
            t0 = time.perf_counter()
            await sandbox.files.write_file(path, payload)
            t1 = time.perf_counter()
            data = await sandbox.files.read_bytes(path)
            t2 = time.perf_counter()
            assert data == payload
            write_read.append(t2 - t0)
            writes.append(t1 - t0)
            reads.append(t2 - t1)

        big = work / "big.bin"
        downloads = []
        for _ in range(3):
            t0 = time.perf_counter()
            size = 0
            async for chunk in await sandbox.files.read_bytes_stream(str(big), chunk_size=MiB):
                size += len(chunk)
            downloads.append(time.perf_counter() - t0)
            assert size == 100 * MiB
        uploads = []
        content = io.BytesIO(os.urandom(100 * MiB))
        for _ in range(3):
            t0 = time.perf_counter()
            await sandbox.files.write_file(str(work / "uploaded.bin"), content)
            uploads.append(time.perf_counter() - t0)
        assert (work / "uploaded.bin").stat().st_size == 100 * MiB
        return {
            "commands_run_true": percentiles(runs),
            "file_4k_write_plus_read": percentiles(write_read),
            "file_4k_write": percentiles(writes),
            "file_4k_read": percentiles(reads),
            "download_100mb_mib_per_s": round(100 / min(downloads), 1),
            "upload_100mb_mib_per_s": round(100 / min(uploads), 1),
        }
    finally:
        await sandbox.kill()
        await sandbox.close()


def bench_sdk_sync(domain: str, n: int) -> dict[str, Any]:
    config = ConnectionConfigSync(domain=domain, protocol="http", request_timeout=timedelta(seconds=60))
    sandbox = SandboxSync.create("bench", connection_config=config, entrypoint=["true"])
    try:
        for _ in range(20):
            sandbox.commands.run("true")
        runs = []
        for _ in range(n):
            t0 = time.perf_counter()
            sandbox.commands.run("true")
            runs.append(time.perf_counter() - t0)
        return {"commands_run_true": percentiles(runs)}
    finally:
        sandbox.kill()
        sandbox.close()


def bench_raw(url: str, n: int) -> dict[str, Any]:
    """Without the SDK: what execd itself costs per command, and output streaming throughput."""
    with httpx.Client(base_url=url, timeout=300) as client:
        runs = []
        for i in range(n + 20):
            t0 = time.perf_counter()
            body = client.post("/command", json={"argv": ["true"]}).content
            if i >= 20:
                runs.append(time.perf_counter() - t0)
            assert b"execution_complete" in body
        pings = []
        for _ in range(n):
            t0 = time.perf_counter()
            client.get("/ping")
            pings.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        total = 0
        command = "head -c 1073741824 /dev/zero | tr '\\0' x"
        with client.stream("POST", "/command", json={"command": command}) as response:
            for chunk in response.iter_raw(MiB):
                total += len(chunk)
        stream_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        with client.stream("POST", "/command", json={"command": "seq 1 1000000"}) as response:
            for _ in response.iter_raw(MiB):
                pass
        lines_s = time.perf_counter() - t0
    return {
        "http_command_argv_true": percentiles(runs),
        "http_ping": percentiles(pings),
        "output_1gib_mib_per_s": round(1024 / stream_s, 1),
        "output_1m_lines_per_s": round(1_000_000 / lines_s),
    }


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def tree_rss_kib(pid: int) -> int:
    """RSS of a process and its children (an earlier one-file build was two processes)."""
    total = rss_kib(pid)
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        for child in children.read_text().split():
            total += tree_rss_kib(int(child))
    return total


def bench_startup(argv_prefix: list[str], runs: int) -> dict[str, Any]:
    """Process start -> first 200 from /ping; and resident memory once idle."""
    times, idle = [], []
    for _ in range(runs):
        port = free_port()
        with tempfile.TemporaryDirectory() as state:
            env = {**os.environ, "EXECD_STATE_DIR": state, "EXECD_ENVS": f"{state}/.env"}
            args = [*argv_prefix, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
            t0 = time.perf_counter()
            proc = subprocess.Popen(args, env=env)
            try:
                with httpx.Client(timeout=1) as client:
                    while True:
                        try:
                            if client.get(f"http://127.0.0.1:{port}/ping").status_code == 200:
                                break
                        except httpx.TransportError:
                            time.sleep(0.002)
                    times.append(time.perf_counter() - t0)
                    for _ in range(10):
                        client.get(f"http://127.0.0.1:{port}/ping")
                time.sleep(0.3)
                idle.append(tree_rss_kib(proc.pid))
            finally:
                proc.terminate()
                proc.wait(10)
    return {"startup": percentiles(times), "idle_rss_mib": round(statistics.median(idle) / 1024, 1)}


def make_file(path: Path, mib: int) -> None:
    with open(path, "wb") as fh:
        for _ in range(mib):
            fh.write(os.urandom(MiB))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=300, help="samples per latency figure")
    parser.add_argument(
        "--binary",
        default=str(EXECD_BINARY) if EXECD_BINARY.exists() else None,
        help="also measure start-up and idle memory of this executable (default: the built one, if any)",
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "execd.json"))
    args = parser.parse_args(argv)

    results: dict[str, Any] = {
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
        "load_avg_at_start": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_file(work / "big.bin", 100)
        with run_execd(work / "execd") as execd, run_lifecycle(execd.endpoint) as lifecycle:
            results["rss_after_start_mib"] = round(execd.rss_kib() / 1024, 1)
            results["sdk_async"] = asyncio.run(bench_sdk_async(lifecycle.domain, work, args.n))
            results["sdk_sync"] = bench_sdk_sync(lifecycle.domain, args.n)
            results["raw_http"] = bench_raw(execd.url, args.n)
            results["rss_after_workload_mib"] = round(execd.rss_kib() / 1024, 1)
    results["python_module"] = bench_startup([sys.executable, "-m", "opensandbox_platform.execd.main"], 10)
    if args.binary:
        results["binary"] = bench_startup([args.binary], 10)
        binary = Path(args.binary)
        # a one-dir build: the executable and its libraries beside it (execd-lib/)
        files = [binary, *(p for p in binary.parent.glob("execd-lib/**/*") if p.is_file())]
        results["binary"]["size_mib"] = round(sum(p.stat().st_size for p in files) / MiB, 1)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
