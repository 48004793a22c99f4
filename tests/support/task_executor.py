"""The task-executor image of this tree, built when missing or stale and loaded into the real node."""

from __future__ import annotations

from tests.support.images import built_image
from tests.support.real_node import RealNode

TASK_EXECUTOR_IMAGE = "localhost/opensandbox/task-executor:dev"


def load_task_executor_image(node: RealNode) -> str:
    """Loads the image (rebuilt when its sources changed) into the node's containerd and returns
    its name as containerd knows it."""
    image = built_image("task-executor", TASK_EXECUTOR_IMAGE)
    node.load_image(image)
    return image
