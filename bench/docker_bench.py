"""Docker runtime benchmark: `Sandbox.create` -> first `commands.run("true")` through the server
with `runtime.type = "docker"` (podman's Docker API at DOCKER_HOST), direct and through the
server proxy, and the time a delete takes; the create's steps (p50 of each, from the server's
`sandbox created` log lines: image inspect, container create, entrypoint check, start, execd ready).
Prints the figures and writes bench/results/docker.json.

Run: `uv run python bench/docker_bench.py [--n 15]` (or `make bench BENCH=docker`), with podman's
service up (`make podman-up`; `source .podman/env`) and build/execd built (`make execd-binary`).
The sandboxes use localhost/opensandbox-test-base:latest; every one is deleted. All traffic goes
to 127.0.0.1 and the local Docker socket.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opensandbox import Sandbox  # noqa: E402
from opensandbox.config import ConnectionConfig  # noqa: E402

from bench.common import summary_ms, write  # noqa: E402
from harness.docker_api import docker_unavailable  # noqa: E402
from harness.server_process import ServerProcess  # noqa: E402


async def create_to_first_command(server: ServerProcess, n: int, proxy: bool) -> dict[str, Any]:
    config = ConnectionConfig(domain=server.domain, use_server_proxy=proxy, disable_metrics=True)
    totals, creates, firsts, deletes = [], [], [], []
    for i in range(n + 1):
        t0 = time.perf_counter()
        sandbox = await Sandbox.create(server.image, connection_config=config)
        t1 = time.perf_counter()
        assert (await sandbox.commands.run("true")).exit_code == 0
        t2 = time.perf_counter()
        await sandbox.kill()
        t3 = time.perf_counter()
        await sandbox.close()
        if i >= 1:  # the first one also copies execd into memory and warms the code paths
            totals.append(t2 - t0)
            creates.append(t1 - t0)
            firsts.append(t2 - t1)
            deletes.append(t3 - t2)
    return {
        "create_to_first_command": summary_ms(totals),
        "sdk_create": summary_ms(creates),
        "first_command": summary_ms(firsts),
        "delete": summary_ms(deletes),
    }


def create_steps(log: str) -> dict[str, float]:
    """The p50 of each step of the runtime's creates (its `sandbox created` lines), the first one left
    out (it also makes execd's volume)."""
    lines = [line for line in log.splitlines() if 'msg="sandbox created"' in line][1:]
    steps: dict[str, list[float]] = {}
    for line in lines:
        for step, value in re.findall(r"\b(\w*ms)=(\d+)", line):
            steps.setdefault(step, []).append(float(value))
    return {step: statistics.median(values) for step, values in steps.items()}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=15, help="create -> first command samples per variant")
    args = parser.parse_args(argv)
    reason = docker_unavailable()
    if reason:
        print(f"docker bench skipped: {reason}")
        return
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="docker-bench-") as tmp:
        server = ServerProcess(Path(tmp), runtime="docker").start()
        try:
            for name, proxy in (("direct", False), ("server_proxy", True)):
                results[name] = asyncio.run(create_to_first_command(server, args.n, proxy))
                print(name, results[name]["create_to_first_command"], flush=True)
            results["server_create_steps_p50_ms"] = create_steps(server.logs())
            print("server's create steps (p50 ms)", results["server_create_steps_p50_ms"], flush=True)
        finally:
            server.stop()
    write("docker", {"params": vars(args), **results})


if __name__ == "__main__":
    main(sys.argv[1:])
