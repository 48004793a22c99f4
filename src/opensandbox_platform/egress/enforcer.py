"""A policy enforced in one network namespace: its ruleset, the addresses its names resolved to,
what it refused, and the state a restart starts from.

`apply` replaces the whole table in one nftables transaction and returns once the kernel holds it:
a change is enforced when the call that made it returns. The DNS filter calls `admit` with each
answer of a name a rule decides; its addresses join that rule's sets before the answer goes back,
so the connection that follows the lookup finds them. An address leaves when the last TTL that
brought it ran out (at least `min_ttl`: a short TTL must not break the connection right after the
lookup; at most `max_ttl`). Exact names that a rule denies are resolved by the enforcer itself, so
a connection to their addresses is refused even when the sandbox learned them another way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from opensandbox_platform.egress import policy as P
from opensandbox_platform.egress.nft import Nft, NftError, denied_counts

log = logging.getLogger("egress")

Answer = list[tuple[str, int]]  # (address, ttl seconds)
Resolve = Callable[[str], Awaitable[Answer]]
MAX_COUNTED_NAMES = 1024  # denied names counted one by one (then under "other")
ENFORCEMENT_MODE = "dns+nft"


@dataclass(frozen=True)
class Limits:
    max_rules: int = P.DEFAULT_MAX_RULES
    min_ttl: float = 60.0
    max_ttl: float = 86400.0
    resolve_timeout: float = 2.0


class Enforcer:
    def __init__(
        self,
        nft: Nft,
        layout: P.Layout | None = None,
        limits: Limits | None = None,
        state_path: Path | None = None,
        resolve: Resolve | None = None,
    ) -> None:
        self.nft = nft
        self.layout = layout or P.Layout()
        self.limits = limits or Limits()
        self.state_path = state_path
        self.resolve = resolve
        self.policy = P.ALLOW_ALL
        self.enforced = False
        # name -> address -> expiry (time.time(): kept across a restart in the state file)
        self.resolved: dict[str, dict[str, float]] = {}
        self._members: dict[int, set[str]] = {}  # rule index -> addresses in its sets (as written)
        self.denied_names: Counter[str] = Counter()
        self.dns_answers: Counter[str] = Counter()  # "allowed" / "denied"
        self.changes = 0
        self._denied_before: Counter[str] = Counter()
        self._lock = asyncio.Lock()
        self._expiry: asyncio.TimerHandle | None = None
        self._refresh: asyncio.Future[None] | None = None

    # --- state across restarts ------------------------------------------------------------------------
    def load_state(self) -> P.Policy | None:
        """The policy and resolved addresses of the last run, if a state file holds them."""
        if self.state_path is None:
            return None
        try:
            data = json.loads(self.state_path.read_text())
            loaded = P.parse_policy(data["policy"], self.limits.max_rules)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        now = time.time()
        for name, addresses in dict(data.get("resolved") or {}).items():
            kept = {str(a): float(e) for a, e in dict(addresses).items() if float(e) > now}
            if kept:
                self.resolved[str(name)] = kept
        return loaded

    def _save(self) -> None:
        if self.state_path is None:
            return
        data = {"policy": self.policy.to_json(), "resolved": self.resolved}
        tmp = self.state_path.with_suffix(".tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self.state_path)

    # --- changes --------------------------------------------------------------------------------------
    async def apply(self, policy: P.Policy) -> None:
        """Enforce `policy` (the table replaced in one transaction), then resolve its exact denials."""
        async with self._lock:
            self._forget_expired()
            by_rule = self._by_rule(policy)
            if self.enforced:  # the new table's counters start at 0: keep what the old one counted
                self._denied_before.update(self._kernel_denied())
            self.nft.run(P.ruleset(policy, self.layout, by_rule))
            self.policy = policy
            self.enforced = True
            self.changes += 1
            self._members = {i: r.v4 | r.v6 for i, r in by_rule.items()}
            self._save()
        log.info("egress policy enforced default=%s rules=%d", policy.default_action, len(policy.rules))
        await self._resolve_denials(policy)

    async def patch(self, rules: tuple[P.Rule, ...]) -> P.Policy:
        policy = P.merge(self.policy, rules, self.limits.max_rules)
        await self.apply(policy)
        return policy

    async def delete(self, targets: list[str] | None) -> P.Policy:
        """Remove these targets' rules, or every rule when `targets` is None."""
        policy = P.Policy(self.policy.default_action) if targets is None else P.remove(self.policy, targets)
        await self.apply(policy)
        return policy

    def admit(self, name: str, answer: Answer) -> bool:
        """An answer for `name`: False when the policy denies the name (the filter then answers
        NXDOMAIN); else its addresses are in the sets of the rule that decides it (when one does)."""
        index, action = self.policy.decide(name)
        self.dns_answers["denied" if action == "deny" else "allowed"] += 1
        if action == "deny":
            self.count_denied_name(name)
            return False
        if index is not None and answer:
            self._remember(P.normalize_name(name), answer)
            self._sync()
        return True

    def count_denied_name(self, name: str) -> None:
        key = P.normalize_name(name)
        if key not in self.denied_names and len(self.denied_names) >= MAX_COUNTED_NAMES:
            key = "other"
        self.denied_names[key] += 1

    def denied_addresses(self) -> dict[str, int]:
        """Address -> packets of refused connections, since this enforcer started."""
        counts = Counter(self._denied_before)
        counts.update(self._kernel_denied())
        return dict(counts)

    def _kernel_denied(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for family in ("4", "6"):
            with contextlib.suppress(NftError, ValueError):
                counts.update(denied_counts(self.nft.json(f"list set inet {self.layout.table} denied{family}")))
        return counts

    def status(self) -> dict[str, object]:
        """The egress API's answer (PolicyStatusResponse), plus whether the kernel holds the policy."""
        return {
            "status": "ok" if self.enforced else "not enforced",
            "mode": self.policy.mode,
            "enforcementMode": ENFORCEMENT_MODE,
            "enforced": self.enforced,
            "policy": self.policy.to_json(),
        }

    # --- resolved addresses ---------------------------------------------------------------------------
    def _remember(self, name: str, answer: Answer) -> None:
        now = time.time()
        known = self.resolved.setdefault(name, {})
        for address, ttl in answer:
            expiry = now + min(max(float(ttl), self.limits.min_ttl), self.limits.max_ttl)
            known[address] = max(known.get(address, 0.0), expiry)

    def _by_rule(self, policy: P.Policy) -> dict[int, P.Resolved]:
        """Addresses of each name rule: those of the names it decides (the first matching rule)."""
        by_rule: dict[int, P.Resolved] = {}
        for name, addresses in self.resolved.items():
            index, _ = policy.decide(name)
            if index is None:
                continue
            target = by_rule.setdefault(index, P.Resolved())
            for address in addresses:
                target.add(address)
        return by_rule

    def _sync(self) -> None:
        """Bring the kernel's sets to what `resolved` says (one transaction for every change)."""
        wanted = {i: r.v4 | r.v6 for i, r in self._by_rule(self.policy).items()}
        commands = ""
        for index in set(wanted) | set(self._members):
            have, want = self._members.get(index, set()), wanted.get(index, set())
            commands += P.element_change(self.layout, "add", index, sorted(want - have))
            commands += P.element_change(self.layout, "delete", index, sorted(have - want))
        if commands:
            self.nft.run(commands)
            self._members = wanted
            self._save()

    def _forget_expired(self) -> None:
        now = time.time()
        for name in list(self.resolved):
            kept = {a: e for a, e in self.resolved[name].items() if e > now}
            if kept:
                self.resolved[name] = kept
            else:
                del self.resolved[name]

    def _schedule_expiry(self) -> None:
        """Wake when the next address expires (an event at a known time, not a poll)."""
        if self._expiry is not None:
            self._expiry.cancel()
        expiries = [e for addresses in self.resolved.values() for e in addresses.values()]
        if not expiries:
            return
        delay = max(0.0, min(expiries) - time.time()) + 0.05
        self._expiry = asyncio.get_running_loop().call_later(delay, self._expire)

    def _expire(self) -> None:
        self._expiry = None
        self._forget_expired()
        try:
            self._sync()
        except NftError as exc:
            log.error("cannot remove expired addresses error=%s", exc)
        with contextlib.suppress(RuntimeError):
            self._schedule_expiry()
            if self.policy.exact_denials():  # their addresses may have moved: look again
                self._refresh = asyncio.ensure_future(self._resolve_denials(self.policy))

    async def _resolve_denials(self, policy: P.Policy) -> None:
        """Resolve the names that rules deny outright, so their addresses are refused too."""
        if self.resolve is None or not policy.exact_denials():
            self._schedule_expiry()
            return
        names = [name for _, name in policy.exact_denials()]
        results = await asyncio.gather(
            *(asyncio.wait_for(self.resolve(name), self.limits.resolve_timeout) for name in names),
            return_exceptions=True,
        )
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("cannot resolve a denied name name=%s error=%r", name, result)
            elif result:
                self._remember(name, result)
        if policy is self.policy:
            self._sync()
        self._schedule_expiry()

    def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        self.nft.close()
