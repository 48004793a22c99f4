"""The runtimes the hostile-code battery runs against, one `Target` builder each.

A target starts its runtime's server (with the tests' usual harness) and says what the battery
needs to know of it: where its host-side addresses are (the tenant tries them all), where a
sandbox's execd would be reached from another sandbox, how to keep the cloud metadata address on
this machine, and its known gaps (test name -> reason: those tests are strict xfails, and
docs/security.md lists them). A kubernetes target is added here as one more builder.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from harness.controller_process import ControllerProcess
from harness.docker_api import docker_api
from harness.images import EXECD_IMAGE, TEST_IMAGE, built_image
from harness.kubernetes_server import KubernetesServer, real_node_server_config
from harness.paths import CRDS
from harness.real_node import real_node
from harness.server_process import running_server
from harness.services import local_cluster
from opensandbox_platform.server.runtimes import netpolicy

METADATA = "169.254.169.254"
MAX_PROCESSES = 512  # each sandbox's pids limit in the battery


@dataclass
class Target:
    name: str
    domain: str  # the server, host:port
    server_port: int
    api_key: str
    image: str
    state_dir: Path  # the server's (a canary file goes there)
    host_addresses: dict[str, str]  # canary name -> a host address the tenant might reach ("host", "bridge")
    gateway: str  # the host as a sandbox's default gateway sees it
    sandbox_address: Callable[[str], str]  # sandbox id -> where another sandbox would reach its execd ("": nowhere)
    # Keeps METADATA on this machine for the tenant (sandbox id, listener port -> context manager);
    # raises when it cannot be sure: the test then fails without sending anything.
    metadata_route: Callable[[str, int], AbstractContextManager[None]]
    metadata_listener: str  # the host address the metadata canary listens on
    max_processes: int = MAX_PROCESSES  # the tenant's pids limit
    limits: dict[str, str] = field(default_factory=lambda: {"cpu": "1", "memory": "256Mi"})  # each sandbox's
    gaps: dict[str, str] = field(default_factory=dict)


def primary_address() -> str:
    """The host's own address on its main interface (not loopback, not a bridge of ours)."""
    addresses = netpolicy.host_addresses(Path("/proc/net/fib_trie").read_text())
    candidates = [a for a in addresses if not a.startswith("127.") and not a.startswith("10.88.")]
    return candidates[-1] if candidates else "127.0.0.1"


# -- local -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def local_target(workdir: Path) -> Iterator[Target]:
    config = f"diskSizeMib = 128\nwarmPoolSize = 1\nmaxProcesses = {MAX_PROCESSES}\n"
    with running_server(workdir, extra_config=config, runtime="local") as server:

        @contextlib.contextmanager
        def metadata_route(sandbox_id: str, port: int) -> Iterator[None]:
            # The jail's own network namespace rejects link-local addresses before slirp4netns
            # sees a packet: make sure that rule is loaded before the tenant tries.
            (record,) = [r for r in server.records() if r["id"] == sandbox_id]
            rules = subprocess.run(
                [
                    "nsenter",
                    f"--net=/proc/{record['pid']}/ns/net",
                    "nft",
                    "list",
                    "set",
                    "inet",
                    "opensandbox",
                    "denied",
                ],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
            if "169.254.0.0/16" not in rules:
                raise RuntimeError(f"the tenant's namespace does not reject {METADATA}: not probing it")
            yield

        yield Target(
            name="local",
            domain=server.domain,
            server_port=server.port,
            api_key=server.api_key,
            image=server.image,
            state_dir=server.state_dir,
            host_addresses={"host": primary_address()},
            gateway="10.0.2.2",  # slirp4netns' gateway: the host, without its loopback
            sandbox_address=lambda sandbox_id: "",  # each sandbox has a network namespace of its own
            metadata_route=metadata_route,
            metadata_listener="127.0.0.1",
        )


@contextlib.contextmanager
def metadata_dnat(sources: str, listener: str, port: int) -> Iterator[None]:
    """Sandboxes reach the host's routes: send METADATA traffic from `sources` to our listener at
    `listener`:`port`, and drop anything else to it, in an nftables table of this test's own."""
    table = f"osb_security_{os.getpid()}"
    dnat = f"ip saddr {sources} ip daddr {METADATA} tcp dport 80 dnat to {listener}:{port}"
    rules = f"""table ip {table} {{
  chain prerouting {{ type nat hook prerouting priority dstnat; {dnat}; }}
  chain forward {{ type filter hook forward priority -1; ip daddr {METADATA} drop; }}
}}
"""
    subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["nft", "delete", "table", "ip", table], check=False, capture_output=True)


# -- docker (podman) -----------------------------------------------------------------------------------


def _podman_network() -> tuple[str, str]:
    config = docker_api("GET", "/networks/podman").json()["IPAM"]["Config"][0]
    return str(config["Subnet"]), str(config["Gateway"])


@contextlib.contextmanager
def docker_target(workdir: Path) -> Iterator[Target]:
    subnet, gateway = _podman_network()
    with running_server(workdir, runtime="docker", extra_config=f"pidsLimit = {MAX_PROCESSES}\n") as server:

        def sandbox_address(sandbox_id: str) -> str:
            inspect = docker_api("GET", f"/containers/sandbox-{sandbox_id}/json").json()
            networks = inspect["NetworkSettings"]["Networks"]
            address = next(iter(networks.values()))["IPAddress"]
            return f"{address}:44772"

        yield Target(
            name="docker",
            domain=server.domain,
            server_port=server.port,
            api_key=server.api_key,
            image=server.image,
            state_dir=server.state_dir,
            host_addresses={"host": primary_address(), "bridge": gateway},
            gateway=gateway,
            sandbox_address=sandbox_address,
            metadata_route=lambda _id, port: metadata_dnat(subnet, gateway, port),
            metadata_listener=gateway,
            gaps=DOCKER_GAPS,
        )


DOCKER_GAPS = {
    "test_cannot_connect_to_a_listener_on_the_hosts_bridge_address": "containers on the engine's bridge reach the"
    " host's address on it; only a host firewall can stop that",
    "test_cannot_connect_to_a_listener_on_the_hosts_own_address": "containers are routed to the host's addresses;"
    " only a host firewall can stop that",
    "test_cannot_reach_the_cloud_metadata_address": "containers are routed like the host: 169.254.169.254 is"
    " reachable unless a host firewall drops it",
    "test_cannot_reach_the_second_sandboxs_execd_even_with_its_token": "sandboxes share the engine's bridge and"
    " reach each other's ports; execd's token is the only guard",
    "test_filling_the_disk_hits_the_sandboxs_own_quota": "a container's writable layer is on the host's disk without"
    " a quota (overlay size limits need XFS with project quotas)",
}


# -- kubernetes (the real node) -------------------------------------------------------------------------------


@contextlib.contextmanager
def kubernetes_target(workdir: Path) -> Iterator[Target]:
    """Sandboxes are pods on the real node, built by the controller (its default pod hardening, the
    per-pod execd token) from the server's direct-mode template."""
    with local_cluster() as cluster, real_node(cluster) as node:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS))
        namespace = f"security-{secrets.token_hex(4)}"
        cluster.kubectl("create", "namespace", namespace)
        image = built_image("execd", EXECD_IMAGE)
        node.load_image(image)
        controller = ControllerProcess(cluster, namespace, "--execd-image", image).start()
        server = KubernetesServer(workdir, namespace, cluster.kubeconfig, real_node_server_config()).start()
        try:

            def sandbox_address(sandbox_id: str) -> str:
                raw = cluster.kubectl(
                    "get", "bsbx", sandbox_id, "-n", namespace, "-o", "jsonpath={.status.sandboxes[0].podIP}"
                )
                return f"{raw}:44772" if raw else ""

            yield Target(
                name="kubernetes",
                domain=server.domain,
                server_port=server.port,
                api_key="",
                image=TEST_IMAGE,
                state_dir=workdir,
                host_addresses={"host": primary_address(), "bridge": NODE_BRIDGE},
                gateway=NODE_BRIDGE,
                sandbox_address=sandbox_address,
                metadata_route=lambda _id, port: metadata_dnat(POD_CIDR, NODE_BRIDGE, port),
                metadata_listener=NODE_BRIDGE,
                max_processes=POD_PIDS_LIMIT,
                limits={"cpu": "250m", "memory": "256Mi"},  # the node has 2 CPUs for several sandboxes
                gaps=KUBERNETES_GAPS,
            )
        finally:
            server.stop()
            controller.stop()
            cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


NODE_BRIDGE = "10.77.0.1"  # the real node's bridge (tools/node.sh)
POD_CIDR = "10.77.0.0/24"
POD_PIDS_LIMIT = 4096  # the test node's kubelet podPidsLimit (tools/node.sh)
KUBERNETES_GAPS = {
    "test_cannot_connect_to_a_listener_on_the_hosts_bridge_address": "pods reach the node's address on their bridge;"
    " a NetworkPolicy-enforcing CNI or a node firewall stops that",
    "test_cannot_reach_the_second_sandboxs_execd_even_with_its_token": "pods share the pod network; the per-pod"
    " token is the guard (a NetworkPolicy can deny pod-to-pod traffic too)",
    "test_filling_the_disk_hits_the_sandboxs_own_quota": "a container's writable layer has no quota: the kubelet"
    " evicts a pod over its ephemeral-storage limit after the fact instead of failing its writes",
}


TARGETS: dict[str, Callable[[Path], AbstractContextManager[Target]]] = {
    "local": local_target,
    "docker": docker_target,
    "kubernetes": kubernetes_target,
}
