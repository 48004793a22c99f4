"""Lifecycle hooks of a sandbox (the SDK's `lifecycle` of a create): what they are and when they are
due. Pure: parsing and schedules only; `hooks.py` runs them.

Wire form, as the SDK 1.1.1 sends it:
`{"preStart": {"command": [...], "timeoutSeconds": N}, "periodic": [{"name", "schedule", "command",
"timeoutSeconds"}]}`. The server checks a create's hooks with `parse` (400 naming the field), and
execd parses them again when they reach it.

Schedules: five-field cron (`*/5 * * * *`, in UTC) and its descriptors (`@hourly`, `@daily`, ...),
read by croniter; `@every Ns` (a whole number of seconds, at least 1), anchored at the hooks' start.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

DEFAULT_TIMEOUT_SECONDS = 60
MAX_PRE_START_SECONDS = 3 * 3600
MAX_PERIODIC_SECONDS = 300
MAX_PERIODIC_HOOKS = 16
MAX_ARGV_BYTES = 64 * 1024
_NAME = re.compile(r"[A-Za-z0-9]([-_.A-Za-z0-9]{0,61}[A-Za-z0-9])?")
_EVERY = re.compile(r"@every\s+([0-9]{1,9})s")
# croniter's descriptors; @reboot has no next time.
_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


class LifecycleError(ValueError):
    """A hook that cannot be run; the message names the field (`lifecycle.periodic[0].schedule`)."""


@dataclass(frozen=True)
class Hook:
    command: list[str]
    timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS

    def to_json(self) -> dict[str, Any]:
        return {"command": list(self.command), "timeoutSeconds": self.timeout_seconds}


@dataclass(frozen=True)
class PeriodicHook(Hook):
    name: str = ""
    schedule: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "schedule": self.schedule, **super().to_json()}


@dataclass(frozen=True)
class Lifecycle:
    pre_start: Hook | None = None
    periodic: list[PeriodicHook] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self.pre_start is not None:
            body["preStart"] = self.pre_start.to_json()
        if self.periodic:
            body["periodic"] = [hook.to_json() for hook in self.periodic]
        return body


def parse(raw: object, where: str = "lifecycle") -> Lifecycle:
    """The hooks of `raw`, checked; LifecycleError naming the first field that is wrong."""
    if not isinstance(raw, dict):
        raise LifecycleError(f"{where} must be an object")
    unknown = sorted(set(raw) - {"preStart", "periodic"})
    if unknown:
        raise LifecycleError(f"{where}.{unknown[0]} is not a lifecycle hook (preStart, periodic)")
    pre_start = None
    if raw.get("preStart") is not None:
        pre_start = _hook(raw["preStart"], f"{where}.preStart", MAX_PRE_START_SECONDS, set())
    periodic = _periodic(raw.get("periodic"), f"{where}.periodic")
    return Lifecycle(pre_start, periodic)


def _periodic(raw: object, where: str) -> list[PeriodicHook]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise LifecycleError(f"{where} must be a list")
    if len(raw) > MAX_PERIODIC_HOOKS:
        raise LifecycleError(f"{where}: at most {MAX_PERIODIC_HOOKS} periodic hooks")
    hooks: list[PeriodicHook] = []
    for index, item in enumerate(raw):
        at = f"{where}[{index}]"
        hook = _hook(item, at, MAX_PERIODIC_SECONDS, {"name", "schedule"})
        assert isinstance(item, dict)
        name, schedule = item.get("name"), item.get("schedule")
        if not isinstance(name, str) or not _NAME.fullmatch(name.strip()):
            raise LifecycleError(f"{at}.name must be 1-63 letters, digits, '-', '_' or '.'")
        if any(h.name == name.strip() for h in hooks):
            raise LifecycleError(f"{at}.name {name!r} is used by another periodic hook")
        if not isinstance(schedule, str):
            raise LifecycleError(f"{at}.schedule must be a string")
        try:
            Schedule(schedule.strip())
        except LifecycleError as exc:
            raise LifecycleError(f"{at}.schedule: {exc}") from None
        hooks.append(PeriodicHook(hook.command, hook.timeout_seconds, name.strip(), schedule.strip()))
    return hooks


def _hook(raw: object, where: str, max_timeout: int, extra: set[str]) -> Hook:
    if not isinstance(raw, dict):
        raise LifecycleError(f"{where} must be an object")
    unknown = sorted(set(raw) - {"command", "timeoutSeconds"} - extra)
    if unknown:
        raise LifecycleError(f"{where}.{unknown[0]} is not a field of a hook")
    command = raw.get("command")
    if not isinstance(command, list) or not command or not all(isinstance(a, str) for a in command):
        raise LifecycleError(f"{where}.command must be a non-empty list of strings")
    if not command[0].strip() or any("\0" in a for a in command):
        raise LifecycleError(f"{where}.command: the program must be named, and no argument may contain NUL")
    if sum(len(a.encode()) for a in command) > MAX_ARGV_BYTES:
        raise LifecycleError(f"{where}.command is longer than {MAX_ARGV_BYTES} bytes")
    timeout = raw.get("timeoutSeconds")
    if timeout is None:
        timeout = DEFAULT_TIMEOUT_SECONDS
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not 1 <= timeout <= max_timeout:
        raise LifecycleError(f"{where}.timeoutSeconds must be a whole number of seconds from 1 to {max_timeout}")
    return Hook(list(command), timeout)


class Schedule:
    """When a periodic hook is due: `next_after(t)` is the first due time after `t` (Unix seconds)."""

    def __init__(self, text: str) -> None:
        self.text = text
        every = _EVERY.fullmatch(text)
        self.every: int | None = None
        if every is not None:
            self.every = int(every.group(1))
            if self.every < 1:
                raise LifecycleError(f"{text!r}: an @every interval is at least 1s")
            return
        if text.startswith("@every"):
            raise LifecycleError(f"{text!r} is not '@every Ns' (a whole number of seconds, e.g. @every 30s)")
        if text.startswith("@") and text not in _DESCRIPTORS:
            raise LifecycleError(f"{text!r} is not one of {', '.join(_DESCRIPTORS)} or @every Ns")
        if not text.startswith("@") and len(text.split()) != 5:
            raise LifecycleError(f"{text!r} is not a five-field cron expression (minute hour day month weekday)")
        from croniter import croniter  # only where a cron schedule is used: it costs ~30 ms to import

        if not croniter.is_valid(text):
            raise LifecycleError(f"{text!r} is not a valid cron expression")

    def next_after(self, after: float, anchor: float) -> float:
        """The first due time after `after`; `@every` counts whole intervals from `anchor`."""
        if self.every is not None:
            due = anchor + (int((after - anchor) // self.every) + 1) * self.every
            return due if due > after else due + self.every  # (float rounding at an exact multiple)
        from croniter import croniter

        return float(croniter(self.text, after).get_next(float))


def pre_start_seconds(raw: dict[str, Any] | None) -> int:
    """How long a checked `lifecycle` (wire form) may hold the entrypoint back: its preStart's timeout."""
    pre_start = (raw or {}).get("preStart") or {}
    return int(pre_start.get("timeoutSeconds") or 0)


def failure(run: dict[str, Any], what: str = "preStart") -> str | None:
    """Why a run (as execd reports it, `hooks.Run.to_json`) failed, with its exit code and the end of
    its output; None if it succeeded."""
    if run.get("exitCode") == 0 and not run.get("timedOut"):
        return None
    output = str(run.get("output") or "").strip()[-1000:] or "(no output)"
    code = run.get("exitCode")
    if run.get("timedOut"):
        seconds = run.get("durationMs", 0) / 1000
        return f"the {what} hook timed out after {seconds:.1f} s and was killed (exit code {code}); output: {output}"
    return f"the {what} hook exited with code {code}; output: {output}"
