"""The kubernetes runtime: every sandbox is one BatchSandbox (replicas 1) that the controller serves.

- Direct mode builds the sandbox's pod from the request (image, entrypoint, env, limits); pooled mode
  (`extensions.poolRef`) claims a warm pod of that Pool and starts the entrypoint and env in it.
- A create is one POST of the BatchSandbox, then a wait on the watch: an informer on the server's
  BatchSandboxes resolves the create's future when the sandbox is Running with a pod IP (or can never
  be). The create runs in its own task, shielded from the request: a client that goes away does not
  cancel it, and a create that fails or times out deletes its BatchSandbox.
- get and list are served from the informer's cache; the server's own writes (renew, metadata, delete)
  are applied to that cache at once, so a client reads what it just wrote.
- `timeout` is `spec.expireTime`: the controller deletes the BatchSandbox then, also while the
  server is down. Pause and resume are not supported (`capabilities`: the routes refuse them).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass

import aiohttp

from opensandbox_platform.api import conditions, labels
from opensandbox_platform.api.resources import BATCHSANDBOXES, POOLS
from opensandbox_platform.daemon import times
from opensandbox_platform.kube.client import JSON, KubeClient, KubeError
from opensandbox_platform.kube.informer import Informer
from opensandbox_platform.server import errors, validation
from opensandbox_platform.server.config import Config
from opensandbox_platform.server.errors import ApiError
from opensandbox_platform.server.runtimes import guards
from opensandbox_platform.server.runtimes.base import Capabilities, Endpoint, RuntimeHealth, SandboxInfo, SandboxSpec
from opensandbox_platform.server.runtimes.kubernetes_objects import (
    Entry,
    Settings,
    build_batchsandbox,
    new_sandbox_id,
    pool_image,
    read_entry,
)
from opensandbox_platform.server.runtimes.liveness import EngineMonitor, engine_call

log = logging.getLogger(__name__)


POD_READY_TIMEOUT = "KUBERNETES::POD_READY_TIMEOUT"
POD_IP_NOT_AVAILABLE = "KUBERNETES::POD_IP_NOT_AVAILABLE"  # the SDK retries endpoint calls on this one
POOL_NOT_FOUND = "KUBERNETES::POOL_NOT_FOUND"
POOL_CAPACITY_EXHAUSTED = "KUBERNETES::POOL_CAPACITY_EXHAUSTED"
FORBIDDEN = "KUBERNETES::FORBIDDEN"
API_UNAVAILABLE = "KUBERNETES::API_UNAVAILABLE"
API_NAME = "the Kubernetes API server"
DISCARD_RETRY_SECONDS = 5.0
DISCARD_ATTEMPTS = 120  # ten minutes of retries for a create's BatchSandbox the API server did not delete
SYNC_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class PoolEntry:
    namespace: str
    name: str
    image: str
    deleting: bool

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def read_pool(raw: JSON) -> PoolEntry:
    meta = raw["metadata"]
    return PoolEntry(meta.get("namespace", ""), meta["name"], pool_image(raw), bool(meta.get("deletionTimestamp")))


class KubernetesRuntime:
    capabilities = Capabilities(runtime="kubernetes", pool_ref=True, resource_requests=True)

    def __init__(self, config: Config) -> None:
        section = config.kubernetes
        self.namespace = section.namespace
        self.kubeconfig = section.kubeconfig or None
        self.create_timeout = section.create_timeout_seconds
        self.api_timeout = section.api_timeout_seconds
        self.engine = EngineMonitor(API_NAME, self._ping, section.health_interval_seconds, section.api_timeout_seconds)
        self.settings = Settings(section.image_pull_policy, section.default_pod_spec)
        self._client: KubeClient | None = None
        self._sandboxes: Informer[Entry] | None = None
        self._pools: Informer[PoolEntry] | None = None
        self._entries: dict[str, Entry] = {}  # by name: the newest version seen or written
        self._deleted: set[str] = set()  # names we deleted: hidden until the watch agrees (names are UUIDs)
        self._waiters: dict[str, asyncio.Future[Entry]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._creates: set[asyncio.Task[SandboxInfo]] = set()

    # --- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        client = self._client = KubeClient.from_config(self.kubeconfig, timeout=self.api_timeout)
        try:
            # Fail at start-up, with the API server's words, when the CRD or our permissions are missing.
            await client.list(BATCHSANDBOXES, self.namespace, limit=1)
            await client.list(POOLS, self.namespace, limit=1)
        except KubeError as err:
            await client.aclose()
            raise RuntimeError(
                f"kubernetes runtime: cannot list BatchSandboxes/Pools in {self.namespace}: {err}"
            ) from None
        selector = f"{labels.CREATED_BY}={labels.CREATED_BY_SERVER}"
        self._sandboxes = Informer(client, BATCHSANDBOXES, read_entry, self.namespace, label_selector=selector)
        self._sandboxes.add_handler(self._on_sandbox_event)
        self._pools = Informer(client, POOLS, read_pool, self.namespace)
        for informer in (self._sandboxes, self._pools):
            task = asyncio.create_task(informer.run(), name=f"informer-{informer.resource.plural}")
            self._background.add(task)
        await asyncio.wait_for(
            asyncio.gather(self._sandboxes.synced.wait(), self._pools.synced.wait()), SYNC_TIMEOUT_SECONDS
        )
        self.engine.start()

    def health(self) -> RuntimeHealth:
        """The API server's state, and whether both informers are connected (else the cache that
        get and list read may be stale)."""
        informers = {"sandboxInformer": self._sandboxes, "poolInformer": self._pools}
        return self.engine.health(
            **{name: bool(i is not None and i.connected and i.synced.is_set()) for name, i in informers.items()}
        )

    async def _ping(self) -> None:
        await self.client.request("GET", "/version")

    def unavailable_error(self, exc: BaseException) -> ApiError | None:
        if isinstance(exc, TimeoutError):
            why = f"no answer within {self.api_timeout:g}s (kubernetes.apiTimeoutSeconds)"
        elif isinstance(exc, aiohttp.ClientError):
            why = str(exc) or type(exc).__name__
        else:
            return None
        self.engine.failed(why)
        return ApiError(503, API_UNAVAILABLE, f"{API_NAME} is unavailable: {why}", {"Retry-After": "5"})

    async def close(self) -> None:
        """Creates still waiting are given up (their BatchSandboxes deleted); sandboxes keep running."""
        await self.engine.close()
        for create in list(self._creates):
            create.cancel()
        await asyncio.gather(*self._creates, return_exceptions=True)
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    @property
    def client(self) -> KubeClient:
        assert self._client is not None, "the runtime is not started"
        return self._client

    # --- the cache --------------------------------------------------------------------------------
    def _on_sandbox_event(self, old: Entry | None, new: Entry | None) -> None:
        if new is None:
            assert old is not None
            self._gone(old)
            return
        if new.name in self._deleted:
            return  # we deleted it; a late update must not bring it back
        self._observe(new)

    def _observe(self, entry: Entry) -> None:
        """Keep the newest version (our writes' results can be ahead of the watch) and wake its create."""
        current = self._entries.get(entry.name)
        if current is None or entry.newer_than(current):
            self._entries[entry.name] = entry
            current = entry
        waiter = self._waiters.get(entry.name)
        if waiter is not None and not waiter.done():
            if current.running:
                waiter.set_result(current)
            elif current.failure is not None:
                waiter.set_exception(_failure_error(current))

    def _gone(self, entry: Entry) -> None:
        current = self._entries.get(entry.name)
        if current is not None and current.uid == entry.uid:
            del self._entries[entry.name]
        self._deleted.discard(entry.name)
        waiter = self._waiters.get(entry.name)
        if waiter is not None and not waiter.done():
            waiter.set_exception(
                ApiError(409, errors.INVALID_STATE, f"sandbox {entry.name} was deleted while starting")
            )

    def _entry(self, sandbox_id: str) -> Entry:
        entry = self._entries.get(sandbox_id)
        if entry is None:
            raise errors.not_found(sandbox_id)
        return entry

    # --- create -----------------------------------------------------------------------------------
    @engine_call
    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        task = asyncio.create_task(self._create(spec))
        self._creates.add(task)
        task.add_done_callback(self._create_done)
        return await asyncio.shield(task)

    def _create_done(self, task: asyncio.Task[SandboxInfo]) -> None:
        self._creates.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("create failed: %s", task.exception())  # retrieved: the client may have gone

    async def _create(self, spec: SandboxSpec) -> SandboxInfo:
        pool = spec.extensions.get(labels.EXTENSION_POOL_REF)
        image = await self._pool_image(pool) if pool else None
        sandbox_id = new_sandbox_id()
        obj = build_batchsandbox(sandbox_id, spec, self.settings, dt.datetime.now(dt.UTC), image)
        waiter: asyncio.Future[Entry] = asyncio.get_running_loop().create_future()
        self._waiters[sandbox_id] = waiter
        started = time.perf_counter()
        try:
            try:
                created = await self.client.create(BATCHSANDBOXES, obj, self.namespace)
            except KubeError as err:
                self._waiters.pop(sandbox_id, None)
                raise _create_error(err) from None  # refused: nothing to clean up
            posted = time.perf_counter()
            self._observe(read_entry(created))
            try:
                entry = await asyncio.wait_for(waiter, self.create_timeout)
            except TimeoutError:
                raise self._timeout_error(sandbox_id) from None
            log.debug(
                "created %s: POST %.1f ms, Running after %.1f ms",
                sandbox_id,
                (posted - started) * 1000,
                (time.perf_counter() - posted) * 1000,
            )
        except BaseException:
            if sandbox_id in self._waiters:  # the POST may have created it
                await self._discard(sandbox_id)
            raise
        finally:
            self._waiters.pop(sandbox_id, None)
        return entry.info

    async def _pool_image(self, pool: str) -> str:
        """The Pool's image; 400 when there is no such Pool. The cache answers; a GET only on a miss
        (a Pool created a moment ago)."""
        if not validation.is_dns_subdomain(pool):
            raise ApiError(400, POOL_NOT_FOUND, f"extensions.poolRef {pool!r} is not a valid Pool name")
        assert self._pools is not None
        cached = self._pools.get(f"{self.namespace}/{pool}")
        if cached is not None and not cached.deleting:
            return cached.image
        try:
            return read_pool(await self.client.get(POOLS, pool, self.namespace)).image
        except KubeError as err:
            if err.not_found:
                raise ApiError(
                    400, POOL_NOT_FOUND, f"Pool {pool!r} does not exist in namespace {self.namespace}"
                ) from None
            raise

    def _timeout_error(self, sandbox_id: str) -> ApiError:
        entry = self._entries.get(sandbox_id)
        detail = f" ({entry.info.reason}: {entry.info.message})" if entry and entry.info.message else ""
        if entry is not None and entry.info.reason == "POOL_EXHAUSTED":
            return ApiError(
                429, POOL_CAPACITY_EXHAUSTED, f"no idle pod in the Pool within {self.create_timeout:g}s{detail}"
            )
        return ApiError(504, POD_READY_TIMEOUT, f"the sandbox was not Running within {self.create_timeout:g}s{detail}")

    async def _discard(self, sandbox_id: str) -> None:
        """Delete a create's BatchSandbox (it may not exist); runs to the end even when cancelled.
        When the API server does not answer, the delete is retried in the background."""
        task = asyncio.ensure_future(self._delete_object(sandbox_id, None))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            await task
            raise
        except (TimeoutError, aiohttp.ClientError):
            retry = asyncio.create_task(self._discard_later(sandbox_id), name=f"discard-{sandbox_id}")
            self._background.add(retry)
            retry.add_done_callback(self._background.discard)
        except Exception:
            log.exception("could not delete the BatchSandbox of a failed create", extra={"sandbox": sandbox_id})

    async def _discard_later(self, sandbox_id: str) -> None:
        for _ in range(DISCARD_ATTEMPTS):
            await asyncio.sleep(DISCARD_RETRY_SECONDS)
            try:
                await self._delete_object(sandbox_id, None)
                return
            except (TimeoutError, aiohttp.ClientError, KubeError) as err:
                log.info(
                    "retrying the delete of a failed create's BatchSandbox: %r", err, extra={"sandbox": sandbox_id}
                )
        log.error("gave up deleting the BatchSandbox of a failed create", extra={"sandbox": sandbox_id})

    async def _delete_object(self, name: str, uid: str | None) -> None:
        try:
            await self.client.delete(BATCHSANDBOXES, name, self.namespace, precondition_uid=uid)
        except KubeError as err:
            if not (err.not_found or err.conflict):
                raise
            if err.not_found and name not in self._entries:
                return  # never created, or the watch has seen it go already
        self._entries.pop(name, None)
        self._deleted.add(name)

    # --- the other calls --------------------------------------------------------------------------
    async def get(self, sandbox_id: str) -> SandboxInfo:
        return self._entry(sandbox_id).info

    async def list(self) -> list[SandboxInfo]:
        return [entry.info for entry in self._entries.values()]

    @engine_call
    async def delete(self, sandbox_id: str) -> None:
        entry = self._entry(sandbox_id)
        await self._delete_object(entry.name, entry.uid)

    # Not called (capabilities.pause is False: the routes refuse first); here for the protocol.
    async def pause(self, sandbox_id: str) -> None:
        raise guards.not_supported("pause", self.capabilities.runtime)

    async def resume(self, sandbox_id: str) -> None:
        raise guards.not_supported("resume", self.capabilities.runtime)

    @engine_call
    async def renew(self, sandbox_id: str, expires_at: dt.datetime) -> SandboxInfo:
        entry = self._entry(sandbox_id)
        guards.require_expiry(sandbox_id, entry.info.expires_at)
        return await self._patch(entry, {"spec": {"expireTime": times.rfc3339(expires_at, digits=6)}})

    @engine_call
    async def patch_metadata(self, sandbox_id: str, patch: dict[str, str | None]) -> SandboxInfo:
        entry = self._entry(sandbox_id)
        if not patch:
            return entry.info
        return await self._patch(entry, {"metadata": {"labels": patch}})

    async def _patch(self, entry: Entry, patch: JSON) -> SandboxInfo:
        try:
            result = await self.client.patch(BATCHSANDBOXES, entry.name, patch, self.namespace)
        except KubeError as err:
            if err.not_found:
                raise errors.not_found(entry.name) from None
            if err.status in (400, 422):
                raise errors.invalid(err.message) from None
            raise
        updated = read_entry(result)
        self._observe(updated)
        return self._entries.get(entry.name, updated).info

    async def endpoint(self, sandbox_id: str, port: int) -> Endpoint:
        entry = self._entry(sandbox_id)
        if not entry.pod_ip:
            raise ApiError(404, POD_IP_NOT_AVAILABLE, f"sandbox {sandbox_id} has no pod IP yet ({entry.info.state})")
        host = f"[{entry.pod_ip}]" if ":" in entry.pod_ip else entry.pod_ip
        return Endpoint(f"{host}:{port}")

    async def upstream(self, sandbox_id: str, port: int) -> Endpoint:
        guards.require_running(sandbox_id, self._entry(sandbox_id).info.state)
        return await self.endpoint(sandbox_id, port)


def _create_error(err: KubeError) -> ApiError:
    if err.status in (400, 422):
        return errors.invalid(f"the BatchSandbox was refused: {err.message}")
    if err.status == 403:
        return ApiError(403, FORBIDDEN, f"the BatchSandbox was refused: {err.message}")
    return ApiError(500, errors.INTERNAL_ERROR, f"the Kubernetes API failed to create the BatchSandbox: {err}")


def _failure_error(entry: Entry) -> ApiError:
    assert entry.failure is not None
    reason, message = entry.failure
    if reason == conditions.POOL_NOT_FOUND:
        return ApiError(400, POOL_NOT_FOUND, message)
    if reason == conditions.FAILED_CREATE:
        return ApiError(400, errors.START_FAILED, f"the sandbox's pod cannot be created: {message}")
    if reason == conditions.POD_FAILED:
        return ApiError(400, errors.START_FAILED, f"sandbox {entry.name}: {message}")
    if reason == "DELETING":
        return ApiError(409, errors.INVALID_STATE, f"sandbox {entry.name}: {message}")
    return ApiError(400, errors.START_FAILED, f"sandbox {entry.name} ended while starting: {message}")
