"""What happened to each sandbox, as `diagnostics/events` tells it: the server's own lifecycle
events (created, claimed from a pool, paused, renewed, expired, hook runs), kept per sandbox in a
bounded ring, next to what the runtime itself knows (pod events, an OOM kill).

The ring is in the server's memory: a restarted server starts with the runtime's view only (pod
events, container state), which is written in the engine and survives it.
"""

from __future__ import annotations

import datetime as dt
from collections import deque
from dataclasses import dataclass

from opensandbox_platform.daemon import times

# Events kept per sandbox (the oldest go first), and sandboxes remembered after their deletion
# (so that `diagnostics/events` of a sandbox deleted a moment ago is not a bare 404 at once).
PER_SANDBOX = 200
REMEMBERED_GONE = 256


class Reason:
    """The reasons the server records (pod events keep Kubernetes' own)."""

    CREATED = "Created"
    CLAIMED = "ClaimedFromPool"
    STARTED = "Started"
    PAUSED = "Paused"
    RESUMED = "Resumed"
    RENEWED = "Renewed"
    EXPIRED = "Expired"
    DELETED = "Deleted"
    EXITED = "Exited"
    OOM_KILLED = "OOMKilled"
    HOOK_SUCCEEDED = "HookSucceeded"
    HOOK_FAILED = "HookFailed"
    HOOK_SKIPPED = "HookSkipped"  # a periodic hook due while its previous run was still going
    EGRESS_DENIED = "EgressDenied"  # connections the network policy refused, by address
    EGRESS_NAME_DENIED = "EgressNameDenied"  # DNS names the network policy answered NXDOMAIN


@dataclass(frozen=True)
class SandboxEvent:
    at: dt.datetime
    reason: str
    message: str
    source: str = "server"  # server, or what the runtime read it from (pod, container, jail, execd)
    type: str = "Normal"  # Normal or Warning, as Kubernetes' events

    def line(self) -> str:
        return f"{times.rfc3339(self.at, digits=3)}  {self.type:<7}  {self.source:<9}  {self.reason}: {self.message}"


# (A name for class bodies whose `list` method hides the builtin.)
EventList = list[SandboxEvent]


class EventLog:
    """The server's events per sandbox id."""

    def __init__(self) -> None:
        self._events: dict[str, deque[SandboxEvent]] = {}
        self._gone: deque[str] = deque()

    def record(self, sandbox_id: str, reason: str, message: str, *, warning: bool = False) -> None:
        ring = self._events.setdefault(sandbox_id, deque(maxlen=PER_SANDBOX))
        ring.append(SandboxEvent(times.now(), reason, message, type="Warning" if warning else "Normal"))

    def of(self, sandbox_id: str) -> list[SandboxEvent]:
        return list(self._events.get(sandbox_id, ()))

    def knows(self, sandbox_id: str) -> bool:
        return sandbox_id in self._events

    def gone(self, sandbox_id: str, reason: str, message: str) -> None:
        """The sandbox was removed: its events stay for a while (the last REMEMBERED_GONE of them)."""
        self.record(sandbox_id, reason, message)
        self._gone.append(sandbox_id)
        while len(self._gone) > REMEMBERED_GONE:
            self._events.pop(self._gone.popleft(), None)


def merged(*sources: list[SandboxEvent]) -> list[SandboxEvent]:
    """Events of several sources in time order (stable: equal times keep their source's order)."""
    return sorted((event for source in sources for event in source), key=lambda event: event.at)
