"""--task-executor-image-pull-policy (the chart's taskExecutor.image.pullPolicy) reaches the sidecar."""

from __future__ import annotations

import pytest

from opensandbox_platform.api.crds import PoolSpec, SandboxTemplate
from opensandbox_platform.controller.main import parse_args
from opensandbox_platform.controller.pods import pod_spec
from opensandbox_platform.controller.settings import Settings
from opensandbox_platform.controller.tasks import pool_sidecar

POOL = PoolSpec.model_validate(
    {
        "maxBufferSize": 1,
        "capacity": 1,
        "sandboxTemplate": {"spec": {"image": "img"}},
        "taskExecutor": {"enabled": True},
    }
)


def sidecar_pull_policy(*flags: str) -> str:
    args = parse_args(["--task-executor-image", "te:1", *flags])
    settings = Settings(
        task_executor_image=args.task_executor_image, task_executor_pull_policy=args.task_executor_image_pull_policy
    )
    sidecar = pool_sidecar(
        POOL, settings.task_executor_image, settings.task_executor_resources(), settings.task_executor_pull_policy
    )
    assert sidecar is not None
    spec = pod_spec(SandboxTemplate.model_validate({"spec": {"image": "img"}}), None, sidecar)
    policy: str = spec["containers"][1]["imagePullPolicy"]
    return policy


def test_default_is_if_not_present() -> None:
    assert sidecar_pull_policy() == "IfNotPresent"


@pytest.mark.parametrize("policy", ["Always", "Never", "IfNotPresent"])
def test_the_flag_sets_the_sidecars_pull_policy(policy: str) -> None:
    assert sidecar_pull_policy("--task-executor-image-pull-policy", policy) == policy


def test_an_unknown_policy_is_refused() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--task-executor-image-pull-policy", "Sometimes"])
