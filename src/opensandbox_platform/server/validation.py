"""Checks of create and patch input beyond the schema: what the runtime supports, label rules,
quantities, timeouts. The same checks for every runtime."""

from __future__ import annotations

import datetime as dt
import platform
import re

from opensandbox_platform.api import labels
from opensandbox_platform.egress import policy as egress_policy
from opensandbox_platform.execd import lifecycle
from opensandbox_platform.server import errors, volumes
from opensandbox_platform.server.errors import ApiError
from opensandbox_platform.server.models import LABEL_NAME, CreateSandboxRequest
from opensandbox_platform.server.runtimes import guards
from opensandbox_platform.server.runtimes.base import MAX_CPU_MILLIS, Capabilities, SandboxSpec

MIN_TIMEOUT_SECONDS = 60
# Sanity bound of memory on every runtime (CPUs: base.MAX_CPU_MILLIS, or the runtime's own bound):
# beyond it a number is a typo that cgroups or engines would refuse with a 500.
MAX_MEMORY_BYTES = 1 << 50  # 1 PiB
_NAME = re.compile(LABEL_NAME)
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_QUANTITY = re.compile(r"([0-9]+(?:\.[0-9]+)?)(m|k|Ki|M|Mi|G|Gi|T|Ti)?")
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


def host_arch() -> str:
    """This host's architecture as platform.arch names it (amd64, arm64)."""
    return _ARCH.get(platform.machine(), platform.machine())


def is_dns_subdomain(name: str) -> bool:
    """RFC 1123 subdomain, as Kubernetes names and label-key prefixes must be."""
    return 0 < len(name) <= 253 and all(_DNS_LABEL.fullmatch(part) for part in name.split("."))


def is_reserved_key(key: str) -> bool:
    """Metadata keys under the platform's prefixes are its own labels, on every runtime."""
    return key.startswith(labels.RESERVED_PREFIXES)


def check_label_key(key: str) -> None:
    prefix, _, name = key.rpartition("/")
    if is_reserved_key(key):
        reserved = next(p for p in labels.RESERVED_PREFIXES if key.startswith(p))
        raise ApiError(400, errors.INVALID_METADATA_LABEL, f"metadata key {key!r}: the prefix {reserved} is reserved")
    if not _NAME.fullmatch(name) or (prefix and not is_dns_subdomain(prefix)):
        raise ApiError(400, errors.INVALID_METADATA_LABEL, f"metadata key {key!r} is not a valid Kubernetes label key")


def check_label_value(key: str, value: str) -> None:
    if value and not _NAME.fullmatch(value):
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


def cpu_millis(value: str, field: str = "resourceLimits.cpu", maximum: int = MAX_CPU_MILLIS) -> int:
    match = _QUANTITY.fullmatch(value.strip())
    if not match or match.group(2) not in (None, "m"):
        raise errors.invalid(f"{field} {value!r} is not a CPU quantity (e.g. 1, 0.5, 500m)")
    number = float(match.group(1))
    millis = int(number) if match.group(2) == "m" else int(number * 1000)
    if millis <= 0:
        raise errors.invalid(f"{field} must be positive")
    if millis > maximum:
        raise errors.invalid(f"{field} {value!r} is more than the {maximum / 1000:g} CPUs allowed here")
    return millis


def memory_bytes(value: str, field: str = "resourceLimits.memory") -> int:
    match = _QUANTITY.fullmatch(value.strip())
    if not match or match.group(2) == "m":
        raise errors.invalid(f"{field} {value!r} is not a memory quantity (e.g. 512Mi, 2Gi)")
    amount = int(float(match.group(1)) * _FACTORS[match.group(2)])
    if amount < 16 << 20:
        raise errors.invalid(f"{field} must be at least 16Mi")
    if amount > MAX_MEMORY_BYTES:
        raise errors.invalid(f"{field} {value!r} is more than 1Pi")
    return amount


def renewed_expiry(wanted: dt.datetime, now: dt.datetime, max_timeout: int) -> dt.datetime:
    """A renew's `expiresAt` (UTC when it names no zone): after now, at most `max_timeout` seconds
    ahead (server.maxSandboxTimeoutSeconds, as for a create's timeout). It may be earlier than the
    current expiry: the SDK 1.1.1 documents that a renew "may shorten, preserve, or extend" it."""
    try:
        expires_at = (wanted if wanted.tzinfo else wanted.replace(tzinfo=dt.UTC)).astimezone(dt.UTC)
        latest = now + dt.timedelta(seconds=max_timeout)
    except (OverflowError, ValueError):
        raise ApiError(400, errors.INVALID_EXPIRATION, "expiresAt is out of range") from None
    if expires_at <= now:
        raise ApiError(400, errors.INVALID_EXPIRATION, "expiresAt must be in the future")
    if expires_at > latest:
        raise ApiError(
            400,
            errors.INVALID_EXPIRATION,
            f"expiresAt must be at most {max_timeout} seconds from now (server.maxSandboxTimeoutSeconds)",
        )
    return expires_at


def signed_expiry(expires: str, now: dt.datetime, max_seconds: int) -> int:
    """A signed endpoint's `expires` (Unix epoch seconds): in the future, at most `max_seconds` ahead."""
    if not expires.isdigit() or len(expires) > 12:
        raise ApiError(400, errors.INVALID_EXPIRATION, f"expires {expires!r} is not Unix epoch seconds")
    value = int(expires)
    if value <= now.timestamp():
        raise ApiError(400, errors.INVALID_EXPIRATION, "expires must be in the future")
    if value > now.timestamp() + max_seconds:
        raise ApiError(
            400,
            errors.INVALID_EXPIRATION,
            f"expires must be at most {max_seconds} seconds from now (server.maxSignedEndpointSeconds)",
        )
    return value


def create_spec(
    body: CreateSandboxRequest,
    max_timeout: int,
    capabilities: Capabilities = CORE_ONLY,
    allowed_host_paths: list[str] | None = None,
    max_rules: int = egress_policy.DEFAULT_MAX_RULES,
) -> SandboxSpec:
    """The runtime's view of a create; what `capabilities` does not cover is refused, not dropped."""
    _refuse_unsupported(body, capabilities)
    if (body.image is None) == (not body.snapshot_id):
        raise errors.invalid("give exactly one of image and snapshotId")
    if body.image is not None and not body.entrypoint:
        raise errors.invalid("entrypoint must be a non-empty list of strings")
    if body.entrypoint is not None and not all(body.entrypoint):
        raise errors.invalid("entrypoint must not contain empty strings")
    if body.timeout is not None and not MIN_TIMEOUT_SECONDS <= body.timeout <= max_timeout:
        raise errors.invalid(f"timeout must be between {MIN_TIMEOUT_SECONDS} and {max_timeout} seconds, or null")
    if body.platform is not None:
        arch = host_arch()
        if body.platform.os != "linux" or body.platform.arch != arch:
            raise errors.invalid(f"platform must be linux/{arch} on this host")
    env = {k: v for k, v in (body.env or {}).items() if v is not None}
    for key, value in env.items():
        if not key or "=" in key or "\0" in key:
            raise errors.invalid(f"env name {key!r} is not valid")
        if "\0" in value:
            raise errors.invalid(f"env value of {key!r} contains NUL")
    metadata = body.metadata or {}
    check_metadata(dict(metadata))
    limits = body.resource_limits or {}
    for name in limits:
        if name not in ("cpu", "memory"):  # refused, never dropped: nothing would bound it
            raise guards.not_supported(f"resourceLimits.{name}", capabilities.runtime)
    requests = _resource_requests(body.resource_requests or {})
    spec = SandboxSpec(
        image=body.image.uri if body.image else "",
        entrypoint=list(body.entrypoint or []),  # empty with a snapshot: runtimes/snapshots.restored defaults it
        env=env,
        metadata=dict(metadata),
        extensions=dict(body.extensions or {}),
        timeout_seconds=body.timeout,
        cpu_millis=cpu_millis(limits["cpu"], maximum=capabilities.max_cpu_millis) if limits.get("cpu") else None,
        memory_bytes=memory_bytes(limits["memory"]) if limits.get("memory") else None,
        cpu_request_millis=requests.get("cpu"),
        memory_request_bytes=requests.get("memory"),
        image_auth=_image_auth(body),
        secure_access=body.secure_access,
        volumes=volumes.parse(body.volumes, allowed_host_paths or [], capabilities.volumes),
        snapshot_id=body.snapshot_id or None,
        network_policy=network_policy(body.network_policy, max_rules) if body.network_policy is not None else None,
        lifecycle=lifecycle_hooks(body.lifecycle) if body.lifecycle else None,
    )
    for volume in spec.volumes:
        if isinstance(volume.backend, volumes.PvcBackend) and volume.backend.storage:
            memory_bytes(volume.backend.storage, f"volumes {volume.name}: pvc.storage")
    _check_requests_within_limits(spec)
    return spec


POOL_REF_FIELD = f"extensions.{labels.EXTENSION_POOL_REF}"
# How a refusal names a field whose name alone does not say what it is.
DESCRIBED = {"lifecycle": "lifecycle (preStart and periodic hooks)"}


def network_policy(raw: object, max_rules: int) -> dict[str, object]:
    """A networkPolicy checked and normalized (egress/policy.py); 400 naming what is wrong."""
    try:
        return egress_policy.parse_policy(raw, max_rules).to_json()
    except egress_policy.PolicyError as exc:
        raise errors.invalid(f"networkPolicy: {exc}") from None


def lifecycle_hooks(raw: object) -> dict[str, object] | None:
    """The lifecycle hooks checked (execd/lifecycle.py) in their wire form; None when there are none."""
    try:
        hooks = lifecycle.parse(raw).to_json()
    except lifecycle.LifecycleError as exc:
        raise errors.invalid(str(exc)) from None
    return hooks or None


def served_fields(capabilities: Capabilities) -> dict[str, bool]:
    """The optional create fields and whether the runtime honours them (False: no runtime yet).
    The OpenAPI document leaves out what a runtime refuses (server/openapi.py)."""
    return {
        "snapshotId": capabilities.snapshots,
        "templateId": False,
        "networkPolicy": capabilities.network_policy,
        "credentialProxy": False,
        "volumes": bool(capabilities.volumes),
        "lifecycle": capabilities.lifecycle,
        "secureAccess": True,  # every runtime: the server's proxy enforces it
        POOL_REF_FIELD: capabilities.pool_ref,
        "image.auth": capabilities.image_auth,
        "resourceRequests": capabilities.resource_requests,
    }


def _refuse_unsupported(body: CreateSandboxRequest, capabilities: Capabilities) -> None:
    """400 `SANDBOX::API_NOT_SUPPORTED` naming the first field of the request the runtime cannot honour."""
    pooled = bool(body.extensions and body.extensions.get(labels.EXTENSION_POOL_REF))
    values = {
        "snapshotId": body.snapshot_id,
        "templateId": body.template_id,
        "networkPolicy": body.network_policy is not None,
        "credentialProxy": body.credential_proxy,
        "volumes": body.volumes,
        "lifecycle": body.lifecycle,
        "secureAccess": body.secure_access,
        POOL_REF_FIELD: pooled,
        "image.auth": _image_auth(body),
        "resourceRequests": body.resource_requests,
    }
    asked = {name: (values[name], served) for name, served in served_fields(capabilities).items()}
    for name, (value, served) in asked.items():
        if value and not served:
            raise guards.not_supported(DESCRIBED.get(name, name), capabilities.runtime)
    if pooled and body.resource_requests:
        raise ApiError(
            400,
            errors.API_NOT_SUPPORTED,
            f"resourceRequests is not supported with extensions.{labels.EXTENSION_POOL_REF}: "
            "a claimed pod's resources are the Pool's",
        )
    if pooled and body.lifecycle:
        raise ApiError(
            400,
            errors.API_NOT_SUPPORTED,
            f"lifecycle is not supported with extensions.{labels.EXTENSION_POOL_REF}: a warm pod's entrypoint"
            " starts at its claim, with no preStart hook before it (create without poolRef)",
        )
    # A Pool's pods are made, and their images pulled, before any claim (a pooled create's volumes
    # must be the Pool's own mounts: the runtime checks them against the Pool).
    if pooled and values["image.auth"]:
        raise ApiError(
            400,
            errors.API_NOT_SUPPORTED,
            f"image.auth is not supported with extensions.{labels.EXTENSION_POOL_REF}: a warm pod's image is"
            " the Pool's (put its pull secret in the Pool's template, or create without poolRef)",
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
