"""The allocation ledger of pooled BatchSandboxes, and the allocator's plan. Pure: no I/O.

Which pod of a Pool serves which sandbox is recorded in the BatchSandbox itself: each entry of
`status.sandboxes` names its pod by name and uid. One status write per BatchSandbox records any
number of allocations, guarded by the BatchSandbox's resourceVersion. A pod is free when no ledger
names it and no claim label marks it (labels and ownerReferences follow the ledger, off the
critical path). docs/controller.md argues why this hands every pod out at most once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from opensandbox_platform.api import labels
from opensandbox_platform.api.crds import BatchSandboxSpec
from opensandbox_platform.controller.pods import PodInfo
from opensandbox_platform.kube.client import JSON

TERMINAL_TASK_STATES = ("succeeded", "failed")


@dataclass(frozen=True, slots=True)
class Allocation:
    """One ledger entry: sandbox `index` is served by this pod."""

    index: int
    pod_name: str
    pod_uid: str


def read_ledger(bs: JSON) -> dict[int, Allocation]:
    """The allocations a BatchSandbox records: a pooled one's, and one that left its Pool until the pods
    it claimed are deleting (departing()). Direct mode writes no pod uids, so it has none of its own."""
    entries = (bs.get("status") or {}).get("sandboxes") or []
    return {e["index"]: Allocation(e["index"], e["podName"], e["podUID"]) for e in entries if e.get("podUID")}


def written_tasks(bs: JSON) -> dict[int, JSON]:
    """Each sandbox's task as the BatchSandbox's status records it."""
    return {s["index"]: s["task"] for s in (bs.get("status") or {}).get("sandboxes") or [] if s.get("task")}


def finished_indices(bs: JSON) -> set[int]:
    """Sandboxes whose task ended (their pod is not replaced when it goes)."""
    return {i for i, task in written_tasks(bs).items() if task.get("state") in TERMINAL_TASK_STATES}


def ledger_uids(bs: JSON) -> list[str]:
    return [a.pod_uid for a in read_ledger(bs).values()]


def released_indices(bs: JSON) -> set[int]:
    """Sandboxes handed back: listed in the release annotation (pod names or indices), or marked
    released in status already."""
    meta = bs["metadata"]
    listed = {s.strip() for s in (meta.get("annotations") or {}).get(labels.RELEASE, "").split(",") if s.strip()}
    released = set()
    for entry in (bs.get("status") or {}).get("sandboxes") or []:
        if entry.get("released") or entry.get("podName") in listed or str(entry.get("index")) in listed:
            released.add(int(entry["index"]))
    return released


@dataclass(frozen=True, slots=True)
class Lost:
    """A ledger entry whose pod is gone or cannot serve any more: its sandbox gets a new pod."""

    index: int
    pod_name: str
    why: str  # deleted, Evicted, failed, ...
    pod: PodInfo | None  # still there (failed, evicted): deleted once the ledger drops it


@dataclass
class Holding:
    """What one pooled BatchSandbox holds of its Pool, and what it still wants."""

    pods: dict[int, PodInfo] = field(default_factory=dict)  # live allocated pods by index
    lost: list[Lost] = field(default_factory=list)
    conflicts: list[tuple[int, PodInfo]] = field(default_factory=list)  # pods another BatchSandbox's label claims
    wanted: list[int] = field(default_factory=list)  # indices below replicas without a pod

    @property
    def changed(self) -> bool:
        """Whether the ledger must be written although nothing new is allocated."""
        return bool(self.lost or self.conflicts)


def holding(
    spec: BatchSandboxSpec,
    bs: JSON,
    pod_named: Callable[[str], PodInfo | None],
    labelled: Iterable[PodInfo],
) -> Holding:
    """Resolve a BatchSandbox's ledger against the live pods (`pod_named` looks one up by name).

    `labelled` are pods whose claim label names this BatchSandbox (claims written before the ledger
    existed, or whose ledger write was lost): they are adopted. A sandbox whose task ended does not
    get a new pod when its pod goes."""
    meta = bs["metadata"]
    finished = finished_indices(bs)
    result = Holding()
    for entry in read_ledger(bs).values():
        pod = pod_named(entry.pod_name)
        if pod is not None and pod.uid != entry.pod_uid:
            pod = None  # a namesake: ours is gone
        if pod is not None and pod.batchsandbox not in (None, meta["name"]):
            result.conflicts.append((entry.index, pod))
        elif pod is None or pod.deleting or pod.lost:
            if entry.index not in finished:
                why = "deleted" if pod is None or pod.deleting else (pod.reason or "failed")
                result.lost.append(Lost(entry.index, entry.pod_name, why, None if pod is None or pod.deleting else pod))
        else:
            result.pods[entry.index] = pod
    for pod in labelled:
        index = pod.index
        if index is None or index in result.pods or pod.owner_uid != meta["uid"] or pod.deleting or pod.lost:
            continue
        result.pods[index] = pod
    released = released_indices(bs)
    result.wanted = [
        i for i in range(spec.replicas) if i not in result.pods and i not in finished and i not in released
    ]
    return result


def assign(requests: list[tuple[str, list[int]]], free: list[PodInfo]) -> dict[str, dict[int, PodInfo]]:
    """Hand free pods to the wanted indices, first come first served (a request is a BatchSandbox
    key with its wanted indices, oldest BatchSandbox first). A pod goes to at most one index."""
    pool = iter(free)
    result: dict[str, dict[int, PodInfo]] = {}
    for key, indices in requests:
        for index in indices:
            pod = next(pool, None)
            if pod is None:
                return result
            result.setdefault(key, {})[index] = pod
    return result


def departing(bs: JSON, pod_named: Callable[[str], PodInfo | None], labelled: Iterable[PodInfo]) -> list[PodInfo]:
    """The pool pods a BatchSandbox that left its Pool (poolRef removed) still holds and has not deleted:
    those its ledger names and those whose claim label and owner say they are its (a pod of a Pool in a
    direct BatchSandbox can only be one it claimed before it left). They are dirty: deleted, never
    handed back. Its ledger stays in status until this is empty, so none of them looks free meanwhile."""
    if bs["spec"].get("poolRef"):
        return []
    uid = bs["metadata"].get("uid")
    found: dict[str, PodInfo] = {}
    for entry in read_ledger(bs).values():
        pod = pod_named(entry.pod_name)
        if pod is not None and pod.uid == entry.pod_uid:
            found[pod.uid] = pod
    for pod in labelled:
        if pod.pool is not None and pod.owner_uid == uid:
            found[pod.uid] = pod
    return [p for p in found.values() if not p.deleting]


def is_free(pod: PodInfo, revision: str) -> bool:
    """An idle pod the allocator may hand out (the caller also checks ledgers and in-flight work)."""
    return pod.ready and not pod.claimed and not pod.deleting and not pod.evicting and pod.revision == revision
