"""The real node of the local cluster (tools/node.sh): kubelet + containerd, pods that actually run.

It is on unless OSB_REAL_NODE=0. Tests choose it explicitly with `REAL_NODE_PLACEMENT`, since it is
tainted; kwok nodes stay for everything else. Images come from podman (`tools/node.sh load-image`):
pods use imagePullPolicy Never, as no registry is reachable.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from harness.images import TEST_IMAGE
from harness.paths import ROOT, TOOLS
from harness.services import LocalCluster
from opensandbox_platform.api import labels

ENV_SWITCH = "OSB_REAL_NODE"
NODE_NAME = os.environ.get("OSB_NODE_NAME", "osb-real-node")
NODE_LABEL = ("opensandbox.io/node", "real")
NODE_TAINT_KEY = "opensandbox.io/real-node"
POD_NETWORK_PREFIX = "10.77."

# The nodeSelector and toleration that put a pod on the real node.
PLACEMENT: dict[str, Any] = {
    "nodeSelector": {NODE_LABEL[0]: NODE_LABEL[1]},
    "tolerations": [{"key": NODE_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}],
}
# The same as YAML lines (JSON values are YAML flow style), for manifests written as text.
REAL_NODE_PLACEMENT = "".join(f"{key}: {json.dumps(value)}\n" for key, value in PLACEMENT.items())


def real_node_pod_spec(**container: Any) -> dict[str, Any]:
    """A pod spec for the real node: one container `sandbox` from the test image (imagePullPolicy
    Never: no registry is reachable) with `container`'s fields, stopped within a second."""
    main = {"name": labels.SANDBOX_CONTAINER, "image": TEST_IMAGE, "imagePullPolicy": "Never", **container}
    return {"terminationGracePeriodSeconds": 1, **PLACEMENT, "containers": [main]}


def enabled() -> bool:
    """The real node is on by default; OSB_REAL_NODE=0 switches it off (kwok nodes only)."""
    return os.environ.get(ENV_SWITCH, "1") != "0"


class RealNodeUnavailable(Exception):
    """The real node is switched off (OSB_REAL_NODE=0)."""


@dataclass(frozen=True)
class RealNode:
    name: str
    cluster: LocalCluster

    def load_image(self, image: str) -> None:
        """Copy a podman image into the node's containerd."""
        result = _node_sh("load-image", image)
        if result.returncode != 0:
            raise RuntimeError(f"tools/node.sh load-image {image} failed:\n{result.stderr[-4000:]}")


def _node_sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(TOOLS / "node.sh"), *args], cwd=ROOT, text=True, capture_output=True, check=False)


@contextmanager
def real_node(cluster: LocalCluster) -> Iterator[RealNode]:
    """The running real node; starts it (and stops it afterwards) when the cluster was up without it.

    Raises RealNodeUnavailable when switched off, RuntimeError (with tools/node.sh's reason) when it
    cannot start.
    """
    if not enabled():
        raise RealNodeUnavailable(
            f"the real node is off ({ENV_SWITCH}=0); unset it to run kubelet + containerd "
            "(tools/node.sh, docs/test-cluster.md)"
        )
    started = _node_sh("status").returncode != 0
    if started:
        result = _node_sh("up")
        if result.returncode != 0:
            reason = result.stderr[-4000:]
            raise RuntimeError(f"the real node did not start (tools/node.sh up):\n{reason}")
    try:
        yield RealNode(name=NODE_NAME, cluster=cluster)
    finally:
        if started:
            _node_sh("down")
