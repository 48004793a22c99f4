"""Informer: a local cache of one kind, kept current with list + watch.

- Lists in pages, then watches from the list's resourceVersion with bookmarks.
- A `410 Gone` (the resourceVersion fell out of etcd's window) relists; handlers then see the
  difference between the old and new cache as adds, updates and deletes.
- A watch that stays silent longer than `silence_timeout` (bookmarks arrive about once a minute) is
  restarted, so a half-dead connection cannot freeze the cache.
- `transform` turns each raw object into the slim value that is cached (a pod costs ~10 KB as
  JSON; the controller keeps the few fields it uses).
- The cache never goes back in time: an object older (by resourceVersion) than the cached one is
  ignored. Writers put their results in at once (`assume`), and a watch event or a list that
  started before such a write must not undo it: the controller's allocation ledger relies on it.
- `resync()` reads everything again with a consistent list, e.g. when a replica becomes leader and
  must see every write its predecessor made before acting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import aiohttp

from opensandbox_platform.kube.client import JSON, KubeClient, KubeError, Resource

log = logging.getLogger(__name__)


class Cached(Protocol):
    @property
    def key(self) -> str: ...


T = TypeVar("T", bound=Cached)
Handler = Callable[[T | None, T | None], None]  # (old, new): add = (None, new), delete = (old, None)
Indexer = Callable[[T], Iterable[str]]


def object_key(obj: JSON) -> str:
    meta = obj["metadata"]
    return f"{meta['namespace']}/{meta['name']}" if meta.get("namespace") else str(meta["name"])


@dataclass
class Informer(Generic[T]):
    client: KubeClient
    resource: Resource
    transform: Callable[[JSON], T]
    namespace: str | None = None
    label_selector: str | None = None
    page_size: int = 500
    watch_timeout: int = 290  # server-side timeoutSeconds of one watch request
    silence_timeout: float = 330.0  # restart a watch that sent nothing (not even a bookmark) this long

    store: dict[str, T] = field(default_factory=dict)
    synced: asyncio.Event = field(default_factory=asyncio.Event)
    # False from a failed list or watch until the next list succeeds or the next event arrives:
    # the cache may then be stale (readiness reports it).
    connected: bool = False
    _versions: dict[str, tuple[str, int]] = field(default_factory=dict)  # key -> (uid, resourceVersion)
    _handlers: list[Handler[T]] = field(default_factory=list)
    _indexers: dict[str, Indexer[T]] = field(default_factory=dict)
    _indexes: dict[str, dict[str, set[str]]] = field(default_factory=dict)
    _rv: str = ""

    # --- reading ----------------------------------------------------------------------------------
    def get(self, key: str) -> T | None:
        return self.store.get(key)

    def by_index(self, index: str, value: str) -> list[T]:
        return [self.store[k] for k in self._indexes[index].get(value, ())]

    def add_index(self, name: str, indexer: Indexer[T]) -> None:
        self._indexers[name] = indexer
        self._indexes[name] = {}
        for obj in self.store.values():
            self._index(obj)

    def add_handler(self, handler: Handler[T]) -> None:
        self._handlers.append(handler)

    # --- cache maintenance ------------------------------------------------------------------------
    def _index(self, obj: T) -> None:
        for name, indexer in self._indexers.items():
            for value in indexer(obj):
                self._indexes[name].setdefault(value, set()).add(obj.key)

    def _unindex(self, obj: T) -> None:
        for name, indexer in self._indexers.items():
            for value in indexer(obj):
                keys = self._indexes[name].get(value)
                if keys is not None:
                    keys.discard(obj.key)
                    if not keys:
                        del self._indexes[name][value]

    def _newer(self, raw: JSON, key: str) -> bool:
        """Whether `raw` is not older than what is cached for `key` (and records its version)."""
        meta = raw["metadata"]
        version = _version(meta.get("resourceVersion"))
        uid = str(meta.get("uid", ""))
        cached = self._versions.get(key)
        if cached is not None and cached[0] == uid and version < cached[1]:
            return False
        self._versions[key] = (uid, version)
        return True

    def _put_raw(self, raw: JSON) -> None:
        key = object_key(raw)
        if self._newer(raw, key):
            self._put(self.transform(raw))

    def _put(self, obj: T) -> None:
        old = self.store.get(obj.key)
        if old is not None:
            self._unindex(old)
        self.store[obj.key] = obj
        self._index(obj)
        self._notify(old, obj)

    def _remove(self, key: str) -> None:
        self._versions.pop(key, None)
        old = self.store.pop(key, None)
        if old is not None:
            self._unindex(old)
            self._notify(old, None)

    def _notify(self, old: T | None, new: T | None) -> None:
        for handler in self._handlers:
            try:
                handler(old, new)
            except Exception:
                log.exception("informer handler failed", extra={"resource": self.resource.plural})

    def _params(self) -> dict[str, str | int]:
        return {"labelSelector": self.label_selector} if self.label_selector else {}

    async def _list(self) -> str:
        """A consistent list (all pages from one snapshot) into the cache; returns its resourceVersion.

        What the list no longer has is removed, unless the cache holds a newer version of it (an
        object created, or written by us, after the list's snapshot)."""
        seen: set[str] = set()
        cont = ""
        while True:
            params = {**self._params(), "limit": self.page_size}
            if cont:
                params["continue"] = cont
            page = await self.client.list(self.resource, self.namespace, **params)
            for raw in page.get("items", []):
                key = object_key(raw)
                seen.add(key)
                self._put_raw(raw)
            cont = page["metadata"].get("continue", "")
            if not cont:
                version: str = page["metadata"]["resourceVersion"]
                break
        snapshot = _version(version)
        for key in [k for k in self.store if k not in seen]:
            if self._versions.get(key, ("", 0))[1] <= snapshot:
                self._remove(key)
        return version

    async def resync(self) -> None:
        """Bring the cache up to date with a consistent list now (the watch goes on meanwhile)."""
        await self._list()

    async def _watch_once(self) -> None:
        stream = self.client.watch(
            self.resource,
            self.namespace,
            resourceVersion=self._rv,
            allowWatchBookmarks="true",
            timeoutSeconds=self.watch_timeout,
            **self._params(),
        )
        iterator = aiter(stream)
        try:
            while True:
                try:
                    event = await asyncio.wait_for(anext(iterator), self.silence_timeout)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    log.warning("watch silent, restarting", extra={"resource": self.resource.plural})
                    return
                self._apply(event)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    def _apply(self, event: JSON) -> None:
        kind, raw = event["type"], event["object"]
        if kind == "ERROR":
            code = raw.get("code", 500)
            raise KubeError(code, raw.get("reason", ""), raw.get("message", ""))
        self._rv = raw["metadata"]["resourceVersion"]
        self.connected = True
        if kind == "BOOKMARK":
            return
        if kind == "DELETED":
            key = object_key(raw)
            cached = self._versions.get(key)
            if cached is None or cached[0] == str(raw["metadata"].get("uid", "")):  # not a newer namesake
                self._remove(key)
        else:
            self._put_raw(raw)

    async def run(self) -> None:
        """List, then watch forever; relist on 410 Gone; back off on errors."""
        backoff = 0.1
        need_list = True
        while True:
            try:
                if need_list:
                    self._rv = await self._list()
                    need_list = False
                    self.connected = True
                    self.synced.set()
                await self._watch_once()
                backoff = 0.1
            except KubeError as err:
                if err.gone:
                    log.info("watch expired, relisting", extra={"resource": self.resource.plural})
                    need_list = True
                    continue
                self.connected = False
                log.warning("watch failed: %s", err, extra={"resource": self.resource.plural})
                need_list = need_list or err.status >= 500
            except (
                aiohttp.ClientError,
                OSError,
                ValueError,
                KeyError,
            ) as err:  # connection trouble, torn stream
                self.connected = False
                log.warning("watch broke: %r", err, extra={"resource": self.resource.plural})
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def assume(self, raw: JSON) -> None:
        """Put an object we just wrote (the API server's answer) into the cache before its watch
        event arrives, so that the next reconcile reads its own write."""
        self._put_raw(raw)


def _version(resource_version: str | None) -> int:
    """resourceVersions are etcd revisions: integers that only grow (0 when absent or unexpected)."""
    return int(resource_version) if resource_version and resource_version.isdigit() else 0
