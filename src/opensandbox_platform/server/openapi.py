"""The OpenAPI document as this server accepts requests: FastAPI's, made exact where the models
alone cannot say it (the configured and host-dependent bounds, and what the runtime refuses).

Schemathesis checks the server against it (tests/e2e/test_fuzz.py): a request the document calls
valid must not be refused for its shape, and one it calls invalid must be refused. Creates and
renews are the exceptions the document cannot capture: whether an image and its entrypoint exist,
and where "now" is.
"""

from __future__ import annotations

from typing import Any

from opensandbox_platform.api import labels
from opensandbox_platform.server import validation
from opensandbox_platform.server.config import Config
from opensandbox_platform.server.runtimes.base import Capabilities

Document = dict[str, Any]


def refine(document: Document, config: Config, capabilities: Capabilities) -> Document:
    schemas = document.get("components", {}).get("schemas", {})
    create = schemas.get("CreateSandboxRequest")
    if create is not None:
        _refine_create(create, schemas, config, capabilities)
    for path, operations in document.get("paths", {}).items():
        if "/proxy/" in path:
            for operation in operations.values():
                # The sandbox answers: any status, any body.
                operation["responses"]["default"] = {"description": "the sandbox's own response"}
    return document


def _refine_create(create: Document, schemas: Document, config: Config, capabilities: Capabilities) -> None:
    properties = create["properties"]
    properties["timeout"] = {
        "anyOf": [
            {
                "type": "integer",
                "minimum": validation.MIN_TIMEOUT_SECONDS,
                "maximum": config.server.max_sandbox_timeout_seconds,
            },
            {"type": "null"},
        ],
        "description": "seconds until the sandbox is deleted; null: never",
    }
    platform_schema = schemas.get("PlatformSpec")
    if platform_schema is not None:
        platform_schema["properties"]["os"]["enum"] = ["linux"]
        platform_schema["properties"]["arch"]["enum"] = [validation.host_arch()]
    if not capabilities.snapshots:  # no snapshotId to create from: an image and its entrypoint it is
        create["required"] = sorted({*create.get("required", []), "image", "entrypoint"})
    for name, served in validation.served_fields(capabilities).items():
        if served:
            continue
        if name == validation.POOL_REF_FIELD:
            properties["extensions"] = {
                "anyOf": [
                    {
                        "type": "object",
                        "propertyNames": {"not": {"const": labels.EXTENSION_POOL_REF}},
                        "additionalProperties": {"type": "string"},
                    },
                    {"type": "null"},
                ]
            }
        elif name == "image.auth":
            image = schemas.get("ImageSpec")
            if image is not None:
                image["properties"].pop("auth", None)
        else:
            properties.pop(name, None)
