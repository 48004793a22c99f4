"""The controller's settings (its command-line flags, which the chart fills from its values)."""

from __future__ import annotations

from dataclasses import dataclass

from opensandbox_platform.api import tokens
from opensandbox_platform.kube.client import JSON


@dataclass
class Settings:
    execd_image: str | None = None
    execd_install: str = "post-start"  # how execd gets into a pod: pods.EXECD_POST_START or EXECD_INIT_CONTAINER
    task_executor_image: str | None = None
    egress_image: str | None = None  # the network-policy sidecar (BatchSandboxes with labels.NETWORK_POLICY)
    egress_pull_policy: str = "IfNotPresent"
    # The task-executor sidecar's resources when a Pool does not set them (the chart's taskExecutor.resources).
    task_executor_cpu_request: str = "100m"
    task_executor_memory_request: str = "128Mi"
    task_executor_cpu_limit: str = "500m"
    task_executor_memory_limit: str = "256Mi"
    task_executor_pull_policy: str = "IfNotPresent"  # the chart's taskExecutor.image.pullPolicy
    pod_ready_deadline: float = 300.0
    token_key: bytes | None = None  # sandbox pods' access tokens (api/tokens.py); None: pods take any caller
    write_concurrency: int = 32  # writes in flight per reconcile (more only queue in the API server)

    def task_executor_resources(self) -> JSON:
        return {
            "requests": {"cpu": self.task_executor_cpu_request, "memory": self.task_executor_memory_request},
            "limits": {"cpu": self.task_executor_cpu_limit, "memory": self.task_executor_memory_limit},
        }

    def pod_token(self, pod_name: str) -> str | None:
        return tokens.pod_token(self.token_key, pod_name) if self.token_key else None
