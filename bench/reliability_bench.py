"""Reliability figures (issue 16): other clients' `/health` latency while the server is attacked,
and 150 concurrent creates on the local runtime.

`uv run python bench/reliability_bench.py [--seconds 8] [--creates 150]` prints the figures and
writes bench/results/reliability.json. Each attack runs in its own process (harness/abuse.py) while
a probe in this one sends `GET /health` every 20 ms on a kept-alive connection, as an SDK's pool
does; the target is a p99 within 2x of the idle one. The server is the shipped defaults (local
runtime, an API key) but for `server.maxConnections`, set lower than the idle attack's sockets so
that the cap is what is measured, not the descriptor limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from bench.common import summary_ms, write
from harness.abuse import attack_process, probing
from harness.server_process import ServerProcess, running_server

KEY = "bench-key"
ATTACKS: dict[str, dict[str, int | float]] = {
    "huge_header_96MiB": {"size": 96 << 20},
    "slowloris_200": {"connections": 200, "interval": 0.5},
    "idle_sockets_2000_without_key": {"connections": 2000},
}
ATTACK_NAMES = {
    "huge_header_96MiB": "huge-header",
    "slowloris_200": "slowloris",
    "idle_sockets_2000_without_key": "idle",
}


def open_fds(server: ServerProcess) -> int:
    assert server.proc is not None
    return len(list(Path(f"/proc/{server.proc.pid}/fd").iterdir()))


def health_during(server: ServerProcess, seconds: float, attack: str | None) -> dict[str, Any]:
    most_fds = open_fds(server)
    with probing(server.port) as probe:
        counts: dict[str, Any] = {}
        if attack is None:
            time.sleep(seconds)
        else:
            proc = attack_process(ATTACK_NAMES[attack], server.port, seconds, **ATTACKS[attack])
            while proc.poll() is None:
                most_fds = max(most_fds, open_fds(server))
                time.sleep(0.2)
            out, _ = proc.communicate(timeout=120)
            counts = json.loads(out.strip().splitlines()[-1])
    return {"health": probe.summary(), "attack": counts, "server_fds_max": most_fds}


async def burst(server: ServerProcess, n: int) -> dict[str, Any]:
    body = {"image": {"uri": server.image}, "entrypoint": ["tail", "-f", "/dev/null"], "timeout": 600}
    headers = {"OPEN-SANDBOX-API-KEY": KEY}
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=n + 10)) as client:

        async def one() -> tuple[int, float, str]:
            started = time.monotonic()
            response = await client.post(f"{server.url}/v1/sandboxes", json=body, headers=headers)
            return response.status_code, time.monotonic() - started, response.json().get("id", "")

        started = time.monotonic()
        results = await asyncio.gather(*(one() for _ in range(n)))
        wall = time.monotonic() - started
        created = [sandbox_id for status, _, sandbox_id in results if status == 202]
        await asyncio.gather(*(client.delete(f"{server.url}/v1/sandboxes/{i}", headers=headers) for i in created))
    outcomes: dict[str, int] = {}
    for status, _, _ in results:
        outcomes[str(status)] = outcomes.get(str(status), 0) + 1
    by_status = {
        str(status): summary_ms([seconds for s, seconds, _ in results if s == status])
        for status in {s for s, _, _ in results}
    }
    return {"creates": n, "outcomes": outcomes, "wall_s": round(wall, 2), "latency_by_status": by_status}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--seconds", type=float, default=12.0, help="duration of each attack (past the 10 s header timeout)"
    )
    parser.add_argument("--creates", type=int, default=150, help="concurrent creates on the local runtime")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"seconds_per_attack": args.seconds}
    with tempfile.TemporaryDirectory(prefix="reliability-bench-") as tmp:
        with running_server(Path(tmp) / "attacks", api_key=KEY, server_config="maxConnections = 512") as server:
            results["idle"] = health_during(server, args.seconds, None)
            print("idle", results["idle"]["health"], flush=True)
            for attack in ATTACKS:
                results[attack] = health_during(server, args.seconds, attack)
                ratio = results[attack]["health"].get("p99_ms", 0) / max(results["idle"]["health"]["p99_ms"], 0.01)
                results[attack]["p99_vs_idle"] = round(ratio, 2)
                print(attack, results[attack]["health"], f"p99 x{ratio:.2f}", results[attack]["attack"], flush=True)
        with running_server(Path(tmp) / "burst", api_key=KEY) as server:
            results["concurrent_creates_local"] = asyncio.run(burst(server, args.creates))
            print("creates", results["concurrent_creates_local"], flush=True)
    write("reliability", results)


if __name__ == "__main__":
    main(sys.argv[1:])
