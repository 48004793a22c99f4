"""Checks of create and patch input beyond the schema: label rules, quantities, timeouts."""

from __future__ import annotations

import platform
import re

from opensandbox_platform.server import errors
from opensandbox_platform.server.errors import ApiError
from opensandbox_platform.server.models import CreateSandboxRequest
from opensandbox_platform.server.runtimes.base import SandboxSpec

MIN_TIMEOUT_SECONDS = 60
RESERVED_PREFIX = "opensandbox.io/"
_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|Ki|M|Mi|G|Gi|T|Ti)?$")
_FACTORS = {
    None: 1,
    "k": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
}
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def check_label_key(key: str) -> None:
    prefix, _, name = key.rpartition("/")
    if key.startswith(RESERVED_PREFIX):
        raise ApiError(
            400, errors.INVALID_METADATA_LABEL, f"metadata key {key!r}: the prefix {RESERVED_PREFIX} is reserved"
        )
    if not _NAME.match(name) or (prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix))):
        raise ApiError(400, errors.INVALID_METADATA_LABEL, f"metadata key {key!r} is not a valid Kubernetes label key")


def check_label_value(key: str, value: str) -> None:
    if value and not _NAME.match(value):
        raise ApiError(
            400,
            errors.INVALID_METADATA_LABEL,
            f"metadata value {value!r} of {key!r} is not a valid Kubernetes label value "
            "(at most 63 of A-Z a-z 0-9 - _ ., starting and ending alphanumeric)",
        )


def check_metadata(metadata: dict[str, str | None]) -> None:
    for key, value in metadata.items():
        check_label_key(key)
        if value is not None:
            check_label_value(key, value)


def cpu_millis(value: str) -> int:
    match = _QUANTITY.match(value.strip())
    if not match or match.group(2) not in (None, "m"):
        raise errors.invalid(f"resourceLimits.cpu {value!r} is not a CPU quantity (e.g. 1, 0.5, 500m)")
    number = float(match.group(1))
    millis = int(number) if match.group(2) == "m" else int(number * 1000)
    if millis <= 0:
        raise errors.invalid("resourceLimits.cpu must be positive")
    return millis


def memory_bytes(value: str) -> int:
    match = _QUANTITY.match(value.strip())
    if not match or match.group(2) == "m":
        raise errors.invalid(f"resourceLimits.memory {value!r} is not a memory quantity (e.g. 512Mi, 2Gi)")
    amount = int(float(match.group(1)) * _FACTORS[match.group(2)])
    if amount < 16 << 20:
        raise errors.invalid("resourceLimits.memory must be at least 16Mi")
    return amount


def create_spec(body: CreateSandboxRequest, max_timeout: int, *, pools: bool = False) -> SandboxSpec:
    """The runtime's view of a create; `pools`: the runtime serves `extensions.poolRef` (kubernetes)."""
    unsupported = {
        "snapshotId": body.snapshot_id,
        "templateId": body.template_id,
        "networkPolicy": body.network_policy,
        "credentialProxy": body.credential_proxy,
        "volumes": body.volumes,
        "lifecycle": body.lifecycle,
        "secureAccess": body.secure_access or None,
    }
    for name, value in unsupported.items():
        if value:
            raise ApiError(400, errors.API_NOT_SUPPORTED, f"{name} is not supported by this server's runtime")
    if body.extensions and body.extensions.get("poolRef") and not pools:
        raise ApiError(400, errors.API_NOT_SUPPORTED, "extensions.poolRef needs the kubernetes runtime")
    if body.image is None:
        raise errors.invalid("image is required")
    if not body.entrypoint:
        raise errors.invalid("entrypoint must be a non-empty list of strings")
    if not all(body.entrypoint):
        raise errors.invalid("entrypoint must not contain empty strings")
    if body.timeout is not None and not MIN_TIMEOUT_SECONDS <= body.timeout <= max_timeout:
        raise errors.invalid(f"timeout must be between {MIN_TIMEOUT_SECONDS} and {max_timeout} seconds, or null")
    if body.platform is not None:
        host_arch = _ARCH.get(platform.machine(), platform.machine())
        if body.platform.os != "linux" or body.platform.arch != host_arch:
            raise errors.invalid(f"platform must be linux/{host_arch} on this host")
    env = {k: v for k, v in (body.env or {}).items() if v is not None}
    for key in env:
        if not key or "=" in key or "\0" in key:
            raise errors.invalid(f"env name {key!r} is not valid")
    metadata = body.metadata or {}
    check_metadata(dict(metadata))
    limits = body.resource_limits or {}
    return SandboxSpec(
        image=body.image.uri,
        entrypoint=list(body.entrypoint),
        env=env,
        metadata=dict(metadata),
        extensions=dict(body.extensions or {}),
        timeout_seconds=body.timeout,
        cpu_millis=cpu_millis(limits["cpu"]) if limits.get("cpu") else None,
        memory_bytes=memory_bytes(limits["memory"]) if limits.get("memory") else None,
        image_auth=_image_auth(body),
    )


def _image_auth(body: CreateSandboxRequest) -> dict[str, str] | None:
    auth = body.image.auth if body.image else None
    if auth is None or not (auth.username or auth.password):
        return None
    return {"username": auth.username or "", "password": auth.password or ""}
