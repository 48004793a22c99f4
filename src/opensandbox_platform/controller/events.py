"""Kubernetes Events on our objects, fire-and-forget (an Event is never worth failing a reconcile)."""

from __future__ import annotations

import asyncio
import logging
import uuid

from opensandbox_platform.kube.client import EVENTS, JSON, KubeClient
from opensandbox_platform.kube.leaderelection import micro_time

log = logging.getLogger(__name__)
COMPONENT = "opensandbox-controller"


class EventRecorder:
    def __init__(self, client: KubeClient, host: str) -> None:
        self.client = client
        self.host = host
        self._pending: set[asyncio.Task[None]] = set()

    def record(self, obj: JSON, type_: str, reason: str, message: str) -> None:
        """`type_` is Normal or Warning; `reason` is UpperCamelCase, `message` a sentence for a person."""
        meta = obj["metadata"]
        now = micro_time()
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
            "firstTimestamp": now[:19] + "Z",
            "lastTimestamp": now[:19] + "Z",
            "count": 1,
        }
        log.log(
            logging.WARNING if type_ == "Warning" else logging.INFO,
            message,
            extra={"object": f"{obj.get('kind')}/{meta['namespace']}/{meta['name']}", "reason": reason},
        )
        task = asyncio.get_running_loop().create_task(self._send(event, meta["namespace"]))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _send(self, event: JSON, namespace: str) -> None:
        try:
            await self.client.create(EVENTS, event, namespace)
        except Exception as err:
            log.debug("event not recorded: %s", err)
