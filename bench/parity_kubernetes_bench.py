"""SDK-parity benchmark on the kubernetes runtime (the real node): `Sandbox.create` latency (direct
mode, a cold pod each) with no volume, one host volume and one existing pvc volume (a claim bound to a
hostPath PV the benchmark makes: the test cluster has no dynamic provisioner).

Run: `uv run python -m bench.parity_kubernetes_bench [--n 5]` (or `make bench BENCH=parity_kubernetes`;
it starts the test cluster with the real node when it is not running: hold /tmp/osb-cluster.lock). One
namespace with its own controller and server; every sandbox is killed after its create; the PV is
deleted at the end. All traffic goes to 127.0.0.1 and the pods' own IPs. Writes bench/results/parity-kubernetes.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opensandbox import Sandbox  # noqa: E402
from opensandbox.config import ConnectionConfig  # noqa: E402
from opensandbox.models.sandboxes import PVC, Host, Volume  # noqa: E402

from bench.common import summary_ms, write  # noqa: E402
from harness.controller_process import ControllerProcess  # noqa: E402
from harness.images import EXECD_IMAGE, TEST_IMAGE, built_image  # noqa: E402
from harness.kubernetes_server import SMALL, KubernetesServer, real_node_server_config  # noqa: E402
from harness.paths import CRDS  # noqa: E402
from harness.real_node import ENV_SWITCH, real_node  # noqa: E402
from harness.real_node import enabled as real_node_enabled  # noqa: E402
from harness.services import LocalCluster, local_cluster  # noqa: E402


async def creates(server: KubernetesServer, n: int, volumes: list[Volume]) -> dict[str, float]:
    """`Sandbox.create` returning (pod Ready, execd answering the SDK's health check); one warm-up."""
    config = ConnectionConfig(domain=server.domain, disable_metrics=True)
    samples = []
    for i in range(n + 1):
        started = time.perf_counter()
        sb = await Sandbox.create(
            TEST_IMAGE, connection_config=config, resource=SMALL, entrypoint=["sleep", "infinity"],
            volumes=volumes or None,
        )  # fmt: skip
        elapsed = time.perf_counter() - started
        await sb.kill()
        await sb.close()
        if i:
            samples.append(elapsed)
    return summary_ms(samples)


def make_pv(cluster: LocalCluster, name: str, storage_class: str, path: Path) -> None:
    path.mkdir(parents=True)
    pv = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name},
        "spec": {
            "storageClassName": storage_class,
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "hostPath": {"path": str(path), "type": "Directory"},
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pv))


async def run(server: KubernetesServer, n: int, allowed: Path, storage_class: str) -> dict[str, Any]:
    host = [Volume(name="data", mount_path="/data", host=Host(path=str(allowed / "data")))]
    claim = PVC(claim_name="bench", storage_class=storage_class, storage="64Mi")
    pvc = [Volume(name="cache", mount_path="/cache", pvc=claim)]
    return {
        "create_no_volume": await creates(server, n, []),
        "create_one_host_volume": await creates(server, n, host),
        "create_one_pvc_volume": await creates(server, n, pvc),  # the warm-up makes and binds the claim
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5, help="creates per case")
    args = parser.parse_args(argv)
    if not real_node_enabled():
        print(f"parity_kubernetes: skipped, the real node is off ({ENV_SWITCH}=0)")
        return
    namespace = f"bench-parity-{uuid.uuid4().hex[:6]}"
    storage_class = f"osb-{namespace}"
    with (
        local_cluster() as cluster,
        real_node(cluster) as node,
        tempfile.TemporaryDirectory(prefix="parity-k8s-") as tmp,
    ):
        node.load_image(built_image("execd", EXECD_IMAGE))
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS))
        cluster.kubectl("create", "namespace", namespace)
        allowed = Path(tmp) / "allowed"
        (allowed / "data").mkdir(parents=True)
        make_pv(cluster, storage_class, storage_class, Path(tmp) / "pv")
        controller = ControllerProcess(cluster, namespace, "--execd-image", EXECD_IMAGE, "--log-level", "2").start()
        server = KubernetesServer(
            Path(tmp) / "server", namespace, cluster.kubeconfig, real_node_server_config(),
            server_config=f'allowedHostPaths = ["{allowed}"]',
        )  # fmt: skip
        try:
            server.start()
            figures = asyncio.run(run(server, args.n, allowed, storage_class))
        finally:
            server.stop()
            controller.stop()
            cluster.kubectl("delete", "namespace", namespace, "--wait=false")
            with contextlib.suppress(Exception):
                cluster.kubectl("delete", "pv", storage_class, "--wait=false")
    write(
        "parity-kubernetes",
        {
            "n": args.n,
            **figures,
            "setup": "real node (kubelet + containerd + runc), direct mode (a cold pod per create), execd"
            " injected by the controller; pvc: a claim bound to a hostPath PV made beforehand",
        },
    )


if __name__ == "__main__":
    main(sys.argv[1:])
