"""`opensandbox-server` as a real subprocess on 127.0.0.1: its config written to its workdir, started,
waited for on /health, stopped with SIGTERM.

What the config says is the subclasses': tests/e2e/server_support.py (local and docker runtimes) and
tests/support/kubernetes_server.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import httpx

from tests.support.ports import free_port


@dataclass
class ServerSubprocess:
    workdir: Path
    port: int = field(default_factory=free_port, kw_only=True)
    proc: subprocess.Popen[bytes] | None = field(default=None, kw_only=True)

    def config(self) -> str:
        """The server's TOML config."""
        raise NotImplementedError

    @property
    def config_path(self) -> Path:
        return self.workdir / "server.toml"

    @property
    def domain(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.domain}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    def start(self) -> Self:
        """Starts the server and returns once it answers /health (RuntimeError with its log if not)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config())
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "opensandbox_platform.server.main", "--config", str(self.config_path),
                 "--port", str(self.port)],
                stdout=log, stderr=log,
                env={k: v for k, v in os.environ.items() if not k.startswith("OPEN_SANDBOX_")},
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.logs()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not answer /health: {self.logs()[-3000:]}")
            time.sleep(0.05)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
