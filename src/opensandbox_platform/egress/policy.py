"""The egress policy: model, validation, rule semantics and the nftables ruleset. Pure: no I/O.

A policy is what the SDK sends (`NetworkPolicy`): `{"defaultAction": "allow"|"deny", "egress":
[{"action": "allow"|"deny", "target": T}, ...]}`. Rules are evaluated in order and the first that
matches decides; no match means `defaultAction`. A target is a name (`pypi.org`), a wildcard
(`*.pypi.org`: any name below pypi.org, not pypi.org itself), or (beyond upstream) an IPv4/IPv6
address or CIDR. `defaultAction` defaults to deny when the policy has rules; an empty policy
(`{}`) allows everything (the sidecar is there, so rules can be added later).

Enforcement (`ruleset`) is two layers in the sandbox's network namespace:

- every DNS query (UDP and TCP port 53, to any address) is redirected to the enforcer's DNS filter,
  which answers names whose decision is deny with NXDOMAIN and, for the others, adds the answer's
  addresses to the set of the rule the name fell under before it answers;
- an output chain that checks each new connection against the rules in order: a CIDR rule by its
  addresses, a name rule by the set of addresses its names resolved to; then the default. Denied
  connections are rejected (the caller fails at once) and counted per address.

DNS over TLS (port 853) and the well-known DNS-over-HTTPS resolvers are rejected whatever the
rules say: a sandbox cannot go around the filter through them. Loopback, replies of established
connections (and the redirected DNS queries, which reach loopback only after the route was
chosen) and the enforcer's own packets (marked with `Layout.mark`, which takes CAP_NET_ADMIN to
set) pass.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Action = Literal["allow", "deny"]
Kind = Literal["name", "wildcard", "cidr"]
ACTIONS: tuple[Action, ...] = ("allow", "deny")
DEFAULT_MAX_RULES = 256
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
# Resolvers that answer DNS over HTTPS on their well-known addresses: a sandbox could resolve any
# name through them, so they are never reachable from a sandbox under a policy.
DOH_RESOLVERS = (
    "1.1.1.1",
    "1.0.0.1",
    "8.8.8.8",
    "8.8.4.4",
    "9.9.9.9",
    "149.112.112.112",
    "208.67.222.222",
    "208.67.220.220",
    "94.140.14.14",
    "94.140.15.15",
    "185.228.168.9",
    "76.76.2.0",
    "76.76.19.19",
    "2606:4700:4700::1111",
    "2606:4700:4700::1001",
    "2001:4860:4860::8888",
    "2001:4860:4860::8844",
    "2620:fe::fe",
    "2620:fe::9",
)


class PolicyError(ValueError):
    """A policy, rule or target the API refuses (400)."""


@dataclass(frozen=True)
class Rule:
    action: Action
    target: str  # normalized: lower case without a trailing dot, or the network as ipaddress writes it
    kind: Kind

    def matches(self, name: str) -> bool:
        """Whether a (normalized) name falls under this rule; CIDR rules match addresses only."""
        if self.kind == "name":
            return name == self.target
        if self.kind == "wildcard":
            return name.endswith(self.target[1:])  # "*.x" -> ".x": names below x
        return False

    def to_json(self) -> dict[str, str]:
        return {"action": self.action, "target": self.target}


@dataclass(frozen=True)
class Policy:
    default_action: Action = "allow"
    rules: tuple[Rule, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"defaultAction": self.default_action, "egress": [r.to_json() for r in self.rules]}

    @property
    def mode(self) -> str:
        """Upstream's summary of a policy: `allow_all` or `deny_all` by default action."""
        return "deny_all" if self.default_action == "deny" else "allow_all"

    def decide(self, name: str) -> tuple[int | None, Action]:
        """(index of the first name rule the name falls under or None, the action that applies)."""
        normalized = normalize_name(name)
        for index, rule in enumerate(self.rules):
            if rule.matches(normalized):
                return index, rule.action
        return None, self.default_action

    def exact_denials(self) -> list[tuple[int, str]]:
        """Name rules that deny one exact name: the enforcer resolves those itself, so a connection
        to their addresses is refused even when the sandbox learned them elsewhere."""
        return [(i, r.target) for i, r in enumerate(self.rules) if r.kind == "name" and r.action == "deny"]


ALLOW_ALL = Policy()


# --- parsing and validation -------------------------------------------------------------------------------
def normalize_name(name: str) -> str:
    return name.strip().rstrip(".").lower()


def parse_target(raw: object) -> tuple[Kind, str]:
    """A rule's target: a name, `*.` + a name, or an IP address / CIDR; PolicyError otherwise."""
    if not isinstance(raw, str) or not raw.strip():
        raise PolicyError("a rule's target must be a non-empty string")
    text = raw.strip()
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        pass
    else:
        return "cidr", str(network)
    name = normalize_name(text)
    wildcard = name.startswith("*.")
    body = name[2:] if wildcard else name
    labels = body.split(".")
    if len(body) > 253 or not all(_LABEL.fullmatch(label) for label in labels) or body.replace(".", "").isdigit():
        raise PolicyError(
            f"target {raw!r} is neither a domain name (a.example.com), a wildcard (*.example.com) nor an IP/CIDR"
        )
    if wildcard and len(labels) < 2:
        raise PolicyError(f"target {raw!r}: a wildcard needs a domain of at least two labels (*.example.com)")
    return ("wildcard", f"*.{body}") if wildcard else ("name", body)


def parse_rule(raw: object) -> Rule:
    if not isinstance(raw, dict):
        raise PolicyError("a rule must be an object {action, target}")
    unknown = set(raw) - {"action", "target"}
    if unknown:
        raise PolicyError(f"unknown field {sorted(unknown)[0]!r} in a rule (only action and target)")
    action = raw.get("action")
    if action not in ACTIONS:
        raise PolicyError(f"a rule's action must be allow or deny, not {action!r}")
    kind, target = parse_target(raw.get("target"))
    return Rule(action, target, kind)


def parse_rules(raw: object, max_rules: int = DEFAULT_MAX_RULES) -> tuple[Rule, ...]:
    if not isinstance(raw, list):
        raise PolicyError("egress rules must be a list of {action, target}")
    rules = tuple(parse_rule(item) for item in raw)
    _check_count(len(rules), max_rules)
    return rules


def parse_policy(raw: object, max_rules: int = DEFAULT_MAX_RULES) -> Policy:
    """The policy of a create or a replace. `None` and `{}` allow everything."""
    if raw is None:
        return ALLOW_ALL
    if not isinstance(raw, dict):
        raise PolicyError("a network policy must be an object {defaultAction, egress}")
    unknown = set(raw) - {"defaultAction", "egress"}
    if unknown:
        raise PolicyError(f"unknown field {sorted(unknown)[0]!r} in the network policy (defaultAction, egress)")
    if not raw:
        return ALLOW_ALL
    default = raw.get("defaultAction")
    if default is None:
        default = "deny"  # as the SDK's and upstream's models default it
    if default not in ACTIONS:
        raise PolicyError(f"defaultAction must be allow or deny, not {default!r}")
    rules = parse_rules(raw.get("egress") or [], max_rules)
    return Policy(default, _first_per_target(rules))


def parse_targets(raw: object) -> list[str]:
    """The body of a DELETE: targets to remove, normalized as rules store them."""
    if not isinstance(raw, list) or not raw:
        raise PolicyError("the body must be a non-empty list of targets")
    return [parse_target(item)[1] for item in raw]


def _check_count(count: int, max_rules: int) -> None:
    if count > max_rules:
        raise PolicyError(f"a policy may have at most {max_rules} rules, not {count}")


def _first_per_target(rules: Iterable[Rule]) -> tuple[Rule, ...]:
    seen: set[str] = set()
    kept = []
    for rule in rules:
        if rule.target not in seen:
            seen.add(rule.target)
            kept.append(rule)
    return tuple(kept)


# --- changes --------------------------------------------------------------------------------------------------
def merge(policy: Policy, incoming: Iterable[Rule], max_rules: int = DEFAULT_MAX_RULES) -> Policy:
    """PATCH: incoming rules go first (they win), the first of a target in the payload wins, and
    existing rules of other targets stay in their order; the default action is kept."""
    new = _first_per_target(incoming)
    targets = {r.target for r in new}
    rules = new + tuple(r for r in policy.rules if r.target not in targets)
    _check_count(len(rules), max_rules)
    return Policy(policy.default_action, rules)


def remove(policy: Policy, targets: Iterable[str]) -> Policy:
    """DELETE: rules of these targets go (unknown targets are ignored); the default action is kept."""
    gone = set(targets)
    return Policy(policy.default_action, tuple(r for r in policy.rules if r.target not in gone))


# --- the ruleset ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Where the enforcer sits in the network namespace it guards."""

    table: str = "opensandbox_egress"
    dns_port: int = 15353  # the DNS filter, on the namespace's loopback; every port-53 query goes there
    mark: int = 0x4F534547  # "OSEG": the enforcer's own packets (SO_MARK needs CAP_NET_ADMIN)
    denied_set_size: int = 4096  # addresses whose refused connections are counted one by one


@dataclass
class Resolved:
    """Addresses a rule's names resolved to, by family (what goes into the rule's sets)."""

    v4: set[str] = field(default_factory=set)
    v6: set[str] = field(default_factory=set)

    def add(self, address: str) -> None:
        (self.v4 if ipaddress.ip_address(address).version == 4 else self.v6).add(address)


def set_name(index: int, version: int) -> str:
    return f"r{index}v{version}"


def ruleset(policy: Policy, layout: Layout, resolved: Mapping[int, Resolved] | None = None) -> str:
    """`nft -f` input that replaces the enforcer's table in one transaction (the old table and the
    new are never both missing: no packet passes unchecked while it changes). `resolved`: addresses
    already known for name rules, by rule index."""
    resolved = resolved or {}
    sets = [_set("doh4", "ipv4_addr", _v4(DOH_RESOLVERS)), _set("doh6", "ipv6_addr", _v6(DOH_RESOLVERS))]
    for family in ("4", "6"):
        size = layout.denied_set_size
        sets.append(f"  set denied{family} {{\n    type ipv{family}_addr; size {size}; flags dynamic; counter\n  }}")
    checks = []
    for index, rule in enumerate(policy.rules):
        verdict = "accept" if rule.action == "allow" else "goto refuse"
        if rule.kind == "cidr":
            version = ipaddress.ip_network(rule.target).version
            name = set_name(index, version)
            sets.append(_set(name, f"ipv{version}_addr", [rule.target], interval=True))
            checks.append(f"{'ip' if version == 4 else 'ip6'} daddr @{name} {verdict}")
            continue
        known = resolved.get(index, Resolved())
        sets.append(_set(set_name(index, 4), "ipv4_addr", sorted(known.v4)))
        sets.append(_set(set_name(index, 6), "ipv6_addr", sorted(known.v6)))
        checks.append(f"ip daddr @{set_name(index, 4)} {verdict}")
        checks.append(f"ip6 daddr @{set_name(index, 6)} {verdict}")
    default = "accept" if policy.default_action == "allow" else "goto refuse"
    body = "\n".join(sets)
    rule_lines = "".join(f"    {line}\n" for line in checks)
    mark = f"0x{layout.mark:08x}"
    table = f"inet {layout.table}"
    return f"""\
table {table} {{}}
delete table {table}
table {table} {{
{body}
  chain dns {{
    type nat hook output priority -100; policy accept;
    meta mark {mark} return
    meta l4proto {{ tcp, udp }} th dport 53 redirect to :{layout.dns_port}
  }}
  chain output {{
    type filter hook output priority 0; policy accept;
    meta mark {mark} accept
    oifname "lo" accept
    ip daddr 127.0.0.0/8 accept
    ip6 daddr ::1 accept
    ct state established,related accept
    ip daddr @doh4 goto refuse
    ip6 daddr @doh6 goto refuse
    meta l4proto {{ tcp, udp }} th dport 853 goto refuse
{rule_lines}    {default}
  }}
  chain refuse {{
    meta nfproto ipv4 add @denied4 {{ ip daddr }}
    meta nfproto ipv6 add @denied6 {{ ip6 daddr }}
    reject with icmpx type admin-prohibited
  }}
}}
"""


def element_change(layout: Layout, verb: Literal["add", "delete"], index: int, addresses: Iterable[str]) -> str:
    """`nft -f` input that adds addresses to (or deletes them from) a name rule's sets."""
    by_version: dict[int, list[str]] = {4: [], 6: []}
    for address in addresses:
        by_version[ipaddress.ip_address(address).version].append(address)
    return "".join(
        f"{verb} element inet {layout.table} {set_name(index, v)} {{ {', '.join(found)} }}\n"
        for v, found in by_version.items()
        if found
    )


def _set(name: str, kind: str, elements: list[str], interval: bool = False) -> str:
    flags = " flags interval;" if interval else ""
    listed = f"\n    elements = {{ {', '.join(elements)} }}" if elements else ""
    return f"  set {name} {{\n    type {kind};{flags}{listed}\n  }}"


def _v4(addresses: Iterable[str]) -> list[str]:
    return [a for a in addresses if ":" not in a]


def _v6(addresses: Iterable[str]) -> list[str]:
    return [a for a in addresses if ":" in a]
