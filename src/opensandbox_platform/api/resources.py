"""Our custom resources as the Kubernetes client addresses them (shared by controller and server)."""

from __future__ import annotations

from opensandbox_platform.api import labels
from opensandbox_platform.kube.client import Resource

POOLS = Resource(labels.GROUP, labels.VERSION, "pools", "Pool")
BATCHSANDBOXES = Resource(labels.GROUP, labels.VERSION, "batchsandboxes", "BatchSandbox")
