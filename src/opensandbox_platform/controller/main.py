"""`opensandbox-controller`: the Pool and BatchSandbox controller."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from opensandbox_platform.api import tokens
from opensandbox_platform.api.crdgen import render
from opensandbox_platform.controller.allocator import Allocator
from opensandbox_platform.controller.batchsandbox import BatchSandboxReconciler
from opensandbox_platform.controller.inflight import InFlight
from opensandbox_platform.controller.manager import Manager, Options, pod_namespace
from opensandbox_platform.controller.pool import PoolReconciler
from opensandbox_platform.controller.settings import Settings
from opensandbox_platform.daemon import logs
from opensandbox_platform.daemon.cli import add_options, limit_options
from opensandbox_platform.daemon.http import limits_from_args
from opensandbox_platform.daemon.process import stop_on_signals
from opensandbox_platform.kube.client import KubeClient
from opensandbox_platform.kube.serving import (
    MetricsAuth,
    metrics_route,
    probe_route,
    serve,
    split_address,
    tls_context,
)

log = logging.getLogger("opensandbox.controller")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="opensandbox-controller",
        description="Reconciles Pool (warm pods) and BatchSandbox (N sandboxes) resources. "
        "`opensandbox-controller print-crds` writes the CRD manifests to stdout.",
    )
    parser.add_argument(
        "command",
        nargs="?",
        choices=["run", "print-crds"],
        default="run",
        help="run the controller (default) or print the CRDs",
    )
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster config, else $KUBECONFIG)")
    parser.add_argument("--namespace", help="watch only this namespace (default: all)")
    parser.add_argument(
        "--leader-elect",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="elect a leader with a Lease so only one replica acts (default: off)",
    )
    parser.add_argument("--leader-election-id", default="opensandbox-controller", help="name of the Lease")
    parser.add_argument("--leader-election-namespace", help="namespace of the Lease (default: our own)")
    parser.add_argument(
        "--metrics-bind-address",
        default=":8443",
        help="address of the metrics endpoint; 0 disables it (default: %(default)s)",
    )
    parser.add_argument(
        "--metrics-secure",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="serve metrics over HTTPS with TokenReview + SubjectAccessReview (default: on)",
    )
    parser.add_argument("--metrics-cert-dir", help="directory with tls.crt/tls.key (default: self-signed)")
    parser.add_argument(
        "--health-probe-bind-address",
        default=":8081",
        help="address of /healthz and /readyz (default: %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        type=int,
        default=3,
        choices=range(6),
        metavar="0-5",
        help="verbosity: 0 errors, 1 warnings, 2-3 info, 4-5 debug (default: 3)",
    )
    parser.add_argument("--concurrency", type=int, default=16, help="BatchSandboxes reconciled at once (default: 16)")
    parser.add_argument("--execd-image", help="inject execd from this image into every sandbox pod")
    parser.add_argument(
        "--execd-install",
        choices=["post-start", "init-container"],
        default="post-start",
        help="how execd is copied into a pod: by the postStart hook of an installer container started before "
        "the sandbox container (one kubelet sync), or by an init container (the kubelet starts the sandbox "
        "only after its next relist, ~0.5 s later on average) (default: %(default)s)",
    )
    parser.add_argument(
        "--task-executor-image",
        help="image of the task-executor sidecar (Pools with taskExecutor.enabled and direct-mode "
        "BatchSandboxes with a taskTemplate; a Pool's taskExecutor.image wins)",
    )
    parser.add_argument(
        "--egress-image",
        help="image of the egress sidecar injected into the pods of BatchSandboxes created with a networkPolicy "
        "(annotation opensandbox.io/network-policy) and of Pools with spec.egress; without it such pods are not "
        "created (docs/network-policy.md)",
    )
    parser.add_argument(
        "--egress-image-pull-policy",
        choices=["Always", "IfNotPresent", "Never"],
        default="IfNotPresent",
        help="imagePullPolicy of the egress sidecar (default: %(default)s)",
    )
    defaults = Settings()
    for name, what in (
        ("cpu-request", "CPU request"),
        ("memory-request", "memory request"),
        ("cpu-limit", "CPU limit"),
        ("memory-limit", "memory limit"),
    ):
        parser.add_argument(
            f"--task-executor-{name}",
            default=getattr(defaults, f"task_executor_{name.replace('-', '_')}"),
            help=f"{what} of the task-executor sidecar where a Pool sets no taskExecutor.resources "
            "(default: %(default)s)",
        )
    parser.add_argument(
        "--task-executor-image-pull-policy",
        choices=["Always", "IfNotPresent", "Never"],
        default=defaults.task_executor_pull_policy,
        help="imagePullPolicy of the task-executor sidecar (default: %(default)s)",
    )
    parser.add_argument(
        "--sandbox-token-key-file",
        help="a secret key (a file, e.g. a mounted Secret) from which each sandbox pod's access token for "
        "execd and the task executor is derived; the server needs the same key (kubernetes.sandboxTokenKeyFile). "
        "Without it, anyone who reaches a pod's IP can use its execd (default: none)",
    )
    parser.add_argument(
        "--pod-ready-deadline",
        type=float,
        default=300.0,
        help="replace idle pool pods not Ready after this many seconds (default: 300)",
    )
    # Limits of the probe and metrics listeners (env OPENSANDBOX_CONTROLLER_HTTP_<FLAG>).
    add_options(parser, limit_options("OPENSANDBOX_CONTROLLER_HTTP"))
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> None:
    client = KubeClient.from_config(args.kubeconfig)
    settings = Settings(
        execd_image=args.execd_image,
        execd_install=args.execd_install,
        task_executor_image=args.task_executor_image,
        egress_image=args.egress_image,
        egress_pull_policy=args.egress_image_pull_policy,
        task_executor_cpu_request=args.task_executor_cpu_request,
        task_executor_memory_request=args.task_executor_memory_request,
        task_executor_cpu_limit=args.task_executor_cpu_limit,
        task_executor_memory_limit=args.task_executor_memory_limit,
        task_executor_pull_policy=args.task_executor_image_pull_policy,
        pod_ready_deadline=args.pod_ready_deadline,
        token_key=tokens.read_key(args.sandbox_token_key_file) if args.sandbox_token_key_file else None,
    )
    manager = Manager(
        client,
        Options(
            namespace=args.namespace,
            concurrency=args.concurrency,
            leader_elect=args.leader_elect,
            leader_election_id=args.leader_election_id,
            leader_election_namespace=args.leader_election_namespace or pod_namespace(),
            settings=settings,
        ),
    )
    inflight = InFlight()  # pool pods the allocator and the Pool reconciler act on right now
    for reconciler in (PoolReconciler, Allocator, BatchSandboxReconciler):
        reconciler(manager, inflight).setup()
    servers = []
    limits = limits_from_args(args)
    host, port = split_address(args.health_probe_bind_address)
    if port:
        servers.append(
            await serve(
                host,
                port,
                {"/healthz": probe_route(lambda: True), "/readyz": probe_route(lambda: manager.synced)},
                limits=limits,
            )
        )
    host, port = split_address(args.metrics_bind_address)
    if port:
        auth = MetricsAuth(client) if args.metrics_secure else None
        tls = tls_context(args.metrics_cert_dir) if args.metrics_secure else None
        servers.append(await serve(host, port, {"/metrics": metrics_route(auth)}, tls, limits))
    log.info(
        "starting",
        extra={
            "identity": manager.identity,
            "namespace": args.namespace or "(all)",
            "leader_elect": args.leader_elect,
        },
    )

    stop = stop_on_signals()
    running = asyncio.create_task(manager.run())
    stopping = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    for server in servers:
        server.close()
    await client.aclose()
    if running in done and stopping not in done:
        # Leadership lost: exit so that the pod restarts and waits for the lease again.
        log.error("leadership lost; exiting")
        sys.exit(1)
    log.info("stopped")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "print-crds":
        sys.stdout.write(render())
        return
    logs.setup(logs.verbosity_to_level(args.log_level), "json")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
