"""Wire models of the lifecycle API (specs/sandbox-lifecycle.yml), camelCase on the wire."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel

from opensandbox_platform.api import labels
from opensandbox_platform.server.runtimes.base import SandboxInfo, SnapshotInfo

# What metadata keys and values may be (Kubernetes label rules, the platform's prefixes reserved),
# written once: validation.py checks with them, and the OpenAPI document states them, so a client
# (or a fuzzer) can tell a valid request from the schema alone. ECMAScript and Python read them alike.
_DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_RESERVED = "|".join(re.escape(prefix) for prefix in labels.RESERVED_PREFIXES)
LABEL_NAME = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
LABEL_KEY_PATTERN = rf"^(?!{_RESERVED})(?:{_DNS_LABEL}(?:\.{_DNS_LABEL})*/)?{LABEL_NAME}$"
LABEL_VALUE_PATTERN = rf"^(?:{LABEL_NAME})?$"
ENV_NAME_PATTERN = "^[^=\u0000]+$"
NO_NUL_PATTERN = "^[^\u0000]*$"
_LABEL_VALUE = {"type": "string", "pattern": LABEL_VALUE_PATTERN}
_LABEL_KEYS = {"pattern": LABEL_KEY_PATTERN, "maxLength": 253 + 1 + 63}
Metadata = Annotated[
    dict[str, str],
    WithJsonSchema({"type": "object", "propertyNames": _LABEL_KEYS, "additionalProperties": _LABEL_VALUE}),
]
MetadataPatch = Annotated[
    dict[str, str | None],
    WithJsonSchema(
        {
            "type": "object",
            "propertyNames": _LABEL_KEYS,
            "additionalProperties": {"anyOf": [_LABEL_VALUE, {"type": "null"}]},
            "description": "JSON merge patch: null deletes a key",
        }
    ),
]
Env = Annotated[
    dict[str, str | None],
    WithJsonSchema(
        {
            "type": "object",
            "propertyNames": {"pattern": ENV_NAME_PATTERN},
            "additionalProperties": {"anyOf": [{"type": "string", "pattern": NO_NUL_PATTERN}, {"type": "null"}]},
        }
    ),
]
Argument = Annotated[str, Field(min_length=1, pattern="^[^\x00]+$")]


class Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class ImageAuth(Wire):
    username: str | None = None
    password: str | None = None


class ImageSpec(Wire):
    uri: str = Field(min_length=1)
    auth: ImageAuth | None = None


class PlatformSpec(Wire):
    os: str
    arch: str


class CreateSandboxRequest(Wire):
    image: ImageSpec | None = None  # exactly one of image and snapshotId (validation.py)
    snapshot_id: str | None = None
    template_id: str | None = None
    platform: PlatformSpec | None = None
    timeout: int | None = Field(
        None, ge=60, description="seconds, at least 60 (at most server.maxSandboxTimeoutSeconds); null: no expiry"
    )
    resource_limits: dict[str, str] | None = None
    resource_requests: dict[str, str] | None = None
    env: Env | None = None
    metadata: Metadata | None = None
    entrypoint: list[Argument] | None = Field(None, min_length=1, description="required with image")
    network_policy: dict[str, Any] | None = None
    credential_proxy: dict[str, Any] | None = None
    secure_access: bool = False
    volumes: list[dict[str, Any]] | None = None
    extensions: dict[str, str] | None = None
    lifecycle: dict[str, Any] | None = None


class SandboxStatus(Wire):
    state: str
    reason: str | None = None
    message: str | None = None
    last_transition_at: dt.datetime | None = None


class SandboxModel(Wire):
    id: str
    image: ImageSpec | None = None
    snapshot_id: str | None = None
    status: SandboxStatus
    metadata: dict[str, str] | None = None
    extensions: dict[str, str] | None = None
    entrypoint: list[str]
    expires_at: dt.datetime | None = None
    created_at: dt.datetime

    @classmethod
    def of(cls, info: SandboxInfo) -> SandboxModel:
        return cls(
            id=info.id,
            image=ImageSpec(uri=info.image) if info.image else None,
            snapshot_id=info.snapshot_id or None,
            status=SandboxStatus(
                state=info.state,
                reason=info.reason or None,
                message=info.message or None,
                last_transition_at=info.last_transition_at,
            ),
            metadata=info.metadata,
            extensions=info.extensions or None,
            entrypoint=info.entrypoint,
            expires_at=info.expires_at,
            created_at=info.created_at,
        )


class CreateSandboxResponse(Wire):
    id: str
    status: SandboxStatus
    metadata: dict[str, str] | None = None
    extensions: dict[str, str] | None = None
    expires_at: dt.datetime | None = None
    created_at: dt.datetime
    entrypoint: list[str]

    @classmethod
    def of(cls, info: SandboxInfo) -> CreateSandboxResponse:
        full = SandboxModel.of(info)
        return cls(
            id=full.id,
            status=full.status,
            metadata=full.metadata,
            extensions=full.extensions,
            expires_at=full.expires_at,
            created_at=full.created_at,
            entrypoint=full.entrypoint,
        )


class PaginationInfo(Wire):
    page: int
    page_size: int
    total_items: int
    total_pages: int
    has_next_page: bool


class ListSandboxesResponse(Wire):
    items: list[SandboxModel]
    pagination: PaginationInfo


class RenewRequest(Wire):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")
    expires_at: dt.datetime


class RenewResponse(Wire):
    expires_at: dt.datetime


class EndpointModel(Wire):
    endpoint: str
    headers: dict[str, str] | None = None


SNAPSHOT_NAME_PATTERN = "^[^\u0000-\u001f]+$"


class CreateSnapshotRequest(Wire):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")
    name: str | None = Field(None, min_length=1, max_length=253, pattern=SNAPSHOT_NAME_PATTERN)


class SnapshotStatusModel(Wire):
    state: str
    reason: str | None = None
    message: str | None = None
    last_transition_at: dt.datetime | None = None


class SnapshotModel(Wire):
    id: str
    sandbox_id: str
    name: str | None = None
    status: SnapshotStatusModel
    created_at: dt.datetime

    @classmethod
    def of(cls, info: SnapshotInfo) -> SnapshotModel:
        return cls(
            id=info.id,
            sandbox_id=info.sandbox_id,
            name=info.name,
            status=SnapshotStatusModel(
                state=info.state,
                reason=info.reason or None,
                message=info.message or None,
                last_transition_at=info.last_transition_at,
            ),
            created_at=info.created_at,
        )


class ListSnapshotsResponse(Wire):
    items: list[SnapshotModel]
    pagination: PaginationInfo


class ErrorResponse(Wire):
    code: str
    message: str
