"""The official SDK through the server's kubernetes runtime to real pods (the real node, OSB_REAL_NODE=1).

  pooled        `Sandbox.create(extensions={"poolRef"})` → first `commands.run("true")` done, over N runs
                (the SDK's defaults: keep-alive entrypoint, no env: a pure claim)
  pooled_env    the same with `env` and an entrypoint: the controller starts them through execd first
  direct        `Sandbox.create(image)` (a cold pod: schedule, execd init container, readiness) → first
                command, for comparison

Run: `uv run python -m bench kubernetes_real` or `uv run python -m bench.kubernetes_real_bench [--n
50] [--direct 10]`. Prints a notice and writes nothing when the real node is off. Each pooled run
starts when the Pool has its whole buffer idle and Ready (read from the pods; the refill is not
timed); every sandbox is killed after its run. One namespace with its own controller
(`--execd-image`) and server; all traffic goes to 127.0.0.1 and the pods' own IPs. Writes
bench/results/kubernetes-real.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opensandbox import Sandbox  # noqa: E402
from opensandbox.config import ConnectionConfig  # noqa: E402

from bench.common import summary_ms, wait_pool_available, write  # noqa: E402
from harness.controller_process import ControllerProcess  # noqa: E402
from harness.images import EXECD_IMAGE, TEST_IMAGE  # noqa: E402
from harness.kubernetes_server import SMALL, KubernetesServer, real_node_server_config, real_pool  # noqa: E402
from harness.paths import CRDS  # noqa: E402
from harness.real_node import ENV_SWITCH, RealNodeUnavailable, real_node  # noqa: E402
from harness.real_node import enabled as real_node_enabled  # noqa: E402
from harness.services import local_cluster  # noqa: E402
from opensandbox_platform.api.resources import POOLS  # noqa: E402
from opensandbox_platform.kube.client import KubeClient  # noqa: E402

POOL = "real"


async def create_to_first_command(config: ConnectionConfig, **kwargs: Any) -> tuple[float, float]:
    """Seconds from the create to the first command's end, and of the create (with the SDK's health check)."""
    started = time.perf_counter()
    sb = await Sandbox.create(TEST_IMAGE, connection_config=config, resource=SMALL, **kwargs)
    created = time.perf_counter() - started
    try:
        execution = await sb.commands.run("true")
        elapsed = time.perf_counter() - started
        assert execution.error is None and execution.exit_code in (0, None), execution
    finally:
        await sb.kill()
        await sb.close()
    return elapsed, created


async def run(server: KubernetesServer, namespace: str, kubeconfig: str, args: argparse.Namespace) -> Any:
    # A cold pod can take longer than the SDK's default 30 s request timeout on a busy machine.
    config = ConnectionConfig(domain=server.domain, disable_metrics=True, request_timeout=timedelta(seconds=120))
    client = KubeClient.from_config(kubeconfig)
    results: dict[str, Any] = {}
    try:
        await client.create(POOLS, real_pool(POOL, args.pool), namespace)
        variants = {
            "pooled": {"extensions": {"poolRef": POOL}},
            "pooled_env": {
                "extensions": {"poolRef": POOL},
                "env": {"GREETING": "hi"},
                "entrypoint": ["sleep", "infinity"],
            },
        }
        for name, kwargs in variants.items():
            samples = []
            for _ in range(args.n):
                await wait_pool_available(client, namespace, POOL, args.pool, 120)
                samples.append(await create_to_first_command(config, **kwargs))
            results[name] = summary_ms([total for total, _ in samples])
            results[f"{name}_create_only"] = summary_ms([created for _, created in samples])
            print(f"{name}: {results[name]}\n  of which Sandbox.create: {results[f'{name}_create_only']}", flush=True)
        await client.patch(POOLS, POOL, {"spec": {"minBufferSize": 0, "maxBufferSize": 0}}, namespace)
        direct = [await create_to_first_command(config, entrypoint=["sleep", "infinity"]) for _ in range(args.direct)]
        results["direct"] = summary_ms([total for total, _ in direct])
        print(f"direct: {results['direct']}", flush=True)
    finally:
        await client.aclose()
    return results


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50, help="runs of each pooled variant")
    parser.add_argument("--direct", type=int, default=10, help="direct (cold) runs")
    parser.add_argument("--pool", type=int, default=3, help="the Pool's idle buffer")
    args = parser.parse_args(argv)
    if not real_node_enabled():
        print(f"kubernetes_real: skipped, the real node is off ({ENV_SWITCH}=0)")
        return
    namespace = f"bench-real-{uuid.uuid4().hex[:6]}"
    with local_cluster() as cluster, tempfile.TemporaryDirectory(prefix="k8s-real-bench-") as tmp:
        try:
            node_cm = real_node(cluster)
            node = node_cm.__enter__()
        except RealNodeUnavailable as off:
            print(f"kubernetes_real: skipped: {off}")
            return
        try:
            node.load_image(EXECD_IMAGE)
            cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS))
            cluster.kubectl("create", "namespace", namespace)
            controller = ControllerProcess(cluster, namespace, "--execd-image", EXECD_IMAGE, "--log-level", "2")
            controller.start()
            server = KubernetesServer(Path(tmp), namespace, cluster.kubeconfig, real_node_server_config())
            try:
                server.start()
                figures = asyncio.run(run(server, namespace, str(cluster.kubeconfig), args))
            finally:
                server.stop()
                controller.stop()
                cluster.kubectl("delete", "namespace", namespace, "--wait=false")
        finally:
            node_cm.__exit__(None, None, None)
    write(
        "kubernetes-real",
        {
            "params": vars(args),
            **figures,
            "setup": "real node (kubelet + containerd + runc); execd injected by the controller; SDK with"
            " health check; each sandbox killed after its first command; pooled runs start with the Pool's"
            " buffer full",
        },
    )


if __name__ == "__main__":
    main(sys.argv[1:])
