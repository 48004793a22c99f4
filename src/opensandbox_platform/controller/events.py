"""Kubernetes Events on our objects, fire-and-forget (an Event is never worth failing a reconcile)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from opensandbox_platform.daemon import times
from opensandbox_platform.kube.client import EVENTS, JSON, KubeClient

log = logging.getLogger(__name__)
COMPONENT = "opensandbox-controller"


class EventRecorder:
    """Sends Events, with a spam filter like client-go's: per object and reason a burst of `burst`
    Events, then one every `refill` seconds. Routine events (a pool refilling after every claim) would
    otherwise cost the API server a write per claim. Every event is logged either way."""

    def __init__(self, client: KubeClient, host: str, burst: int = 5, refill: float = 10.0) -> None:
        self.client = client
        self.host = host
        self.burst = burst
        self.refill = refill
        self._tokens: dict[tuple[str, str], tuple[float, float]] = {}  # (uid, reason) -> (tokens, at)
        self._pending: set[asyncio.Task[None]] = set()

    def _allow(self, uid: str, reason: str) -> bool:
        now = time.monotonic()
        tokens, at = self._tokens.get((uid, reason), (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) / self.refill)
        allowed = tokens >= 1.0
        self._tokens[(uid, reason)] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._tokens) > 10_000:  # forget the oldest objects
            for key in list(self._tokens)[:5_000]:
                del self._tokens[key]
        return allowed

    def record(self, obj: JSON, type_: str, reason: str, message: str) -> None:
        """`type_` is Normal or Warning; `reason` is UpperCamelCase, `message` a sentence for a person."""
        meta = obj["metadata"]
        now = times.now()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion"),
                "kind": obj.get("kind"),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message,
            "source": {"component": COMPONENT, "host": self.host},
            "reportingComponent": COMPONENT,
            "reportingInstance": self.host,
            "firstTimestamp": times.rfc3339(now),
            "lastTimestamp": times.rfc3339(now),
            "count": 1,
        }
        log.log(
            logging.WARNING if type_ == "Warning" else logging.INFO,
            message,
            extra={"object": f"{obj.get('kind')}/{meta['namespace']}/{meta['name']}", "reason": reason},
        )
        if not self._allow(str(meta.get("uid")), reason):
            return
        task = asyncio.get_running_loop().create_task(self._send(event, meta["namespace"]))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _send(self, event: JSON, namespace: str) -> None:
        try:
            await self.client.create(EVENTS, event, namespace)
        except Exception as err:
            log.debug("event not recorded: %s", err)
