"""Server configuration: one TOML file whose keys mirror the chart's `server.config.*` values.

Keys are written in the chart's camelCase (`apiKey`, `execdImage`); upstream's snake_case spellings
(`api_key`, `execd_image`) are accepted too. Unknown keys are an error, so a typo is caught at
start-up instead of silently ignored. Every key has a default: no file is needed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

CONFIG_ENV = "SANDBOX_CONFIG_PATH"
API_KEY_ENV = "OPENSANDBOX_SERVER_API_KEY"
METRICS_TOKEN_ENV = "OPENSANDBOX_SERVER_METRICS_TOKEN"


class Section(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class SigningKeyConfig(Section):
    id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,32}$", description="named in every token it signs")
    secret: str = Field(min_length=32, description="at least 32 characters (init-config writes 43 random ones)")
    retire_at: dt.datetime | None = Field(
        default=None, description="a retired key verifies tokens until then and signs none (rotation overlap)"
    )


class ServerSection(Section):
    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=8080, ge=1, le=65535, description="port to listen on")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="log verbosity")
    api_key: str = Field(
        default="",
        description="when set, every request but /health, /ready, /version and the API docs needs header"
        f" OPEN-SANDBOX-API-KEY (env {API_KEY_ENV})",
    )
    eip: str = Field(
        default="", description="public host[:port] used in server-proxy endpoints (default: the request's)"
    )
    max_sandbox_timeout_seconds: int = Field(
        default=7 * 24 * 3600,
        ge=60,
        description="the largest `timeout` a create may ask for, and how far ahead a renew may move the expiry",
    )
    max_connections: int = Field(
        default=4096,
        ge=16,
        description="client connections held at once; a new one closes the one idle the longest, and is"
        " refused (503) only when all are serving requests (lowered to what RLIMIT_NOFILE allows)",
    )
    header_timeout_seconds: float = Field(
        default=10.0, gt=0, description="a request's head must arrive within this many seconds (else 408)"
    )
    keep_alive_timeout_seconds: float = Field(
        default=20.0, gt=0, description="an idle keep-alive connection is closed after this many seconds"
    )
    max_header_bytes: int = Field(
        default=32 * 1024, ge=1024, description="largest request head (request line and headers); 431 above"
    )
    max_request_line_bytes: int = Field(
        default=8 * 1024, ge=256, description="longest request line (method, URL, version); 414 above"
    )
    create_concurrency: int = Field(
        default=0,
        ge=0,
        description="creates run at once; 0: the runtime's default (local: the number of CPUs, docker: twice"
        " that and at least 4, kubernetes: 256)",
    )
    create_queue_size: int = Field(
        default=32, ge=0, description="creates waiting for a slot; one more is refused with 429 and Retry-After"
    )
    signing_keys: list[SigningKeyConfig] = Field(
        default_factory=list,
        description="keys of signed endpoints and secureAccess tokens ({id, secret, retireAt}); the first"
        " without retireAt signs, every one verifies; empty: a random key per server process",
    )
    allowed_host_paths: list[str] = Field(
        default_factory=list,
        description="host directories under which `host` volumes may be mounted (absolute; symlinks in them are"
        " refused; on kubernetes, directories of the nodes); empty: host volumes are refused",
    )
    max_signed_endpoint_seconds: int = Field(
        default=7 * 24 * 3600, ge=60, description="how far ahead a signed endpoint's expiry may be"
    )
    create_queue_timeout_seconds: float = Field(
        default=10.0, gt=0, description="how long a create may wait for a slot before it is refused with 503"
    )
    metrics: bool = Field(default=True, description="serve Prometheus metrics on GET /metrics")
    metrics_token: str = Field(
        default="",
        description="a bearer token (Authorization: Bearer ...) that may read /metrics without the API key, for"
        f" Prometheus (env {METRICS_TOKEN_ENV}); with neither key nor token /metrics is open",
    )

    @model_validator(mode="after")
    def _one_signing_key_signs(self) -> ServerSection:
        ids = [key.id for key in self.signing_keys]
        if len(set(ids)) != len(ids):
            raise ValueError("server.signingKeys: key ids must be unique")
        if self.signing_keys and all(key.retire_at for key in self.signing_keys):
            raise ValueError("server.signingKeys: one key must have no retireAt (it signs)")
        return self

    @model_validator(mode="after")
    def _head_holds_its_line(self) -> ServerSection:
        if self.max_header_bytes < self.max_request_line_bytes:
            raise ValueError("server.maxHeaderBytes must be at least server.maxRequestLineBytes")
        return self


class RuntimeSection(Section):
    type: Literal["local", "docker", "kubernetes"] = Field(
        default="local",
        description="where sandboxes run: local (bubblewrap jails on this host), docker (containers through the"
        " Docker Engine API) or kubernetes (BatchSandbox resources served by the controller)",
    )
    execd_image: str = Field(
        default="opensandbox/execd:dev",
        description="execd image of the docker runtime (kubernetes: the controller's --execd-image injects execd)",
    )


class LocalSection(Section):
    state_dir: str = Field(
        default="", description="sandbox records and logs (default $XDG_STATE_HOME/opensandbox/local)"
    )
    run_dir: str = Field(
        default="/run/opensandbox",
        description="host-wide directory of the uid-range locks every local-runtime server on this host shares",
    )
    warm_pool_size: int = Field(
        default=2,
        ge=0,
        le=64,
        description="jails kept started ahead of creates: a create then costs ~10 ms (each ~16 MiB PSS idle)",
    )
    start_timeout_seconds: float = Field(default=30.0, gt=0, description="how long a jail may take to start execd")
    disk_size_mib: int = Field(
        default=1024,
        ge=16,
        description="size of each sandbox's private writable storage: its root file system, /tmp and home"
        " (a tmpfs: what is stored counts in the sandbox's memory too)",
    )
    tmp_size_mib: int = Field(default=512, ge=1, description="size of the in-memory /run of each jail")
    open_files: int = Field(default=65536, ge=64, description="RLIMIT_NOFILE of every sandbox process")
    use_cgroups: bool = Field(
        default=True,
        description="limits and pause through cgroup v1 where writable; false: rlimits and SIGSTOP only",
    )
    max_processes: int = Field(default=4096, ge=16, description="pids cgroup limit (and RLIMIT_NPROC) of each sandbox")
    default_cpu: str = Field(default="1", description="CPU limit when a create gives none (e.g. 1, 500m; empty: none)")
    default_memory: str = Field(
        default="2Gi", description="memory limit when a create gives none (e.g. 2Gi; empty: none)"
    )
    code_prestart: str = Field(
        default="",
        description="a language (e.g. python) whose code-interpreter kernel every jail starts before it is"
        " claimed, so the first codes.run needs no kernel start (~40-60 MiB more per warm jail); empty: none",
    )
    network: Literal["outbound", "none"] = Field(
        default="outbound",
        description="outbound: a network namespace of its own with internet access through slirp4netns (the host,"
        " its loopback, private and link-local ranges unreachable); none: loopback only",
    )
    network_allow: list[str] = Field(
        default_factory=list, description="IPv4 CIDRs sandboxes may reach although denied by default (e.g. 10.1.0.0/16)"
    )
    network_deny: list[str] = Field(default_factory=list, description="more IPv4 CIDRs sandboxes may not reach")
    images: Literal["containers-storage", "none"] = Field(
        default="containers-storage",
        description="where image roots come from: containers-storage (the host's podman images, unpacked once per"
        " digest into the state dir); none: every sandbox gets the minimal root",
    )
    require_image: bool = Field(
        default=False,
        description="refuse a create whose image is not available (400) instead of giving it the minimal root",
    )
    uid_range_start: int = Field(
        default=1_000_000_000,
        description="first host uid/gid of the sandboxes' ranges: sandbox slot N maps its ids 0..65535 to"
        " uidRangeStart + N*65536 ...",
    )
    uid_range_slots: int = Field(default=16384, ge=1, description="how many sandboxes (ranges) this host can hold")
    snapshot_store_max_mib: int = Field(
        default=10240,
        ge=16,
        description="the most the snapshots under the state dir may hold together: a capture that could take the"
        " store above it is Failed (snapshot_too_large); each snapshot holds at most diskSizeMib",
    )

    forward_ports: str = Field(
        default="61000-65535",
        description="host loopback ports a sandbox's ports are forwarded from (low-high): outside the kernel's"
        " ephemeral range, where container engines publish ports and their NAT rules (live or left behind) would"
        " take a forwarder's connections; empty: any ephemeral port",
    )

    @field_validator("forward_ports")
    @classmethod
    def _forward_ports(cls, value: str) -> str:
        from opensandbox_platform.server.runtimes.forward import PortRange

        PortRange.parse(value)  # ValueError: a clear message
        return value

    @field_validator("network_allow", "network_deny")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        from opensandbox_platform.server.runtimes.netpolicy import normalize

        return normalize(value)

    @model_validator(mode="after")
    def _uid_layout(self) -> LocalSection:
        from opensandbox_platform.server.runtimes.uidmap import check_layout

        check_layout(self.uid_range_start, self.uid_range_slots)
        return self


class DockerSection(Section):
    host: str = Field(default="", description="Docker Engine API address (default $DOCKER_HOST, else the local socket)")
    publish_host: str = Field(
        default="127.0.0.1", description="host address execd's port of each sandbox is published on (ephemeral port)"
    )
    endpoint_host: str = Field(
        default="", description="address endpoints name for published ports (default publishHost; loopback for 0.0.0.0)"
    )
    network: str = Field(default="", description="network sandboxes join (default: the engine's default bridge)")
    execd_dir: str = Field(
        default="",
        description="directory holding execd, execd-lib/ and bootstrap.sh (tools/build-execd.sh's"
        " build/execd/opensandbox) to give sandboxes; default: runtime.execdImage's /opensandbox/",
    )
    state_dir: str = Field(
        default="", description="renewed expiries and patched metadata (default $XDG_STATE_HOME/opensandbox/docker)"
    )
    pull_timeout_seconds: float = Field(default=300.0, gt=0, description="how long a create may wait for an image pull")
    start_timeout_seconds: float = Field(default=30.0, gt=0, description="how long execd may take to start")
    api_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="bound of every other Engine API call; a stalled engine makes the call a 503 after it",
    )
    health_interval_seconds: float = Field(
        default=5.0, gt=0, description="how often the engine is pinged for /health and /ready"
    )
    liveness_interval_seconds: float = Field(
        default=10.0,
        ge=0,
        description="how often each Running sandbox's execd is pinged; two failures in a row make it Failed"
        " (EXECD_UNREACHABLE); 0: never",
    )
    default_cpu: str = Field(default="", description="CPU limit when a create gives none (e.g. 1, 500m; empty: none)")
    default_memory: str = Field(default="", description="memory limit when a create gives none (e.g. 2Gi; empty: none)")
    pids_limit: int = Field(default=4096, ge=16, description="pids limit of each sandbox container")
    oci_runtime: str = Field(
        default="", description="OCI runtime of sandbox containers (e.g. runsc; default: the engine's)"
    )
    seccomp_profile: str = Field(
        default="builtin",
        description="builtin: the local runtime's filter (Docker's default, stricter: no unshare, keyctl, io_uring);"
        " default: the engine's own; else the path of a profile file on the engine's host",
    )
    working_dir: str = Field(
        default="/workspace", description="working directory of sandboxes whose image sets none (created if missing)"
    )
    snapshot_max_size_mib: int = Field(
        default=4096,
        ge=1,
        description="the largest writable layer a snapshot commits (apparent size: a sparse file counts in full);"
        " a larger one makes the snapshot Failed (snapshot_too_large)",
    )

    def state_path(self) -> Path:
        if self.state_dir:
            return Path(self.state_dir).expanduser()
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(base) / "opensandbox" / "docker"


class KubernetesSection(Section):
    namespace: str = Field(default="opensandbox", description="namespace of BatchSandboxes and Pools")
    workload_provider: Literal["batchsandbox"] = Field(
        default="batchsandbox",
        description="workload kind of a sandbox: only batchsandbox (one BatchSandbox each); checked here, read by"
        " nothing else (the chart writes it)",
    )
    kubeconfig: str = Field(
        default="", description="kubeconfig file (default: the in-cluster service account, else $KUBECONFIG)"
    )
    create_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="how long a create waits for its sandbox to be Running before it is deleted (504)",
    )
    sandbox_token_key_file: str = Field(
        default="",
        description="the key sandbox pods' execd tokens are derived from (the controller's"
        " --sandbox-token-key-file; the chart mounts the same Secret in both); endpoints then carry each pod's"
        " token. Empty: endpoints carry none (pods whose controller has no key take any caller)",
    )
    api_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="bound of every Kubernetes API call but watches; an API server that does not answer"
        " makes the call a 503",
    )
    health_interval_seconds: float = Field(
        default=5.0, gt=0, description="how often the API server is asked /version for /health and /ready"
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", description="imagePullPolicy of direct-mode sandbox containers"
    )
    default_volume_storage: str = Field(
        default="1Gi",
        pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$",
        description="storage request of a PersistentVolumeClaim a create makes for a `pvc` volume that names none",
    )
    default_pod_spec: dict[str, Any] = Field(
        default_factory=dict,
        description="PodSpec fields (nodeSelector, tolerations, runtimeClassName, ...) every direct-mode"
        " sandbox pod starts from; not containers",
    )

    @field_validator("default_pod_spec")
    @classmethod
    def _no_containers(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "containers" in value:
            raise ValueError("defaultPodSpec must not set containers: the server builds the sandbox container")
        return value


class EgressSection(Section):
    """Network policies (`networkPolicy` of a create; docs/network-policy.md)."""

    image: str = Field(
        default="opensandbox/egress:dev",
        description="the egress sidecar's image (docker runtime; kubernetes: the controller's --egress-image)",
    )
    upstream_dns: list[str] = Field(
        default_factory=list,
        description="resolvers (host[:port]) the DNS filter forwards allowed queries to (local and docker"
        " runtimes); empty: this host's /etc/resolv.conf (local), the sidecar's (docker)",
    )
    max_rules: int = Field(default=256, ge=1, le=4096, description="rules a sandbox's policy may have")
    min_ttl_seconds: float = Field(
        default=60.0, ge=1, description="an allowed name's addresses stay allowed at least this long after a lookup"
    )


class ConsoleSection(Section):
    enabled: bool = Field(
        default=True,
        description="serve the web console on /console (sandboxes, files, a terminal; docs/observability.md)",
    )
    session_hours: float = Field(
        default=12.0, gt=0, le=24 * 30, description="how long a console login lasts before the API key is asked again"
    )
    secure_cookie: bool = Field(
        default=True,
        description="mark the console's session cookie Secure: browsers then keep it over HTTPS and on loopback"
        " (localhost, 127.0.0.1) only; false only for plain HTTP on another address you trust",
    )
    terminal: bool = Field(default=True, description="offer an interactive shell (execd's PTY) on the sandbox page")


class Config(Section):
    server: ServerSection = ServerSection()
    console: ConsoleSection = ConsoleSection()
    runtime: RuntimeSection = RuntimeSection()
    local: LocalSection = LocalSection()
    docker: DockerSection = DockerSection()
    kubernetes: KubernetesSection = KubernetesSection()
    egress: EgressSection = EgressSection()

    def state_dir(self) -> Path:
        if self.local.state_dir:
            return Path(self.local.state_dir).expanduser()
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(base) / "opensandbox" / "local"


class ConfigError(Exception):
    pass


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """The config from `path` (or $SANDBOX_CONFIG_PATH), defaults without; env overrides on top."""
    path = path or os.environ.get(CONFIG_ENV) or None
    data: dict[str, Any] = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid config {path}: {exc}") from None
    if os.environ.get(API_KEY_ENV):
        config.server.api_key = os.environ[API_KEY_ENV]
    if os.environ.get(METRICS_TOKEN_ENV):
        config.server.metrics_token = os.environ[METRICS_TOKEN_ENV]
    return config


def render_default(api_key: str = "", signing_secret: str = "") -> str:
    """A commented TOML file with every key at its default but `server.apiKey` and
    `server.signingKeys` (what `init-config` writes, with fresh random keys)."""
    lines = ["# opensandbox-server configuration. Keys mirror the Helm chart's server.config.* values.", ""]
    for section_name, field in Config.model_fields.items():
        section = field.default
        assert isinstance(section, Section)
        lines.append(f"[{section_name}]")
        for name, info in type(section).model_fields.items():
            if info.description:
                lines.append(f"# {info.description}")
            value = getattr(section, name)
            if (section_name, name) == ("server", "api_key") and api_key:
                value = api_key
            if (section_name, name) == ("server", "signing_keys") and signing_secret:
                value = [{"id": "k1", "secret": signing_secret}]
            lines.append(f"{to_camel(name)} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def is_loopback(host: str) -> bool:
    """Whether the server listening on `host` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
