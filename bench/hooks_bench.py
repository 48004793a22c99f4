"""Lifecycle hooks benchmark (issue 19), local and docker runtimes: `Sandbox.create` latency without
hooks, with a trivial `preStart` (`true`: what running a hook before the entrypoint costs: on
docker the start gate and execd's `POST /lifecycle`), and with one periodic hook. Prints the figures
and writes bench/results/hooks.json.

Run: `uv run python bench/hooks_bench.py [--n 15] [--runtimes local,docker]` (or `make bench
BENCH=hooks`). Each runtime gets its own `opensandbox-server` subprocess on 127.0.0.1 (docker:
podman's service, started if it is not running); every sandbox is deleted. All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opensandbox.models.sandboxes import LifecycleHook, PeriodicLifecycleHook, SandboxLifecycle  # noqa: E402

from bench.common import write  # noqa: E402
from bench.parity_bench import create_latency  # noqa: E402
from harness.server_process import running_server  # noqa: E402
from harness.services import podman_docker_host  # noqa: E402

CASES: dict[str, SandboxLifecycle | None] = {
    "create_no_hooks": None,
    "create_pre_start_true": SandboxLifecycle(pre_start=LifecycleHook(command=["true"])),
    "create_one_periodic_hook": SandboxLifecycle(
        periodic=[PeriodicLifecycleHook(name="tick", schedule="@every 30s", command=["true"])]
    ),
}


async def run_runtime(runtime: str, n: int) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix=f"hooks-bench-{runtime}-") as workdir,
        running_server(Path(workdir) / "server", runtime=runtime) as server,
    ):
        figures = {}
        for name, hooks in CASES.items():
            figures[name] = await create_latency(server, n, lifecycle=hooks)
            print(f"{runtime} {name}: {figures[name]}", flush=True)
        return figures


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=15, help="creates per case")
    parser.add_argument("--runtimes", default="local,docker")
    args = parser.parse_args(argv)
    figures: dict[str, Any] = {"n": args.n}
    for runtime in args.runtimes.split(","):
        print(f"-- {runtime}", flush=True)
        with podman_docker_host() if runtime == "docker" else contextlib.nullcontext():
            figures[runtime] = asyncio.run(run_runtime(runtime, args.n))
    write("hooks", figures)


if __name__ == "__main__":
    main(sys.argv[1:])
