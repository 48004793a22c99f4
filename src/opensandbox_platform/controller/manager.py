"""Starts things: the cache, the controllers (on the leader only), leader election.

What wakes each reconciler is declared in the reconciler's own `setup` (as controller-runtime's
SetupWithManager); the manager only holds what they share to read and write — the cache, the API
client, the Event recorder, the settings — and runs them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from opensandbox_platform.controller.cache import Cache
from opensandbox_platform.controller.events import EventRecorder
from opensandbox_platform.controller.settings import Settings
from opensandbox_platform.kube.client import KubeClient
from opensandbox_platform.kube.controller import Controller
from opensandbox_platform.kube.leaderelection import LeaderElector

log = logging.getLogger(__name__)


@dataclass
class Options:
    namespace: str | None = None
    concurrency: int = 16
    leader_elect: bool = False
    leader_election_id: str = "opensandbox-controller"
    leader_election_namespace: str = "default"
    settings: Settings = field(default_factory=Settings)


class Manager:
    def __init__(self, client: KubeClient, options: Options) -> None:
        self.client = client
        self.options = options
        self.settings = options.settings
        self.identity = f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
        self.cache = Cache(client, options.namespace)
        self.events = EventRecorder(client, socket.gethostname())
        self.controllers: list[Controller] = []
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self.elector = (
            LeaderElector(client, options.leader_election_namespace, options.leader_election_id, self.identity)
            if options.leader_elect
            else None
        )

    def add(self, controller: Controller, close: Callable[[], Awaitable[None]] | None = None) -> None:
        """Run `controller` while leading; `close` releases what its reconciler holds on the way out."""
        self.controllers.append(controller)
        if close is not None:
            self._closers.append(close)

    @property
    def synced(self) -> bool:
        return self.cache.synced

    @property
    def leading(self) -> bool:
        return self.elector is None or self.elector.is_leader

    async def _lead(self) -> None:
        await self.cache.wait_synced()
        if self.elector is not None:
            # A predecessor may have written allocations our watch has not delivered yet: read them now,
            # before anything allocates (docs/controller.md).
            await self.cache.batchsandboxes.resync()
        cache = self.cache
        log.info(
            "caches synced; reconciling",
            extra={
                "pools": len(cache.pools.store),
                "batchsandboxes": len(cache.batchsandboxes.store),
                "pods": len(cache.pods.store),
            },
        )
        await asyncio.gather(*(c.run() for c in self.controllers))

    async def run(self) -> None:
        informers = [asyncio.create_task(i.run()) for i in self.cache.informers]
        try:
            if self.elector is None:
                await self._lead()
            else:
                try:
                    await self.elector.run(self._lead)
                finally:
                    await self.elector.release()
        finally:
            for close in self._closers:
                await close()
            for task in informers:
                task.cancel()
            await asyncio.gather(*informers, return_exceptions=True)


def pod_namespace() -> str:
    """The namespace we run in (for the leader-election Lease), from the service account when in a pod."""
    path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    if os.path.exists(path):
        with open(path) as f:
            return f.read().strip()
    return os.environ.get("POD_NAMESPACE", "default")
