"""Work in flight on pool pods, shared by the allocator and the Pool reconciler of this process.

Both act on a Pool's idle pods: the allocator hands them to BatchSandboxes, the Pool reconciler
deletes surplus, broken and old ones. An allocation does not change the pod (it is recorded in the
BatchSandbox), so a resourceVersion precondition on the pod cannot order the two; this does. Each
side marks the pods it acts on before its first `await` and skips the pods the other has marked;
asyncio runs one of them at a time, so a pod is never both allocated and deleted.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class InFlight:
    reserved: set[str] = field(default_factory=set)  # pod keys whose allocation is being written
    doomed: set[str] = field(default_factory=set)  # pod keys being deleted
    # Per pool: BatchSandbox keys whose ledger write had an unknown outcome (timeout, broken connection).
    # The pool allocates nothing until a fresh read says what was written.
    uncertain: dict[str, set[str]] = field(default_factory=dict)
    # Per pool: sandboxes its BatchSandboxes still wait for after the last allocation pass.
    unmet: dict[str, int] = field(default_factory=dict)

    def busy(self, pod_key: str) -> bool:
        return pod_key in self.reserved or pod_key in self.doomed

    def forget_pool(self, pool_key: str) -> None:
        self.uncertain.pop(pool_key, None)
        self.unmet.pop(pool_key, None)
