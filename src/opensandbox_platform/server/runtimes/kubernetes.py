"""The kubernetes runtime: every sandbox is one BatchSandbox (replicas 1) that the controller serves.

- Direct mode builds the sandbox's pod from the request (image, entrypoint, env, limits); pooled mode
  (`extensions.poolRef`) claims a warm pod of that Pool and starts the entrypoint and env in it.
- A create is one POST of the BatchSandbox, then a wait on the watch: an informer on the server's
  BatchSandboxes resolves the create's future when the sandbox is Running with a pod IP (or can never
  be), then one patch that clears its pending mark before the 202. The create runs in its own task,
  shielded from the request: a client that goes away does not cancel it, and a create that fails or
  times out deletes its BatchSandbox (retried until it is gone). A create that never answered (the
  server died) is deleted by its provisional expiry and by any server's sweep of abandoned creates.
- get and list are served from the informer's cache; the server's own writes (renew, metadata, delete)
  are applied to that cache at once, so a client reads what it just wrote; a sandbox another replica
  created a moment ago, or a Pending one, is read from the API server before an answer.
- An unreachable or failing API server is a 503 with Retry-After (logged once per outage by the
  EngineMonitor, which /health and /ready report); a create holds its POST up to HOLD_SECONDS while
  the API server comes back.
- `timeout` is `spec.expireTime`: the controller deletes the BatchSandbox then, also while the
  server is down.
- Pause (with `snapshotRepository`) is a snapshot, then replicas 0 on the snapshot's image; a pooled
  sandbox leaves its Pool then (its claimed pod is deleted) for a template built from the Pool's.
  Resume is replicas 1: a fresh pod from the snapshot image (docs/snapshots.md).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from opensandbox_platform.api import conditions, labels, tokens
from opensandbox_platform.api.resources import BATCHSANDBOXES, POOLS
from opensandbox_platform.daemon import times
from opensandbox_platform.execd import lifecycle
from opensandbox_platform.kube.client import EVENTS, JSON, PODS, KubeClient, KubeError
from opensandbox_platform.kube.informer import Informer
from opensandbox_platform.server import errors, metrics, validation
from opensandbox_platform.server.config import Config
from opensandbox_platform.server.errors import ApiError
from opensandbox_platform.server.runtimes import guards
from opensandbox_platform.server.runtimes import kubernetes_owned as owned
from opensandbox_platform.server.runtimes import kubernetes_snapshots as ksnaps
from opensandbox_platform.server.runtimes import snapshots as snaps
from opensandbox_platform.server.runtimes.base import (
    Capabilities,
    Endpoint,
    LogText,
    RuntimeHealth,
    SandboxInfo,
    SandboxSpec,
    SnapshotInfo,
    SnapshotState,
    State,
)
from opensandbox_platform.server.runtimes.events import EventList, EventLog, Reason, SandboxEvent
from opensandbox_platform.server.runtimes.hooks import begin_lifecycle
from opensandbox_platform.server.runtimes.kubernetes_objects import (
    RESUME_PATCH,
    Entry,
    Mount,
    Settings,
    build_batchsandbox,
    finish_create,
    left_pool_patch,
    left_pool_template,
    new_sandbox_id,
    owner_reference,
    paused_patch,
    pool_egress,
    pool_image,
    pool_mounts,
    read_entry,
    volumes_not_in_pool,
)
from opensandbox_platform.server.runtimes.liveness import EngineMonitor
from opensandbox_platform.server.volumes import VolumeSpec

log = logging.getLogger(__name__)
T = TypeVar("T")


POD_READY_TIMEOUT = "KUBERNETES::POD_READY_TIMEOUT"
POD_IP_NOT_AVAILABLE = "KUBERNETES::POD_IP_NOT_AVAILABLE"  # the SDK retries endpoint calls on this one
POOL_NOT_FOUND = "KUBERNETES::POOL_NOT_FOUND"
POOL_CAPACITY_EXHAUSTED = "KUBERNETES::POOL_CAPACITY_EXHAUSTED"
FORBIDDEN = "KUBERNETES::FORBIDDEN"
API_UNAVAILABLE = "KUBERNETES::API_UNAVAILABLE"
API_NAME = "the Kubernetes API server"
SYNC_TIMEOUT_SECONDS = 30.0
HOLD_SECONDS = 5.0  # a create's POST retries this long while the API server is unreachable
ABANDON_GRACE_SECONDS = 30.0  # a pending create older than createTimeoutSeconds plus this is abandoned
RETRY_AFTER_SECONDS = 5


@dataclass(frozen=True, slots=True)
class PoolEntry:
    namespace: str
    name: str
    image: str
    deleting: bool
    egress: bool  # its pods have the egress sidecar (spec.egress)
    mounts: frozenset[Mount] = frozenset()  # its sandbox container's (a pooled create's volumes must be among them)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def read_pool(raw: JSON) -> PoolEntry:
    meta = raw["metadata"]
    return PoolEntry(
        meta.get("namespace", ""),
        meta["name"],
        pool_image(raw),
        bool(meta.get("deletionTimestamp")),
        pool_egress(raw),
        pool_mounts(raw),
    )


class PauseRefused(Exception):
    """A pooled sandbox cannot be paused: no Pool template to resume it from."""


class KubernetesRuntime:
    capabilities = Capabilities(
        runtime="kubernetes",
        pool_ref=True,
        resource_requests=True,
        image_auth=True,
        volumes=frozenset({"host", "pvc"}),
        network_policy=True,
        lifecycle=True,  # direct mode only (validation refuses it with a poolRef)
    )

    def __init__(self, config: Config) -> None:
        section = config.kubernetes
        self.namespace = section.namespace
        self.kubeconfig = section.kubeconfig or None
        self.create_timeout = section.create_timeout_seconds
        self.api_timeout = section.api_timeout_seconds
        # Knows whether the API server answers (for /health and /ready), and logs an outage once.
        self.engine = EngineMonitor(API_NAME, self._ping, section.health_interval_seconds, section.api_timeout_seconds)
        self.settings = Settings(
            section.image_pull_policy,
            section.default_pod_spec,
            allowed_host_paths=tuple(config.server.allowed_host_paths),
            default_volume_storage=section.default_volume_storage,
            egress_upstream_dns=tuple(config.egress.upstream_dns),
            snapshot_pull_secret=section.snapshot_registry_secret,
        )
        self.snapshots: ksnaps.KubernetesSnapshots | None = None
        if section.snapshot_repository:
            commit = ksnaps.CommitSettings(
                repository=section.snapshot_repository,
                committer_image=section.snapshot_committer_image,
                max_bytes=section.snapshot_max_size_mib << 20,
                timeout_seconds=section.snapshot_timeout_seconds,
                ca_pem=ksnaps.read_ca(section.snapshot_registry_ca_file),
                registry_secret=section.snapshot_registry_secret,
                ca_file=section.snapshot_registry_ca_file,
            )
            self.snapshots = ksnaps.KubernetesSnapshots(lambda: self.client, self._call, self.namespace, commit)
            self.capabilities = dataclasses.replace(self.capabilities, snapshots=True, pause=True)
        self.token_key = tokens.read_key(section.sandbox_token_key_file) if section.sandbox_token_key_file else None
        self._client: KubeClient | None = None
        self._sandboxes: Informer[Entry] | None = None
        self._pools: Informer[PoolEntry] | None = None
        self._entries: dict[str, Entry] = {}  # by name: the newest version seen or written
        self._deleted: set[str] = set()  # names we deleted: hidden until the watch agrees (names are UUIDs)
        self._waiters: dict[str, asyncio.Future[Entry]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._creates: set[asyncio.Task[SandboxInfo]] = set()
        self.events = EventLog()

    # --- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        trace = metrics.engine_trace("kubernetes", metrics.kubernetes_resource)
        client = self._client = KubeClient.from_config(self.kubeconfig, timeout=self.api_timeout, trace_configs=[trace])
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
            self._spawn(informer.run(), f"informer-{informer.resource.plural}")
        await asyncio.wait_for(
            asyncio.gather(self._sandboxes.synced.wait(), self._pools.synced.wait()), SYNC_TIMEOUT_SECONDS
        )
        self._spawn(self._sweep_abandoned(), "abandoned-creates")
        if self.snapshots is not None:
            await self.snapshots.start()
            self._spawn(self._recover_pauses(), "recover-pauses")
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
        """The 503 for a call the API server did not serve (no connection, no answer in time, 429 or
        5xx); None for any other error."""
        if isinstance(exc, TimeoutError):
            why = f"no answer within {self.api_timeout:g}s (kubernetes.apiTimeoutSeconds)"
        elif isinstance(exc, aiohttp.ClientError | OSError):
            why = str(exc) or type(exc).__name__
        elif isinstance(exc, KubeError) and exc.transient:
            why = str(exc)
        else:
            return None
        self.engine.failed(why)
        return ApiError(
            503, API_UNAVAILABLE, f"{API_NAME} is unavailable: {why}", {"Retry-After": str(RETRY_AFTER_SECONDS)}
        )

    def _spawn(self, work: Awaitable[None], name: str) -> None:
        task = asyncio.ensure_future(work)
        task.set_name(name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Creates still waiting are given up (their BatchSandboxes deleted); sandboxes keep running."""
        await self.engine.close()
        if self.snapshots is not None:
            await self.snapshots.close()
        for create in list(self._creates):
            create.cancel()
        await asyncio.gather(*self._creates, return_exceptions=True)
        background = list(self._background)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
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
        if entry.name not in self._deleted and entry.info.expires_at and entry.info.expires_at <= times.now():
            self.events.gone(entry.name, Reason.EXPIRED, f"its expireTime {entry.info.expires_at.isoformat()} passed")
        self._deleted.discard(entry.name)
        if self.snapshots is not None and (entry.pausing or entry.paused_into or entry.info.snapshot_id):
            self._spawn(self.snapshots.forget_pauses(entry.name), f"forget-pauses-{entry.name}")
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

    async def _fresh_entry(self, sandbox_id: str) -> Entry:
        """The sandbox as the API server has it when our cache may lag: not seen yet (another replica
        created it a moment ago) or still Pending. A GET is a consistent read."""
        entry = self._entries.get(sandbox_id)
        if entry is not None and entry.info.state != "Pending":
            return entry
        if sandbox_id in self._deleted or not validation.is_dns_subdomain(sandbox_id):
            raise errors.not_found(sandbox_id)
        try:
            raw = await self._call(self.client.get(BATCHSANDBOXES, sandbox_id, self.namespace))
        except KubeError as err:
            if err.not_found:
                raise errors.not_found(sandbox_id) from None
            raise
        fresh = read_entry(raw)
        if (raw["metadata"].get("labels") or {}).get(labels.CREATED_BY) != labels.CREATED_BY_SERVER:
            raise errors.not_found(sandbox_id)  # not a sandbox of the lifecycle API
        self._observe(fresh)
        return self._entries.get(sandbox_id, fresh)

    async def _call(self, request: Awaitable[T]) -> T:
        """An API-server call; an outage (no connection, no answer, 429, 5xx) becomes a 503 with Retry-After."""
        try:
            result = await request
        except Exception as exc:
            error = self.unavailable_error(exc)
            if error is None:
                raise
            raise error from None
        self.engine.ok()
        return result

    # --- create -----------------------------------------------------------------------------------
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
        pool_ref = spec.extensions.get(labels.EXTENSION_POOL_REF)
        if spec.snapshot_id:
            spec = await self._restoring(spec, spec.snapshot_id, pool_ref)
        pool = await self._pool(pool_ref) if pool_ref else None
        if spec.network_policy is not None:
            self._check_network_policy(pool)
        if pool is not None and spec.volumes:
            _check_pool_volumes(pool, spec.volumes)
        sandbox_id = new_sandbox_id()
        now = dt.datetime.now(dt.UTC)
        # (a preStart hook holds the create that much longer)
        pending_for = self.create_timeout + lifecycle.pre_start_seconds(spec.lifecycle) + ABANDON_GRACE_SECONDS
        image, egress = (pool.image, pool.egress) if pool else (None, False)
        obj = build_batchsandbox(sandbox_id, spec, self.settings, now, image, pending_for, egress)
        made = await owned.make(
            self.client, self._call, self.namespace, sandbox_id, spec, self.settings.default_volume_storage
        )
        waiter: asyncio.Future[Entry] = asyncio.get_running_loop().create_future()
        self._waiters[sandbox_id] = waiter
        started = time.perf_counter()
        try:
            try:
                created = await self._post(obj)
            except KubeError as err:  # refused: nothing was made (a 503 may have landed: cleaned up below)
                self._waiters.pop(sandbox_id, None)
                raise _create_error(err) from None
            posted = time.perf_counter()
            self._observe(read_entry(created))
            await owned.adopt(self.client, self._call, self.namespace, made, created)
            try:
                await asyncio.wait_for(waiter, self.create_timeout)
            except TimeoutError:
                raise self._timeout_error(sandbox_id) from None
            if spec.lifecycle:  # the pod is Ready (execd answers); its entrypoint waits at the start gate
                execd = await self.endpoint(sandbox_id, labels.EXECD_PORT)
                await begin_lifecycle(execd, spec.lifecycle, self.create_timeout)
            # The client holds the sandbox from here: no pending mark, the requested expiry.
            finished = await self._call(
                self.client.patch(BATCHSANDBOXES, sandbox_id, finish_create(spec, now), self.namespace)
            )
            self._observe(read_entry(finished))
            log.debug(
                "created %s: POST %.1f ms, Running after %.1f ms",
                sandbox_id,
                (posted - started) * 1000,
                (time.perf_counter() - posted) * 1000,
            )
        except BaseException:
            if sandbox_id in self._waiters:  # the POST may have created it
                self._discard(sandbox_id)
            await asyncio.shield(owned.remove(self.client, self.namespace, made))
            raise
        finally:
            self._waiters.pop(sandbox_id, None)
        return self._entries[sandbox_id].info

    async def _post(self, obj: JSON) -> JSON:
        """POST the BatchSandbox; while the API server is unreachable, try again for up to HOLD_SECONDS
        (the name is fixed, so a POST that landed before its answer was lost is found, not doubled)."""
        deadline = time.monotonic() + HOLD_SECONDS
        delay = 0.1
        while True:
            try:
                return await self._call(self.client.create(BATCHSANDBOXES, obj, self.namespace))
            except KubeError as err:
                if err.conflict and err.reason == "AlreadyExists":
                    return await self._call(self.client.get(BATCHSANDBOXES, obj["metadata"]["name"], self.namespace))
                raise
            except ApiError as err:
                if err.status != 503 or time.monotonic() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _pool(self, pool: str) -> PoolEntry:
        """The Pool; 400 when there is no such Pool. The cache answers; a GET only on a miss (a Pool
        created a moment ago)."""
        if not validation.is_dns_subdomain(pool):
            raise ApiError(400, POOL_NOT_FOUND, f"extensions.poolRef {pool!r} is not a valid Pool name")
        assert self._pools is not None
        cached = self._pools.get(f"{self.namespace}/{pool}")
        if cached is not None and not cached.deleting:
            return cached
        try:
            return read_pool(await self._call(self.client.get(POOLS, pool, self.namespace)))
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

    def _discard(self, sandbox_id: str) -> None:
        """Delete a failed create's BatchSandbox (it may not exist) in the background, again and again
        until it is gone: a create that failed must leave nothing behind."""
        self._spawn(self._delete_until_gone(sandbox_id), f"discard-{sandbox_id}")

    async def _delete_until_gone(self, sandbox_id: str) -> None:
        delay = 0.2
        while True:
            try:
                await self._delete_object(sandbox_id, None)
                return
            except Exception as err:
                log.info(
                    "could not delete the BatchSandbox of a failed create yet: %s", err, extra={"sandbox": sandbox_id}
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _sweep_abandoned(self) -> None:
        """Delete creates that never answered (their server died before its 202). A live create answers
        or gives up within createTimeoutSeconds, so one pending longer is nobody's; every replica sweeps."""
        older_than = self.create_timeout + ABANDON_GRACE_SECONDS / 2
        while True:
            now = dt.datetime.now(dt.UTC)
            for entry in list(self._entries.values()):
                if entry.abandoned(now, older_than) and entry.name not in self._waiters:
                    log.warning("deleting a create that never answered", extra={"sandbox": entry.name})
                    self._discard(entry.name)
            await asyncio.sleep(min(10.0, older_than / 4))

    async def _delete_object(self, name: str, uid: str | None) -> None:
        try:
            await self._call(self.client.delete(BATCHSANDBOXES, name, self.namespace, precondition_uid=uid))
        except KubeError as err:
            if not (err.not_found or err.conflict):
                raise
            if err.not_found and name not in self._entries:
                return  # never created, or the watch has seen it go already
        self._entries.pop(name, None)
        self._deleted.add(name)

    # --- the other calls --------------------------------------------------------------------------
    async def get(self, sandbox_id: str) -> SandboxInfo:
        return (await self._fresh_entry(sandbox_id)).info

    async def list(self) -> list[SandboxInfo]:
        return [entry.info for entry in self._entries.values()]

    async def delete(self, sandbox_id: str) -> None:
        entry = await self._fresh_entry(sandbox_id)
        await self._delete_object(entry.name, entry.uid)

    # --- pause and resume: a snapshot, then no pod; a new pod from its image (docs/snapshots.md) ------
    async def pause(self, sandbox_id: str) -> None:
        """202 at once: the sandbox is Pausing while its committer runs, then Paused (replicas 0, the
        template on the snapshot's image); a failed snapshot leaves it Running (an event says why)."""
        store = self._snapshots
        entry = await self._fresh_entry(sandbox_id)
        guards.require_running(sandbox_id, entry.info.state)
        raw = await self._call(self.client.get(BATCHSANDBOXES, sandbox_id, self.namespace))
        if raw["spec"].get("poolRef"):  # refused now rather than after the snapshot
            try:
                await self._call(self._pool_to_resume_from(raw))
            except PauseRefused as refused:
                raise ApiError(409, errors.INVALID_STATE, f"sandbox {sandbox_id} cannot be paused: {refused}") from None
        pod = await self._call(self.client.get(PODS, entry.pod_name or "", self.namespace))
        held = ksnaps.held_of(raw, entry.info.image, entry.info.entrypoint)
        record = await store.begin(sandbox_id, "pause", held, pod, owner_reference(raw), pause=True)
        await self._patch(entry, {"metadata": {"annotations": {labels.PAUSING: record.id}}})
        self._spawn(self._finish_pause(sandbox_id, record.id), f"pause-{sandbox_id}")

    async def _finish_pause(self, sandbox_id: str, snapshot_id: str) -> None:
        store = self._snapshots
        record = await store.settled(snapshot_id)
        for _ in range(10):  # a conflict: the controller wrote meanwhile; read again
            try:
                raw = await self.client.get(BATCHSANDBOXES, sandbox_id, self.namespace)
                if (raw["metadata"].get("annotations") or {}).get(labels.PAUSING) != snapshot_id:
                    return  # deleted and made again, or another replica finished it
                failure = f"{record.reason}: {record.message}" if record.state != SnapshotState.READY else ""
                if not failure:
                    try:
                        patch = await self._paused_patch(raw, snapshot_id, record.image)
                    except PauseRefused as refused:
                        failure = str(refused)
                        await store.forget_pauses(sandbox_id)  # a pooled sandbox's only pause snapshot: unused
                if failure:
                    patch = {"metadata": {"annotations": {labels.PAUSING: None}}}
                    self.events.record(sandbox_id, "PauseFailed", failure, warning=True)
                self._observe(read_entry(await self.client.patch(BATCHSANDBOXES, sandbox_id, patch, self.namespace)))
                break
            except KubeError as err:
                if err.not_found:  # deleted meanwhile: _gone found this snapshot still Creating
                    await store.forget_pauses(sandbox_id)
                    return
                if not err.conflict:
                    log.warning("pause of %s not finished yet: %s", sandbox_id, err)
                await asyncio.sleep(0.5)
        if record.state == SnapshotState.READY:
            await store.forget_pauses(sandbox_id, keep=snapshot_id)  # an earlier pause's image is not used now

    async def _paused_patch(self, raw: JSON, snapshot_id: str, image: str) -> JSON:
        """The patch that makes the sandbox Paused on the snapshot's image; a pooled one also leaves its
        Pool for a template built from the Pool's (the resume is a fresh pod, not a warm one)."""
        pull_secret = self.settings.snapshot_pull_secret
        if not raw["spec"].get("poolRef"):
            return paused_patch(raw, snapshot_id, image, pull_secret)
        return left_pool_patch(raw, await self._pool_to_resume_from(raw), snapshot_id, image, pull_secret)

    async def _pool_to_resume_from(self, raw: JSON) -> JSON:
        """The Pool of a pooled sandbox (a consistent read), checked to give a pod to resume into."""
        name = raw["spec"]["poolRef"]
        try:
            pool = await self.client.get(POOLS, name, self.namespace)
        except KubeError as err:
            if err.not_found:
                raise PauseRefused(f"its Pool {name!r} is gone: there is no pod template to resume it from") from None
            raise
        try:
            left_pool_template(pool, raw)
        except ValueError as err:
            raise PauseRefused(f"Pool {name!r}: {err}") from None
        return pool

    async def _recover_pauses(self) -> None:
        """After a restart: finish pauses that were under way; forget pause snapshots of sandboxes gone."""
        store = self._snapshots
        for entry in list(self._entries.values()):
            if entry.pausing:
                self._spawn(self._finish_pause(entry.name, entry.pausing), f"pause-{entry.name}")
        for record in await store.list():
            if record.pause and record.sandbox_id not in self._entries:
                await store.forget_pauses(record.sandbox_id)

    async def resume(self, sandbox_id: str) -> None:
        """A new pod from the snapshot's image (replicas back to 1): same id, a new pod IP, which the
        SDK's resume waits for (POD_IP_NOT_AVAILABLE until then)."""
        entry = await self._fresh_entry(sandbox_id)
        if entry.info.state != State.PAUSED:
            raise ApiError(409, errors.INVALID_STATE, f"sandbox {sandbox_id} is {entry.info.state}, not Paused")
        await self._patch(entry, RESUME_PATCH)

    async def renew(self, sandbox_id: str, expires_at: dt.datetime) -> SandboxInfo:
        entry = await self._fresh_entry(sandbox_id)
        guards.require_expiry(sandbox_id, entry.info.expires_at)
        return await self._patch(entry, {"spec": {"expireTime": times.rfc3339(expires_at, digits=6)}})

    async def patch_metadata(self, sandbox_id: str, patch: dict[str, str | None]) -> SandboxInfo:
        entry = await self._fresh_entry(sandbox_id)
        if not patch:
            return entry.info
        return await self._patch(entry, {"metadata": {"labels": patch}})

    async def _patch(self, entry: Entry, patch: JSON) -> SandboxInfo:
        try:
            result = await self._call(self.client.patch(BATCHSANDBOXES, entry.name, patch, self.namespace))
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
        entry = await self._fresh_entry(sandbox_id)
        if entry.info.state == State.PAUSED:  # not a 404, which the SDK retries: no pod until a resume
            raise ApiError(409, errors.INVALID_STATE, f"sandbox {sandbox_id} is Paused: resume it first")
        if not entry.pod_ip or entry.info.state == "Pending":  # resuming: not before it is Running
            raise ApiError(404, POD_IP_NOT_AVAILABLE, f"sandbox {sandbox_id} has no pod IP yet ({entry.info.state})")
        host = f"[{entry.pod_ip}]" if ":" in entry.pod_ip else entry.pod_ip
        headers = {}
        if port == labels.EXECD_PORT and self.token_key and entry.pod_name:
            headers[labels.EXECD_TOKEN_HEADER] = tokens.pod_token(self.token_key, entry.pod_name)
        if port == labels.EGRESS_PORT and entry.has_policy and self.token_key and entry.pod_name:
            headers[labels.EGRESS_TOKEN_HEADER] = tokens.egress_token(self.token_key, entry.pod_name)
        return Endpoint(f"{host}:{port}", headers, entry.info.secure_access)

    async def upstream(self, sandbox_id: str, port: int) -> Endpoint:
        guards.require_running(sandbox_id, (await self._fresh_entry(sandbox_id)).info.state)
        return await self.endpoint(sandbox_id, port)

    # --- diagnostics ------------------------------------------------------------------------------
    async def logs(self, sandbox_id: str, tail: int | None, since: dt.datetime | None, scope: str) -> LogText:
        """The pod's main container (the entrypoint and execd; not execd's installer, which comes
        first); scope `all`: every container."""
        entry = await self._fresh_entry(sandbox_id)
        if not entry.pod_name:
            return LogText("", warnings=[f"sandbox {sandbox_id} has no pod yet ({entry.info.state})"])
        pod = await self._call(self.client.get(PODS, entry.pod_name, self.namespace))
        names = [c["name"] for c in pod["spec"].get("initContainers") or []] + [
            c["name"] for c in pod["spec"]["containers"]
        ]
        main = next(c["name"] for c in pod["spec"]["containers"] if c["name"] != labels.EXECD_INSTALLER)
        chosen = names if scope == "all" else [main]
        params: dict[str, str | int] = {}
        if tail is not None:
            params["tailLines"] = tail
        if since is not None:
            params["sinceSeconds"] = max(1, int((times.now() - since).total_seconds()))
        parts, warnings = [], []
        for name in chosen:
            params["container"] = name
            path = f"{PODS.path(self.namespace, entry.pod_name)}/log"
            try:
                text = await self._call(self.client.text(path, params))
            except KubeError as err:
                warnings.append(f"container {name}: {err.message}")
                continue
            parts.append(text if len(chosen) == 1 else f"==> container {name} <==\n{text}")
        return LogText("".join(parts), warnings=warnings)

    async def runtime_events(self, sandbox_id: str) -> EventList:
        """Kubernetes Events of the BatchSandbox (the controller's) and of its pod (the scheduler's,
        the kubelet's: pulls, OOM kills, probes)."""
        entry = await self._fresh_entry(sandbox_id)
        found: list[SandboxEvent] = []
        for kind, name in (("BatchSandbox", entry.name), ("Pod", entry.pod_name)):
            if not name:
                continue
            selector = f"involvedObject.kind={kind},involvedObject.name={name}"
            listed = await self._call(self.client.list(EVENTS, self.namespace, fieldSelector=selector))
            found.extend(kube_event(item, kind.lower()) for item in listed.get("items") or [])
        return sorted(found, key=lambda event: event.at)

    async def inspect(self, sandbox_id: str) -> dict[str, Any]:
        entry = await self._fresh_entry(sandbox_id)
        found: dict[str, Any] = {
            "batchSandbox": await self._call(self.client.get(BATCHSANDBOXES, entry.name, self.namespace))
        }
        if entry.pod_name:
            with contextlib.suppress(KubeError):
                found["pod"] = await self._call(self.client.get(PODS, entry.pod_name, self.namespace))
        return found

    # --- snapshots (docs/snapshots.md; runtimes/kubernetes_snapshots.py) -------------------------
    @property
    def _snapshots(self) -> ksnaps.KubernetesSnapshots:
        if self.snapshots is None:  # capabilities.snapshots is False: the routes refuse first
            raise guards.not_supported("snapshots", self.capabilities.runtime)
        return self.snapshots

    async def create_snapshot(self, sandbox_id: str, name: str | None) -> SnapshotInfo:
        store = self._snapshots
        entry = await self._fresh_entry(sandbox_id)
        if entry.info.state != "Running" or not entry.pod_name:
            raise snaps.not_running(sandbox_id, entry.info.state)
        raw = await self._call(self.client.get(BATCHSANDBOXES, sandbox_id, self.namespace))
        pod = await self._call(self.client.get(PODS, entry.pod_name, self.namespace))
        held = ksnaps.held_of(raw, entry.info.image, entry.info.entrypoint)
        return (await store.begin(sandbox_id, name, held, pod, owner_reference(raw))).info()

    async def get_snapshot(self, snapshot_id: str) -> SnapshotInfo:
        return (await self._snapshots.find(snapshot_id)).info()

    async def list_snapshots(self) -> builtins.list[SnapshotInfo]:
        return [record.info() for record in await self._snapshots.list()]

    async def delete_snapshot(self, snapshot_id: str) -> None:
        users = [e.name for e in self._entries.values() if e.info.snapshot_id == snapshot_id]
        await self._snapshots.delete(snapshot_id, users)

    async def _restoring(self, spec: SandboxSpec, snapshot_id: str, pool: str | None) -> SandboxSpec:
        """A create from a snapshot: its image, and its entrypoint, env and resources as defaults."""
        if pool:
            raise ApiError(
                400,
                errors.API_NOT_SUPPORTED,
                "snapshotId with extensions.poolRef is not supported by the kubernetes runtime: a pool's pods run"
                " the pool's image",
            )
        record = await snaps.ready_for_create(self._snapshots.find, snapshot_id)
        return snaps.restored(spec, record.held, image=record.image)

    async def egress(self, sandbox_id: str) -> Endpoint | None:
        entry = await self._fresh_entry(sandbox_id)
        if not entry.has_policy:
            return None
        guards.require_running(sandbox_id, entry.info.state)
        return await self.endpoint(sandbox_id, labels.EGRESS_PORT)

    def _check_network_policy(self, pool: PoolEntry | None) -> None:
        """A policy is enforced by an egress sidecar: the controller puts one into a direct create's
        pod, or a Pool with `spec.egress` into its warm pods (the claim's policy replaces the Pool's
        there). A Pool without it has none (400), and without the token key the sandbox could change it."""
        if pool is not None and not pool.egress:
            raise ApiError(
                400,
                errors.API_NOT_SUPPORTED,
                f"networkPolicy with extensions.poolRef: Pool {pool.name!r} has no egress sidecar in its pods;"
                " enable it with spec.egress on the Pool (e.g. `egress: {defaultAction: deny}`), or create"
                " without poolRef (docs/network-policy.md)",
            )
        if self.token_key is None:
            raise ApiError(
                400,
                errors.API_NOT_SUPPORTED,
                "networkPolicy needs kubernetes.sandboxTokenKeyFile (the egress sidecar's token is derived from it)",
            )


def _check_pool_volumes(pool: PoolEntry, volumes: list[VolumeSpec]) -> None:
    """A warm pod's mounts were made with it: a pooled create may only name volumes the Pool's
    sandbox container already mounts (same mountPath, claim or host directory, subPath, readOnly)."""
    missing = volumes_not_in_pool(volumes, pool.mounts)
    if missing:
        raise ApiError(
            400,
            errors.API_NOT_SUPPORTED,
            f"volumes with extensions.poolRef: Pool {pool.name!r} does not mount {', '.join(missing)} as asked"
            " (a warm pod's mounts are the Pool's: add them to its template's sandbox container, or create"
            " without poolRef)",
        )


def kube_event(item: JSON, source: str) -> SandboxEvent:
    """A core/v1 Event as a sandbox event (its last time, reason and message; repeats counted)."""
    at = (
        times.parse_optional(item.get("lastTimestamp"))
        or times.parse_optional(item.get("eventTime"))
        or times.parse_optional((item.get("metadata") or {}).get("creationTimestamp"))
        or times.now()
    )
    count = int(item.get("count") or 1)
    message = str(item.get("message") or "") + (f" (x{count})" if count > 1 else "")
    return SandboxEvent(at, str(item.get("reason") or ""), message, source, str(item.get("type") or "Normal"))


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
    if reason == conditions.POOL_WITHOUT_EGRESS:
        return ApiError(400, errors.API_NOT_SUPPORTED, message)
    if reason == conditions.EGRESS_POLICY_FAILED:
        return ApiError(503, errors.EGRESS_UNAVAILABLE, f"sandbox {entry.name}: {message}")
    if reason == conditions.FAILED_CREATE:
        return ApiError(400, errors.START_FAILED, f"the sandbox's pod cannot be created: {message}")
    if reason == conditions.POD_FAILED:
        return ApiError(400, errors.START_FAILED, f"sandbox {entry.name}: {message}")
    if reason == "DELETING":
        return ApiError(409, errors.INVALID_STATE, f"sandbox {entry.name}: {message}")
    return ApiError(400, errors.START_FAILED, f"sandbox {entry.name} ended while starting: {message}")
