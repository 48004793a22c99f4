"""`python -m opensandbox_platform.server.runtimes.restore_job`: lays a local snapshot's files out in a
new jail's writable layer (runtimes/filetree.py), reading the job as JSON on stdin and answering
`{"skipped": N}` on stdout.

A process of its own, not a thread of the server: the server puts it in the new sandbox's cgroups
before it writes anything, so the tmpfs pages of the restored files are charged to that sandbox's
memory (as everything the sandbox writes itself), not to the server's (runtimes/local_snapshots.py).
It is started from the staging thread, so it sees that thread's private mount namespace.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from opensandbox_platform.server.runtimes import filetree
from opensandbox_platform.server.runtimes.snapstore import SnapshotStore


def main() -> None:
    job = json.loads(sys.stdin.read())
    store = SnapshotStore(Path(job["store"]))
    skipped = filetree.restore(
        job["layer"],
        store.entries(job["snapshot"]),
        store.open_blob,
        id_offset=job["id_offset"],
        protected=frozenset(job["protected"]),
    )
    json.dump({"skipped": len(skipped)}, sys.stdout)


if __name__ == "__main__":
    main()
