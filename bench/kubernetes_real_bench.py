"""The official SDK through the server's kubernetes runtime to real pods (the real node, OSB_REAL_NODE=1).

  pooled        `Sandbox.create(extensions={"poolRef"})` → first `commands.run("true")` done, over N runs
                (the SDK's defaults: keep-alive entrypoint, no env: a pure claim)
  pooled_env    the same with `env` and an entrypoint: the controller starts them through execd first
  direct        `Sandbox.create(image)` (a cold pod: schedule, execd copied in, the sandbox starts,
                readiness) → first command, once per way execd gets into the pod (the controller's
                `--execd-install`: `post-start`, the default, and `init-container`, upstream's), each
                with its own controller. Each run's breakdown comes from a watch on the namespace's
                pods, as this client saw them (ms after the create call): the pod created, scheduled,
                execd copied (the installer running / the init container ended), the sandbox
                container running, the pod Ready; then the create's return and the first command's end.
  policy        pooled creates with a network policy: three kinds interleaved, each from a full buffer
                (`--policy` runs of each): a Pool without egress (no sidecar), a Pool with
                `spec.egress` and no policy in the create (the Pool's stays), the same Pool with a
                policy (default deny + allow *.good.test: the controller PUTs it into the claimed
                pod's sidecar before the sandbox is Ready). Written to kubernetes-pooled-policy.json.

Run: `uv run python -m bench kubernetes_real` or `uv run python -m bench.kubernetes_real_bench [--n
50] [--direct 10] [--install post-start,init-container] [--policy 20]` (`--n 0 --direct 0` for the
policy figures alone). Prints a notice and writes nothing when the
real node is off. Each pooled run starts when the Pool has its whole buffer idle and Ready (read from
the pods; the refill is not timed); every sandbox is killed after its run. One namespace with its own
controller (`--execd-image`, `--egress-image`) and server; all traffic goes to 127.0.0.1 and the
pods' own IPs (the egress Pool's sidecars forward lookups to their own loopback: none are made).
Writes bench/results/kubernetes-real.json (when --n or --direct) and kubernetes-pooled-policy.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
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
from opensandbox.models.sandboxes import NetworkPolicy, NetworkRule  # noqa: E402

from bench.common import summary_ms, wait_pool_available, write  # noqa: E402
from harness.controller_process import ControllerProcess  # noqa: E402
from harness.images import EGRESS_IMAGE, EXECD_IMAGE, TEST_IMAGE, built_image  # noqa: E402
from harness.kubernetes_server import SMALL, KubernetesServer, real_node_server_config, real_pool  # noqa: E402
from harness.paths import CRDS  # noqa: E402
from harness.real_node import ENV_SWITCH, RealNodeUnavailable, real_node  # noqa: E402
from harness.real_node import enabled as real_node_enabled  # noqa: E402
from harness.services import local_cluster  # noqa: E402
from opensandbox_platform.api import labels  # noqa: E402
from opensandbox_platform.api.resources import POOLS  # noqa: E402
from opensandbox_platform.controller.pods import EXECD_INSTALLER  # noqa: E402
from opensandbox_platform.kube.client import JSON, PODS, KubeClient, KubeError  # noqa: E402

POOL = "real"
PLAIN, GUARDED = "plain", "guarded"  # the policy runs' Pools: without and with spec.egress
POLICY = NetworkPolicy(default_action="deny", egress=[NetworkRule(action="allow", target="*.good.test")])


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


class PodMilestones:
    """When this client first saw each step of every pod in the namespace (monotonic seconds)."""

    def __init__(self) -> None:
        self.seen: dict[str, dict[str, float]] = {}  # pod name -> milestone -> time
        self.batchsandbox: dict[str, str] = {}  # pod name -> its BatchSandbox

    def observe(self, pod: JSON) -> None:
        now = time.perf_counter()
        name = pod["metadata"]["name"]
        marks = self.seen.setdefault(name, {})
        owner = (pod["metadata"].get("labels") or {}).get(labels.BATCHSANDBOX)
        if owner:
            self.batchsandbox[name] = owner
        status = pod.get("status") or {}
        reached = {"created": True, "scheduled": bool((pod.get("spec") or {}).get("nodeName"))}
        for cs in status.get("initContainerStatuses") or []:
            if cs.get("name") == EXECD_INSTALLER and "terminated" in (cs.get("state") or {}):
                reached["execd_copied"] = True
        for cs in status.get("containerStatuses") or []:
            running = "running" in (cs.get("state") or {})
            if cs.get("name") == EXECD_INSTALLER and running:  # its postStart hook has run by then
                reached["execd_copied"] = True
            if cs.get("name") == labels.SANDBOX_CONTAINER and running:
                reached["sandbox_running"] = True
        reached["ready"] = any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
        )
        for mark, yes in reached.items():
            if yes:
                marks.setdefault(mark, now)

    def of(self, sandbox_id: str, started: float) -> dict[str, float]:
        for name, owner in self.batchsandbox.items():
            if owner == sandbox_id:
                return {f"{mark}_ms": round((at - started) * 1000, 1) for mark, at in self.seen[name].items()}
        return {}


async def watch_pods(client: KubeClient, namespace: str, milestones: PodMilestones) -> None:
    while True:
        with contextlib.suppress(KubeError, OSError, asyncio.TimeoutError):
            async for event in client.watch(PODS, namespace, timeoutSeconds=300):
                if event.get("type") in ("ADDED", "MODIFIED"):
                    milestones.observe(event["object"])


async def direct_runs(config: ConnectionConfig, client: KubeClient, namespace: str, n: int) -> dict[str, Any]:
    milestones = PodMilestones()
    watcher = asyncio.create_task(watch_pods(client, namespace, milestones))
    try:
        await asyncio.sleep(0.5)  # the watch is open
        totals, creates, breakdowns = [], [], []
        for _ in range(n):
            started = time.perf_counter()
            sb = await Sandbox.create(
                TEST_IMAGE, connection_config=config, resource=SMALL, entrypoint=["sleep", "infinity"]
            )
            created = time.perf_counter() - started
            try:
                execution = await sb.commands.run("true")
                elapsed = time.perf_counter() - started
                assert execution.error is None and execution.exit_code in (0, None), execution
                steps = milestones.of(sb.id, started)
            finally:
                await sb.kill()
                await sb.close()
            totals.append(elapsed)
            creates.append(created)
            breakdowns.append(
                {**steps, "create_returned_ms": round(created * 1000, 1), "first_command_ms": round(elapsed * 1000, 1)}
            )
        marks = sorted(
            {k for b in breakdowns for k in b}, key=lambda k: statistics.median(b[k] for b in breakdowns if k in b)
        )
        return {
            "create_to_first_command": summary_ms(totals),
            "create_only": summary_ms(creates),
            "breakdown_p50_ms": {k: round(statistics.median(b[k] for b in breakdowns if k in b), 1) for k in marks},
            "runs": breakdowns,
        }
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


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
    finally:
        await client.aclose()
    return results


async def run_policy(server: KubernetesServer, namespace: str, kubeconfig: str, args: argparse.Namespace) -> Any:
    """Pooled creates from a plain Pool, from an egress Pool without and with a policy, interleaved."""
    config = ConnectionConfig(domain=server.domain, disable_metrics=True, request_timeout=timedelta(seconds=120))
    client = KubeClient.from_config(kubeconfig)
    guarded = real_pool(GUARDED, args.pool)
    guarded["spec"]["egress"] = {"defaultAction": "deny", "upstreamDns": ["127.0.0.1"]}
    variants: dict[str, tuple[str, dict[str, Any]]] = {
        "plain_pool": (PLAIN, {}),
        "egress_pool_no_policy": (GUARDED, {}),
        "egress_pool_policy": (GUARDED, {"network_policy": POLICY}),
    }
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    try:
        for pool in (real_pool(PLAIN, args.pool), guarded):
            await client.create(POOLS, pool, namespace)
        for _ in range(args.policy):
            for name, (pool_name, kwargs) in variants.items():
                await wait_pool_available(client, namespace, pool_name, args.pool, 120)
                samples[name].append(await create_to_first_command(config, extensions={"poolRef": pool_name}, **kwargs))
        for pool_name in (PLAIN, GUARDED):
            await client.patch(POOLS, pool_name, {"spec": {"minBufferSize": 0, "maxBufferSize": 0}}, namespace)
    finally:
        await client.aclose()
    results: dict[str, Any] = {}
    for name, runs in samples.items():
        results[name] = summary_ms([total for total, _ in runs])
        results[f"{name}_create_only"] = summary_ms([created for _, created in runs])
        print(f"policy/{name}: {results[name]}\n  of which Sandbox.create: {results[f'{name}_create_only']}")
    extra = results["egress_pool_policy_create_only"]["p50_ms"] - results["egress_pool_no_policy_create_only"]["p50_ms"]
    results["extra_create_p50_ms_for_a_policy"] = round(extra, 2)
    print(f"policy: a pooled create with a policy takes {extra:+.1f} ms (p50) more than one without", flush=True)
    return results


async def run_direct(server: KubernetesServer, kubeconfig: str, namespace: str, n: int) -> dict[str, Any]:
    config = ConnectionConfig(domain=server.domain, disable_metrics=True, request_timeout=timedelta(seconds=120))
    client = KubeClient.from_config(kubeconfig)
    try:
        return await direct_runs(config, client, namespace, n)
    finally:
        await client.aclose()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50, help="runs of each pooled variant")
    parser.add_argument("--direct", type=int, default=10, help="direct (cold) runs")
    parser.add_argument("--pool", type=int, default=3, help="the Pool's idle buffer")
    parser.add_argument("--policy", type=int, default=20, help="runs of each pooled network-policy kind")
    parser.add_argument(
        "--install",
        default="post-start,init-container",
        help="the controller's --execd-install values to measure direct runs with (comma-separated)",
    )
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
            node.load_image(built_image("execd", EXECD_IMAGE))  # (rebuilt when its sources changed)
            if args.policy:
                node.load_image(built_image("egress", EGRESS_IMAGE))
            cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS))
            cluster.kubectl("create", "namespace", namespace)
            installs = [i.strip() for i in args.install.split(",") if i.strip()]
            flags = ("--execd-image", EXECD_IMAGE, "--log-level", "2", "--egress-image", EGRESS_IMAGE,
                     "--egress-image-pull-policy", "Never")  # fmt: skip
            controller = ControllerProcess(cluster, namespace, *flags, "--execd-install", installs[0]).start()
            server = KubernetesServer(Path(tmp), namespace, cluster.kubeconfig, real_node_server_config())
            try:
                server.start()
                kubeconfig = str(cluster.kubeconfig)
                figures = asyncio.run(run(server, namespace, kubeconfig, args)) if args.n else {}
                policy = asyncio.run(run_policy(server, namespace, kubeconfig, args)) if args.policy else None
                for i, install in enumerate(installs):
                    if i:  # another way to copy execd: another controller
                        controller.stop()
                        controller = ControllerProcess(cluster, namespace, *flags, "--execd-install", install).start()
                    if not args.direct:
                        break
                    direct = asyncio.run(run_direct(server, kubeconfig, namespace, args.direct))
                    figures[f"direct_{install.replace('-', '_')}"] = direct
                    print(f"direct ({install}): {direct['create_to_first_command']}", flush=True)
                    print(f"  breakdown p50: {direct['breakdown_p50_ms']}", flush=True)
            finally:
                server.stop()
                controller.stop()
                cluster.kubectl("delete", "namespace", namespace, "--wait=false")
        finally:
            node_cm.__exit__(None, None, None)
    if policy is not None:
        setup = "real node; SDK with health check; create → first command; each from a full buffer of the Pool"
        write("kubernetes-pooled-policy", {"params": vars(args), **policy, "setup": setup})
    if not (args.n or args.direct):
        return
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
