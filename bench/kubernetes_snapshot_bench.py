"""Kubernetes snapshots and pause/resume on the real node, through the official SDK and the server's
kubernetes runtime: for a sandbox with an empty workspace and with 200 MiB of random data in it, the
time from `create_snapshot()` to Ready (polled every 50 ms: the committer pod scheduled on the node,
the layer read while the container is frozen, written and pushed to the cluster registry) and from
`Sandbox.create(snapshot_id=...)` to the first command (the snapshot image pulled from the registry);
then `pause()` → Paused → `Sandbox.resume()` → first command, for a direct sandbox and for a pooled one
(claimed from a warm Pool; its pause releases the claimed pod and its resume is a fresh pod).

Run: `uv run python -m bench kubernetes_snapshot` or `uv run python bench/kubernetes_snapshot_bench.py
[--n 3] [--sizes 0,200] [--pauses 5] [--pooled-pauses 5]`, under `flock /tmp/osb-cluster.lock`. Needs
the real node (prints a notice and writes nothing when it is off). Traffic goes to 127.0.0.1, the
registry on the node's bridge address and the pods' own IPs. Writes bench/results/kubernetes-snapshots.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opensandbox import Sandbox, SandboxManager  # noqa: E402
from opensandbox.config import ConnectionConfig  # noqa: E402

from bench.common import summary_ms, write  # noqa: E402
from bench.snapshot_bench import until_ready  # noqa: E402
from harness.controller_process import ControllerProcess  # noqa: E402
from harness.images import EXECD_IMAGE, built_image  # noqa: E402
from harness.kube import idle_ready, pool_manifest, pool_pods  # noqa: E402
from harness.kubernetes_server import (  # noqa: E402
    SMALL,
    KubernetesServer,
    load_committer_image,
    registry_base_image,
    snapshot_server_config,
)
from harness.paths import CRDS  # noqa: E402
from harness.real_node import ENV_SWITCH, RealNodeUnavailable, real_node, real_node_pod_spec  # noqa: E402
from harness.real_node import enabled as real_node_enabled  # noqa: E402
from harness.registry import cluster_registry  # noqa: E402
from harness.services import LocalCluster, local_cluster  # noqa: E402

POOL = "bench-warm"


async def until_state(manager: SandboxManager, sandbox_id: str, state: str) -> None:
    for _ in range(6000):
        if (await manager.get_sandbox_info(sandbox_id)).status.state == state:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{sandbox_id} not {state} after 300 s")


async def one_size(config: ConnectionConfig, image: str, mib: int, n: int) -> dict[str, Any]:
    manager = await SandboxManager.create(config)
    snaps, restores = [], []
    captured = ""
    source = await Sandbox.create(image, connection_config=config, resource=SMALL, entrypoint=["sleep", "infinity"])
    try:
        if mib:
            command = f"mkdir -p /workspace && head -c {mib << 20} /dev/urandom > /workspace/data"
            assert (await source.commands.run(command)).error is None
        for _ in range(n):
            t0 = time.perf_counter()
            snapshot = await source.create_snapshot()
            await until_ready(manager, snapshot.id)
            t1 = time.perf_counter()
            captured = (await manager.get_snapshot(snapshot.id)).status.message  # "N files, B bytes"
            restored = await Sandbox.create(snapshot_id=snapshot.id, connection_config=config, resource=SMALL)
            assert (await restored.commands.run("true")).error is None
            t2 = time.perf_counter()
            await restored.kill()
            await restored.close()
            snaps.append(t1 - t0)
            restores.append(t2 - t1)
            await asyncio.sleep(2)  # the restored BatchSandbox leaves the server's cache: the snapshot is free
            await manager.delete_snapshot(snapshot.id)
    finally:
        await source.kill()
        await source.close()
        await manager.close()
    return {
        "workspace_mib": mib,
        "captured": captured,
        "snapshot_to_ready": summary_ms(snaps),
        "restore_to_first_command": summary_ms(restores),
    }


async def pause_and_resume(
    manager: SandboxManager, config: ConnectionConfig, sandbox: Sandbox
) -> tuple[float, float, Sandbox]:
    """pause() → Paused, then Sandbox.resume() → first command: the two durations and the resumed handle."""
    t0 = time.perf_counter()
    await sandbox.pause()
    await until_state(manager, sandbox.id, "Paused")
    t1 = time.perf_counter()
    resumed = await Sandbox.resume(sandbox.id, connection_config=config, resume_timeout=timedelta(seconds=120))
    assert (await resumed.commands.run("true")).error is None
    return t1 - t0, time.perf_counter() - t1, resumed


async def pause_figures(config: ConnectionConfig, image: str, n: int) -> dict[str, Any]:
    manager = await SandboxManager.create(config)
    sandbox = await Sandbox.create(image, connection_config=config, resource=SMALL, entrypoint=["sleep", "infinity"])
    pauses, resumes = [], []
    try:
        current = sandbox
        for _ in range(n):
            paused, resumed_in, resumed = await pause_and_resume(manager, config, current)
            if current is not sandbox:
                await current.close()
            current = resumed
            pauses.append(paused)
            resumes.append(resumed_in)
    finally:
        await sandbox.kill()
        await sandbox.close()
        await manager.close()
    return {"pause_to_paused": summary_ms(pauses), "resume_to_first_command": summary_ms(resumes)}


async def pooled_pause_figures(
    config: ConnectionConfig, cluster: LocalCluster, namespace: str, image: str, n: int
) -> dict[str, Any]:
    """A fresh pooled sandbox per sample (a paused one has left its Pool), claimed once a warm pod is idle."""
    from lightkube import Client, KubeConfig

    kube = Client(config=KubeConfig.from_file(cluster.kubeconfig))
    manager = await SandboxManager.create(config)
    pauses, resumes = [], []
    try:
        for _ in range(n):
            await until_idle(kube, namespace)
            sandbox = await Sandbox.create(
                image, connection_config=config, resource=SMALL, extensions={"poolRef": POOL}
            )
            try:
                paused, resumed_in, resumed = await pause_and_resume(manager, config, sandbox)
                await resumed.close()
            finally:
                await sandbox.kill()
                await sandbox.close()
            pauses.append(paused)
            resumes.append(resumed_in)
    finally:
        await manager.close()
    return {"pause_to_paused": summary_ms(pauses), "resume_to_first_command": summary_ms(resumes)}


async def until_idle(kube: Any, namespace: str) -> None:
    for _ in range(2400):
        if idle_ready(pool_pods(kube, namespace, POOL)):
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"no idle pod in Pool {POOL} after 120 s")


async def figures(
    server: KubernetesServer, cluster: LocalCluster, image: str, args: argparse.Namespace
) -> dict[str, Any]:
    config = ConnectionConfig(domain=server.domain, request_timeout=timedelta(seconds=300), disable_metrics=True)
    out: dict[str, Any] = {"sizes": []}
    for mib in [int(s) for s in args.sizes.split(",") if s.strip()]:
        found = await one_size(config, image, mib, args.n)
        print("kubernetes", found, flush=True)
        out["sizes"].append(found)
    if args.pauses:
        out["pause_resume"] = await pause_figures(config, image, args.pauses)
        print("kubernetes", out["pause_resume"], flush=True)
    if args.pooled_pauses:
        pod_spec = real_node_pod_spec(image=image, imagePullPolicy="IfNotPresent")
        manifest = pool_manifest(POOL, pod_spec, minimum=1, maximum=1, capacity=args.pooled_pauses + 1)
        cluster.kubectl("apply", "-n", server.namespace, "-f", "-", input=json.dumps(manifest))
        found = await pooled_pause_figures(config, cluster, server.namespace, image, args.pooled_pauses)
        out["pooled_pause_resume"] = found
        print("kubernetes pooled", found, flush=True)
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3, help="snapshot + restore samples per size")
    parser.add_argument("--sizes", default="0,200", help="workspace sizes in MiB (comma-separated)")
    parser.add_argument("--pauses", type=int, default=5, help="pause -> resume samples")
    parser.add_argument("--pooled-pauses", type=int, default=5, help="pause -> resume samples of pooled sandboxes")
    args = parser.parse_args(argv)
    if not real_node_enabled():
        print(f"kubernetes_snapshot: skipped, the real node is off ({ENV_SWITCH}=0)")
        return
    namespace = f"bench-snap-{uuid.uuid4().hex[:6]}"
    load = os.getloadavg()[0]
    with local_cluster() as cluster, tempfile.TemporaryDirectory(prefix="k8s-snap-bench-") as tmp:
        try:
            node_cm = real_node(cluster)
            node = node_cm.__enter__()
        except RealNodeUnavailable as off:
            print(f"kubernetes_snapshot: skipped: {off}")
            return
        try:
            node.load_image(built_image("execd", EXECD_IMAGE))
            registry = cluster_registry()
            image = registry_base_image(registry)
            config = snapshot_server_config(registry, load_committer_image(node))
            cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS))
            cluster.kubectl("create", "namespace", namespace)
            controller = ControllerProcess(cluster, namespace, "--execd-image", EXECD_IMAGE).start()
            server = KubernetesServer(Path(tmp), namespace, cluster.kubeconfig, config)
            try:
                server.start()
                found = asyncio.run(figures(server, cluster, image, args))
            finally:
                server.stop()
                controller.stop()
                cluster.kubectl("delete", "namespace", namespace, "--wait=false")
        finally:
            node_cm.__exit__(None, None, None)
    write(
        "kubernetes-snapshots",
        {
            "params": vars(args),
            "load_average_at_start": load,
            **found,
            "setup": "real node (kubelet + containerd + runc), the cluster registry (HTTPS, open) on the node's"
            " bridge; sandboxes of the test image pushed there, 250m CPU; snapshots polled every 50 ms",
        },
    )


if __name__ == "__main__":
    main(sys.argv[1:])
