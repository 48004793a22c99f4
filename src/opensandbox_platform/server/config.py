"""Server configuration: one TOML file whose keys mirror the chart's `server.config.*` values.

Keys are written in the chart's camelCase (`apiKey`, `execdImage`); upstream's snake_case spellings
(`api_key`, `execd_image`) are accepted too. Unknown keys are an error, so a typo is caught at
start-up instead of silently ignored. Every key has a default: no file is needed.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

CONFIG_ENV = "SANDBOX_CONFIG_PATH"
API_KEY_ENV = "OPENSANDBOX_SERVER_API_KEY"


class Section(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class ServerSection(Section):
    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=8080, ge=1, le=65535, description="port to listen on")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="log verbosity")
    api_key: str = Field(
        default="",
        description=f"when set, every request but /health needs header OPEN-SANDBOX-API-KEY (env {API_KEY_ENV})",
    )
    eip: str = Field(
        default="", description="public host[:port] used in server-proxy endpoints (default: the request's)"
    )
    max_sandbox_timeout_seconds: int = Field(
        default=7 * 24 * 3600, ge=60, description="the largest `timeout` a create may ask for"
    )


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
        default="", description="sandbox records and private dirs (default $XDG_STATE_HOME/opensandbox/local)"
    )
    warm_pool_size: int = Field(
        default=2,
        ge=0,
        le=64,
        description="jails kept started ahead of creates: a create then costs ~10 ms (each ~13 MiB PSS idle)",
    )
    start_timeout_seconds: float = Field(default=30.0, gt=0, description="how long a jail may take to start execd")
    tmp_size_mib: int = Field(default=512, ge=1, description="size of the in-memory /run of each jail")
    open_files: int = Field(default=65536, ge=64, description="RLIMIT_NOFILE of every sandbox process")
    use_cgroups: bool = Field(
        default=True,
        description="limits and pause through cgroup v1 where writable; false: rlimits and SIGSTOP only",
    )
    max_processes: int = Field(
        default=4096, ge=16, description="pids cgroup limit of each sandbox (if cgroups are writable)"
    )
    code_prestart: str = Field(
        default="",
        description="a language (e.g. python) whose code-interpreter kernel every jail starts before it is"
        " claimed, so the first codes.run needs no kernel start (~40-60 MiB more per warm jail); empty: none",
    )


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
    default_cpu: str = Field(default="", description="CPU limit when a create gives none (e.g. 1, 500m; empty: none)")
    default_memory: str = Field(default="", description="memory limit when a create gives none (e.g. 2Gi; empty: none)")
    pids_limit: int = Field(default=4096, ge=16, description="pids limit of each sandbox container")
    oci_runtime: str = Field(
        default="", description="OCI runtime of sandbox containers (e.g. runsc; default: the engine's)"
    )
    working_dir: str = Field(
        default="/workspace", description="working directory of sandboxes whose image sets none (created if missing)"
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
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", description="imagePullPolicy of direct-mode sandbox containers"
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


class Config(Section):
    server: ServerSection = ServerSection()
    runtime: RuntimeSection = RuntimeSection()
    local: LocalSection = LocalSection()
    docker: DockerSection = DockerSection()
    kubernetes: KubernetesSection = KubernetesSection()

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
    return config


def render_default() -> str:
    """A commented TOML file with every key at its default (what `init-config` writes)."""
    lines = ["# opensandbox-server configuration. Keys mirror the Helm chart's server.config.* values.", ""]
    for section_name, field in Config.model_fields.items():
        section = field.default
        assert isinstance(section, Section)
        lines.append(f"[{section_name}]")
        for name, info in type(section).model_fields.items():
            if info.description:
                lines.append(f"# {info.description}")
            lines.append(f"{to_camel(name)} = {_toml_value(getattr(section, name))}")
        lines.append("")
    return "\n".join(lines)


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
