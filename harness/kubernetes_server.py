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

from harness.images import TEST_IMAGE, built_image
from harness.kube import pool_manifest
from harness.paths import sandbox_token_key
from harness.real_node import NODE_LABEL, NODE_TAINT_KEY, RealNode, real_node_pod_spec
from harness.registry import Registry
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


# --- snapshots and pause/resume (docs/snapshots.md) ---------------------------------------------------------
COMMITTER_IMAGE = "opensandbox/server:v0.1.0"  # the server's own image (the chart's tests build it too)
SNAPSHOT_BASE = ("osb-tests/snapshot-base", "v1")


def load_committer_image(node: RealNode) -> str:
    node.load_image(built_image("server", COMMITTER_IMAGE))
    return COMMITTER_IMAGE


def registry_base_image(registry: Registry) -> str:
    """The test image in the cluster registry (pushed once): a snapshot is a layer over an image a
    registry holds."""
    repository, tag = SNAPSHOT_BASE
    try:
        present = tag in registry.tags(repository)
    except Exception:  # a registry that never saw the repository answers 404
        present = False
    reference = registry.reference(repository, tag)
    if not present:
        registry.push(TEST_IMAGE, reference)
    return reference


def snapshot_server_config(
    registry: Registry, committer_image: str, max_size_mib: int = 4096, registry_secret: str = ""
) -> str:
    """`[kubernetes]` keys of real_node_server_config with snapshots to `registry` (with the credentials
    of the Secret `registry_secret`, if given); images are pulled (the sandboxes' base image and
    snapshot images are the registries')."""
    pulls = real_node_server_config().replace('imagePullPolicy = "Never"', 'imagePullPolicy = "IfNotPresent"')
    keys = (
        f'snapshotRepository = "{registry.address}/osb-tests/snapshots"\n'
        f'snapshotRegistryCaFile = "{registry.ca}"\n'
        f'snapshotCommitterImage = "{committer_image}"\n'
        f"snapshotMaxSizeMib = {max_size_mib}\n"
    )
    if registry_secret:
        keys += f'snapshotRegistrySecret = "{registry_secret}"\n'
    head, table, rest = pulls.partition("[kubernetes.defaultPodSpec]")
    return head + keys + table + rest
