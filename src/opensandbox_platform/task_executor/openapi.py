"""The executor's OpenAPI 3.1 document, served at GET /openapi.json (docs/task-executor.md renders it)."""

from __future__ import annotations

from typing import Any

from opensandbox_platform.task_executor.tasks import ID_PATTERN, REASONS, STATES

_ERROR = {"$ref": "#/components/schemas/Error"}
_TASK = {"$ref": "#/components/schemas/Task"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_SINCE = {
    "name": "since",
    "in": "query",
    "schema": {"type": "integer", "default": -1},
    "description": "Long poll: answer once a revision above this exists (or `wait` has passed).",
}
_WAIT = {
    "name": "wait",
    "in": "query",
    "schema": {"type": "number", "minimum": 0, "maximum": 60, "default": 0},
    "description": "Seconds to wait for a change newer than `since`; 0 answers at once.",
}
_OUTPUT = {
    "name": "output",
    "in": "query",
    "schema": {"type": "boolean", "default": True},
    "description": "Include the output tail (`output=false` leaves it out).",
}
_BAD = _json(_ERROR, "Invalid request")
_MISSING = _json(_ERROR, "No task with this id")

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "OpenSandbox task-executor",
        "version": "1",
        "description": "Runs BatchSandbox tasks inside the sandbox's main container (port 5758).",
    },
    "paths": {
        "/health": {
            "get": {
                "summary": "Liveness and mode",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "status": {"const": "ok"},
                                "mode": {"enum": ["sidecar", "direct"]},
                                "tasks": {"type": "integer"},
                                "running": {"type": "integer"},
                            },
                        },
                        "Up",
                    )
                },
            }
        },
        "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI"}}}},
        "/tasks": {
            "post": {
                "summary": "Submit a task (idempotent: an existing id returns the existing task)",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/TaskSpec"}}},
                },
                "responses": {
                    "201": _json(_TASK, "Created and queued or started"),
                    "200": _json(_TASK, "A task with this id exists already; it is returned unchanged"),
                    "400": _BAD,
                },
            },
            "get": {
                "summary": "All tasks",
                "parameters": [_SINCE, _WAIT, _OUTPUT],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "revision": {"type": "integer", "description": "Highest revision of any task"},
                                "tasks": {"type": "array", "items": _TASK},
                            },
                        },
                        "Tasks in submission order",
                    ),
                    "400": _BAD,
                },
            },
        },
        "/tasks/{id}": {
            "get": {
                "summary": "One task (long-poll with since + wait)",
                "parameters": [_ID, _SINCE, _WAIT, _OUTPUT],
                "responses": {"200": _json(_TASK, "The task"), "400": _BAD, "404": _MISSING},
            },
            "delete": {
                "summary": "Cancel the task if needed and forget it (record and output)",
                "parameters": [_ID],
                "responses": {"204": {"description": "Removed"}, "404": _MISSING},
            },
        },
        "/tasks/{id}/cancel": {
            "post": {
                "summary": "Cancel: SIGTERM the task's process group, SIGKILL after the grace period",
                "parameters": [_ID],
                "responses": {
                    "200": _json(_TASK, "The task (state failed, reason Cancelled, once it ended)"),
                    "404": _MISSING,
                },
            }
        },
    },
    "components": {
        "schemas": {
            "EnvVar": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "value": {"type": "string", "default": ""}},
            },
            "TaskSpec": {
                "type": "object",
                "required": ["id", "command"],
                "additionalProperties": False,
                "properties": {
                    "id": {"type": "string", "pattern": ID_PATTERN.pattern},
                    "command": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                    "args": {"type": "array", "items": {"type": "string"}},
                    "env": {"type": "array", "items": {"$ref": "#/components/schemas/EnvVar"}},
                    "workingDir": {"type": "string", "description": "Absolute; default: the main container's"},
                    "timeoutSeconds": {"type": "number", "exclusiveMinimum": 0},
                },
            },
            "Task": {
                "allOf": [
                    {"$ref": "#/components/schemas/TaskSpec"},
                    {
                        "type": "object",
                        "properties": {
                            "state": {"enum": list(STATES)},
                            "exitCode": {"type": ["integer", "null"], "description": "128+N when killed by signal N"},
                            "reason": {"enum": [None, *REASONS]},
                            "message": {"type": ["string", "null"]},
                            "createdAt": {"type": "string", "format": "date-time"},
                            "startedAt": {"type": ["string", "null"], "format": "date-time"},
                            "finishedAt": {"type": ["string", "null"], "format": "date-time"},
                            "attempts": {"type": "integer", "description": "Starts (executor restarts re-run)"},
                            "revision": {"type": "integer"},
                            "output": {"type": "string", "description": "Tail of stdout+stderr"},
                        },
                    },
                ]
            },
            "Error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            },
        }
    },
}
