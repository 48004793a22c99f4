"""The `docker` runtime: every sandbox is a container, created through the Docker Engine API.

Create: pull the image if it is missing (with the request's image.auth), create the container in one
call (labels carry the sandbox id, the request and its expiry; execd's volume is mounted read-only;
see docker_model.py), check that the entrypoint's program exists in it, start it, and wait for
execd's "listening" line in its output, attached before the start (an event, not a poll; bounded)
while its inspect (the published port) runs beside. Anything that fails removes the container again.

execd (one-dir: execd, execd-lib/, bootstrap.sh) lives in one named volume per version, shared by
every sandbox and mounted read-only at /opt/opensandbox/bin: made once, by the first create that
needs it, from `docker.execdDir` or from `runtime.execdImage`'s /opensandbox/ (read from a helper
container that is never started), so a create copies nothing, and its pages in the page cache are
shared by every sandbox instead of charged to each.

The truth lives in Docker: list and get read the containers with the id label; a restarted
server rebuilds its index (container id, execd token and host port) from them. Expiry and
metadata start in the labels; renewals and patches go to a small file per sandbox in
`docker.stateDir`, because labels cannot change (docker_model.OverrideStore). The shared sweeper
(expiry.py) deletes what is due. The few Engine calls aiodocker's public API does not make the
way we need are in docker_api.py.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import datetime as dt
import functools
import hashlib
import io
import json
import logging
import os
import secrets
import tarfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiodocker
import aiohttp
from aiodocker.containers import DockerContainer
from aiodocker.exceptions import DockerError
from aiodocker.volumes import DockerVolume

from opensandbox_platform.api import labels as L
from opensandbox_platform.daemon import times
from opensandbox_platform.server import errors, metrics, validation
from opensandbox_platform.server.config import Config
from opensandbox_platform.server.errors import ApiError
from opensandbox_platform.server.runtimes import docker_api, docker_snapshots, docker_volumes, guards, seccomp
from opensandbox_platform.server.runtimes import docker_model as model
from opensandbox_platform.server.runtimes import snapshots as snaps
from opensandbox_platform.server.runtimes.base import (
    Capabilities,
    Endpoint,
    LogText,
    RuntimeHealth,
    SandboxInfo,
    SandboxSpec,
    SnapshotInfo,
    State,
    merge_metadata,
)
from opensandbox_platform.server.runtimes.docker_snapshots import DockerSnapshots
from opensandbox_platform.server.runtimes.events import EventList, EventLog, Reason
from opensandbox_platform.server.runtimes.expiry import ExpirySweeper
from opensandbox_platform.server.runtimes.hooks import begin_lifecycle
from opensandbox_platform.server.runtimes.liveness import EngineMonitor, ExecdProbe, engine_call, ping_execd

log = logging.getLogger("opensandbox.docker")

LOG_TAIL_CHARS = 4000
HOST_CPU_MILLIS = (os.cpu_count() or 1) * 1000
ENGINE_UNAVAILABLE = "DOCKER::ENGINE_UNAVAILABLE"
ENGINE_NAME = "the Docker Engine API"
DOCKER_NOT_CONNECTED = 900  # aiodocker's status for a connection error
PUBLISHED_PORT_TIMEOUT = 3.0  # seconds execd may take to answer on its published port once it listens
Json = dict[str, Any]
JsonList = list[Json]  # (at module level: `list` in the class body is the method)
Targets = list[tuple[str, Endpoint]]


@dataclass
class Sandbox:
    """What the server keeps of one sandbox container (rebuilt from Docker on start)."""

    labels: model.Labels
    container_id: str
    token: str
    port: int | None
    ip: str
    expires_at: dt.datetime | None
    metadata: dict[str, str]
    state: str = State.RUNNING  # the last one seen; the proxy uses it to refuse a paused sandbox
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    execd_dead: str = ""  # why the liveness probe gave up on its execd (the container still runs)
    has_policy: bool = False  # an egress sidecar enforces its networkPolicy
    egress_token: str = ""  # the sidecar's (read from it when needed)

    @property
    def id(self) -> str:
        return self.labels.id


class DockerRuntime:
    # The engine refuses more CPUs than the host has (with a 500 of its own): a 400 here instead.
    capabilities = Capabilities(
        runtime="docker",
        image_auth=True,
        pause=True,
        resource_requests=True,
        volumes=frozenset({"host", "pvc"}),
        snapshots=True,
        network_policy=True,
        lifecycle=True,
        max_cpu_millis=HOST_CPU_MILLIS,
    )

    def __init__(self, config: Config) -> None:
        self.config = config
        self.settings = config.docker
        self.store = model.OverrideStore(self.settings.state_path())
        self.sandboxes: dict[str, Sandbox] = {}
        self.default_cpu = validation.cpu_millis(self.settings.default_cpu) if self.settings.default_cpu else None
        self.default_memory = (
            validation.memory_bytes(self.settings.default_memory) if self.settings.default_memory else None
        )
        self._docker: aiodocker.Docker | None = None
        self.snapshots = DockerSnapshots(lambda: self.docker, self.settings.snapshot_max_size_mib << 20)
        self._seccomp = ""
        self._seccomp_userns = ""
        self._execd_dir_tar: bytes | None = None  # docker.execdDir as a tar, read once
        self._execd_volume: str | None = None  # the volume holding execd, once made
        self._execd_lock = asyncio.Lock()
        self._pull_locks: dict[str, asyncio.Lock] = {}
        self._found_programs: set[tuple[str, str]] = set()  # (image id, argv[0]) known to exist
        self._deleting: set[str] = set()  # ids being deleted: listed as Stopping, not as what the engine says
        self._abandoned: dict[str, float] = {}  # ids whose create the engine never answered: removed later
        # Never-started containers found at start that may be another server's create in progress
        # (servers may share an engine): container id -> when to remove it if it is still not started.
        self._unstarted: dict[str, float] = {}
        self.engine = EngineMonitor(
            ENGINE_NAME, self._ping, self.settings.health_interval_seconds, self.settings.api_timeout_seconds
        )
        self.probe = ExecdProbe(
            self._probe_targets,
            self._execd_died,
            interval=self.settings.liveness_interval_seconds,
            timeout=min(self.settings.api_timeout_seconds, 5.0),
        )
        self.events = EventLog()
        self.expiry = ExpirySweeper(
            sandbox_ids=lambda: list(self.sandboxes),
            expiry_of=self._expiry_of,
            lock_of=lambda sandbox_id: self.sandboxes[sandbox_id].lock,  # present: expiry_of just said so
            delete=self._expire,
        )

    @property
    def docker(self) -> aiodocker.Docker:
        assert self._docker is not None, "the runtime is not started"
        return self._docker

    # -- lifecycle of the runtime --------------------------------------------------------------

    def _seccomp_option(self, version: dict[str, Any], *, userns: bool = False) -> str:
        components = version.get("Components") or []
        podman = any("podman" in str(c.get("Name", "")).lower() for c in components)
        name = "seccomp-userns.json" if userns else "seccomp.json"
        value, write_to = model.seccomp_option(
            self.settings.seccomp_profile, podman, self.store.directory / "profiles" / name, userns=userns
        )
        if write_to is not None:  # not beside the sandboxes' *.json files: those are overrides
            Path(write_to).parent.mkdir(exist_ok=True)
            Path(write_to).write_text(json.dumps(seccomp.docker_profile(seccomp.rules(userns=userns)), indent=1))
        return value

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.settings.api_timeout_seconds)
        self._docker = aiodocker.Docker(url=self.settings.host or None, timeout=timeout)
        docker_api.add_trace(self._docker, metrics.engine_trace("docker", metrics.docker_resource))
        try:
            version = await self.docker.version()
        except (DockerError, TimeoutError, aiohttp.ClientError) as exc:
            await self._docker.close()
            raise RuntimeError(f"cannot reach the Docker Engine API: {getattr(exc, 'message', exc)!s}") from None
        self.store.directory.mkdir(parents=True, exist_ok=True)
        self._seccomp = self._seccomp_option(version)
        self._seccomp_userns = self._seccomp_option(version, userns=True)  # isolated sessions asked for
        await self._remove_helpers()
        if self.settings.execd_dir:  # a wrong path fails the start, not every create
            self._execd_dir_tar = await asyncio.to_thread(_dir_tar, Path(self.settings.execd_dir))
        await self._recover()
        self.expiry.start()
        self.engine.start()
        self.probe.start()
        log.info(
            "docker runtime ready engine=%s api=%s sandboxes=%d",
            version.get("Version"),
            version.get("ApiVersion"),
            len(self.sandboxes),
        )

    async def close(self) -> None:
        await self.snapshots.close()
        await self.expiry.close()
        await self.probe.close()
        await self.engine.close()
        if self._docker is not None:
            await self._docker.close()
            self._docker = None

    async def _recover(self) -> None:
        known: set[str] = set()  # sandbox ids with a container, in any state
        for item in await self._list_containers():
            labels = model.decode_labels(item.get("Labels") or {})
            if labels is None:
                continue
            known.add(labels.id)
            if str(item.get("State")).lower() == "created":
                # Never started: a create cut short by a server stop (nobody was told its id), or
                # another server's create under way. Removed once no create could still be starting it.
                self._unstarted[item["Id"]] = time.monotonic() + self._unstarted_grace(labels)
                continue
            with contextlib.suppress(DockerError):
                self._adopt(await self._inspect(item["Id"]))
        for stale in self.store.ids() - set(self.sandboxes):
            self.store.delete(stale)
        await self._remove_unstarted()
        for item in await docker_api.list_containers(self.docker, L.DOCKER_EGRESS_FOR):
            if (item.get("Labels") or {}).get(L.DOCKER_EGRESS_FOR) not in known:
                await self._remove_container(item["Id"])  # its sandbox is gone

    def _unstarted_grace(self, labels: model.Labels) -> float:
        """Seconds until a never-started container made at `labels.created_at` can be nobody's
        create in progress (a create gives up after the engine's and execd's timeouts)."""
        limit = 2 * self.settings.api_timeout_seconds + self.settings.start_timeout_seconds
        return max(0.0, limit - (times.now() - labels.created_at).total_seconds())

    async def _remove_unstarted(self) -> None:
        for container_id, due in list(self._unstarted.items()):
            if time.monotonic() < due:
                continue
            del self._unstarted[container_id]
            with contextlib.suppress(DockerError):
                inspect = await self._inspect(container_id)
                labels = model.decode_labels((inspect.get("Config") or {}).get("Labels") or {})
                if str((inspect.get("State") or {}).get("Status")).lower() == "created" and labels is not None:
                    log.warning("removing a sandbox container whose create did not finish id=%s", labels.id)
                    await self._remove_container(container_id)
                    self.store.delete(labels.id)

    async def _remove_helpers(self) -> None:
        filters = json.dumps({"label": [L.DOCKER_EXECD_HELPER]})
        for item in await self.docker.containers.list(all=True, filters=filters):
            await self._remove_container(item.id)

    # -- the API -------------------------------------------------------------------------------

    def health(self) -> RuntimeHealth:
        return self.engine.health()

    @engine_call
    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        if spec.snapshot_id:
            spec = await self._restoring(spec, spec.snapshot_id)
        sandbox_id = str(uuid.uuid4())
        now = times.now()
        steps = _Steps()
        image = await self._ensure_image(spec.image, spec.image_auth)
        execd_volume = self._execd_volume or await self._make_execd_volume(spec.image)
        steps.done("image")
        token = secrets.token_urlsafe(24)
        binds = self.settings.state_path() / "binds"
        prepared = await docker_volumes.prepare(self.docker, sandbox_id, spec.volumes, binds)
        labels = model.encode_labels(sandbox_id, spec, now, docker_volumes.owned_label(prepared))
        make = functools.partial(self._create_container, sandbox_id, spec, image, execd_volume, token, labels)
        try:
            try:
                return await make(prepared, steps)
            except _PortTaken as exc:  # the container is gone again: once more, on another port
                log.warning("sandbox create retried id=%s: %s", sandbox_id, exc.message)
                return await make(prepared, steps)
        except BaseException as exc:
            failed_start = isinstance(exc, ApiError) and exc.code == errors.START_FAILED
            gone = docker_volumes.removed_volume(prepared) if failed_start else None
            await asyncio.shield(docker_volumes.remove(self.docker, prepared.created))
            if gone is not None:
                raise errors.invalid(f"volume {gone}: its directory was removed while the sandbox started") from None
            raise
        finally:
            docker_volumes.release(prepared)

    async def _create_container(
        self,
        sandbox_id: str,
        spec: SandboxSpec,
        image: dict[str, Any],
        execd_volume: str,
        token: str,
        labels: dict[str, str],
        prepared: docker_volumes.Prepared,
        steps: _Steps,
    ) -> SandboxInfo:
        image_config = image.get("Config") or {}
        working_dir = image_config.get("WorkingDir") or self.settings.working_dir
        body = model.container_config(
            sandbox_id,
            spec,
            token=token,
            labels=labels,
            working_dir=working_dir,
            settings=self.settings,
            cpu_millis=spec.cpu_millis or self.default_cpu,
            memory_bytes=spec.memory_bytes or self.default_memory,
            seccomp=self._seccomp_userns if L.wants_isolation(spec.extensions) else self._seccomp,
            execd_volume=execd_volume,
            mounts=prepared.mounts,
        )
        try:
            container = await self.docker.containers.create(body, name=model.container_name(sandbox_id))
        except DockerError as exc:
            if exc.status == DOCKER_NOT_CONNECTED:
                raise
            raise ApiError(500, errors.START_FAILED, f"cannot create the container: {exc.message}") from None
        except BaseException:
            # No answer: the engine may still make the container once it wakes up.
            self._abandoned[sandbox_id] = time.monotonic()
            raise
        steps.done("create")
        try:
            await self._check_entrypoint(container.id, image, spec, working_dir)
            steps.done("check")
            async with docker_api.attach_output(self.docker, container.id) as output:
                steps.done("attach")
                await container.start()
                steps.done("start")
                # The published port is known once started: read it while execd starts.
                ready = _both(self._wait_ready(container.id, output), self._inspect(container.id))
                egress_token = ""
                if spec.network_policy is None:
                    _, inspect = await ready
                else:  # the sidecar joins the namespace as soon as it exists, while execd starts
                    egress = self._start_egress(sandbox_id, container.id, spec.network_policy)
                    (_, inspect), egress_token = await _both(ready, egress)
                steps.done("ready")
                await self._check_published_port(inspect, token)
                if spec.lifecycle:  # preStart runs under the network policy; then execd opens the gate
                    await self._begin_lifecycle(inspect, token, spec.lifecycle)
                    steps.done("preStart")
                elif spec.network_policy is not None:
                    await self._open_start_gate(container.id)
        except BaseException as exc:
            if spec.network_policy is not None:
                await asyncio.shield(self._remove_container(model.egress_name(sandbox_id)))
            if not await asyncio.shield(self._remove_container(container.id)):
                self._abandoned[sandbox_id] = time.monotonic()
            if isinstance(exc, DockerError) or (isinstance(exc, ApiError) and exc.code == errors.START_FAILED):
                self._execd_volume = None  # the next create checks that execd's volume is (still) complete
            if isinstance(exc, DockerError) and exc.status != DOCKER_NOT_CONNECTED:
                raise ApiError(500, errors.START_FAILED, f"cannot start the sandbox: {exc.message}") from None
            raise
        sandbox = self._adopt(inspect)
        assert sandbox is not None
        sandbox.egress_token = egress_token
        self._save(sandbox)
        self.expiry.wake()
        log.info("sandbox created id=%s container=%s %s", sandbox_id, container.id[:12], steps)
        return model.sandbox_info(
            sandbox.labels, model.ContainerState.from_inspect(inspect["State"]), sandbox.expires_at, sandbox.metadata
        )

    @engine_call
    async def get(self, sandbox_id: str) -> SandboxInfo:
        sandbox = await self._sandbox(sandbox_id)
        return await self._info(sandbox)

    @engine_call
    async def list(self) -> list[SandboxInfo]:
        infos = []
        for item in await self._list_containers():
            labels = model.decode_labels(item.get("Labels") or {})
            if labels is None:
                continue
            state = model.ContainerState.from_list(item)
            known = self.sandboxes.get(labels.id)
            if known is not None:
                info = model.sandbox_info(
                    labels,
                    state,
                    known.expires_at,
                    known.metadata,
                    deleting=labels.id in self._deleting,
                    execd_dead=known.execd_dead,
                )
                infos.append(info)
                known.state = info.state
                continue
            override = self.store.load(labels.id)
            expires_at = override.expires_at if override else labels.expires_at
            infos.append(
                model.sandbox_info(labels, state, expires_at, override.metadata if override else labels.metadata)
            )
        return infos

    @engine_call
    async def delete(self, sandbox_id: str) -> None:
        sandbox = await self._sandbox(sandbox_id)
        async with sandbox.lock:
            await self._destroy(sandbox)

    @engine_call
    async def pause(self, sandbox_id: str) -> None:
        sandbox = await self._sandbox(sandbox_id)
        async with sandbox.lock:
            await self._expect_state(sandbox, State.RUNNING)
            await self._call(self.docker.containers.container(sandbox.container_id).pause(), sandbox)
            sandbox.state = State.PAUSED

    @engine_call
    async def resume(self, sandbox_id: str) -> None:
        sandbox = await self._sandbox(sandbox_id)
        async with sandbox.lock:
            await self._expect_state(sandbox, State.PAUSED)
            await self._call(self.docker.containers.container(sandbox.container_id).unpause(), sandbox)
            sandbox.state = State.RUNNING

    async def _restoring(self, spec: SandboxSpec, snapshot_id: str) -> SandboxSpec:
        """A create from a snapshot: its image, and its entrypoint, env and resources as defaults."""
        record = await snaps.ready_for_create(self.snapshots.find, snapshot_id)
        return snaps.restored(spec, record.held, image=docker_snapshots.image_ref(snapshot_id))

    @engine_call
    async def create_snapshot(self, sandbox_id: str, name: str | None) -> SnapshotInfo:
        sandbox = await self._sandbox(sandbox_id)
        async with sandbox.lock:
            inspect = await self._inspect(sandbox.container_id)
            state = model.map_state(model.ContainerState.from_inspect(inspect.get("State") or {}))[0]
            if state != State.RUNNING or sandbox.id in self._deleting:
                raise snaps.not_running(sandbox_id, state)
            held = docker_snapshots.held_of(inspect, sandbox.labels.image, sandbox.labels.entrypoint)
            return self.snapshots.begin(sandbox.container_id, sandbox_id, name, held, sandbox.lock).info()

    @engine_call
    async def get_snapshot(self, snapshot_id: str) -> SnapshotInfo:
        return (await self.snapshots.find(snapshot_id)).info()

    @engine_call
    async def list_snapshots(self) -> builtins.list[SnapshotInfo]:
        return await self.snapshots.list()

    @engine_call
    async def delete_snapshot(self, snapshot_id: str) -> None:
        await self.snapshots.delete(snapshot_id)

    @engine_call
    async def renew(self, sandbox_id: str, expires_at: dt.datetime) -> SandboxInfo:
        sandbox = await self._sandbox(sandbox_id)
        async with sandbox.lock:
            guards.require_expiry(sandbox_id, sandbox.expires_at)
            sandbox.expires_at = expires_at
            self._save(sandbox)
            self.expiry.wake()
        return await self._info(sandbox)

    @engine_call
    async def patch_metadata(self, sandbox_id: str, patch: dict[str, str | None]) -> SandboxInfo:
        sandbox = await self._sandbox(sandbox_id)
        async with sandbox.lock:
            merge_metadata(sandbox.metadata, patch)
            self._save(sandbox)
        return await self._info(sandbox)

    @engine_call
    async def endpoint(self, sandbox_id: str, port: int) -> Endpoint:
        sandbox = await self._sandbox(sandbox_id)
        if port == L.EXECD_PORT:
            if sandbox.port is None:
                raise ApiError(409, errors.INVALID_STATE, f"sandbox {sandbox_id} has no published execd port")
            address = f"{model.endpoint_host(self.settings)}:{sandbox.port}"
            return Endpoint(address, {L.EXECD_TOKEN_HEADER: sandbox.token}, sandbox.labels.secure_access)
        # Other ports are not published: the container's address on its network, reachable from
        # this host (as upstream's bridge mode does).
        if not sandbox.ip:
            raise ApiError(409, errors.INVALID_STATE, f"sandbox {sandbox_id} has no network address")
        secure = sandbox.labels.secure_access
        if port == L.EGRESS_PORT and sandbox.has_policy:
            token = await self._egress_token(sandbox)
            return Endpoint(f"{sandbox.ip}:{port}", {L.EGRESS_TOKEN_HEADER: token}, secure_access=secure)
        return Endpoint(f"{sandbox.ip}:{port}", secure_access=secure)

    @engine_call
    async def upstream(self, sandbox_id: str, port: int) -> Endpoint:
        guards.require_running(sandbox_id, (await self._sandbox(sandbox_id)).state)
        return await self.endpoint(sandbox_id, port)

    @engine_call
    async def egress(self, sandbox_id: str) -> Endpoint | None:
        sandbox = await self._sandbox(sandbox_id)
        if not sandbox.has_policy:
            return None
        guards.require_running(sandbox_id, sandbox.state)
        return await self.endpoint(sandbox_id, L.EGRESS_PORT)

    async def _egress_token(self, sandbox: Sandbox) -> str:
        """The sidecar's token (kept in its environment only: the sandbox cannot read it)."""
        if sandbox.has_policy and not sandbox.egress_token:
            with contextlib.suppress(DockerError):
                sandbox.egress_token = model.env_value(
                    await self._inspect(model.egress_name(sandbox.id)), "OPENSANDBOX_EGRESS_TOKEN"
                )
        return sandbox.egress_token

    async def _start_egress(self, sandbox_id: str, container_id: str, policy: dict[str, Any]) -> str:
        """Start the sandbox's egress sidecar in its network namespace and wait until it enforces the
        policy (its "listening" line comes after the ruleset is loaded). Returns its token."""
        token = secrets.token_urlsafe(24)
        egress = self.config.egress
        await self._ensure_image(egress.image, None)
        body = model.egress_config(sandbox_id, container_id, policy, token, egress.image, egress.upstream_dns)
        sidecar = await self.docker.containers.create(body, name=model.egress_name(sandbox_id))
        async with docker_api.attach_output(self.docker, sidecar.id) as output:
            await sidecar.start()
            await self._wait_ready(sidecar.id, output, model.EGRESS_READY_LINE, "the egress sidecar")
        return token

    async def _begin_lifecycle(self, inspect: dict[str, Any], token: str, hooks: dict[str, Any]) -> None:
        address = f"{model.endpoint_host(self.settings)}:{model.published_port(inspect)}"
        await begin_lifecycle(
            Endpoint(address, {L.EXECD_TOKEN_HEADER: token}), hooks, self.settings.start_timeout_seconds
        )

    async def _open_start_gate(self, container_id: str) -> None:
        """Let the entrypoint go: the bootstrap script waits on the FIFO L.START_GATE, which it made
        before execd started (so once execd is ready, writing to it cannot make a plain file)."""
        execution = await self.docker.containers.container(container_id).exec(
            ["sh", "-c", f"printf go > {L.START_GATE}"], stdout=True, stderr=True
        )
        async with execution.start(detach=False) as stream:
            while await stream.read_out() is not None:
                pass
        code = (await execution.inspect()).get("ExitCode")
        if code != 0:  # the entrypoint would never start: fail the create instead
            raise ApiError(500, errors.START_FAILED, f"cannot open the sandbox's start gate (exit code {code})")

    # -- sandboxes -----------------------------------------------------------------------------

    async def _sandbox(self, sandbox_id: str) -> Sandbox:
        """The sandbox by id: from the index, else found in Docker (one made by another server)."""
        sandbox = self.sandboxes.get(sandbox_id)
        if sandbox is not None:
            return sandbox
        try:
            inspect = await self._inspect(model.container_name(sandbox_id))
        except DockerError:
            raise errors.not_found(sandbox_id) from None
        adopted = self._adopt(inspect)
        if adopted is None or adopted.id != sandbox_id:
            raise errors.not_found(sandbox_id)
        return adopted

    def _adopt(self, inspect: dict[str, Any]) -> Sandbox | None:
        labels = model.decode_labels((inspect.get("Config") or {}).get("Labels") or {})
        if labels is None:
            return None
        override = self.store.load(labels.id)
        sandbox = Sandbox(
            labels=labels,
            container_id=inspect["Id"],
            token=model.env_value(inspect, "EXECD_ACCESS_TOKEN"),
            port=model.published_port(inspect),
            ip=model.container_ip(inspect),
            expires_at=override.expires_at if override else labels.expires_at,
            metadata=dict(override.metadata if override else labels.metadata),
            state=model.map_state(model.ContainerState.from_inspect(inspect.get("State") or {}))[0],
            has_policy=((inspect.get("Config") or {}).get("Labels") or {}).get(L.DOCKER_EGRESS) == "true",
        )
        self.sandboxes[labels.id] = sandbox
        return sandbox

    async def _info(self, sandbox: Sandbox) -> SandboxInfo:
        try:
            inspect = await self._inspect(sandbox.container_id)
        except DockerError as exc:
            if exc.status == 404:  # removed behind our back
                self._forget(sandbox)
                raise errors.not_found(sandbox.id) from None
            raise
        state = model.ContainerState.from_inspect(inspect["State"])
        info = model.sandbox_info(
            sandbox.labels,
            state,
            sandbox.expires_at,
            sandbox.metadata,
            deleting=sandbox.id in self._deleting,
            execd_dead=sandbox.execd_dead,
        )
        sandbox.state = info.state
        return info

    async def _expect_state(self, sandbox: Sandbox, wanted: str) -> None:
        current = (await self._info(sandbox)).state
        if current != wanted:
            raise ApiError(409, errors.INVALID_STATE, f"sandbox {sandbox.id} is {current}, not {wanted}")

    async def _call(self, operation: Any, sandbox: Sandbox) -> None:
        try:
            await operation
        except DockerError as exc:
            if exc.status == 404:
                self._forget(sandbox)
                raise errors.not_found(sandbox.id) from None
            raise ApiError(500, errors.INTERNAL_ERROR, f"sandbox {sandbox.id}: {exc.message}") from None

    async def _destroy(self, sandbox: Sandbox) -> None:
        """Remove the container with its anonymous volumes, then what the server kept of it."""
        self._deleting.add(sandbox.id)
        try:
            if sandbox.has_policy:
                await self._remove_container(model.egress_name(sandbox.id))
            await self.docker.containers.container(sandbox.container_id).delete(force=True, v=True)
        except DockerError as exc:
            if exc.status == DOCKER_NOT_CONNECTED:
                raise
            if exc.status != 404:
                raise ApiError(500, errors.INTERNAL_ERROR, f"cannot delete {sandbox.id}: {exc.message}") from None
        finally:
            self._deleting.discard(sandbox.id)
        self._forget(sandbox)
        await docker_volumes.remove(self.docker, sandbox.labels.owned_volumes)

    def _forget(self, sandbox: Sandbox) -> None:
        self.sandboxes.pop(sandbox.id, None)
        self.store.delete(sandbox.id)

    def _save(self, sandbox: Sandbox) -> None:
        self.store.save(sandbox.id, model.Override(expires_at=sandbox.expires_at, metadata=sandbox.metadata))

    # -- creating ------------------------------------------------------------------------------

    async def _ensure_image(self, uri: str, auth: dict[str, str] | None) -> dict[str, Any]:
        """The image's inspect; pulled first when missing (one pull per image at a time)."""
        with contextlib.suppress(DockerError):
            return await self.docker.images.inspect(uri)
        lock = self._pull_locks.setdefault(uri, asyncio.Lock())
        async with lock:
            with contextlib.suppress(DockerError):
                return await self.docker.images.inspect(uri)
            log.info("pulling image=%s", uri)
            try:
                async with asyncio.timeout(self.settings.pull_timeout_seconds):
                    await self.docker.images.pull(uri, auth=auth)
                return await self.docker.images.inspect(uri)
            except TimeoutError:
                message = f"pulling image {uri} took longer than {self.settings.pull_timeout_seconds:g} s"
            except DockerError as exc:
                message = f"cannot pull image {uri}: {exc.message}"
            log.warning("%s", message)
            raise ApiError(400, errors.IMAGE_PULL_FAILED, message)

    async def _make_execd_volume(self, helper_image: str) -> str:
        """The volume holding execd, made (once per version) and remembered. Its name carries a
        digest of the content (of `docker.execdDir`, or the execd image's id); `.complete`, the last
        member written, tells a finished volume from one a crash left half-written. `helper_image`
        (present: the create's) makes the never-started container the files go in through when
        they come from a directory."""
        async with self._execd_lock:
            if self._execd_volume is None:
                if self._execd_dir_tar is not None:
                    tar = self._execd_dir_tar
                    name = model.execd_volume_name(hashlib.sha256(tar).hexdigest())
                    await self._fill_execd_volume(name, helper_image, lambda _: _async_value(tar))
                else:
                    image = self.config.runtime.execd_image
                    image_id = str((await self._ensure_image(image, None)).get("Id", "")).removeprefix("sha256:")
                    name = model.execd_volume_name(image_id)
                    await self._fill_execd_volume(name, image, self._execd_tar_from_image)
                self._execd_volume = name
                await self._remove_stale_execd_volumes(name)
            return self._execd_volume

    async def _fill_execd_volume(
        self, name: str, helper_image: str, tar_of: Callable[[DockerContainer], Awaitable[bytes]]
    ) -> None:
        """Creates volume `name` (no-op if it exists) and, unless it is complete, writes `tar_of`'s
        archive into it through a helper container of `helper_image` (created, never started)."""
        await self.docker.volumes.create({"Name": name, "Labels": {L.DOCKER_EXECD_VOLUME: name}})  # type: ignore[no-untyped-call]
        body: Json = {
            "Image": helper_image,
            "Cmd": ["true"],
            "Labels": {L.DOCKER_EXECD_HELPER: "true"},
            "HostConfig": {"Mounts": [{"Type": "volume", "Source": name, "Target": HELPER_MOUNT}]},
        }
        helper = await self.docker.containers.create(body)
        try:
            complete = f"{HELPER_MOUNT}/{model.EXECD_VOLUME_COMPLETE}"
            if not await docker_api.path_exists(self.docker, helper.id, complete):
                await helper.put_archive(HELPER_MOUNT, await tar_of(helper))  # type: ignore[no-untyped-call]
                log.info("execd volume made volume=%s", name)
        finally:
            await self._remove_container(helper.id)

    async def _execd_tar_from_image(self, helper: DockerContainer) -> bytes:
        """The execd image's /opensandbox/ as an archive rooted at the volume (the helper is of
        that image)."""
        image = self.config.runtime.execd_image
        archive = await helper.get_archive(L.EXECD_IMAGE_DIR + "/")
        try:
            return _rerooted_tar(archive)
        except ValueError:
            raise ApiError(
                500, errors.START_FAILED, f"execd image {image} has no {L.EXECD_IMAGE_DIR}/execd and bootstrap.sh"
            ) from None

    async def _remove_stale_execd_volumes(self, current: str) -> None:
        """Volumes of other execd versions made over an hour ago: removed unless a sandbox still uses
        one (then the Engine refuses, and a later server start tries again). Younger ones may belong to
        another server on this engine (another version, or execd from the image where this one has
        it from a directory) that has not created its first sandbox yet."""
        found = await self.docker.volumes.list()  # type: ignore[no-untyped-call]
        for volume in found.get("Volumes") or []:
            # By name: the engine made one without our label when a create found it gone (a prune).
            ours = str(volume.get("Name", "")).startswith(model.EXECD_VOLUME_PREFIX)
            created = model.docker_time(volume.get("CreatedAt"))
            old = created is not None and times.now() - created > STALE_EXECD_VOLUME
            if ours and volume.get("Name") != current and old:
                with contextlib.suppress(DockerError):
                    await DockerVolume(self.docker, volume["Name"]).delete()  # type: ignore[no-untyped-call]

    async def _check_entrypoint(
        self, container_id: str, image: dict[str, Any], spec: SandboxSpec, working_dir: str
    ) -> None:
        """A missing program is the caller's mistake (400), told before anything starts: the
        bootstrap script would only report it in the log of a container that then exits."""
        program = spec.entrypoint[0]
        key = (str(image.get("Id")), program)
        if key in self._found_programs:
            return
        path = model.image_path((image.get("Config") or {}).get("Env") or [], spec.env)
        candidates = model.program_candidates(program, working_dir, path)
        found = await asyncio.gather(*(docker_api.path_exists(self.docker, container_id, c) for c in candidates))
        if not any(found):
            raise ApiError(400, errors.INVALID_PARAMETER, f"cannot start the entrypoint: {program} is not in the image")
        self._found_programs.add(key)

    async def _wait_ready(
        self, container_id: str, output: AsyncIterator[str], line: str = model.READY_LINE, what: str = "execd"
    ) -> None:
        """Read the container's output until `line` (execd says it listens); the output ends if it exits."""
        seen = ""
        timeout = self.settings.start_timeout_seconds
        try:
            async with asyncio.timeout(timeout):
                async for chunk in output:
                    seen = (seen + chunk)[-LOG_TAIL_CHARS:]
                    if line in seen:
                        return
        except TimeoutError:
            raise self._start_failed(container_id, f"{what} did not start within {timeout:g} s", seen) from None
        state = (await self._inspect(container_id)).get("State") or {}
        raise self._start_failed(container_id, f"the container exited with code {state.get('ExitCode')}", seen)

    async def _check_published_port(self, inspect: dict[str, Any], token: str) -> None:
        """execd answers on the published port the endpoint names. An engine's NAT rule for that
        port can send it elsewhere: a rule the engine left behind for a removed container (podman
        does) comes first and takes the port's connections to a dead or a stranger's address."""
        port = model.published_port(inspect)
        if port is None:
            return
        endpoint = Endpoint(f"{model.endpoint_host(self.settings)}:{port}", {L.EXECD_TOKEN_HEADER: token})
        why = await ping_execd(endpoint, PUBLISHED_PORT_TIMEOUT)
        if why is not None:
            raise _PortTaken(
                f"execd's published port {port} does not reach the container ({why}): the engine's NAT rule for"
                " it is stale or another container's"
            )

    def _start_failed(self, container_id: str, why: str, output: str) -> ApiError:
        lines = [line for line in output.strip().splitlines() if line.strip()]
        log.error("sandbox start failed container=%s why=%s log=%s", container_id[:12], why, output[-2000:])
        return ApiError(500, errors.START_FAILED, f"{why}: {lines[-1] if lines else 'no output'}")

    # -- diagnostics ---------------------------------------------------------------------------

    @engine_call
    async def logs(self, sandbox_id: str, tail: int | None, since: dt.datetime | None, scope: str) -> LogText:
        """The container's output (execd's log and the entrypoint's, stdout and stderr)."""
        sandbox = await self._sandbox(sandbox_id)
        params: dict[str, Any] = {"stdout": True, "stderr": True}
        if tail is not None:
            params["tail"] = tail
        if since is not None:
            params["since"] = int(since.timestamp())
        lines = await self.docker.containers.container(sandbox.container_id).log(**params)
        return LogText("".join(lines))

    @engine_call
    async def runtime_events(self, sandbox_id: str) -> EventList:
        sandbox = await self._sandbox(sandbox_id)
        return model.container_events(await self._inspect(sandbox.container_id))

    @engine_call
    async def inspect(self, sandbox_id: str) -> dict[str, Any]:
        sandbox = await self._sandbox(sandbox_id)
        return model.redacted_inspect(await self._inspect(sandbox.container_id))

    # -- Docker helpers ------------------------------------------------------------------------

    async def _inspect(self, container: str) -> dict[str, Any]:
        """GET /containers/{id or name}/json."""
        return await self.docker.containers.container(container).show()

    async def _list_containers(self) -> JsonList:
        return await docker_api.list_containers(self.docker, L.DOCKER_ID)

    async def _remove_container(self, container_id: str) -> bool:
        """Remove a container (by id or name); False when the engine could not be asked (never raises)."""
        try:
            await self.docker.containers.container(container_id).delete(force=True, v=True)
        except DockerError as exc:
            if exc.status != 404:
                log.error("cannot remove container %s: %s", container_id[:12], exc.message)
                return exc.status != DOCKER_NOT_CONNECTED
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning("cannot remove container %s now: %r", container_id[:12], exc)
            return False
        return True

    # -- the engine's health and execd's liveness ------------------------------------------------

    def unavailable_error(self, exc: BaseException) -> ApiError | None:
        if isinstance(exc, TimeoutError):
            why = f"no answer within {self.settings.api_timeout_seconds:g}s (docker.apiTimeoutSeconds)"
        elif isinstance(exc, aiohttp.ClientError) or (
            isinstance(exc, DockerError) and exc.status == DOCKER_NOT_CONNECTED
        ):
            why = str(getattr(exc, "message", "") or exc)
        else:
            return None
        self.engine.failed(why)
        return ApiError(503, ENGINE_UNAVAILABLE, f"{ENGINE_NAME} is unavailable: {why}", {"Retry-After": "5"})

    async def _ping(self) -> None:
        """The engine monitor's check; once it answers, containers of abandoned creates are removed."""
        async with self.docker._query("_ping", versioned_api=False) as response:
            await response.read()
        await self._remove_abandoned()
        await self._remove_unstarted()

    async def _remove_abandoned(self) -> None:
        """Creates whose engine did not answer may have left a container (made once the engine woke
        up): remove `sandbox-<id>` until the engine has answered long enough for any such request to
        have been served."""
        settle = 2 * self.settings.api_timeout_seconds
        for sandbox_id, since in list(self._abandoned.items()):
            if sandbox_id in self.sandboxes or not await self._remove_container(model.container_name(sandbox_id)):
                continue
            if time.monotonic() - since > settle and self.engine.reachable:
                del self._abandoned[sandbox_id]
                self.store.delete(sandbox_id)

    def _probe_targets(self) -> Targets:
        host = model.endpoint_host(self.settings)
        return [
            (s.id, Endpoint(f"{host}:{s.port}", {L.EXECD_TOKEN_HEADER: s.token}))
            for s in self.sandboxes.values()
            if s.state == State.RUNNING and s.port is not None and not s.execd_dead and s.id not in self._deleting
        ]

    def _execd_died(self, sandbox_id: str, why: str) -> None:
        sandbox = self.sandboxes.get(sandbox_id)
        if sandbox is not None:
            sandbox.execd_dead = why
            sandbox.state = State.FAILED

    # -- expiry (the sweeper's view of the index) ----------------------------------------------

    def _expiry_of(self, sandbox_id: str) -> dt.datetime | None:
        sandbox = self.sandboxes.get(sandbox_id)
        return sandbox.expires_at if sandbox else None

    async def _expire(self, sandbox_id: str) -> None:
        sandbox = self.sandboxes.get(sandbox_id)
        if sandbox is not None:
            await self._destroy(sandbox)
            self.events.gone(sandbox_id, Reason.EXPIRED, f"its expiry {sandbox.expires_at} passed")


HELPER_MOUNT = "/opensandbox-execd"  # where a helper container has execd's volume
STALE_EXECD_VOLUME = dt.timedelta(hours=1)


class _Steps:
    """How long each step of a create took, for its log line (`image_ms=... ready_ms=... ms=...`)."""

    def __init__(self) -> None:
        self.started = self.last = time.monotonic()
        self.spent: list[tuple[str, float]] = []

    def done(self, step: str) -> None:
        now = time.monotonic()
        self.spent.append((step, now - self.last))
        self.last = now

    def __str__(self) -> str:
        fields = [f"{step}_ms={seconds * 1000:.0f}" for step, seconds in self.spent]
        return " ".join([*fields, f"ms={(self.last - self.started) * 1000:.0f}"])


A = TypeVar("A")
B = TypeVar("B")


async def _both(first: Awaitable[A], second: Awaitable[B]) -> tuple[A, B]:
    """Both at once; the first failure cancels the other and is raised as it is (a TaskGroup
    would wrap it in an ExceptionGroup)."""
    a, b = asyncio.ensure_future(first), asyncio.ensure_future(second)
    try:
        return await a, await b
    except BaseException:
        a.cancel()
        b.cancel()
        await asyncio.gather(a, b, return_exceptions=True)
        raise


async def _async_value(value: bytes) -> bytes:
    return value


def _dir_tar(directory: Path) -> bytes:
    """`directory` (execd, execd-lib/, bootstrap.sh) as an archive for the volume's root: owned by
    root, modes kept, `.complete` last. RuntimeError if it does not hold an execd build."""
    for needed in ("execd", "bootstrap.sh"):
        if not os.access(directory / needed, os.X_OK):
            raise RuntimeError(f"docker.execdDir: {directory / needed} is missing or not executable")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(directory.rglob("*")):
            info = tar.gettarinfo(str(path), str(path.relative_to(directory)))
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = 0  # the same files, the same digest: a rebuild of the same execd reuses its volume
            if info.isfile():
                with path.open("rb") as fh:
                    tar.addfile(info, fh)
            else:
                tar.addfile(info)
        _add_complete(tar)
    return _unpadded(buffer, tar)


def _rerooted_tar(archive: tarfile.TarFile) -> bytes:
    """GET archive's tar of a directory (members under its name) re-rooted at that directory, with
    `.complete` last. ValueError if execd or bootstrap.sh is not in it."""
    buffer = io.BytesIO()
    names = set()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for member in archive.getmembers():
            _, _, relative = member.name.partition("/")
            if not relative:
                continue
            member.name = relative
            names.add(relative)
            tar.addfile(member, archive.extractfile(member) if member.isfile() else None)
        _add_complete(tar)
    if not {"execd", "bootstrap.sh"} <= names:
        raise ValueError("not an execd directory")
    return _unpadded(buffer, tar)


def _unpadded(buffer: io.BytesIO, tar: tarfile.TarFile) -> bytes:
    """The closed archive without tarfile's zeros up to a whole record: podman's PUT archive stops
    reading after the two end blocks, and the rest of the body then fails the call with "passing bulk
    input to subprocess: write |1: broken pipe" (containers/buildah#6573)."""
    return buffer.getvalue()[: tar.offset]


def _add_complete(tar: tarfile.TarFile) -> None:
    info = tarfile.TarInfo(model.EXECD_VOLUME_COMPLETE)
    info.size, info.mode = 0, 0o644
    tar.addfile(info, io.BytesIO(b""))


class _PortTaken(ApiError):
    """The published execd port leads elsewhere (docker.py `_check_published_port`)."""

    def __init__(self, message: str) -> None:
        super().__init__(500, errors.START_FAILED, message)
