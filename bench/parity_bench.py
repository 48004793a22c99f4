"""SDK-parity benchmark (issue 19), local and docker runtimes: `Sandbox.create` latency with no
volume, one host volume and one pvc volume (an existing one: its first create, which makes it, is
left out), and the server proxy's cost of a signed endpoint against the plain proxy (`GET /ping` of
execd, sequential, one connection). Prints the figures and writes bench/results/parity.json.

Run: `uv run python bench/parity_bench.py [--n 20] [--requests 300] [--runtimes local,docker]`
(or `make bench BENCH=parity`). Each runtime gets its own `opensandbox-server` subprocess on
127.0.0.1 (docker: podman's service, started if it is not running); every sandbox and the pvc
volume are deleted at the end. All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from opensandbox import Sandbox  # noqa: E402
from opensandbox.config import ConnectionConfig  # noqa: E402
from opensandbox.models.sandboxes import PVC, Host, Volume  # noqa: E402

from bench.common import summary_ms, write  # noqa: E402
from harness.docker_api import docker_api  # noqa: E402
from harness.server_process import ServerProcess, running_server  # noqa: E402
from harness.services import podman_docker_host  # noqa: E402

EXECD_PORT = 44772


def sdk_config(server: ServerProcess, proxy: bool = False) -> ConnectionConfig:
    return ConnectionConfig(domain=server.domain, use_server_proxy=proxy, disable_metrics=True)


async def create_latency(server: ServerProcess, n: int, **create: Any) -> dict[str, float]:
    """`Sandbox.create` returning (the sandbox Running, execd answering), then deleted; two warm-ups."""
    samples = []
    for i in range(n + 2):
        t0 = time.perf_counter()
        sandbox = await Sandbox.create(server.image, connection_config=sdk_config(server), **create)
        elapsed = time.perf_counter() - t0
        await sandbox.kill()
        await sandbox.close()
        if i >= 2:
            samples.append(elapsed)
    return summary_ms(samples)


async def proxy_overhead(server: ServerProcess, requests: int) -> dict[str, Any]:
    """The same `GET /ping` through the plain proxy (API key + the SDK's endpoint headers) and through
    a signed endpoint (no key: the token in the path is checked per request)."""
    sandbox = await Sandbox.create(server.image, connection_config=sdk_config(server, proxy=True))
    try:
        plain = await sandbox.get_endpoint(EXECD_PORT)
        signed = await sandbox.get_signed_endpoint(EXECD_PORT, int(time.time()) + 3600)
        figures: dict[str, Any] = {}
        for name, url, headers in (
            ("plain_proxy", f"http://{plain.endpoint}/ping", {**server.headers(), **(plain.headers or {})}),
            ("signed_endpoint", f"http://{signed.endpoint}/ping", {}),
        ):
            async with httpx.AsyncClient(timeout=10, headers=headers) as client:
                for _ in range(20):  # warm-up, and the connection opened
                    (await client.get(url)).raise_for_status()
                samples = []
                for _ in range(requests):
                    t0 = time.perf_counter()
                    (await client.get(url)).raise_for_status()
                    samples.append(time.perf_counter() - t0)
            figures[name] = summary_ms(samples)
        figures["signed_minus_plain_p50_ms"] = round(
            figures["signed_endpoint"]["p50_ms"] - figures["plain_proxy"]["p50_ms"], 3
        )
        return figures
    finally:
        await sandbox.kill()
        await sandbox.close()


async def run_runtime(runtime: str, n: int, requests: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"parity-bench-{runtime}-") as workdir:
        allowed = Path(workdir) / "allowed"
        (allowed / "data").mkdir(parents=True)
        claim = f"bench-{uuid.uuid4().hex[:8]}"
        config = f'allowedHostPaths = ["{allowed}"]'
        with running_server(Path(workdir) / "server", runtime=runtime, server_config=config) as server:
            host = [Volume(name="data", mount_path="/data", host=Host(path=str(allowed / "data")))]
            pvc = [Volume(name="cache", mount_path="/cache", pvc=PVC(claim_name=claim))]
            try:
                await create_latency(server, 1, volumes=pvc)  # makes the volume (its figures are left out)
                return {
                    "create_no_volume": await create_latency(server, n),
                    "create_one_host_volume": await create_latency(server, n, volumes=host),
                    "create_one_pvc_volume": await create_latency(server, n, volumes=pvc),
                    "proxy": await proxy_overhead(server, requests),
                }
            finally:
                if runtime == "docker":
                    with contextlib.suppress(Exception):
                        docker_api("DELETE", f"/volumes/{claim}", params={"force": "true"})


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20, help="creates per case")
    parser.add_argument("--requests", type=int, default=300, help="proxied requests per case")
    parser.add_argument("--runtimes", default="local,docker")
    args = parser.parse_args(argv)
    figures: dict[str, Any] = {"n": args.n, "requests": args.requests}
    for runtime in args.runtimes.split(","):
        print(f"-- {runtime}", flush=True)
        with podman_docker_host() if runtime == "docker" else contextlib.nullcontext():
            figures[runtime] = asyncio.run(run_runtime(runtime, args.n, args.requests))
    write("parity", figures)


if __name__ == "__main__":
    main(sys.argv[1:])
