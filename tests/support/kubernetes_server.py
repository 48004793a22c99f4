"""Run `opensandbox-server` with the kubernetes runtime as a real subprocess on 127.0.0.1.

Its sandboxes are BatchSandboxes in the given namespace (deleted with the test's namespace); the
controller that serves them is the test's own (`tests/support/controller.py`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from opensandbox_platform.api import labels
from tests.conftest import TEST_IMAGE
from tests.support.ports import free_port
from tests.support.real_node import NODE_LABEL, NODE_TAINT_KEY


@dataclass
class KubernetesServer:
    workdir: Path
    namespace: str
    kubeconfig: Path
    extra_config: str = ""  # more keys for [kubernetes] (TOML)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def domain(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.domain}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    def config(self) -> str:
        return (
            '[server]\nlogLevel = "INFO"\n\n[runtime]\ntype = "kubernetes"\n\n'
            f'[kubernetes]\nnamespace = "{self.namespace}"\nkubeconfig = "{self.kubeconfig}"\n{self.extra_config}\n'
        )

    def start(self) -> KubernetesServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "server.toml"
        config_path.write_text(self.config())
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "opensandbox_platform.server.main", "--config", str(config_path),
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
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def kubernetes_server(
    workdir: Path, namespace: str, kubeconfig: Path, extra_config: str = ""
) -> Iterator[KubernetesServer]:
    server = KubernetesServer(workdir, namespace, kubeconfig, extra_config).start()
    try:
        yield server
    finally:
        server.stop()


# --- the real node (OSB_REAL_NODE=1) ---------------------------------------------------------------
EXECD_IMAGE = "localhost/opensandbox/execd:dev"  # as podman and the node's containerd name it
PLACEMENT: dict[str, Any] = {
    "nodeSelector": {NODE_LABEL[0]: NODE_LABEL[1]},
    "tolerations": [{"key": NODE_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}],
    "terminationGracePeriodSeconds": 1,
}
SMALL = {"cpu": "250m", "memory": "128Mi"}  # the node has 2 CPUs: the SDK's default (1 CPU) fits twice


def real_node_server_config() -> str:
    """`[kubernetes]` keys: direct-mode pods go to the real node, with the image already loaded there."""
    return (
        'imagePullPolicy = "Never"\ncreateTimeoutSeconds = 90\n'
        "[kubernetes.defaultPodSpec]\n"
        f'nodeSelector = {{"{NODE_LABEL[0]}" = "{NODE_LABEL[1]}"}}\n'
        f'tolerations = [{{key = "{NODE_TAINT_KEY}", operator = "Exists", effect = "NoSchedule"}}]\n'
        "terminationGracePeriodSeconds = 1\n"
    )


def real_pool(name: str, size: int) -> dict[str, Any]:
    container = {"name": labels.SANDBOX_CONTAINER, "image": TEST_IMAGE, "imagePullPolicy": "Never"}
    return {
        "apiVersion": labels.API_VERSION,
        "kind": "Pool",
        "metadata": {"name": name},
        "spec": {
            "minBufferSize": size,
            "maxBufferSize": size,
            "capacity": size + 4,
            "sandboxTemplate": {"spec": {**PLACEMENT, "containers": [container]}},
        },
    }
