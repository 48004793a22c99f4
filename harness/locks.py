"""Machine-wide locks between the processes of a test run (the two parts of `make test`, tools/test.sh)."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator


@contextlib.contextmanager
def machine_lock(name: str) -> Iterator[None]:
    """Held by one process of this machine at a time (released when it exits, whatever happens)."""
    with open(f"/tmp/osb-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
