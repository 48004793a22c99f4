"""What a local sandbox's network may reach: pure functions, unit-tested.

Each sandbox has a network namespace of its own (made by the server, so it belongs to the host's
user namespace and nothing in the sandbox holds a capability over it). Outbound traffic leaves
through slirp4netns, which makes ordinary sockets on the host for it; so everything the host can
reach, the sandbox could too. The nftables ruleset below, loaded into the sandbox's namespace
before anything in it runs, keeps it to the internet: it rejects the host's own addresses,
loopback, private, shared, link-local (the cloud metadata address 169.254.169.254), multicast and
reserved ranges, and all IPv6 but loopback; DNS goes to slirp4netns' forwarder only. The operator
can let ranges through (`local.networkAllow`) or reject more (`local.networkDeny`). Loopback
destinations pass by address too: a DNS query a network policy redirects to the jail's own
loopback (runtimes/local_egress.py) still carries the outgoing interface chosen before.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

# slirp4netns' defaults (--cidr 10.0.2.0/24): the sandbox is 10.0.2.100, the gateway (the host,
# whose loopback --disable-host-loopback hides) 10.0.2.2, the DNS forwarder 10.0.2.3.
SLIRP_DNS = "10.0.2.3"
TAP = "tap0"
MTU = 65520
TABLE = "opensandbox"

DENIED_V4 = (
    "0.0.0.0/8",  # "this network"
    "10.0.0.0/8",  # private (slirp's own 10.0.2.0/24 and its gateway to the host included)
    "100.64.0.0/10",  # shared address space (carrier-grade NAT)
    "127.0.0.0/8",  # loopback: only the sandbox's own, on its lo
    "169.254.0.0/16",  # link-local: the cloud metadata service
    "172.16.0.0/12",  # private
    "192.0.0.0/24",  # IETF protocol assignments
    "192.168.0.0/16",  # private
    "198.18.0.0/15",  # benchmarking
    "224.0.0.0/3",  # multicast and reserved (224/4, 240/4, broadcast)
)


def host_addresses(fib_trie: str) -> list[str]:
    """The host's own IPv4 addresses, from /proc/net/fib_trie (each `|-- A` line followed by a
    `/32 host LOCAL` line is one)."""
    found: list[str] = []
    last = ""
    for line in fib_trie.splitlines():
        stripped = line.strip()
        if stripped.startswith("|-- "):
            last = stripped[4:]
        elif stripped.startswith("/32 host LOCAL") and last and last not in found:
            found.append(last)
    return found


def normalize(networks: Iterable[str]) -> list[str]:
    """CIDRs (or single addresses) as nftables writes them; ValueError on a malformed one."""
    result = []
    for network in networks:
        parsed = ipaddress.ip_network(network.strip(), strict=False)
        if parsed.version != 4:
            raise ValueError(f"{network}: only IPv4 networks (sandboxes have no IPv6 beyond loopback)")
        result.append(str(parsed))
    return result


def ruleset(*, host: Iterable[str], allow: Iterable[str] = (), deny: Iterable[str] = ()) -> str:
    """The nftables ruleset of a sandbox's network namespace (`nft -f -` input)."""
    denied = _collapse([*DENIED_V4, *normalize(deny), *(f"{a}/32" for a in host)])
    allowed = _collapse(normalize(allow))
    allowed_set = f"\n    elements = {{ {', '.join(allowed)} }}" if allowed else ""
    return f"""\
table inet {TABLE} {{
  set denied {{
    type ipv4_addr; flags interval;
    elements = {{ {", ".join(denied)} }}
  }}
  set allowed {{
    type ipv4_addr; flags interval;{allowed_set}
  }}
  chain output {{
    type filter hook output priority filter; policy accept;
    oifname "lo" accept
    ip daddr 127.0.0.0/8 accept
    ip daddr {SLIRP_DNS} meta l4proto {{ tcp, udp }} th dport 53 accept
    ip daddr @allowed accept
    ip daddr @denied reject with icmpx type admin-prohibited
    meta nfproto ipv6 reject with icmpx type admin-prohibited
  }}
}}
"""


def loopback_ruleset() -> str:
    """`network = "none"`: loopback only (there is no other interface, but say it anyway)."""
    return f"""\
table inet {TABLE} {{
  chain output {{
    type filter hook output priority filter; policy drop;
    oifname "lo" accept
  }}
}}
"""


def _collapse(networks: Iterable[str]) -> list[str]:
    """Overlapping ranges merged (nftables refuses overlapping interval elements)."""
    parsed = [ipaddress.IPv4Network(n) for n in networks]
    return [str(n) for n in ipaddress.collapse_addresses(parsed)]


# Per-namespace sysctls: the sandbox's root may bind ports below 1024 (it holds no capability over
# this namespace, which belongs to the host's user namespace).
SYSCTLS = {"net/ipv4/ip_unprivileged_port_start": "0"}
