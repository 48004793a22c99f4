"""Runs the real `opensandbox-controller` program against the local cluster, as a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from harness.paths import ROOT, sandbox_token_key
from harness.ports import free_port
from harness.services import LocalCluster


class ControllerProcess:
    def __init__(self, cluster: LocalCluster, namespace: str, *extra: str, log_dir: Path | None = None) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.extra = extra
        self.health_port = free_port()
        self.log_path = (log_dir or ROOT / ".cluster" / "logs") / f"controller-{namespace}-{self.health_port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True) -> ControllerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        args = [
            sys.executable, "-m", "opensandbox_platform.controller.main",
            "--kubeconfig", str(self.cluster.kubeconfig),
            "--namespace", self.namespace,
            "--health-probe-bind-address", f"127.0.0.1:{self.health_port}",
            "--metrics-bind-address", "0",
            "--log-level", "4",
            "--sandbox-token-key-file", str(sandbox_token_key()),
            *self.extra,
        ]  # fmt: skip
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, f"controller exited: {self.logs()[-3000:]}"
            try:
                if httpx.get(f"http://127.0.0.1:{self.health_port}/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"controller not ready in {timeout}s: {self.logs()[-3000:]}")

    def logs(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, as a crash or an OOM kill."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
