"""Access tokens for execd and the task executor in Kubernetes sandboxes: one per pod, stored nowhere.

A pod's token is HMAC-SHA256(key, pod name). The controller, which builds the pod, puts it in the
pod's environment (execd and the task executor refuse requests without it); the controller and the
server compute it again whenever they call a pod, and the server hands it out with the endpoint (as
the other runtimes hand out theirs). The key lives in a Secret that only the controller and the
server mount: a sandbox knows its own token at most, never another's, so the pod network alone no
longer lets one sandbox run commands in another.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

MIN_KEY_BYTES = 16
_DOMAIN = b"opensandbox/pod-token\0"  # so the key could serve another purpose without colliding


_EGRESS_DOMAIN = b"opensandbox/egress-token\0"


def pod_token(key: bytes, pod_name: str) -> str:
    return hmac.new(key, _DOMAIN + pod_name.encode(), hashlib.sha256).hexdigest()


def egress_token(key: bytes, pod_name: str) -> str:
    """The token of a pod's egress sidecar: not the pod token, which the sandbox's own environment
    holds (execd's), so the sandbox cannot change its own network policy."""
    return hmac.new(key, _EGRESS_DOMAIN + pod_name.encode(), hashlib.sha256).hexdigest()


def read_key(path: str | Path) -> bytes:
    """The key from a file (e.g. a mounted Secret); ValueError when it is too short to be one."""
    key = Path(path).read_bytes().strip()
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"{path}: a token key needs at least {MIN_KEY_BYTES} bytes")
    return key
