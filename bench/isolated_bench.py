"""Isolated sessions benchmark, per runtime (local jail, docker container): through the official SDK,
`sandbox.isolation.create(...)` -> first `session.run("true")` (the figure the issue asks for), a warm
run, the delete; the same for an overlay of the whole root `/`; and diff + commit of a pip-like change
(500 files, 5 MiB). Also execd's capabilities probe (its first answer measures a real session).
Prints the figures and writes bench/results/isolated.json.

Run: `uv run python bench/isolated_bench.py [--n 30] [--runtimes local,docker]` (docker: podman's
service up, `source .podman/env`, build/execd built). All traffic goes to 127.0.0.1 and the local
Docker socket.
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
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from opensandbox import Sandbox  # noqa: E402
from opensandbox.config import ConnectionConfig  # noqa: E402
from opensandbox.models.isolated import (  # noqa: E402
    CreateIsolatedSessionRequest,
    IsolatedOverlaySpec,
    IsolatedWorkspaceSpec,
)

from bench.common import summary_ms, write  # noqa: E402
from harness.docker_api import docker_unavailable  # noqa: E402
from harness.server_process import ServerProcess  # noqa: E402

PIP_LIKE = (
    "site=/workspace/bench/venv/lib/python3/site-packages; for p in $(seq 1 50); do d=$site/pkg$p; mkdir -p $d; "
    "for f in $(seq 1 10); do head -c 10240 /dev/urandom > $d/mod$f.py; done; done"
)


async def sessions(sandbox: Sandbox, request: CreateIsolatedSessionRequest, n: int) -> dict[str, Any]:
    totals, creates, firsts, warms, deletes = [], [], [], [], []
    for i in range(n + 1):
        t0 = time.perf_counter()
        session = await sandbox.isolation.create(request)
        t1 = time.perf_counter()
        assert (await session.run("true")).exit_code == 0
        t2 = time.perf_counter()
        assert (await session.run("true")).exit_code == 0
        t3 = time.perf_counter()
        await session.delete()
        t4 = time.perf_counter()
        if i >= 1:  # the first one warms the code paths (and, on a fresh execd, imports the module)
            totals.append(t2 - t0)
            creates.append(t1 - t0)
            firsts.append(t2 - t1)
            warms.append(t3 - t2)
            deletes.append(t4 - t3)
    return {
        "create_to_first_run": summary_ms(totals),
        "create": summary_ms(creates),
        "first_run": summary_ms(firsts),
        "warm_run": summary_ms(warms),
        "delete": summary_ms(deletes),
    }


async def diff_and_commit(sandbox: Sandbox, n: int) -> dict[str, Any]:
    endpoint = await sandbox.get_endpoint(44772)
    request = CreateIsolatedSessionRequest(workspace=IsolatedWorkspaceSpec(path="/workspace/bench"))
    diffs, commits, writes = [], [], []
    async with httpx.AsyncClient(base_url=f"http://{endpoint.endpoint}", headers=endpoint.headers, timeout=120) as http:
        for _ in range(n):
            session = await sandbox.isolation.create(request)
            t0 = time.perf_counter()
            assert (await session.run(PIP_LIKE)).exit_code == 0
            t1 = time.perf_counter()
            response = await http.get(f"/v1/isolated/session/{session.session_id}/diff")
            t2 = time.perf_counter()
            assert response.json()["summary"]["added"] == 500 + 50 + 4, response.json()["summary"]
            response = await http.post(f"/v1/isolated/session/{session.session_id}/commit")
            t3 = time.perf_counter()
            assert not response.json()["failed"] and len(response.json()["applied"]) == 554
            await session.delete()
            await sandbox.commands.run("rm -rf /workspace/bench/venv")
            writes.append(t1 - t0)
            diffs.append(t2 - t1)
            commits.append(t3 - t2)
    return {
        "change": "50 packages x 10 files of 10 KiB (5 MiB, 554 entries)",
        "write_in_session": summary_ms(writes),
        "diff": summary_ms(diffs),
        "commit": summary_ms(commits),
    }


async def runtime_figures(server: ServerProcess, n: int) -> dict[str, Any]:
    config = ConnectionConfig(domain=server.domain, request_timeout=timedelta(seconds=120), disable_metrics=True)
    sandbox = await Sandbox.create(
        server.image,
        connection_config=config,
        entrypoint=["tail", "-f", "/dev/null"],
        extensions={"bootstrap.execd.isolation": "enable"},
    )
    try:
        await sandbox.commands.run(
            "mkdir -p /workspace/bench && cd /workspace/bench && for i in $(seq 1 200); do echo $i > f$i; done"
        )
        t0 = time.perf_counter()
        caps = await sandbox.isolation.capabilities()
        probe_wall = time.perf_counter() - t0
        endpoint = await sandbox.get_endpoint(44772)
        async with httpx.AsyncClient(headers=endpoint.headers) as http:  # the fields beyond the SDK's model
            extra = (await http.get(f"http://{endpoint.endpoint}/v1/isolated/capabilities")).json()
        out: dict[str, Any] = {
            "capabilities": {
                "available": caps.available,
                "overlay": extra.get("overlay"),
                "proc": extra.get("proc"),
                "kernel": extra.get("kernel"),
                "probe_ms": extra.get("probe_ms"),
                "first_capabilities_call_ms": round(probe_wall * 1000, 1),
            }
        }
        workspace = CreateIsolatedSessionRequest(workspace=IsolatedWorkspaceSpec(path="/workspace/bench"))
        out["workspace_overlay"] = await sessions(sandbox, workspace, n)
        print(server.runtime, "workspace", out["workspace_overlay"]["create_to_first_run"], flush=True)
        root = CreateIsolatedSessionRequest(overlays=[IsolatedOverlaySpec(path="/")])
        out["root_overlay"] = await sessions(sandbox, root, max(5, n // 3))
        print(server.runtime, "root", out["root_overlay"]["create_to_first_run"], flush=True)
        out["diff_commit"] = await diff_and_commit(sandbox, max(3, n // 10))
        print(server.runtime, "diff/commit", json.dumps(out["diff_commit"]), flush=True)
        return out
    finally:
        await sandbox.kill()
        await sandbox.close()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=30, help="create -> first run samples per variant")
    parser.add_argument("--runtimes", default="local,docker")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"load_average_at_start": os.getloadavg()[0]}
    for runtime in [r.strip() for r in args.runtimes.split(",") if r.strip()]:
        if runtime == "docker" and (reason := docker_unavailable()):
            print(f"docker skipped: {reason}")
            continue
        with tempfile.TemporaryDirectory(prefix=f"isolated-bench-{uuid.uuid4().hex[:6]}-") as tmp:
            server = ServerProcess(Path(tmp), runtime=runtime).start()
            try:
                results[runtime] = asyncio.run(runtime_figures(server, args.n))
            finally:
                server.stop()
    results["load_average_at_end"] = os.getloadavg()[0]
    write("isolated", {"params": vars(args), **results})


if __name__ == "__main__":
    main(sys.argv[1:])
