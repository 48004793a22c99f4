"""The task-executor image of this tree, built when missing or stale and loaded into the real node."""

from __future__ import annotations

import subprocess

from tests.support.real_node import RealNode
from tests.support.services import ROOT

TASK_EXECUTOR_IMAGE = "localhost/opensandbox/task-executor:dev"
BASE_IMAGE = "localhost/opensandbox-test-base:latest"
BINARY = ROOT / "build" / "task-executor" / "opensandbox-task-executor"
SOURCES = [ROOT / "src/opensandbox_platform/task_executor", ROOT / "src/opensandbox_platform/execd"]


def _newest_source() -> float:
    return max(p.stat().st_mtime for d in SOURCES for p in d.rglob("*.py"))


def load_task_executor_image(node: RealNode) -> str:
    """Builds the executable (when older than its sources) and the image, loads it into the node's
    containerd, and returns the image name as containerd knows it."""
    if not BINARY.exists() or BINARY.stat().st_mtime < _newest_source():
        subprocess.run([str(ROOT / "tools" / "build-task-executor.sh")], cwd=ROOT, check=True, capture_output=True)
    subprocess.run(
        ["podman", "build", "-q", "-f", "images/task-executor.Dockerfile", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
         "-t", TASK_EXECUTOR_IMAGE, "."],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    node.load_image(TASK_EXECUTOR_IMAGE)
    return TASK_EXECUTOR_IMAGE
