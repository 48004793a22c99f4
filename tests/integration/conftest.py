"""Fixtures of the integration tests on the real node."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.controller_process import ControllerProcess
from harness.images import EXECD_IMAGE, built_image
from harness.kubernetes_server import KubernetesServer, kubernetes_server, real_node_server_config
from harness.real_node import RealNode, RealNodeUnavailable, real_node
from harness.services import LocalCluster


@pytest.fixture(scope="session")
def node(cluster: LocalCluster) -> Iterator[RealNode]:
    """The real node (harness/real_node.py); its tests are skipped when it is switched off."""
    try:
        with real_node(cluster) as n:
            yield n
    except RealNodeUnavailable as off:
        pytest.skip(str(off))


@pytest.fixture(scope="session")
def execd_image(node: RealNode) -> str:
    node.load_image(built_image("execd", EXECD_IMAGE))
    return EXECD_IMAGE


@pytest.fixture
def execd_controller(
    cluster: LocalCluster, crds: None, namespace: str, execd_image: str
) -> Iterator[ControllerProcess]:
    proc = ControllerProcess(cluster, namespace, "--execd-image", execd_image).start()
    yield proc
    proc.stop()


@pytest.fixture
def server(
    cluster: LocalCluster, namespace: str, execd_controller: ControllerProcess, tmp_path: Path
) -> Iterator[KubernetesServer]:
    """A kubernetes-runtime server for the real node (modules with other needs define their own)."""
    with kubernetes_server(tmp_path, namespace, cluster.kubeconfig, real_node_server_config()) as srv:
        yield srv
