"""Checks of create and patch input beyond the schema: what the runtime supports, label rules,
quantities, timeouts. The same checks for every runtime."""

from __future__ import annotations

import platform
import re

from opensandbox_platform.api import labels
from opensandbox_platform.server import errors
from opensandbox_platform.server.errors import ApiError
from opensandbox_platform.server.models import CreateSandboxRequest
from opensandbox_platform.server.runtimes import guards
from opensandbox_platform.server.runtimes.base import Capabilities, SandboxSpec

MIN_TIMEOUT_SECONDS = 60
_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
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
# Without a runtime's declaration: the common core only (routes always pass the runtime's).
CORE_ONLY = Capabilities(runtime="server's")


def is_dns_subdomain(name: str) -> bool:
    """RFC 1123 subdomain, as Kubernetes names and label-key prefixes must be."""
    return 0 < len(name) <= 253 and all(_DNS_LABEL.match(part) for part in name.split("."))


def is_reserved_key(key: str) -> bool:
    """Metadata keys under the platform's prefixes are its own labels, on every runtime."""
    return key.startswith(labels.RESERVED_PREFIXES)


def check_label_key(key: str) -> None:
    prefix, _, name = key.rpartition("/")
    if is_reserved_key(key):
        reserved = next(p for p in labels.RESERVED_PREFIXES if key.startswith(p))
        raise ApiError(400, errors.INVALID_METADATA_LABEL, f"metadata key {key!r}: the prefix {reserved} is reserved")
    if not _NAME.match(name) or (prefix and not is_dns_subdomain(prefix)):
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


def cpu_millis(value: str, field: str = "resourceLimits.cpu") -> int:
    match = _QUANTITY.match(value.strip())
    if not match or match.group(2) not in (None, "m"):
        raise errors.invalid(f"{field} {value!r} is not a CPU quantity (e.g. 1, 0.5, 500m)")
    number = float(match.group(1))
    millis = int(number) if match.group(2) == "m" else int(number * 1000)
    if millis <= 0:
        raise errors.invalid(f"{field} must be positive")
    return millis


def memory_bytes(value: str, field: str = "resourceLimits.memory") -> int:
    match = _QUANTITY.match(value.strip())
    if not match or match.group(2) == "m":
        raise errors.invalid(f"{field} {value!r} is not a memory quantity (e.g. 512Mi, 2Gi)")
    amount = int(float(match.group(1)) * _FACTORS[match.group(2)])
    if amount < 16 << 20:
        raise errors.invalid(f"{field} must be at least 16Mi")
    return amount


def create_spec(body: CreateSandboxRequest, max_timeout: int, capabilities: Capabilities = CORE_ONLY) -> SandboxSpec:
    """The runtime's view of a create; what `capabilities` does not cover is refused, not dropped."""
    _refuse_unsupported(body, capabilities)
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
    for name in limits:
        if name not in ("cpu", "memory"):  # refused, never dropped: nothing would bound it
            raise guards.not_supported(f"resourceLimits.{name}", capabilities.runtime)
    requests = _resource_requests(body.resource_requests or {})
    spec = SandboxSpec(
        image=body.image.uri,
        entrypoint=list(body.entrypoint),
        env=env,
        metadata=dict(metadata),
        extensions=dict(body.extensions or {}),
        timeout_seconds=body.timeout,
        cpu_millis=cpu_millis(limits["cpu"]) if limits.get("cpu") else None,
        memory_bytes=memory_bytes(limits["memory"]) if limits.get("memory") else None,
        cpu_request_millis=requests.get("cpu"),
        memory_request_bytes=requests.get("memory"),
        image_auth=_image_auth(body),
    )
    _check_requests_within_limits(spec)
    return spec


def _refuse_unsupported(body: CreateSandboxRequest, capabilities: Capabilities) -> None:
    """400 `SANDBOX::API_NOT_SUPPORTED` naming the first field of the request the runtime cannot honour."""
    pooled = bool(body.extensions and body.extensions.get(labels.EXTENSION_POOL_REF))
    asked = {  # field: (its value in the request, whether the runtime serves it); False: no runtime yet
        "snapshotId": (body.snapshot_id, False),
        "templateId": (body.template_id, False),
        "networkPolicy": (body.network_policy, False),
        "credentialProxy": (body.credential_proxy, False),
        "volumes": (body.volumes, False),
        "lifecycle": (body.lifecycle, False),
        "secureAccess": (body.secure_access, False),
        f"extensions.{labels.EXTENSION_POOL_REF}": (pooled, capabilities.pool_ref),
        "image.auth": (_image_auth(body), capabilities.image_auth),
        "resourceRequests": (body.resource_requests, capabilities.resource_requests),
    }
    for name, (value, served) in asked.items():
        if value and not served:
            raise guards.not_supported(name, capabilities.runtime)
    if pooled and body.resource_requests:
        raise ApiError(
            400,
            errors.API_NOT_SUPPORTED,
            f"resourceRequests is not supported with extensions.{labels.EXTENSION_POOL_REF}: "
            "a claimed pod's resources are the Pool's",
        )


def _resource_requests(requests: dict[str, str]) -> dict[str, int]:
    """resourceRequests as CPU millis and memory bytes; other resources are refused."""
    for name in requests:
        if name not in ("cpu", "memory"):
            raise errors.invalid(f"resourceRequests.{name}: only cpu and memory can be requested")
    parsed: dict[str, int] = {}
    if requests.get("cpu"):
        parsed["cpu"] = cpu_millis(requests["cpu"], "resourceRequests.cpu")
    if requests.get("memory"):
        parsed["memory"] = memory_bytes(requests["memory"], "resourceRequests.memory")
    return parsed


def _check_requests_within_limits(spec: SandboxSpec) -> None:
    """Kubernetes refuses a request above its limit; say so in the API's words."""
    pairs = {
        "cpu": (spec.cpu_request_millis, spec.cpu_millis),
        "memory": (spec.memory_request_bytes, spec.memory_bytes),
    }
    for name, (request, limit) in pairs.items():
        if request is not None and limit is not None and request > limit:
            raise errors.invalid(f"resourceRequests.{name} must not exceed resourceLimits.{name}")


def _image_auth(body: CreateSandboxRequest) -> dict[str, str] | None:
    auth = body.image.auth if body.image else None
    if auth is None or not (auth.username or auth.password):
        return None
    return {"username": auth.username or "", "password": auth.password or ""}
