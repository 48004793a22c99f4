"""What acting as another user costs in execd's files API: the same calls as execd itself (root)
and under `/v1/filesystem/1000/1000/...` (each filesystem step in a thread that becomes uid 1000,
execd/identity.py). Prints the figures and writes bench/results/execd_identity.json.

Run as root (execd must be allowed to switch users): `uv run python bench/execd_identity_bench.py
[--n 300]`. All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.common import summary_ms, write  # noqa: E402
from harness.execd_process import run_execd  # noqa: E402

UID = GID = 1000


def timed(n: int, call: Callable[[], httpx.Response]) -> list[float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        response = call()
        samples.append(time.perf_counter() - t0)
        assert response.status_code == 200, response.text
    return samples


def operations(client: httpx.Client, prefix: str, path: str) -> dict[str, Callable[[], httpx.Response]]:
    directory = os.path.dirname(path)
    payload = os.urandom(4096)
    upload = {"metadata": ("metadata", f'{{"path": "{path}", "mode": 644}}', "application/json")}
    return {
        "info": lambda: client.get(f"{prefix}/files/info", params={"path": path}),
        "download_4k": lambda: client.get(f"{prefix}/files/download", params={"path": path}),
        "upload_4k": lambda: client.post(f"{prefix}/files/upload", files={**upload, "file": ("f", payload)}),
        "list": lambda: client.get(f"{prefix}/directories/list", params={"path": directory}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=300)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: execd must be allowed to switch users")
    figures: dict[str, Any] = {"n": args.n, "uid": UID}
    with tempfile.TemporaryDirectory() as work:
        shared = Path(work) / "shared"
        shared.mkdir()
        os.chmod(work, 0o755)
        os.chown(shared, UID, GID)
        with run_execd(Path(work) / "execd") as execd, httpx.Client(base_url=execd.url, timeout=30) as client:
            for who, prefix in (("execd", ""), ("identity", f"/v1/filesystem/{UID}/{GID}")):
                calls = operations(client, prefix, f"{shared}/{who}.bin")  # each its own file
                calls["upload_4k"]()  # the file exists before anything reads it
                for name, call in calls.items():
                    timed(20, call)  # warm up
                    figures[f"{who}_{name}"] = summary_ms(timed(args.n, call))
    write("execd_identity", figures)


if __name__ == "__main__":
    main()
