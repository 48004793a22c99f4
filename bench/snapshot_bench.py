"""Snapshots benchmark, per runtime (local jail, docker container on podman): through the official SDK,
for a sandbox with an empty workspace and with 10, 50 and 200 MiB of random data in it: the time
from `create_snapshot()` to the snapshot Ready (polled every 50 ms), and from
`Sandbox.create(snapshot_id=...)` to the first command's answer in the restored sandbox, with what
the snapshot takes on disk (local: the store's new bytes; docker: the image's size). Also pause ->
resume -> first command. Prints the figures and writes bench/results/snapshots-RUNTIME.json.

Run: `uv run python bench/snapshot_bench.py [--n 3] [--runtimes local,docker]` (docker: podman's
service up, `source .podman/env`, build/execd built). All traffic goes to 127.0.0.1 and the local
Docker socket.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opensandbox import Sandbox, SandboxManager  # noqa: E402
from opensandbox.config import ConnectionConfig  # noqa: E402

from bench.common import summary_ms, write  # noqa: E402
from harness.docker_api import docker_unavailable  # noqa: E402
from harness.server_process import ServerProcess  # noqa: E402

SIZES_MIB = (0, 10, 50, 200)
RESOURCE = {"cpu": "1", "memory": "1Gi"}


def stored_bytes(server: ServerProcess, snapshot_id: str) -> int:
    """What the snapshot takes: local, the store's blobs (shared ones included); docker, the image."""
    if server.runtime == "local":
        blobs = server.state_dir / "snapshots" / "blobs"
        return sum(p.stat().st_size for p in blobs.rglob("*") if p.is_file())
    out = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Size}}", f"opensandbox-snapshot:{snapshot_id}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip())


async def until_ready(manager: SandboxManager, snapshot_id: str) -> None:
    """Poll as a client must (the API has no event for it)."""
    for _ in range(6000):
        info = await manager.get_snapshot(snapshot_id)
        if info.status.state != "Creating":
            assert info.status.state == "Ready", info.status
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"snapshot {snapshot_id} still Creating after 300 s")


async def one_size(server: ServerProcess, config: ConnectionConfig, mib: int, n: int) -> dict[str, Any]:
    manager = await SandboxManager.create(config)
    snaps, restores, sizes = [], [], []
    source = await Sandbox.create(server.image, connection_config=config, resource=RESOURCE)
    try:
        if mib:
            write_data = f"head -c {mib << 20} /dev/urandom > /workspace/data"
            assert (await source.commands.run(write_data)).error is None
        for _ in range(n):
            t0 = time.perf_counter()
            snapshot = await source.create_snapshot()
            await until_ready(manager, snapshot.id)
            t1 = time.perf_counter()
            restored = await Sandbox.create(snapshot_id=snapshot.id, connection_config=config, resource=RESOURCE)
            assert (await restored.commands.run("true")).error is None
            t2 = time.perf_counter()
            sizes.append(stored_bytes(server, snapshot.id))
            await restored.kill()
            await restored.close()
            await manager.delete_snapshot(snapshot.id)
            snaps.append(t1 - t0)
            restores.append(t2 - t1)
    finally:
        await source.kill()
        await source.close()
        await manager.close()
    return {
        "workspace_mib": mib,
        "snapshot_to_ready": summary_ms(snaps),
        "restore_to_first_command": summary_ms(restores),
        "stored_mib": round(max(sizes) / (1 << 20), 1),
    }


async def resume_figures(server: ServerProcess, config: ConnectionConfig, n: int) -> dict[str, Any]:
    sandbox = await Sandbox.create(server.image, connection_config=config, resource=RESOURCE)
    samples = []
    try:
        for _ in range(n):
            await sandbox.pause()
            t0 = time.perf_counter()
            resumed = await Sandbox.resume(sandbox.id, connection_config=config)
            assert (await resumed.commands.run("true")).error is None
            samples.append(time.perf_counter() - t0)
            await resumed.close()
    finally:
        await sandbox.kill()
        await sandbox.close()
    return {"resume_to_first_command": summary_ms(samples)}


async def runtime_figures(server: ServerProcess, n: int) -> dict[str, Any]:
    config = ConnectionConfig(domain=server.domain, request_timeout=timedelta(seconds=300), disable_metrics=True)
    out: dict[str, Any] = {"sizes": []}
    for mib in SIZES_MIB:
        figures = await one_size(server, config, mib, n)
        print(server.runtime, figures, flush=True)
        out["sizes"].append(figures)
    out["pause_resume"] = await resume_figures(server, config, max(n, 5))
    print(server.runtime, out["pause_resume"], flush=True)
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=3, help="snapshot + restore samples per size")
    parser.add_argument("--runtimes", default="local,docker")
    args = parser.parse_args(argv)
    for runtime in [r.strip() for r in args.runtimes.split(",") if r.strip()]:
        if runtime == "docker" and (reason := docker_unavailable()):
            print(f"docker skipped: {reason}")
            continue
        load = os.getloadavg()[0]
        with tempfile.TemporaryDirectory(prefix=f"snapshot-bench-{uuid.uuid4().hex[:6]}-") as tmp:
            server = ServerProcess(Path(tmp), runtime=runtime).start()
            try:
                figures = asyncio.run(runtime_figures(server, args.n))
            finally:
                server.stop()
        write(f"snapshots-{runtime}", {"params": {"n": args.n}, "load_average_at_start": load, **figures})


if __name__ == "__main__":
    main(sys.argv[1:])
