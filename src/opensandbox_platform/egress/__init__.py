"""Egress network policy: which names and addresses a sandbox may reach (docs/network-policy.md).

- `policy`: the policy model as the SDK sends it, its validation, merge/replace/delete, which rule
  a name falls under, and the nftables ruleset a policy becomes (pure, unit-tested);
- `nft`: libnftables through ctypes (one transaction per change, bound to a network namespace);
- `enforcer`: a policy applied to one network namespace: the ruleset, the addresses allowed names
  resolved to (with their TTLs), the denied-connection counters, the state kept across restarts;
- `dns`: the DNS filter (answers allowed names only, adds their addresses before it answers);
- `app`, `main`: `opensandbox-egress`, the sidecar daemon (the egress API on port 18080).

Standard library plus dnspython: the daemon is a small bundle like execd.
"""
