"""`opensandbox-egress`: the egress sidecar, in the network namespace of the sandbox it guards.

Start-up order is the guarantee: the policy is in the kernel before anything else happens (the
state file's, when a previous run of this sidecar left one, else `--policy`); then the DNS filter
listens; then the API, whose /health answers 200 from then on. A pod's startup probe (the egress
container is a native sidecar) and the docker runtime wait for that before the sandbox's
entrypoint may start. It needs CAP_NET_ADMIN in the namespace; the sandbox never has it.
"""

from __future__ import annotations

import sys

# As in execd: keep OpenSSL out; the API is plain HTTP on the pod network.
if "ssl" not in sys.modules:
    sys.modules["ssl"] = None  # type: ignore[assignment]

import argparse
import json
import logging
import os
import time
from pathlib import Path

from opensandbox_platform.daemon import process
from opensandbox_platform.daemon.cli import add_options, limit_options
from opensandbox_platform.daemon.http import HttpServer, limits_from_args
from opensandbox_platform.egress import policy as P
from opensandbox_platform.egress.app import TOKEN_HEADER, EgressApp
from opensandbox_platform.egress.dns import DnsFilter, bind_sockets, parse_upstream, upstreams_from_resolv_conf
from opensandbox_platform.egress.enforcer import Enforcer, Limits
from opensandbox_platform.egress.nft import Nft

log = logging.getLogger("egress")
PORT = 18080
TOKEN_ENV = "OPENSANDBOX_EGRESS_TOKEN"  # upstream's names
POLICY_ENV = "OPENSANDBOX_EGRESS_RULES"
UPSTREAM_ENV = "OPENSANDBOX_EGRESS_UPSTREAM"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="opensandbox-egress",
        description="Enforces a sandbox's egress policy in this network namespace (a DNS filter and an "
        "nftables default-deny with the allowed names' addresses) and serves the egress API. Needs "
        "CAP_NET_ADMIN here. See docs/network-policy.md.",
    )
    parser.add_argument("--host", default=env("EGRESS_HOST", "0.0.0.0"), help="API address (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=int(env("EGRESS_PORT", PORT)), help=f"API port (default {PORT})")
    parser.add_argument(
        "--policy",
        default=env(POLICY_ENV, ""),
        help=f"the policy at first start, JSON {{defaultAction, egress}} (env {POLICY_ENV}; empty: allow all)",
    )
    parser.add_argument(
        "--token",
        default=env(TOKEN_ENV) or None,
        help=f"require it in header {TOKEN_HEADER} on every call but /health (env {TOKEN_ENV})",
    )
    parser.add_argument(
        "--state-file",
        default=env("EGRESS_STATE_FILE", "/var/lib/opensandbox-egress/state.json"),
        help="the policy in force and the resolved addresses; a restarted sidecar starts from it (default %(default)s)",
    )
    parser.add_argument(
        "--upstream-dns",
        default=env(UPSTREAM_ENV, ""),
        help=f"resolvers to forward allowed queries to, comma-separated host[:port] (env {UPSTREAM_ENV}; "
        "default: the nameservers of /etc/resolv.conf)",
    )
    parser.add_argument("--max-rules", type=int, default=P.DEFAULT_MAX_RULES, help="rules a policy may have")
    parser.add_argument(
        "--min-ttl", type=float, default=60.0, help="seconds an allowed answer's addresses stay at least"
    )
    parser.add_argument(
        "--log-level",
        default=env("EGRESS_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (env EGRESS_LOG_LEVEL)",
    )
    add_options(parser, limit_options("EGRESS"))
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace, started: float) -> None:
    layout = P.Layout()
    state = Path(args.state_file)
    state.parent.mkdir(parents=True, exist_ok=True)
    limits = Limits(max_rules=args.max_rules, min_ttl=args.min_ttl)
    upstreams = [parse_upstream(u) for u in args.upstream_dns.split(",") if u.strip()] or upstreams_from_resolv_conf()
    enforcer = Enforcer(Nft(), layout, limits, state)
    dns_filter = DnsFilter(enforcer, upstreams, mark=layout.mark)
    enforcer.resolve = dns_filter.resolve
    restored = enforcer.load_state()
    initial = restored or P.parse_policy(json.loads(args.policy) if args.policy.strip() else None, args.max_rules)
    await enforcer.apply(initial)
    await dns_filter.serve(*bind_sockets("127.0.0.1", layout.dns_port))
    server = HttpServer(EgressApp(enforcer, args.token).dispatch, limits_from_args(args))
    await server.start(args.host, args.port)
    log.info(
        "egress listening host=%s port=%d default=%s rules=%d restored=%s upstream=%s startup_ms=%d",
        args.host,
        args.port,
        initial.default_action,
        len(initial.rules),
        restored is not None,
        ",".join(f"{h}:{p}" for h, p in upstreams),
        (time.monotonic() - started) * 1000,
    )
    await process.stop_on_signals().wait()
    # The rules stay in the namespace: a stopped or restarting sidecar leaves the sandbox guarded.
    await server.close()
    await dns_filter.close()
    enforcer.close()


def main(argv: list[str] | None = None) -> None:
    started = time.monotonic()
    args = parse_args(argv)
    process.run(serve(args, started), args.log_level, log)


if __name__ == "__main__":
    main()
