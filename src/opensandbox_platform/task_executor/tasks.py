"""A task: what was submitted, what became of it, and how it is kept on disk.

Plain dataclasses and hand-written validation (no pydantic): the executor runs in every pod, and
pydantic alone would add ~15 MiB of resident memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from opensandbox_platform.daemon import times
from opensandbox_platform.daemon.errors import ApiError, bad_request

State = Literal["pending", "running", "succeeded", "failed"]
STATES: tuple[str, ...] = get_args(State)
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed"})
# Why a task ended: its exit (Completed, Error), or what ended it.
REASONS = ("Completed", "Error", "Timeout", "Cancelled", "StartFailed", "Interrupted")
COMPLETED, ERROR, TIMEOUT, CANCELLED, START_FAILED, INTERRUPTED = REASONS
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")
MAX_ARGV = 4096
MAX_ENV = 1024


@dataclass(slots=True)
class Spec:
    """What a client submits (POST /tasks)."""

    id: str
    command: list[str]
    args: list[str] = field(default_factory=list)
    env: list[dict[str, str]] = field(default_factory=list)
    workingDir: str | None = None
    timeoutSeconds: float | None = None

    @property
    def argv(self) -> list[str]:
        return [*self.command, *self.args]


@dataclass(slots=True)
class Task:
    spec: Spec
    state: State = "pending"
    exitCode: int | None = None
    reason: str | None = None
    message: str | None = None
    createdAt: str = field(default_factory=lambda: times.rfc3339(digits=3))
    startedAt: str | None = None
    finishedAt: str | None = None
    attempts: int = 0  # starts so far: above 1 when a restart of the executor interrupted it
    revision: int = 0  # bumped on every change; clients long-poll with ?since=<revision>
    pid: int | None = None
    pidStart: int | None = None  # the process's start time (clock ticks), so a reused pid is not mistaken

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def to_json(self, output: str | None) -> dict[str, Any]:
        """The wire form (internal pid fields left out)."""
        body: dict[str, Any] = asdict(self.spec)
        body.update(
            state=self.state,
            exitCode=self.exitCode,
            reason=self.reason,
            message=self.message,
            createdAt=self.createdAt,
            startedAt=self.startedAt,
            finishedAt=self.finishedAt,
            attempts=self.attempts,
            revision=self.revision,
        )
        if output is not None:
            body["output"] = output
        return body

    def to_disk(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_disk(cls, raw: dict[str, Any]) -> Task:
        spec = Spec(**raw.pop("spec"))
        return cls(spec=spec, **raw)


def parse_spec(body: Any) -> Spec:
    """Validates a submitted task; every problem is a 400 naming the field."""
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    unknown = set(body) - {"id", "command", "args", "env", "workingDir", "timeoutSeconds"}
    if unknown:
        raise bad_request(f"unknown field(s): {', '.join(sorted(unknown))}")
    task_id = body.get("id")
    if not isinstance(task_id, str) or not ID_PATTERN.match(task_id):
        raise bad_request("id must be 1-253 characters: letters, digits, '.', '_', '-' (not first)")
    command = _strings(body.get("command"), "command")
    if not command:
        raise bad_request("command must be a non-empty array of strings")
    args = _strings(body.get("args") or [], "args")
    if len(command) + len(args) > MAX_ARGV:
        raise bad_request(f"command and args together may have at most {MAX_ARGV} entries")
    working_dir = body.get("workingDir")
    if working_dir is not None and (not isinstance(working_dir, str) or not working_dir.startswith("/")):
        raise bad_request("workingDir must be an absolute path")
    timeout = body.get("timeoutSeconds")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0):
        raise bad_request("timeoutSeconds must be a positive number")
    return Spec(task_id, command, args, _env(body.get("env")), working_dir, timeout)


def _strings(value: Any, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad_request(f"{name} must be an array of strings")
    if any("\0" in v for v in value):
        raise bad_request(f"{name} must not contain NUL characters")
    return value


def _env(value: Any) -> list[dict[str, str]]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_ENV:
        raise bad_request(f"env must be an array of at most {MAX_ENV} {{name, value}} objects")
    env = []
    for item in value:
        name = item.get("name") if isinstance(item, dict) else None
        val = item.get("value", "") if isinstance(item, dict) else None
        if not isinstance(name, str) or not name or "=" in name or "\0" in name:
            raise bad_request("env[].name must be a non-empty string without '=' or NUL")
        if not isinstance(val, str) or "\0" in val:
            raise bad_request(f"env[{name}].value must be a string without NUL")
        env.append({"name": name, "value": val})
    return env


class Store:
    """One JSON file per task in the data directory, plus its output log.

    Written with write-to-temp + rename, so a restart never reads half a file. No fsync: the data
    directory is the pod's emptyDir, which dies with the pod, while a container restart (what this
    state is for) keeps the page cache.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)

    def _path(self, task_id: str, suffix: str) -> str:
        return os.path.join(self.directory, task_id + suffix)

    def log_path(self, task_id: str) -> str:
        return self._path(task_id, ".log")

    def save(self, task: Task) -> None:
        path = self._path(task.id, ".json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(task.to_disk(), f, separators=(",", ":"))
        os.replace(tmp, path)

    def remove(self, task_id: str) -> None:
        for suffix in (".json", ".log"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(task_id, suffix))

    def load(self) -> list[Task]:
        tasks = []
        for name in sorted(os.listdir(self.directory)):
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(self.directory, name)) as f:
                    tasks.append(Task.from_disk(json.load(f)))
            except (OSError, ValueError, TypeError):
                continue  # unreadable: ignored rather than blocking the start
        return tasks

    def tail(self, task_id: str, size: int) -> str:
        """The last `size` bytes of the task's combined stdout and stderr."""
        try:
            with open(self.log_path(task_id), "rb") as f:
                end = f.seek(0, os.SEEK_END)
                f.seek(max(0, end - size))
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""


def not_found(task_id: str) -> ApiError:
    return ApiError(404, "NOT_FOUND", f"task {task_id} does not exist")
