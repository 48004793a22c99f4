"""Code interpreter benchmark (local runtime, the official `opensandbox-code-interpreter` 1.1.1):

- `warm_run`: `codes.run("1+1")` round trip in a context whose kernel is up (async SDK, sync SDK,
  and raw HTTP to execd for execd's own share);
- `create_to_first_result`: `Sandbox.create` + `CodeInterpreter.create` (with its strict health
  check) + `codes.run("1+1")`, with a warm pool whose jails pre-start a Python kernel
  (`[local] codePrestart = "python"`), with a warm pool without it (the first run starts the
  kernel), and cold (no pool: the jail and the kernel start);
- `memory`: RSS/PSS of execd idle, then of execd, the kernel bridge and one idle Python kernel.

Run: `uv run python -m bench code [--n 30]` (or `make bench BENCH=code`); writes
bench/results/code.json. Each phase runs its own `opensandbox-server` on 127.0.0.1; all traffic
goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from code_interpreter import CodeInterpreter, CodeInterpreterSync  # noqa: E402
from opensandbox import Sandbox, SandboxSync  # noqa: E402
from opensandbox.config import ConnectionConfig  # noqa: E402
from opensandbox.config.connection_sync import ConnectionConfigSync  # noqa: E402

from bench.common import summary_ms, write  # noqa: E402
from bench.server_bench import descendants, rss_pss_kib  # noqa: E402
from harness.server_process import ServerProcess  # noqa: E402

ENTRYPOINT = ["tail", "-f", "/dev/null"]


def sdk_config(server: ServerProcess) -> ConnectionConfig:
    return ConnectionConfig(domain=server.domain, disable_metrics=True)


async def warm_run(server: ServerProcess, n: int) -> dict[str, Any]:
    sandbox = await Sandbox.create("ubuntu", connection_config=sdk_config(server), entrypoint=ENTRYPOINT)
    interpreter = await CodeInterpreter.create(sandbox)
    ctx = await interpreter.codes.create_context("python")
    samples = []
    for i in range(n + 20):
        t0 = time.perf_counter()
        execution = await interpreter.codes.run("1+1", context=ctx)
        if i >= 20:
            samples.append(time.perf_counter() - t0)
        assert execution.result[0].text == "2"
    endpoint = await sandbox.get_endpoint(44772)
    raw = []
    body = {"code": "1+1", "context": {"id": ctx.id, "language": "python"}}
    async with httpx.AsyncClient(base_url=f"http://{endpoint.endpoint}", headers=endpoint.headers) as client:
        for i in range(n + 20):
            t0 = time.perf_counter()
            response = await client.post("/code", json=body)
            if i >= 20:
                raw.append(time.perf_counter() - t0)
            assert b'"text":"2"' in response.content
    sync_samples = await asyncio.to_thread(warm_run_sync, server, sandbox.id, n)
    await interpreter.aclose()
    await sandbox.kill()
    await sandbox.close()
    return {"async_sdk": summary_ms(samples), "sync_sdk": summary_ms(sync_samples), "raw_http": summary_ms(raw)}


def warm_run_sync(server: ServerProcess, sandbox_id: str, n: int) -> list[float]:
    sandbox = SandboxSync.connect(sandbox_id, connection_config=ConnectionConfigSync(domain=server.domain))
    interpreter = CodeInterpreterSync.create(sandbox)
    ctx = interpreter.codes.create_context("python")
    samples = []
    for i in range(n + 20):
        t0 = time.perf_counter()
        execution = interpreter.codes.run("1+1", context=ctx)
        if i >= 20:
            samples.append(time.perf_counter() - t0)
        assert execution.result[0].text == "2"
    interpreter.codes.delete_context(ctx.id or "")
    interpreter.close()
    sandbox.close()
    return samples


async def create_to_first_result(server: ServerProcess, n: int, spacing: float) -> dict[str, Any]:
    totals, creates, interpreters, firsts = [], [], [], []
    for i in range(n + 2):
        t0 = time.perf_counter()
        sandbox = await Sandbox.create("ubuntu", connection_config=sdk_config(server), entrypoint=ENTRYPOINT)
        t1 = time.perf_counter()
        interpreter = await CodeInterpreter.create(sandbox)
        t2 = time.perf_counter()
        execution = await interpreter.codes.run("1+1")
        t3 = time.perf_counter()
        assert execution.result[0].text == "2", execution
        await interpreter.aclose()
        await sandbox.kill()
        await sandbox.close()
        if i >= 2:  # the first two warm up the server's and the SDK's code paths
            totals.append(t3 - t0)
            creates.append(t1 - t0)
            interpreters.append(t2 - t1)
            firsts.append(t3 - t2)
        await asyncio.sleep(spacing)  # a warm pool refills (and pre-starts its kernel) meanwhile
    return {
        "create_to_first_result": summary_ms(totals),
        "sandbox_create": summary_ms(creates),
        "code_interpreter_create": summary_ms(interpreters),
        "first_run": summary_ms(firsts),
    }


def process_memory(pids: list[int], match: str) -> dict[str, float]:
    rss = pss = 0
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if match in cmdline:
            r, p = rss_pss_kib(pid)
            rss, pss = rss + r, pss + p
    return {"rss_mib": round(rss / 1024, 1), "pss_mib": round(pss / 1024, 1)}


async def memory(server: ServerProcess) -> dict[str, Any]:
    sandbox = await Sandbox.create("ubuntu", connection_config=sdk_config(server), entrypoint=ENTRYPOINT)
    record = next(r for r in server.records() if r["id"] == sandbox.id)
    pid = int(str(record["pid"]))
    figures: dict[str, Any] = {"execd_idle": process_memory(descendants(pid), "jail_init")}
    interpreter = await CodeInterpreter.create(sandbox)
    await interpreter.codes.run("1+1")
    await asyncio.sleep(2)  # idle
    pids = descendants(pid)
    figures["with_one_python_kernel"] = {
        "execd": process_memory(pids, "jail_init"),
        "kernel_bridge": process_memory(pids, "kernel_bridge.py"),
        "python_kernel": process_memory(pids, "ipykernel_launcher"),
    }
    parts = figures["with_one_python_kernel"]
    figures["with_one_python_kernel"]["total"] = {
        key: round(sum(p[key] for p in list(parts.values())), 1) for key in ("rss_mib", "pss_mib")
    }
    await interpreter.aclose()
    await sandbox.kill()
    await sandbox.close()
    return figures


def with_server(workdir: Path, extra_config: str, job: Any) -> Any:
    server = ServerProcess(workdir, extra_config=extra_config).start()
    try:
        return asyncio.run(job(server))
    finally:
        server.stop()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=30, help="samples per create variant")
    parser.add_argument("--runs", type=int, default=300, help="warm round trips per client")
    parser.add_argument("--spacing", type=float, default=3.0, help="seconds between creates (pool refill)")
    args = parser.parse_args(argv)

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="code-bench-") as tmp:
        work = Path(tmp)
        results["warm_run"] = with_server(work / "warm-run", "warmPoolSize = 1", lambda s: warm_run(s, args.runs))
        print("warm run", results["warm_run"], flush=True)
        results["memory"] = with_server(work / "memory", "warmPoolSize = 0", memory)
        print("memory", results["memory"], flush=True)
        variants = {
            "warm_pool_prestarted_kernel": 'warmPoolSize = 2\ncodePrestart = "python"',
            "warm_pool_no_prestart": "warmPoolSize = 2",
            "cold": "warmPoolSize = 0",
        }
        for name, config in variants.items():
            job = lambda s: create_to_first_result(s, args.n, args.spacing)  # noqa: E731
            results[name] = with_server(work / name, config, job)
            print(name, results[name]["create_to_first_result"], flush=True)
    write("code", {"params": vars(args), **results})


if __name__ == "__main__":
    main(sys.argv[1:])
