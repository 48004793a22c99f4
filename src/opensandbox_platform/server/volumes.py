"""A create's `volumes` (the SDK's `Volume`): checked here, the same way for every runtime, into
`VolumeSpec`s the runtimes mount.

Backends: `host` (a directory of the server's host, only under `server.allowedHostPaths`) and `pvc`
(a named volume: a PersistentVolumeClaim, a Docker named volume, a directory under the local
runtime's state dir). Any other backend (`ossfs`, ...) is refused naming it.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from typing import Any

from opensandbox_platform.server import errors
from opensandbox_platform.server.errors import ApiError

BACKENDS = ("host", "pvc")
KNOWN_KEYS = {"name", "mountPath", "readOnly", "subPath", *BACKENDS}
ACCESS_MODES = {"ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"}
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
# Where no volume may be mounted: the platform's own files in a sandbox and the kernel's.
RESERVED_MOUNT_PATHS = ("/", "/opt/opensandbox", "/proc", "/sys", "/dev", "/run/opensandbox")
MAX_VOLUMES = 16


@dataclass(frozen=True)
class HostBackend:
    path: str


@dataclass(frozen=True)
class PvcBackend:
    claim_name: str
    create_if_not_exists: bool = True
    delete_on_sandbox_termination: bool = False
    storage_class: str | None = None
    storage: str | None = None
    access_modes: tuple[str, ...] = ()


@dataclass(frozen=True)
class VolumeSpec:
    name: str
    mount_path: str
    backend: HostBackend | PvcBackend
    read_only: bool = False
    sub_path: str = ""  # relative, normalized; "" is the backend's root


def parse(
    raw: list[dict[str, Any]] | None, allowed_host_paths: list[str], backends: frozenset[str]
) -> list[VolumeSpec]:
    """400 `SANDBOX::INVALID_PARAMETER` for malformed volumes, 400 `SANDBOX::API_NOT_SUPPORTED` for a
    backend this server or runtime (`backends`) does not mount."""
    if not raw:
        return []
    if len(raw) > MAX_VOLUMES:
        raise errors.invalid(f"volumes: at most {MAX_VOLUMES}")
    found = [_one(i, item, allowed_host_paths, backends) for i, item in enumerate(raw)]
    _unique([v.name for v in found], "name")
    _unique([v.mount_path for v in found], "mountPath")
    for a in found:
        for b in found:
            if a is not b and b.mount_path.startswith(a.mount_path.rstrip("/") + "/"):
                raise errors.invalid(f"volumes: mountPath {b.mount_path} is inside {a.mount_path}")
    return found


def _one(index: int, item: Any, allowed: list[str], backends: frozenset[str]) -> VolumeSpec:
    where = f"volumes[{index}]"
    if not isinstance(item, dict):
        raise errors.invalid(f"{where} must be an object")
    chosen = [key for key in item if key not in KNOWN_KEYS - set(BACKENDS) and item[key] is not None]
    unknown = [key for key in chosen if key not in BACKENDS]
    if unknown:
        raise ApiError(
            400, errors.API_NOT_SUPPORTED, f"{where}: the {unknown[0]} volume backend is not supported by this server"
        )
    if len(chosen) != 1:
        raise errors.invalid(f"{where} must name exactly one backend (host or pvc)")
    kind = chosen[0]
    if kind not in backends:
        raise ApiError(400, errors.API_NOT_SUPPORTED, f"{where}: {kind} volumes are not supported by this runtime")
    name = item.get("name")
    if not isinstance(name, str) or not _DNS_LABEL.fullmatch(name):
        raise errors.invalid(f"{where}.name must be a DNS label (a-z, 0-9, -; at most 63)")
    read_only = item.get("readOnly", False)
    if not isinstance(read_only, bool):
        raise errors.invalid(f"{where}.readOnly must be a boolean")
    backend = _host(where, item[kind], allowed) if kind == "host" else _pvc(where, item[kind])
    return VolumeSpec(
        name=name,
        mount_path=mount_path(where, item.get("mountPath")),
        backend=backend,
        read_only=read_only,
        sub_path=sub_path(where, item.get("subPath")),
    )


def _unique(values: list[str], what: str) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise errors.invalid(f"volumes: {what} {value!r} is used twice")
        seen.add(value)


def _clean_absolute(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise errors.invalid(f"{where} must be an absolute path")
    if "\0" in value or any(part in (".", "..") for part in value.split("/")):
        raise errors.invalid(f"{where} must not contain '.', '..' or NUL")
    return posixpath.normpath(value)


def mount_path(where: str, value: Any) -> str:
    path = _clean_absolute(f"{where}.mountPath", value)
    for reserved in RESERVED_MOUNT_PATHS:
        if path == reserved or (reserved != "/" and path.startswith(reserved + "/")):
            raise errors.invalid(f"{where}.mountPath {path} is reserved")
    return path


def sub_path(where: str, value: Any) -> str:
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or value.startswith("/") or "\0" in value:
        raise errors.invalid(f"{where}.subPath must be a relative path")
    parts = [part for part in value.split("/") if part]
    if any(part in (".", "..") for part in parts):
        raise errors.invalid(f"{where}.subPath must not contain '.' or '..'")
    return "/".join(parts)


def _host(where: str, value: Any, allowed: list[str]) -> HostBackend:
    if not isinstance(value, dict):
        raise errors.invalid(f"{where}.host must be an object with a path")
    path = _clean_absolute(f"{where}.host.path", value.get("path"))
    if allowed_root(path, allowed) is None:
        shown = ", ".join(allowed) if allowed else "none (server.allowedHostPaths is empty)"
        raise errors.invalid(f"{where}.host.path {path} is not under an allowed host path: {shown}")
    return HostBackend(path)


def allowed_root(path: str, allowed: list[str]) -> str | None:
    """The longest allowed prefix `path` is under (normalized), or None."""
    roots = [posixpath.normpath(p) for p in allowed if p.startswith("/")]
    under = [root for root in roots if path == root or path.startswith(root.rstrip("/") + "/")]
    return max(under, key=len) if under else None


def _pvc(where: str, value: Any) -> PvcBackend:
    if not isinstance(value, dict):
        raise errors.invalid(f"{where}.pvc must be an object with a claimName")
    claim = value.get("claimName")
    if not isinstance(claim, str) or not _DNS_LABEL.fullmatch(claim):
        raise errors.invalid(f"{where}.pvc.claimName must be a DNS label (a-z, 0-9, -; at most 63)")
    modes = value.get("accessModes") or []
    if not isinstance(modes, list) or any(mode not in ACCESS_MODES for mode in modes):
        raise errors.invalid(f"{where}.pvc.accessModes must be among {', '.join(sorted(ACCESS_MODES))}")
    flags = {
        key: value.get(key, default)
        for key, default in (("createIfNotExists", True), ("deleteOnSandboxTermination", False))
    }
    for key, flag in flags.items():
        if not isinstance(flag, bool):
            raise errors.invalid(f"{where}.pvc.{key} must be a boolean")
    for key in ("storageClass", "storage"):
        if value.get(key) is not None and not isinstance(value.get(key), str):
            raise errors.invalid(f"{where}.pvc.{key} must be a string")
    return PvcBackend(
        claim_name=claim,
        create_if_not_exists=flags["createIfNotExists"],
        delete_on_sandbox_termination=flags["deleteOnSandboxTermination"],
        storage_class=value.get("storageClass"),
        storage=value.get("storage"),
        access_modes=tuple(modes),
    )
