"""The `docker` runtime: every sandbox is a container, created through the Docker Engine API.

Create: pull the image if it is missing (with the request's image.auth), create the container
(labels carry the sandbox id, the request and its expiry; see docker_model.py), check that the
entrypoint's program exists in it, copy execd and its bootstrap script into /opt/opensandbox
(PUT archive, before start), start it, and wait for execd's "listening" line in the container's
log stream (an event, not a poll; bounded). Anything that fails removes the container again.

execd comes from `docker.execdBinary` + `docker.execdBootstrap` when set, else from
`runtime.execdImage`: a helper container of that image is created (never started), its
/opensandbox/ directory read with GET archive and removed; the files are kept in memory.

The truth lives in Docker: list and get read the containers with the id label; a restarted
server rebuilds its index (container id, execd token and host port) from them. Expiry and
metadata start in the labels; renewals and patches go to a small file per sandbox in
`docker.stateDir`, because labels cannot change (docker_model.OverrideStore). The shared sweeper
(expiry.py) deletes what is due. The few Engine calls aiodocker's public API does not make the
way we need are in docker_api.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import json
import logging
import secrets
import tarfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiodocker
from aiodocker.exceptions import DockerError

from opensandbox_platform.api import labels as L
from opensandbox_platform.daemon import times
from opensandbox_platform.server import errors, validation
from opensandbox_platform.server.config import Config
from opensandbox_platform.server.errors import ApiError
from opensandbox_platform.server.runtimes import docker_api, guards, seccomp
from opensandbox_platform.server.runtimes import docker_model as model
from opensandbox_platform.server.runtimes.base import (
    Capabilities,
    Endpoint,
    SandboxInfo,
    SandboxSpec,
    State,
    merge_metadata,
)
from opensandbox_platform.server.runtimes.expiry import ExpirySweeper

log = logging.getLogger("opensandbox.docker")

LOG_TAIL_CHARS = 4000
Json = dict[str, Any]
JsonList = list[Json]  # (at module level: `list` in the class body is the method)


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

    @property
    def id(self) -> str:
        return self.labels.id


class DockerRuntime:
    capabilities = Capabilities(runtime="docker", image_auth=True, pause=True)

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
        self._seccomp = ""
        self._execd_tar: bytes | None = None
        self._execd_lock = asyncio.Lock()
        self._pull_locks: dict[str, asyncio.Lock] = {}
        self._found_programs: set[tuple[str, str]] = set()  # (image id, argv[0]) known to exist
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

    def _seccomp_option(self, version: dict[str, Any]) -> str:
        components = version.get("Components") or []
        podman = any("podman" in str(c.get("Name", "")).lower() for c in components)
        value, write_to = model.seccomp_option(
            self.settings.seccomp_profile, podman, self.store.directory / "profiles" / "seccomp.json"
        )
        if write_to is not None:  # not beside the sandboxes' *.json files: those are overrides
            Path(write_to).parent.mkdir(exist_ok=True)
            Path(write_to).write_text(json.dumps(seccomp.docker_profile(), indent=1))
        return value

    async def start(self) -> None:
        self._docker = aiodocker.Docker(url=self.settings.host or None)
        try:
            version = await self.docker.version()
        except DockerError as exc:
            await self._docker.close()
            raise RuntimeError(f"cannot reach the Docker Engine API: {exc.message}") from None
        self.store.directory.mkdir(parents=True, exist_ok=True)
        self._seccomp = self._seccomp_option(version)
        await self._remove_helpers()
        if self.settings.execd_binary:  # a wrong path fails the start, not every create
            await self._execd_archive()
        await self._recover()
        self.expiry.start()
        log.info(
            "docker runtime ready engine=%s api=%s sandboxes=%d",
            version.get("Version"),
            version.get("ApiVersion"),
            len(self.sandboxes),
        )

    async def close(self) -> None:
        await self.expiry.close()
        if self._docker is not None:
            await self._docker.close()
            self._docker = None

    async def _recover(self) -> None:
        for item in await self._list_containers():
            labels = model.decode_labels(item.get("Labels") or {})
            if labels is None:
                continue
            if str(item.get("State")).lower() == "created":
                # Never started: a create cut short by a server stop. Nobody was told its id.
                log.warning("removing a sandbox container whose create did not finish id=%s", labels.id)
                await self._remove_container(item["Id"])
                self.store.delete(labels.id)
                continue
            with contextlib.suppress(DockerError):
                self._adopt(await self._inspect(item["Id"]))
        for stale in self.store.ids() - set(self.sandboxes):
            self.store.delete(stale)

    async def _remove_helpers(self) -> None:
        filters = json.dumps({"label": [L.DOCKER_EXECD_HELPER]})
        for item in await self.docker.containers.list(all=True, filters=filters):
            await self._remove_container(item.id)

    # -- the API -------------------------------------------------------------------------------

    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        sandbox_id = str(uuid.uuid4())
        now = times.now()
        image = await self._ensure_image(spec.image, spec.image_auth)
        execd_files = await self._execd_archive()
        token = secrets.token_urlsafe(24)
        image_config = image.get("Config") or {}
        working_dir = image_config.get("WorkingDir") or self.settings.working_dir
        labels = model.encode_labels(sandbox_id, spec, now)
        body = model.container_config(
            sandbox_id,
            spec,
            token=token,
            labels=labels,
            working_dir=working_dir,
            settings=self.settings,
            cpu_millis=spec.cpu_millis or self.default_cpu,
            memory_bytes=spec.memory_bytes or self.default_memory,
            seccomp=self._seccomp,
        )
        try:
            container = await self.docker.containers.create(body, name=model.container_name(sandbox_id))
        except DockerError as exc:
            raise ApiError(500, errors.START_FAILED, f"cannot create the container: {exc.message}") from None
        try:
            await self._check_entrypoint(container.id, image, spec, working_dir)
            await container.put_archive("/", execd_files)  # type: ignore[no-untyped-call]
            await container.start()
            await self._wait_ready(container.id)
            inspect = await self._inspect(container.id)
        except BaseException as exc:
            await asyncio.shield(self._remove_container(container.id))
            if isinstance(exc, DockerError):
                raise ApiError(500, errors.START_FAILED, f"cannot start the sandbox: {exc.message}") from None
            raise
        sandbox = self._adopt(inspect)
        assert sandbox is not None
        self._save(sandbox)
        self.expiry.wake()
        return model.sandbox_info(
            sandbox.labels, model.ContainerState.from_inspect(inspect["State"]), sandbox.expires_at, sandbox.metadata
        )

    async def get(self, sandbox_id: str) -> SandboxInfo:
        sandbox = await self._sandbox(sandbox_id)
        return await self._info(sandbox)

    async def list(self) -> list[SandboxInfo]:
        infos = []
        for item in await self._list_containers():
            labels = model.decode_labels(item.get("Labels") or {})
            if labels is None:
                continue
            state = model.ContainerState.from_list(item)
            known = self.sandboxes.get(labels.id)
            if known is not None:
                infos.append(model.sandbox_info(labels, state, known.expires_at, known.metadata))
                known.state = model.map_state(state)[0]
                continue
            override = self.store.load(labels.id)
            expires_at = override.expires_at if override else labels.expires_at
            infos.append(
                model.sandbox_info(labels, state, expires_at, override.metadata if override else labels.metadata)
            )
        return infos

    async def delete(self, sandbox_id: str) -> None:
        sandbox = await self._sandbox(sandbox_id)
        async with sandbox.lock:
            await self._destroy(sandbox)

    async def pause(self, sandbox_id: str) -> None:
        sandbox = await self._sandbox(sandbox_id)
        async with sandbox.lock:
            await self._expect_state(sandbox, State.RUNNING)
            await self._call(self.docker.containers.container(sandbox.container_id).pause(), sandbox)
            sandbox.state = State.PAUSED

    async def resume(self, sandbox_id: str) -> None:
        sandbox = await self._sandbox(sandbox_id)
        async with sandbox.lock:
            await self._expect_state(sandbox, State.PAUSED)
            await self._call(self.docker.containers.container(sandbox.container_id).unpause(), sandbox)
            sandbox.state = State.RUNNING

    async def renew(self, sandbox_id: str, expires_at: dt.datetime) -> SandboxInfo:
        sandbox = await self._sandbox(sandbox_id)
        async with sandbox.lock:
            guards.require_expiry(sandbox_id, sandbox.expires_at)
            sandbox.expires_at = expires_at
            self._save(sandbox)
            self.expiry.wake()
        return await self._info(sandbox)

    async def patch_metadata(self, sandbox_id: str, patch: dict[str, str | None]) -> SandboxInfo:
        sandbox = await self._sandbox(sandbox_id)
        async with sandbox.lock:
            merge_metadata(sandbox.metadata, patch)
            self._save(sandbox)
        return await self._info(sandbox)

    async def endpoint(self, sandbox_id: str, port: int) -> Endpoint:
        sandbox = await self._sandbox(sandbox_id)
        if port == L.EXECD_PORT:
            if sandbox.port is None:
                raise ApiError(409, errors.INVALID_STATE, f"sandbox {sandbox_id} has no published execd port")
            address = f"{model.endpoint_host(self.settings)}:{sandbox.port}"
            return Endpoint(address, {L.EXECD_TOKEN_HEADER: sandbox.token})
        # Other ports are not published: the container's address on its network, reachable from
        # this host (as upstream's bridge mode does).
        if not sandbox.ip:
            raise ApiError(409, errors.INVALID_STATE, f"sandbox {sandbox_id} has no network address")
        return Endpoint(f"{sandbox.ip}:{port}")

    async def upstream(self, sandbox_id: str, port: int) -> Endpoint:
        guards.require_running(sandbox_id, (await self._sandbox(sandbox_id)).state)
        return await self.endpoint(sandbox_id, port)

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
        sandbox.state = model.map_state(state)[0]
        return model.sandbox_info(sandbox.labels, state, sandbox.expires_at, sandbox.metadata)

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
        try:
            await self.docker.containers.container(sandbox.container_id).delete(force=True, v=True)
        except DockerError as exc:
            if exc.status != 404:
                raise ApiError(500, errors.INTERNAL_ERROR, f"cannot delete {sandbox.id}: {exc.message}") from None
        self._forget(sandbox)

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

    async def _execd_archive(self) -> bytes:
        """execd and bootstrap.sh as a tar to extract at / (opt/opensandbox/...), built once."""
        async with self._execd_lock:
            if self._execd_tar is None:
                if self.settings.execd_binary:
                    files = await asyncio.to_thread(self._execd_files_from_paths)
                else:
                    files = await self._execd_files_from_image()
                self._execd_tar = _execd_tar(files)
            return self._execd_tar

    def _execd_files_from_paths(self) -> dict[str, bytes]:
        try:
            return {
                "execd": Path(self.settings.execd_binary).read_bytes(),
                "bootstrap.sh": Path(self.settings.execd_bootstrap).read_bytes(),
            }
        except OSError as exc:
            raise RuntimeError(f"docker.execdBinary/execdBootstrap: {exc}") from None

    async def _execd_files_from_image(self) -> dict[str, bytes]:
        image = self.config.runtime.execd_image
        await self._ensure_image(image, None)
        body: Json = {"Image": image, "Cmd": ["true"], "Labels": {L.DOCKER_EXECD_HELPER: "true"}}
        helper = await self.docker.containers.create(body)
        try:
            archive = await helper.get_archive(L.EXECD_IMAGE_DIR + "/")
            files: dict[str, bytes] = {}
            for member in archive.getmembers():
                name = member.name.rstrip("/").rsplit("/", 1)[-1]
                extracted = archive.extractfile(member) if member.isfile() else None
                if name in ("execd", "bootstrap.sh") and extracted is not None:
                    files[name] = extracted.read()
        finally:
            await self._remove_container(helper.id)
        if set(files) != {"execd", "bootstrap.sh"}:
            raise ApiError(
                500, errors.START_FAILED, f"execd image {image} has no {L.EXECD_IMAGE_DIR}/execd and bootstrap.sh"
            )
        return files

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

    async def _wait_ready(self, container_id: str) -> None:
        """Follow the container's log until execd says it listens; the stream ends if it exits."""
        seen = ""
        timeout = self.settings.start_timeout_seconds
        try:
            async with asyncio.timeout(timeout):
                async with docker_api.follow_logs(self.docker, container_id) as chunks:
                    async for chunk in chunks:
                        seen = (seen + chunk)[-LOG_TAIL_CHARS:]
                        if model.READY_LINE in seen:
                            return
        except TimeoutError:
            raise self._start_failed(container_id, f"execd did not start within {timeout:g} s", seen) from None
        state = (await self._inspect(container_id)).get("State") or {}
        raise self._start_failed(container_id, f"the container exited with code {state.get('ExitCode')}", seen)

    def _start_failed(self, container_id: str, why: str, output: str) -> ApiError:
        lines = [line for line in output.strip().splitlines() if line.strip()]
        log.error("sandbox start failed container=%s why=%s log=%s", container_id[:12], why, output[-2000:])
        return ApiError(500, errors.START_FAILED, f"{why}: {lines[-1] if lines else 'no output'}")

    # -- Docker helpers ------------------------------------------------------------------------

    async def _inspect(self, container: str) -> dict[str, Any]:
        """GET /containers/{id or name}/json."""
        return await self.docker.containers.container(container).show()

    async def _list_containers(self) -> JsonList:
        return await docker_api.list_containers(self.docker, L.DOCKER_ID)

    async def _remove_container(self, container_id: str) -> None:
        try:
            await self.docker.containers.container(container_id).delete(force=True, v=True)
        except DockerError as exc:
            if exc.status != 404:
                log.error("cannot remove container %s: %s", container_id[:12], exc.message)

    # -- expiry (the sweeper's view of the index) ----------------------------------------------

    def _expiry_of(self, sandbox_id: str) -> dt.datetime | None:
        sandbox = self.sandboxes.get(sandbox_id)
        return sandbox.expires_at if sandbox else None

    async def _expire(self, sandbox_id: str) -> None:
        sandbox = self.sandboxes.get(sandbox_id)
        if sandbox is not None:
            await self._destroy(sandbox)


def _execd_tar(files: dict[str, bytes]) -> bytes:
    """opt/, opt/opensandbox/ and the two files, root-owned and executable."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        parts = L.EXECD_MOUNT.strip("/").split("/")
        for depth in range(1, len(parts) + 1):
            directory = tarfile.TarInfo("/".join(parts[:depth]))
            directory.type, directory.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(directory)
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(f"{'/'.join(parts)}/{name}")
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
