"""Network policies: what a policy costs a create, a connection and a change, on the local and docker
runtimes (the kubernetes runtime's sidecar is measured by hand: see docs/network-policy.md).

  create      Sandbox.create through the SDK, with and without a policy (default deny + allow
              *.good.test), interleaved (the machine is shared: only figures of one run compare):
              p50/p99 and the difference. local: the server loads the ruleset and starts the DNS
              filter in the jail's namespace; docker: the egress sidecar starts in the container's.
  connect     inside one sandbox with and one without the policy, N times in a bash loop: a DNS
              query for a.good.test to the fake internet's resolver (over one UDP socket) and a TCP
              connection to its address, in microseconds per lookup+connect; with the policy every
              query is redirected to the DNS filter, which forwards it and adds the address.
  patch       PATCH of the egress API (the SDK's patch_egress_rules, alternately allowing and
              removing bad.test): the call returns once the kernel holds the new ruleset, so this is
              "policy change -> enforced"; p50/p99.

The fake internet (harness/fake_internet.py) is a network namespace of this benchmark's own on
203.0.113.0/24: no traffic leaves the machine. Needs root (namespaces, nftables) and, for docker,
podman's Docker API (started when down) and the egress image (built when missing).

Run: `uv run python -m bench egress` or `uv run python -m bench.egress_bench [--n 20]
[--runtimes local,docker]`. Writes bench/results/egress.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opensandbox import Sandbox  # noqa: E402
from opensandbox.config import ConnectionConfig  # noqa: E402
from opensandbox.models.sandboxes import NetworkPolicy, NetworkRule  # noqa: E402

from bench.common import summary_ms, write  # noqa: E402
from harness.egress_probes import dns_query, sh  # noqa: E402
from harness.fake_internet import FakeInternet  # noqa: E402
from harness.images import EGRESS_IMAGE, built_image  # noqa: E402
from harness.server_process import ServerProcess, running_server  # noqa: E402
from harness.services import podman_docker_host  # noqa: E402

POLICY = NetworkPolicy(default_action="deny", egress=[NetworkRule(action="allow", target="*.good.test")])


def config(server: ServerProcess) -> ConnectionConfig:
    return ConnectionConfig(domain=server.domain, disable_metrics=True)


async def create_latency(server: ServerProcess, n: int) -> dict[str, Any]:
    samples: dict[str, list[float]] = {"no_policy": [], "policy": []}
    for _ in range(n):
        for kind, policy in (("no_policy", None), ("policy", POLICY)):
            started = time.perf_counter()
            sb = await Sandbox.create(server.image, connection_config=config(server), network_policy=policy)
            samples[kind].append(time.perf_counter() - started)
            await sb.kill()
            await sb.close()
    result: dict[str, Any] = {kind: summary_ms(values) for kind, values in samples.items()}
    result["extra_p50_ms"] = round(result["policy"]["p50_ms"] - result["no_policy"]["p50_ms"], 2)
    result["extra_p99_ms"] = round(result["policy"]["p99_ms"] - result["no_policy"]["p99_ms"], 2)
    return result


async def connect_cost(sb: Sandbox, internet: FakeInternet, n: int) -> float:
    """Microseconds per lookup of a.good.test + TCP connection to its address, from inside `sb`.
    The query goes to the fake internet's resolver itself (not through the sandbox's resolv.conf,
    which without a policy leads to this host's resolvers: off the machine); under a policy it is
    redirected to the DNS filter, which forwards it there."""
    query = dns_query("a.good.test")
    script = (
        f"exec 3<>/dev/udp/{internet.dns}/53; s=$(date +%s%N); "
        f"for i in $(seq {n}); do printf '{query}' >&3; dd bs=512 count=1 <&3 2>/dev/null >/dev/null; "
        f"exec 4<>/dev/tcp/{internet.address('a.good.test')}/80; exec 4>&-; done; "
        f"e=$(date +%s%N); echo $(( (e - s) / {n} / 1000 ))"
    )
    return float(await sh(sb, script))


async def connect_overhead(server: ServerProcess, internet: FakeInternet, n: int) -> dict[str, Any]:
    plain = await Sandbox.create(server.image, connection_config=config(server))
    guarded = await Sandbox.create(server.image, connection_config=config(server), network_policy=POLICY)
    try:
        rounds: dict[str, list[float]] = {"no_policy": [], "policy": []}
        for _ in range(5):  # interleaved rounds of n each
            rounds["no_policy"].append(await connect_cost(plain, internet, n))
            rounds["policy"].append(await connect_cost(guarded, internet, n))
    finally:
        for sb in (plain, guarded):
            await sb.kill()
            await sb.close()
    best = {kind: min(values) for kind, values in rounds.items()}  # the least disturbed round
    return {
        "lookups_per_round": n,
        "us_per_lookup_and_connect": {kind: sorted(values) for kind, values in rounds.items()},
        "best_us": best,
        "extra_us": round(best["policy"] - best["no_policy"], 1),
    }


async def patch_latency(server: ServerProcess, n: int) -> dict[str, Any]:
    sb = await Sandbox.create(server.image, connection_config=config(server), network_policy=POLICY)
    try:
        samples: list[float] = []
        for i in range(n):
            started = time.perf_counter()
            if i % 2 == 0:
                await sb.patch_egress_rules([NetworkRule(action="allow", target="bad.test")])
            else:
                await sb.delete_egress_rules(["bad.test"])
            samples.append(time.perf_counter() - started)
    finally:
        await sb.kill()
        await sb.close()
    return summary_ms(samples)


async def run_runtime(runtime: str, internet: FakeInternet, n: int, workdir: Path) -> dict[str, Any]:
    extra = f'\n[egress]\nupstreamDns = ["{internet.dns}"]\n'
    if runtime == "docker":
        extra += f'image = "{built_image("egress", EGRESS_IMAGE)}"\n'
    with running_server(workdir / runtime, runtime=runtime, extra_config=extra) as server:
        print(f"[{runtime}] create x{n} with and without a policy", flush=True)
        create = await create_latency(server, n)
        print(f"[{runtime}] lookup+connect", flush=True)
        connect = await connect_overhead(server, internet, 50)
        print(f"[{runtime}] patch x{4 * n}", flush=True)
        patch = await patch_latency(server, 4 * n)
    return {"create": create, "connect": connect, "patch_to_enforced": patch}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20, help="creates per kind (default 20)")
    parser.add_argument("--runtimes", default="local,docker")
    args = parser.parse_args(argv)
    figures: dict[str, Any] = {"n": args.n}
    tmp = Path(tempfile.mkdtemp(prefix="egress-bench-"))  # kept when a run fails: the servers' logs
    with FakeInternet() as internet:
        for runtime in [r.strip() for r in args.runtimes.split(",") if r.strip()]:
            with podman_docker_host() if runtime == "docker" else contextlib.nullcontext():
                figures[runtime] = asyncio.run(run_runtime(runtime, internet, args.n, tmp))
    shutil.rmtree(tmp, ignore_errors=True)
    write("egress", figures)


if __name__ == "__main__":
    main(sys.argv[1:])
