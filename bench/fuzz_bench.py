"""The long fuzzing run: schemathesis against the server (local runtime, a real sandbox's id) and
against execd in a jail, with many more examples per operation than tests/e2e/test_fuzz.py.

`uv run python bench/fuzz_bench.py [--examples 200] [--seed N]` prints the counts and writes
bench/results/fuzz.json; it fails (exit 1) on any failure, and checks that nothing is left behind.
Which checks run, and the few that are off for a reason, are in harness/fuzz.py.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from bench.common import write
from harness import fuzz
from harness.server_process import ServerProcess, running_server

KEY = "fuzz-key"


def _create(server: ServerProcess) -> str:
    body = {"image": {"uri": server.image}, "entrypoint": ["tail", "-f", "/dev/null"], "timeout": 3600}
    response = httpx.post(f"{server.url}/v1/sandboxes", json=body, headers=server.headers(), timeout=60)
    response.raise_for_status()
    sandbox_id: str = response.json()["id"]
    return sandbox_id


def _summary(run: fuzz.FuzzRun, seconds: float) -> dict[str, Any]:
    return {"ok": run.ok, "generated": run.generated, "passed": run.passed, "seconds": round(seconds, 1)}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--examples", type=int, default=200, help="examples per operation")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"examples_per_operation": args.examples}
    failed = False
    with (
        tempfile.TemporaryDirectory(prefix="fuzz-bench-") as tmp,
        running_server(Path(tmp) / "server", api_key=KEY, extra_config="warmPoolSize = 1") as server,
    ):
        work = Path(tmp)
        sandbox_id = _create(server)
        started = time.monotonic()
        run = fuzz.run(
            f"{server.url}/openapi.json",
            fuzz.server_config(sandbox_id),
            work / "fuzz-server",
            headers=server.headers(),
            max_examples=args.examples,
            seed=args.seed,
            timeout=3600,
        )
        results["server"] = _summary(run, time.monotonic() - started)
        print("server", results["server"], flush=True)
        if not run.ok:
            failed = True
            print(run.tail(), flush=True)

        # A sandbox of its own: the server's run may have left the first one paused (it fuzzes pause too).
        execd_sandbox = _create(server)
        endpoint = httpx.get(
            f"{server.url}/v1/sandboxes/{execd_sandbox}/endpoints/44772", headers=server.headers()
        ).json()
        started = time.monotonic()
        run = fuzz.run(
            fuzz.execd_document(work / "execd-api.json"),
            fuzz.EXECD_CONFIG,
            work / "fuzz-execd",
            base_url=f"http://{endpoint['endpoint']}",
            headers=endpoint["headers"],
            max_examples=args.examples,
            seed=args.seed,
            timeout=3600,
        )
        results["execd"] = _summary(run, time.monotonic() - started)
        print("execd", results["execd"], flush=True)
        if not run.ok:
            failed = True
            print(run.tail(), flush=True)

        listed = httpx.get(f"{server.url}/v1/sandboxes", params={"pageSize": 200}, headers=server.headers()).json()
        results["sandboxes_left_by_the_fuzzers"] = len(listed["items"]) - 2
        for item in listed["items"]:
            httpx.delete(f"{server.url}/v1/sandboxes/{item['id']}", headers=server.headers(), timeout=30)
    write("fuzz", results)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
