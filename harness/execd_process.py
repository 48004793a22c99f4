"""Start execd as a real subprocess on 127.0.0.1 (the SDK tests reach it through the server, the execd
benchmark through harness/lifecycle_stub.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from harness.ports import free_port

MODULE = "opensandbox_platform.execd.main"


@dataclass
class Execd:
    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path
    token: str | None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def headers(self) -> dict[str, str]:
        return {"X-EXECD-ACCESS-TOKEN": self.token} if self.token else {}


@contextmanager
def run_execd(workdir: Path, token: str | None = None, extra_env: dict[str, str] | None = None) -> Iterator[Execd]:
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "EXECD_ENVS": str(workdir / "envs" / ".env"),
        "EXECD_STATE_DIR": str(workdir / "state"),
        **(extra_env or {}),
    }
    # EXECD_BINARY runs the suite against a packaged build (tools/build-execd.sh) instead.
    program = [os.environ["EXECD_BINARY"]] if os.environ.get("EXECD_BINARY") else [sys.executable, "-m", MODULE]
    args = [*program, "--host", "127.0.0.1", "--port", str(port)]
    if token:
        args += ["--access-token", token]
    log = open(workdir / "execd.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(args, env=env, cwd=workdir, stdout=log, stderr=log)
    execd = Execd(proc, port, workdir, token)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"execd exited: {(workdir / 'execd.log').read_text()}")
            try:
                if httpx.get(f"{execd.url}/ping", headers=execd.headers(), timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("execd did not answer /ping")
            time.sleep(0.05)
        yield execd
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
