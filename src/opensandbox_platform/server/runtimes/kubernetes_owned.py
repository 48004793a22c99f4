"""What a kubernetes create makes besides its BatchSandbox: PersistentVolumeClaims for missing `pvc`
volumes (createIfNotExists) and the sandbox's image pull Secret (`image.auth`).

They are made before the BatchSandbox (a pod whose claim or pull secret is missing would wait in
the scheduler's or the kubelet's back-off), then given the BatchSandbox as owner once it exists, so
the garbage collector deletes them with it: the pull Secret always, a claim only when its volume asks
for deleteOnSandboxTermination. A create that fails deletes everything it made itself.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from opensandbox_platform.kube.client import JSON, PVCS, SECRETS, KubeClient, KubeError, Resource
from opensandbox_platform.server import errors
from opensandbox_platform.server.errors import ApiError
from opensandbox_platform.server.runtimes.base import SandboxSpec
from opensandbox_platform.server.runtimes.kubernetes_objects import (
    claim_manifest,
    owner_reference,
    pull_secret_manifest,
)
from opensandbox_platform.server.volumes import PvcBackend

log = logging.getLogger(__name__)
T = TypeVar("T")
Call = Callable[[Awaitable[T]], Awaitable[T]]


@dataclass
class Made:
    """Objects a create made: (resource, name, owned by the BatchSandbox)."""

    objects: list[tuple[Resource, str, bool]] = field(default_factory=list)


async def make(
    client: KubeClient, call: Call[JSON], namespace: str, sandbox_id: str, spec: SandboxSpec, default_storage: str
) -> Made:
    """The claims and pull Secret `spec` needs; 400 for a claim that is missing (createIfNotExists
    false), 409 for one being deleted. On failure, what was made is deleted again."""
    made = Made()
    try:
        for volume in spec.volumes:
            if isinstance(volume.backend, PvcBackend):
                await _ensure_claim(client, call, namespace, sandbox_id, volume.backend, default_storage, made)
        if spec.image_auth:
            secret = pull_secret_manifest(sandbox_id, spec.image, spec.image_auth)
            await call(client.create(SECRETS, secret, namespace))
            made.objects.append((SECRETS, secret["metadata"]["name"], True))
    except BaseException:
        await remove(client, namespace, made)
        raise
    return made


async def _ensure_claim(
    client: KubeClient,
    call: Call[JSON],
    namespace: str,
    sandbox_id: str,
    backend: PvcBackend,
    default_storage: str,
    made: Made,
) -> None:
    name = backend.claim_name
    if any(resource is PVCS and made_name == name for resource, made_name, _ in made.objects):
        return  # two volumes of one claim (subPaths)
    try:
        found = await call(client.get(PVCS, name, namespace))
    except KubeError as err:
        if not err.not_found:
            raise ApiError(500, errors.INTERNAL_ERROR, f"cannot read PersistentVolumeClaim {name}: {err}") from None
    else:
        if found["metadata"].get("deletionTimestamp"):
            raise ApiError(409, errors.INVALID_STATE, f"volume {name}: its PersistentVolumeClaim is being deleted")
        return
    if not backend.create_if_not_exists:
        raise errors.invalid(f"volume {name} does not exist (createIfNotExists is false)")
    try:
        await call(client.create(PVCS, claim_manifest(sandbox_id, backend, default_storage), namespace))
    except KubeError as err:
        if err.conflict:  # another create made it a moment ago: share it
            return
        if err.status in (400, 422):
            raise errors.invalid(f"volume {name}: the PersistentVolumeClaim was refused: {err.message}") from None
        raise ApiError(500, errors.INTERNAL_ERROR, f"cannot create PersistentVolumeClaim {name}: {err}") from None
    made.objects.append((PVCS, name, backend.delete_on_sandbox_termination))


async def adopt(client: KubeClient, call: Call[JSON], namespace: str, made: Made, batchsandbox: JSON) -> None:
    """Give the owned objects the BatchSandbox as owner (the garbage collector deletes them with it)."""
    patch = {"metadata": {"ownerReferences": [owner_reference(batchsandbox)]}}
    for resource, name, owned in made.objects:
        if owned:
            await call(client.patch(resource, name, patch, namespace))


async def remove(client: KubeClient, namespace: str, made: Made) -> None:
    """Delete what a failed create made (best effort: each one is tried)."""
    for resource, name, _ in made.objects:
        try:
            await client.delete(resource, name, namespace)
        except Exception as exc:  # the others are still tried
            log.warning("could not delete %s %s of a failed create: %s", resource.kind, name, exc)
