"""Task parts of the controller: the sidecar in pod specs, what is submitted, and status from reports."""

from __future__ import annotations

import pytest

from opensandbox_platform.api import labels
from opensandbox_platform.api.crds import BatchSandboxSpec, BatchSandboxStatus, PoolSpec, SandboxTemplate, TaskTemplate
from opensandbox_platform.controller.pods import TaskExecutorSidecar, pod_spec, pool_revision, template_revision
from opensandbox_platform.controller.settings import Settings
from opensandbox_platform.controller.status import BatchSandboxView, batchsandbox_status, count_tasks
from opensandbox_platform.controller.tasks import pool_sidecar, submit_body, task_status
from tests.unit.controller.test_pool_plan import NOW, pod

RESOURCES = Settings().task_executor_resources()


def pool_spec(executor: dict[str, object] | None = None) -> PoolSpec:
    raw: dict[str, object] = {
        "maxBufferSize": 1,
        "capacity": 1,
        "sandboxTemplate": {"spec": {"image": "img", "command": ["sleep", "infinity"]}},
    }
    if executor is not None:
        raw["taskExecutor"] = executor
    return PoolSpec.model_validate(raw)


def test_the_sidecar_shares_the_pid_namespace_and_marks_the_main_container() -> None:
    template = SandboxTemplate.model_validate({"spec": {"image": "img", "env": [{"name": "A", "value": "1"}]}})
    spec = pod_spec(template, None, TaskExecutorSidecar("exec:1", RESOURCES))
    assert spec["shareProcessNamespace"] is True
    main, sidecar = spec["containers"]
    assert main["env"] == [{"name": "A", "value": "1"}, {"name": labels.TASK_TARGET_ENV, "value": "sandbox"}]
    assert sidecar["name"] == labels.TASK_EXECUTOR_CONTAINER and sidecar["image"] == "exec:1"
    assert sidecar["args"][:2] == ["--main-container", "sandbox"]
    assert sidecar["securityContext"]["capabilities"] == {"add": ["SYS_ADMIN"]}
    assert sidecar["securityContext"]["runAsUser"] == 0
    assert sidecar["resources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"cpu": "500m", "memory": "256Mi"},
    }
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/health", "port": labels.TASK_EXECUTOR_PORT}
    assert {"name": labels.TASK_DATA_VOLUME, "emptyDir": {}} in spec["volumes"]
    assert sidecar["volumeMounts"] == [{"name": labels.TASK_DATA_VOLUME, "mountPath": labels.TASK_DATA_DIR}]


def test_the_sidecar_targets_the_first_of_full_containers_and_keeps_execd() -> None:
    template = SandboxTemplate.model_validate({"spec": {"containers": [{"name": "app", "image": "x"}]}})
    spec = pod_spec(template, "execd:1", TaskExecutorSidecar("exec:1", RESOURCES))
    names = [c["name"] for c in spec["containers"]]
    assert names == ["execd-installer", "app", labels.TASK_EXECUTOR_CONTAINER]
    assert spec["containers"][2]["args"][:2] == ["--main-container", "app"]
    assert {"name": labels.TASK_TARGET_ENV, "value": "app"} in spec["containers"][1]["env"]


def test_pool_sidecar_defaults_and_overrides() -> None:
    assert pool_sidecar(pool_spec(), "d:1", RESOURCES) is None
    assert pool_sidecar(pool_spec({"enabled": False}), "d:1", RESOURCES) is None
    assert pool_sidecar(pool_spec({"enabled": True}), "d:1", RESOURCES) == TaskExecutorSidecar("d:1", RESOURCES)
    custom = {"enabled": True, "image": "own:2", "resources": {"limits": {"memory": "1Gi"}}}
    assert pool_sidecar(pool_spec(custom), "d:1", RESOURCES) == TaskExecutorSidecar(
        "own:2", {"limits": {"memory": "1Gi"}}
    )
    with pytest.raises(ValueError, match="--task-executor-image"):
        pool_sidecar(pool_spec({"enabled": True}), None, RESOURCES)


def test_pool_revision_changes_with_the_sidecar_only() -> None:
    plain = pool_spec()
    assert pool_revision(plain) == template_revision(plain.sandboxTemplate)  # existing pools keep theirs
    assert pool_revision(pool_spec({"enabled": False})) == pool_revision(plain)
    enabled = pool_revision(pool_spec({"enabled": True}))
    assert enabled != pool_revision(plain)
    assert enabled != pool_revision(pool_spec({"enabled": True, "image": "other"}))


def test_submit_body_from_the_template() -> None:
    template = TaskTemplate.model_validate(
        {"command": ["sh", "-c"], "args": ["x"], "env": [{"name": "A"}], "workingDir": "/w", "timeoutSeconds": 5}
    )
    assert submit_body(template, "uid-3") == {
        "id": "uid-3",
        "command": ["sh", "-c"],
        "args": ["x"],
        "env": [{"name": "A", "value": ""}],
        "workingDir": "/w",
        "timeoutSeconds": 5,
    }
    assert submit_body(TaskTemplate(command=["true"]), "u-0") == {
        "id": "u-0",
        "command": ["true"],
        "args": [],
        "env": [],
    }


def test_task_status_keeps_the_set_fields() -> None:
    report = {"id": "x", "state": "failed", "exitCode": 1, "reason": "Error", "message": None, "revision": 4,
              "startedAt": "2026-01-01T00:00:00.000Z", "finishedAt": "2026-01-01T00:00:01.000Z",
              "output": "x"}  # fmt: skip
    assert task_status(report) == {
        "state": "failed",
        "exitCode": 1,
        "reason": "Error",
        "startedAt": "2026-01-01T00:00:00.000Z",
        "finishedAt": "2026-01-01T00:00:01.000Z",
    }


def with_tasks(replicas: int, tasks: dict[int, dict[str, object]], old: dict[str, object] | None = None,
               pods: dict[int, object] | None = None) -> BatchSandboxStatus:  # fmt: skip
    spec = BatchSandboxSpec.model_validate(
        {"replicas": replicas, "sandboxTemplate": {"spec": {"image": "i"}}, "taskTemplate": {"command": ["true"]}}
    )
    view = BatchSandboxView(spec, 1, BatchSandboxStatus.model_validate(old or {}), pods or {}, tasks=tasks)  # type: ignore[arg-type]
    return batchsandbox_status(view, NOW)


def tasks_finished(replicas: int, tasks: dict[int, dict[str, object]]) -> tuple[bool, bool]:
    """(every task ended, some failed), as the status tells it."""
    status = with_tasks(replicas, tasks)
    return status.finishedAt is not None, status.finishedAt is not None and status.phase == "Failed"


def test_counts_and_the_end() -> None:
    tasks = {0: {"state": "succeeded"}, 1: {"state": "running"}, 5: {"state": "failed"}}
    assert count_tasks(tasks, 3).model_dump() == {"pending": 1, "running": 1, "succeeded": 1, "failed": 0}
    assert tasks_finished(3, tasks) == (False, False)
    assert tasks_finished(2, {0: {"state": "succeeded"}, 1: {"state": "succeeded"}}) == (True, False)
    assert tasks_finished(2, {0: {"state": "failed"}, 1: {"state": "succeeded"}}) == (True, True)
    assert tasks_finished(0, {}) == (False, False)


def test_a_finished_task_stays_in_status_when_its_pod_is_gone() -> None:
    old = {
        "sandboxes": [
            {"index": 0, "podName": "p0", "ready": True, "task": {"state": "succeeded"}},
            {"index": 1, "podName": "p1", "ready": True, "task": {"state": "running"}},
            {"index": 2, "podName": "p2", "ready": True, "task": {"state": "failed"}},
        ]
    }
    tasks = {0: {"state": "succeeded"}, 1: {"state": "running"}, 2: {"state": "failed"}}
    current = {2: pod("p2")}
    kept = with_tasks(3, tasks, old, current).sandboxes or []
    assert [(s.index, s.podName, s.ready) for s in kept] == [(0, "p0", False), (2, "p2", True)]
    assert with_tasks(0, tasks, old).sandboxes == []  # scaled down: nothing kept
