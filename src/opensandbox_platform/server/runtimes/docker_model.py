"""The pure part of the docker runtime: labels, state mapping, the container's config, overrides.

No I/O against Docker here (runtimes/docker.py does that), so all of it is unit-tested with plain
data. Label names are in api/labels.py (`DOCKER_*`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opensandbox_platform.api import labels as L
from opensandbox_platform.daemon import times
from opensandbox_platform.server.config import DockerSection
from opensandbox_platform.server.runtimes.base import SandboxInfo, SandboxSpec, State
from opensandbox_platform.server.runtimes.events import Reason, SandboxEvent
from opensandbox_platform.server.runtimes.jail import CAPABILITIES
from opensandbox_platform.server.runtimes.liveness import EXECD_DEAD
from opensandbox_platform.server.runtimes.seccomp import docker_profile, rules

EXECD_PORT_KEY = f"{L.EXECD_PORT}/tcp"
# execd's files (execd, execd-lib/, bootstrap.sh) come from one volume shared by every sandbox,
# mounted read-only; /opt/opensandbox itself stays the container's (the env file lives there).
EXECD_DIR = L.EXECD_MOUNT + "/bin"
EXECD_BINARY = EXECD_DIR + "/execd"
EXECD_BOOTSTRAP = EXECD_DIR + "/bootstrap.sh"
EXECD_VOLUME_PREFIX = "opensandbox-execd-"
# The last member of the volume's archive: present once the volume holds all of execd.
EXECD_VOLUME_COMPLETE = ".complete"
# Docker's own log line parser is not ours to rely on: execd's start-up line is the readiness event.
READY_LINE = 'msg="execd listening"'
EGRESS_READY_LINE = 'msg="egress listening"'
EGRESS_MEMORY = 64 << 20
UNKNOWN = "Unknown"
_EXITED = re.compile(r"Exited \((-?\d+)\)")


def container_name(sandbox_id: str) -> str:
    return f"sandbox-{sandbox_id}"


# -- labels ------------------------------------------------------------------------------------


@dataclass
class Labels:
    """What a sandbox container's labels say: the create request, as it was at create time."""

    id: str
    image: str
    entrypoint: list[str]
    created_at: dt.datetime
    expires_at: dt.datetime | None
    metadata: dict[str, str] = field(default_factory=dict)
    extensions: dict[str, str] = field(default_factory=dict)
    secure_access: bool = False
    owned_volumes: list[str] = field(default_factory=list)  # named volumes removed with the sandbox
    snapshot_id: str = ""


def encode_labels(
    sandbox_id: str, spec: SandboxSpec, created_at: dt.datetime, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """User metadata and extensions get their own prefixes: a container also carries its image's
    labels, which must not show up as metadata."""
    labels = {
        L.DOCKER_ID: sandbox_id,
        L.DOCKER_IMAGE: spec.image,
        L.DOCKER_ENTRYPOINT: json.dumps(spec.entrypoint),
        L.DOCKER_CREATED_AT: times.rfc3339(created_at, digits=6),
    }
    if spec.snapshot_id:
        labels[L.DOCKER_SNAPSHOT] = spec.snapshot_id
    if spec.timeout_seconds is None:
        labels[L.DOCKER_MANUAL_CLEANUP] = "true"
    else:
        labels[L.DOCKER_EXPIRES_AT] = times.rfc3339(created_at + dt.timedelta(seconds=spec.timeout_seconds), digits=6)
    if spec.secure_access:
        labels[L.DOCKER_SECURE_ACCESS] = "true"
    labels.update({L.DOCKER_METADATA_PREFIX + k: v for k, v in spec.metadata.items()})
    labels.update({L.DOCKER_EXTENSIONS_PREFIX + k: v for k, v in spec.extensions.items()})
    labels.update(extra or {})  # (the platform's too: listed below, so a snapshot's image does not keep them)
    labels[L.DOCKER_OWN_LABELS] = json.dumps(sorted(labels))
    return labels


def decode_labels(labels: dict[str, str]) -> Labels | None:
    """None for a container that is not a sandbox of ours (or whose labels are damaged). Only the
    labels the runtime set count, where it recorded them (not those inherited from the image)."""
    with contextlib.suppress(ValueError, TypeError):
        own = set(json.loads(labels.get(L.DOCKER_OWN_LABELS, "null")) or labels)
        labels = {k: v for k, v in labels.items() if k in own}
    try:
        sandbox_id = labels[L.DOCKER_ID]
        entrypoint = json.loads(labels.get(L.DOCKER_ENTRYPOINT, "[]"))
        created_at = times.parse(labels[L.DOCKER_CREATED_AT])
        expires = labels.get(L.DOCKER_EXPIRES_AT)
        expires_at = times.parse_optional(expires)
    except (KeyError, ValueError):
        return None
    if not isinstance(entrypoint, list):
        return None
    return Labels(
        id=sandbox_id,
        image=labels.get(L.DOCKER_IMAGE, ""),
        entrypoint=[str(a) for a in entrypoint],
        created_at=created_at,
        expires_at=expires_at,
        metadata=_with_prefix(labels, L.DOCKER_METADATA_PREFIX),
        extensions=_with_prefix(labels, L.DOCKER_EXTENSIONS_PREFIX),
        secure_access=labels.get(L.DOCKER_SECURE_ACCESS) == "true",
        owned_volumes=_json_list(labels.get(L.DOCKER_OWNED_VOLUMES)),
        snapshot_id=labels.get(L.DOCKER_SNAPSHOT, ""),
    )


def _json_list(value: str | None) -> list[str]:
    try:
        found = json.loads(value or "[]")
    except ValueError:
        return []
    return [str(item) for item in found] if isinstance(found, list) else []


def _with_prefix(labels: dict[str, str], prefix: str) -> dict[str, str]:
    return {k[len(prefix) :]: v for k, v in labels.items() if k.startswith(prefix)}


# -- state -------------------------------------------------------------------------------------


@dataclass
class ContainerState:
    """The part of a container's state the API reports (from inspect or from the list)."""

    status: str  # created, running, paused, restarting, removing, exited, dead
    exit_code: int | None = None
    oom_killed: bool = False
    error: str = ""
    changed_at: dt.datetime | None = None

    @classmethod
    def from_inspect(cls, state: dict[str, Any]) -> ContainerState:
        status = str(state.get("Status") or "").lower()
        if state.get("Paused") and status == "running":
            status = "paused"
        changed = state.get("FinishedAt") if status in ("exited", "dead") else state.get("StartedAt")
        return cls(
            status=status,
            exit_code=state.get("ExitCode"),
            oom_killed=bool(state.get("OOMKilled")),
            error=str(state.get("Error") or ""),
            changed_at=docker_time(changed),
        )

    @classmethod
    def from_list(cls, item: dict[str, Any]) -> ContainerState:
        """GET /containers/json has no exit code field; its `Status` text has it ("Exited (3) ...")."""
        status = str(item.get("State") or "").lower()
        match = _EXITED.search(str(item.get("Status") or ""))
        return cls(status=status, exit_code=int(match.group(1)) if match else None)


def docker_time(value: Any) -> dt.datetime | None:
    """Docker's RFC 3339 with nanoseconds; "0001-01-01T00:00:00Z" means never."""
    if not isinstance(value, str) or value.startswith("0001-"):
        return None
    trimmed = re.sub(r"(\.\d{6})\d+", r"\1", value)
    with contextlib.suppress(ValueError):
        return times.parse(trimmed)
    return None


def map_state(state: ContainerState) -> tuple[str, str, str]:
    """(state, reason, message) of the API for a container state (upstream's reasons)."""
    status = state.status
    if status == "running":
        return State.RUNNING, "CONTAINER_RUNNING", ""
    if status == "paused":
        return State.PAUSED, "CONTAINER_PAUSED", ""
    if status == "restarting":
        return State.RUNNING, "CONTAINER_RESTARTING", ""
    if status in ("created", "configured", "initialized"):
        return State.PENDING, "CONTAINER_STARTING", ""
    if status in ("removing", "stopping"):
        return State.STOPPING, "CONTAINER_REMOVING", "the sandbox is being deleted"
    if status in ("exited", "dead", "stopped"):
        code = state.exit_code or 0
        if state.oom_killed:
            return State.FAILED, "CONTAINER_OOM_KILLED", "the sandbox ran out of memory and was killed"
        if code == 0:
            return State.TERMINATED, "CONTAINER_EXITED", "the entrypoint exited"
        detail = f": {state.error}" if state.error else ""
        return State.FAILED, "CONTAINER_EXITED_ERROR", f"the entrypoint exited with code {code}{detail}"
    return UNKNOWN, "CONTAINER_STATE_UNKNOWN", f"container status {status!r}"


def sandbox_info(
    labels: Labels,
    state: ContainerState,
    expires_at: dt.datetime | None,
    metadata: dict[str, str],
    *,
    deleting: bool = False,
    execd_dead: str = "",
) -> SandboxInfo:
    """The API's view. A sandbox being deleted is Stopping (its container passes through exited
    states on the way out, which are not its outcome); a running container whose execd the
    liveness probe gave up on is Failed, `EXECD_UNREACHABLE`."""
    api_state, reason, message = map_state(state)
    if deleting:
        api_state, reason, message = State.STOPPING, "DELETING", "the sandbox is being deleted"
    elif execd_dead and api_state == State.RUNNING:
        api_state, reason = State.FAILED, EXECD_DEAD
        message = f"execd, the sandbox's command daemon, is not answering: {execd_dead}"
    return SandboxInfo(
        id=labels.id,
        image=labels.image,
        entrypoint=list(labels.entrypoint),
        metadata=dict(metadata),
        extensions=dict(labels.extensions),
        created_at=labels.created_at,
        expires_at=expires_at,
        state=api_state,
        reason=reason,
        message=message,
        last_transition_at=state.changed_at or labels.created_at,
        secure_access=labels.secure_access,
        snapshot_id=labels.snapshot_id,
    )


# -- the container -----------------------------------------------------------------------------


def endpoint_host(settings: DockerSection) -> str:
    """Where clients reach a published port: the publish address, or loopback for a wildcard."""
    if settings.endpoint_host:
        return settings.endpoint_host
    return "127.0.0.1" if settings.publish_host in ("", "0.0.0.0", "::") else settings.publish_host


def egress_name(sandbox_id: str) -> str:
    return f"sandbox-{sandbox_id}-egress"


def egress_config(
    sandbox_id: str, container_id: str, policy: dict[str, Any], token: str, image: str, upstream_dns: list[str]
) -> dict[str, Any]:
    """The egress sidecar of a sandbox with a network policy: in the sandbox container's network
    namespace, the only container of the sandbox with NET_ADMIN (it loads the ruleset there); its
    own file system keeps the policy in force across its restarts."""
    env = {"OPENSANDBOX_EGRESS_TOKEN": token, "OPENSANDBOX_EGRESS_RULES": json.dumps(policy)}
    if upstream_dns:
        env["OPENSANDBOX_EGRESS_UPSTREAM"] = ",".join(upstream_dns)
    return {
        "Image": image,
        "Env": [f"{k}={v}" for k, v in env.items()],
        "Labels": {L.DOCKER_EGRESS_FOR: sandbox_id},
        "HostConfig": {
            "NetworkMode": f"container:{container_id}",
            "CapDrop": ["ALL"],
            "CapAdd": ["NET_ADMIN"],
            "SecurityOpt": ["no-new-privileges"],
            "Memory": EGRESS_MEMORY,
            "MemorySwap": EGRESS_MEMORY,
            "PidsLimit": 64,
            "RestartPolicy": {"Name": "on-failure"},
        },
    }


def execd_volume_name(key: str) -> str:
    """The volume holding one version of execd: `key` is a digest of its content."""
    return EXECD_VOLUME_PREFIX + key[:16]


def execd_mount(volume: str) -> dict[str, Any]:
    return {"Type": "volume", "Source": volume, "Target": EXECD_DIR, "ReadOnly": True}


def execd_env(sandbox_id: str, token: str) -> dict[str, str]:
    """How execd (started by the bootstrap script) is configured: as in the local runtime, a token
    per sandbox, which the endpoint hands out as the `L.EXECD_TOKEN_HEADER` header."""
    return {
        "EXECD": EXECD_BINARY,
        "EXECD_ACCESS_TOKEN": token,
        "EXECD_PORT": str(L.EXECD_PORT),
        "EXECD_ENVS": L.EXECD_MOUNT + "/.env",
        "OPENSANDBOX_ID": sandbox_id,
    }


def container_config(
    sandbox_id: str,
    spec: SandboxSpec,
    *,
    token: str,
    labels: dict[str, str],
    working_dir: str,
    settings: DockerSection,
    cpu_millis: int | None,
    memory_bytes: int | None,
    seccomp: str = "",
    execd_volume: str,
    mounts: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The body of POST /containers/create, everything in this one call: the bootstrap script as
    entrypoint (execd in the background, then the user's entrypoint as its command), execd's volume
    mounted read-only, execd's port published on an ephemeral host port, and the security defaults.
    With a network policy or lifecycle hooks, the bootstrap script holds the entrypoint back
    (`L.START_GATE`) until the egress sidecar enforces the policy and the preStart hook succeeded."""
    env = {**spec.env, **execd_env(sandbox_id, token)}
    if spec.network_policy is not None or spec.lifecycle:
        env[L.START_GATE_ENV] = L.START_GATE
    if spec.network_policy is not None:
        labels = {**labels, L.DOCKER_EGRESS: "true"}
    host_config: dict[str, Any] = {
        "Mounts": [execd_mount(execd_volume)],
        "PortBindings": {EXECD_PORT_KEY: [{"HostIp": settings.publish_host, "HostPort": ""}]},
        "CapDrop": ["ALL"],
        "CapAdd": list(CAPABILITIES),
        "SecurityOpt": ["no-new-privileges"] + ([f"seccomp={seccomp}"] if seccomp else []),
        "PidsLimit": settings.pids_limit,
        "RestartPolicy": {"Name": "no"},
    }
    if memory_bytes:
        host_config["Memory"] = memory_bytes
        host_config["MemorySwap"] = memory_bytes  # no swap on top of the limit
    if cpu_millis:
        host_config["NanoCpus"] = cpu_millis * 1_000_000
    # resourceRequests: a relative CPU weight (1 CPU = Docker's default 1024 shares) and a soft
    # memory floor the engine reclaims down to under pressure.
    if spec.cpu_request_millis:
        host_config["CpuShares"] = max(2, spec.cpu_request_millis * 1024 // 1000)
    if spec.memory_request_bytes:
        host_config["MemoryReservation"] = spec.memory_request_bytes
    host_config["Mounts"].extend(mounts or [])
    if settings.network:
        host_config["NetworkMode"] = settings.network
    if settings.oci_runtime:
        host_config["Runtime"] = settings.oci_runtime
    return {
        "Image": spec.image,
        "Entrypoint": [EXECD_BOOTSTRAP],
        "Cmd": list(spec.entrypoint),
        "Hostname": sandbox_id[:63],
        "Env": [f"{k}={v}" for k, v in env.items()],
        "WorkingDir": working_dir,
        "Labels": labels,
        "ExposedPorts": {EXECD_PORT_KEY: {}},
        "HostConfig": host_config,
    }


def published_port(inspect: dict[str, Any], key: str = EXECD_PORT_KEY) -> int | None:
    bindings = ((inspect.get("NetworkSettings") or {}).get("Ports") or {}).get(key) or []
    for binding in bindings:
        with contextlib.suppress(KeyError, TypeError, ValueError):
            return int(binding["HostPort"])
    return None


def container_ip(inspect: dict[str, Any]) -> str:
    settings = inspect.get("NetworkSettings") or {}
    if settings.get("IPAddress"):
        return str(settings["IPAddress"])
    for network in (settings.get("Networks") or {}).values():
        if network.get("IPAddress"):
            return str(network["IPAddress"])
    return ""


def env_value(inspect: dict[str, Any], name: str) -> str:
    for entry in (inspect.get("Config") or {}).get("Env") or []:
        key, _, value = str(entry).partition("=")
        if key == name:
            return value
    return ""


def program_candidates(program: str, working_dir: str, path: str) -> list[str]:
    """Where the container would find `program` (argv[0]): itself if it has a slash (relative to
    the working directory), else each directory of PATH, in order."""
    if "/" in program:
        return [program if program.startswith("/") else f"{working_dir.rstrip('/')}/{program}"]
    dirs = [d for d in path.split(":") if d] or ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin"]
    return [f"{d.rstrip('/')}/{program}" for d in dirs]


def image_path(image_env: list[str], request_env: dict[str, str]) -> str:
    if "PATH" in request_env:
        return request_env["PATH"]
    for entry in image_env:
        if entry.startswith("PATH="):
            return entry[5:]
    return "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def seccomp_option(
    setting: str, engine_is_podman: bool, profile_path: Path, *, userns: bool = False
) -> tuple[str, str | None]:
    """(the `seccomp=` value, the file to write the builtin profile to first, if any). Docker takes the
    profile itself; podman's compatible API reads a file on its host (the server's, then). `userns`:
    the builtin profile's isolated-sessions variant (the engine's default and a profile of the
    operator's are used as they are)."""
    if setting == "default":
        return "", None
    if setting != "builtin":
        return setting, None
    if engine_is_podman:
        return str(profile_path), str(profile_path)
    return json.dumps(docker_profile(rules(userns=userns)), separators=(",", ":")), None


# -- overrides: what changed after the create ------------------------------------------------


@dataclass
class Override:
    """Expiry and metadata as renewed and patched (Docker labels cannot change after create)."""

    expires_at: dt.datetime | None
    metadata: dict[str, str]


class OverrideStore:
    """One small JSON file per sandbox in the state dir, replaced atomically on every change.

    Docker has no mutable field on a container; recreating it to change a label would kill what
    runs in it. So the labels hold the values of the create, and this file the current ones; a
    restarted server reads both (the file wins). Lost files only undo renews and patches.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, sandbox_id: str) -> Path:
        return self.directory / f"{sandbox_id}.json"

    def load(self, sandbox_id: str) -> Override | None:
        try:
            data = json.loads(self._path(sandbox_id).read_text())
            expires = data.get("expires_at")
            return Override(
                expires_at=times.parse_optional(expires),
                metadata={str(k): str(v) for k, v in dict(data.get("metadata") or {}).items()},
            )
        except (OSError, ValueError, TypeError, AttributeError):
            return None

    def save(self, sandbox_id: str, override: Override) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        data = {
            "expires_at": times.rfc3339(override.expires_at, digits=6) if override.expires_at else None,
            "metadata": override.metadata,
        }
        tmp = self._path(sandbox_id).with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self._path(sandbox_id))

    def delete(self, sandbox_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(sandbox_id).unlink()

    def ids(self) -> set[str]:
        if not self.directory.is_dir():
            return set()
        return {p.stem for p in self.directory.glob("*.json")}


# Environment variables whose values never leave the server in `diagnostics/inspect`.
SECRET_ENV = ("EXECD_ACCESS_TOKEN",)


def redacted_inspect(inspect: dict[str, Any]) -> dict[str, Any]:
    """A container's inspect without execd's token (the create's own env is the caller's)."""
    config = dict(inspect.get("Config") or {})
    config["Env"] = [
        f"{key}=<redacted>" if key in SECRET_ENV else f"{key}={value}"
        for key, _, value in (str(entry).partition("=") for entry in config.get("Env") or [])
    ]
    return {**inspect, "Config": config}


def container_events(inspect: dict[str, Any]) -> list[SandboxEvent]:
    """What a container's state tells of its life: created, started, finished (an OOM kill, the exit code)."""
    state = inspect.get("State") or {}
    found: list[SandboxEvent] = []
    created = docker_time(inspect.get("Created"))
    if created:
        found.append(
            SandboxEvent(created, "ContainerCreated", f"container {str(inspect.get('Id', ''))[:12]}", "container")
        )
    started = docker_time(state.get("StartedAt"))
    if started:
        found.append(SandboxEvent(started, "ContainerStarted", f"status {state.get('Status', '')}", "container"))
    finished = docker_time(state.get("FinishedAt"))
    if state.get("OOMKilled"):
        message = "the kernel killed the sandbox's process for exceeding its memory limit"
        found.append(SandboxEvent(finished or times.now(), Reason.OOM_KILLED, message, "container", "Warning"))
    if finished and str(state.get("Status", "")).lower() in ("exited", "dead"):
        code = state.get("ExitCode")
        found.append(
            SandboxEvent(finished, Reason.EXITED, f"exit code {code}", "container", "Warning" if code else "Normal")
        )
    return found
