"""Run `opensandbox-server` with the kubernetes runtime as a real subprocess on 127.0.0.1.

Its sandboxes are BatchSandboxes in the given namespace (deleted with the test's namespace); the
controller that serves them is the test's own (`harness/controller_process.py`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.kube import pool_manifest
from harness.paths import sandbox_token_key
from harness.real_node import NODE_LABEL, NODE_TAINT_KEY, real_node_pod_spec
from harness.server_process import ServerSubprocess


@dataclass
class KubernetesServer(ServerSubprocess):
    namespace: str
    kubeconfig: Path
    extra_config: str = ""  # more keys for [kubernetes] (TOML)
    server_config: str = ""  # more keys for [server] (TOML)

    def config(self) -> str:
        return (
            f'[server]\nlogLevel = "INFO"\n{self.server_config}\n\n[runtime]\ntype = "kubernetes"\n\n'
            f'[kubernetes]\nnamespace = "{self.namespace}"\nkubeconfig = "{self.kubeconfig}"\n'
            f'sandboxTokenKeyFile = "{sandbox_token_key()}"\n{self.extra_config}\n'
        )


@contextmanager
def kubernetes_server(
    workdir: Path, namespace: str, kubeconfig: Path, extra_config: str = "", server_config: str = ""
) -> Iterator[KubernetesServer]:
    server = KubernetesServer(workdir, namespace, kubeconfig, extra_config, server_config).start()
    try:
        yield server
    finally:
        server.stop()


# --- the real node (on unless OSB_REAL_NODE=0) ---------------------------------------------------------------
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
    return pool_manifest(name, real_node_pod_spec(), minimum=size, maximum=size, capacity=size + 4)
