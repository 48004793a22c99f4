"""Every condition type, condition reason and Event reason on Pools and BatchSandboxes, in one place.

The controller writes them; the server's kubernetes runtime reads them (a BatchSandbox whose Ready
condition says WaitingForPool is a create that waits for a warm pod). Conditions are standard
`metav1.Condition`s, stored with both True and False status; `set_condition` moves
lastTransitionTime only when the status changes.
"""

from __future__ import annotations

import datetime as dt
from typing import Final, Literal

from opensandbox_platform.api.crds import Condition

# --- condition types ---------------------------------------------------------------------------
READY: Final = "Ready"  # Pool: the buffer is filled. BatchSandbox: every sandbox is Ready.
SANDBOX_REPLACED: Final = "SandboxReplaced"  # BatchSandbox: a lost pod was replaced (message says which)
POD_FAILED: Final = "PodFailed"  # BatchSandbox: a sandbox pod cannot run (crash loop, image pull, ...)

# --- reasons of Ready --------------------------------------------------------------------------
SANDBOXES_READY: Final = "SandboxesReady"
SANDBOXES_NOT_READY: Final = "SandboxesNotReady"
WAITING_FOR_POOL: Final = "WaitingForPool"  # pooled: fewer idle Ready pods than sandboxes wanted
POOL_NOT_FOUND: Final = "PoolNotFound"
FAILED_CREATE: Final = "FailedCreate"  # the API server refused pods built from the template
TASK_EXECUTOR_MISSING: Final = "TaskExecutorMissing"  # tasks, but the pool's pods have no executor
# The BatchSandbox carries a network policy but its Pool has no spec.egress (its pods have no sidecar)
POOL_WITHOUT_EGRESS: Final = "PoolWithoutEgress"
EGRESS_POLICY_FAILED: Final = "EgressPolicyFailed"  # pooled: the claimed pod's sidecar refused the policy
BUFFER_FILLED: Final = "BufferFilled"  # Pool
FILLING: Final = "Filling"  # Pool
EGRESS_NOT_CONFIGURED: Final = "EgressNotConfigured"  # Pool: spec.egress without the controller's egress flags

# --- reasons of the other conditions -------------------------------------------------------------
POD_LOST: Final = "PodLost"  # SandboxReplaced
NO_FAILED_POD: Final = "NoFailedPod"  # PodFailed False
# PodFailed True carries the container's waiting reason (CrashLoopBackOff, ImagePullBackOff, ...).
FAILED_POD_REASONS: Final = frozenset({"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull",
                                       "CreateContainerConfigError", "InvalidImageName"})  # fmt: skip

# --- Event reasons -------------------------------------------------------------------------------
EVENT_SUCCESSFUL_CREATE: Final = "SuccessfulCreate"
EVENT_FAILED_CREATE: Final = FAILED_CREATE
EVENT_SANDBOX_LOST: Final = "SandboxLost"
EVENT_POD_FAILED: Final = POD_FAILED
EVENT_ALLOCATED: Final = "Allocated"  # pooled: pods of the Pool were allocated to the BatchSandbox
EVENT_ALLOCATION_CONFLICT: Final = "AllocationConflict"  # a pod claimed by two BatchSandboxes (never expected)
EVENT_RELEASED: Final = "Released"  # pods handed back after their tasks completed
EVENT_SCALED_DOWN: Final = "ScaledDown"
EVENT_LEFT_POOL: Final = "LeftPool"  # poolRef removed: its claimed pods deleted (never handed back)
EVENT_ENTRYPOINT_FAILED: Final = "EntrypointFailed"
EVENT_EXPIRED: Final = "Expired"
EVENT_TTL_EXPIRED: Final = "TTLExpired"
EVENT_POD_REPLACED: Final = "PodReplaced"  # Pool: a broken idle pod
EVENT_POD_ROLLED: Final = "PodRolled"  # Pool: an idle pod of an older template
EVENT_SURPLUS_DELETED: Final = "SurplusDeleted"  # Pool: idle pods above maxBufferSize or capacity
EVENT_POD_EVICTED: Final = "PodEvicted"  # Pool: an idle pod carrying the evict label
EVENT_EGRESS_NOT_CONFIGURED: Final = EGRESS_NOT_CONFIGURED
EVENT_EGRESS_POLICY_FAILED: Final = EGRESS_POLICY_FAILED


def set_condition(
    conditions: list[Condition], type_: str, status: bool, reason: str, message: str, generation: int, now: dt.datetime
) -> None:
    """Set (or add) the condition `type_` in place; lastTransitionTime moves only when status changes."""
    value: Literal["True", "False"] = "True" if status else "False"
    index = next((i for i, c in enumerate(conditions) if c.type == type_), None)
    since = now if index is None or conditions[index].status != value else conditions[index].lastTransitionTime
    condition = Condition(
        type=type_,
        status=value,
        reason=reason,
        message=message,
        lastTransitionTime=since,
        observedGeneration=generation,
    )
    if index is None:
        conditions.append(condition)
    else:
        conditions[index] = condition


def find(conditions: list[Condition] | None, type_: str) -> Condition | None:
    return next((c for c in conditions or [] if c.type == type_), None)
