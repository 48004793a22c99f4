"""Leader election on a coordination.k8s.io/v1 Lease (client-go's algorithm).

A candidate takes the Lease when it is free or its holder has not renewed it for
`lease_duration` seconds (measured on our clock from when we last saw it change, so clock skew
between machines does not matter). The leader renews every `retry_period`; if it cannot renew for
`renew_deadline` it stops leading at once. On a clean shutdown it releases the Lease so a standby
takes over without waiting for expiry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from opensandbox_platform.daemon import times
from opensandbox_platform.kube.client import JSON, LEASES, KubeClient, KubeError

log = logging.getLogger(__name__)


@dataclass
class LeaderElector:
    client: KubeClient
    namespace: str
    name: str
    identity: str
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    _observed: JSON | None = None
    _observed_at: float = 0.0
    _leading: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def is_leader(self) -> bool:
        return self._leading.is_set()

    def _spec(self, acquire_time: str | None, transitions: int) -> JSON:
        now = times.rfc3339(digits=6)
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self.lease_duration),
            "acquireTime": acquire_time or now,
            "renewTime": now,
            "leaseTransitions": transitions,
        }

    async def _try_acquire_or_renew(self) -> bool:
        try:
            lease = await self.client.get(LEASES, self.name, self.namespace)
        except KubeError as err:
            if not err.not_found:
                raise
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(None, 0),
            }
            self._record(await self.client.create(LEASES, body, self.namespace))
            return True

        spec = lease.get("spec", {})
        if self._observed is None or self._observed.get("spec") != spec:
            self._record(lease, lag=self._renew_lag(spec))
        holder = spec.get("holderIdentity") or ""
        if holder not in ("", self.identity) and self.seconds_to_expiry() > 0:
            return False

        transitions = spec.get("leaseTransitions", 0) + (0 if holder == self.identity else 1)
        acquire = spec.get("acquireTime") if holder == self.identity else None
        lease["spec"] = self._spec(acquire, transitions)
        self._record(await self.client.replace(LEASES, lease, self.namespace))  # resourceVersion guards it
        return True

    def _record(self, lease: JSON, lag: float = 0.0) -> None:
        self._observed = lease
        self._observed_at = time.monotonic() - lag

    def _renew_lag(self, spec: JSON) -> float:
        """How long ago the holder renewed, by its clock, trusted up to one retry period.

        We poll every retry period, so we may see a renewal that late; the holder's timestamp
        corrects for that, and capping the correction keeps clock skew harmless (a leader stops
        acting after renew_deadline, well before others consider the lease expired)."""
        try:
            renewed = times.parse(spec["renewTime"])
        except (KeyError, ValueError, TypeError):
            return 0.0
        return min(max(0.0, (datetime.now(UTC) - renewed).total_seconds()), self.retry_period)

    def seconds_to_expiry(self) -> float:
        duration = (self._observed or {}).get("spec", {}).get("leaseDurationSeconds", self.lease_duration)
        return float(self._observed_at + duration - time.monotonic())

    async def _acquire(self) -> None:
        while True:
            try:
                if await self._try_acquire_or_renew():
                    return
            except (KubeError, OSError) as err:
                log.info("could not acquire lease: %s", err)
            # Wake up right when the holder's lease runs out, not up to a retry period later.
            await asyncio.sleep(min(self.retry_period, max(0.05, self.seconds_to_expiry() + 0.05)))

    async def _renew_until_lost(self) -> None:
        last_renew = time.monotonic()
        while True:
            await asyncio.sleep(self.retry_period)
            try:
                attempt = asyncio.wait_for(self._try_acquire_or_renew(), self.renew_deadline)
                if await attempt:
                    last_renew = time.monotonic()
                    continue
                log.warning("lease taken by another holder")
                return
            except Exception as err:
                log.warning("lease renewal failed: %s", err)
            if time.monotonic() - last_renew > self.renew_deadline:
                log.error("could not renew the lease within %.0fs", self.renew_deadline)
                return

    async def release(self) -> None:
        if not self.is_leader or self._observed is None:
            return
        lease = dict(self._observed)
        lease["spec"] = {**lease.get("spec", {}), "holderIdentity": "", "leaseDurationSeconds": 1}
        try:
            await self.client.replace(LEASES, lease, self.namespace)
        except Exception as err:
            log.info("could not release the lease: %s", err)
        self._leading.clear()

    async def run(self, lead: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Wait to become leader, run `lead()` while leading; return when leadership is lost.

        `lead` is cancelled the moment the lease is lost: a replica that is not the leader must not
        act. The caller usually exits then (as controller-runtime does) and is restarted.
        """
        log.info("waiting for leadership", extra={"lease": f"{self.namespace}/{self.name}", "id": self.identity})
        await self._acquire()
        self._leading.set()
        log.info("became leader", extra={"lease": f"{self.namespace}/{self.name}", "id": self.identity})
        leading = asyncio.create_task(lead())
        renewing = asyncio.create_task(self._renew_until_lost())
        try:
            done, _ = await asyncio.wait({leading, renewing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            leading.cancel()
            renewing.cancel()
            await asyncio.gather(leading, renewing, return_exceptions=True)
        if leading in done and not leading.cancelled() and leading.exception():
            raise leading.exception()  # type: ignore[misc]
        self._leading.clear()
        log.warning("leadership lost")
