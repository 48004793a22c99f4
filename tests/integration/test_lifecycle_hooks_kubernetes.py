"""Lifecycle hooks on the kubernetes runtime (direct mode), through the official SDK, on the real node
(on unless OSB_REAL_NODE=0): preStart runs before the entrypoint (the bootstrap script waits at its
start gate until execd opens it), periodic runs show in the diagnostics events, and a failing
preStart fails the create with its exit code and output, leaving no BatchSandbox or pod."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from lightkube import Client
from lightkube.resources.core_v1 import Pod
from opensandbox import Sandbox
from opensandbox.exceptions import SandboxApiException
from opensandbox.models.sandboxes import LifecycleHook, PeriodicLifecycleHook, SandboxLifecycle

from harness.images import TEST_IMAGE
from harness.kube import BatchSandbox, eventually
from harness.kubernetes_server import SMALL, KubernetesServer
from tests.integration.test_server_kubernetes_real_node import created, sdk_config, stdout_of


async def test_pre_start_runs_before_the_entrypoint_and_periodic_runs_show_in_events(server: KubernetesServer) -> None:
    hooks = SandboxLifecycle(
        pre_start=LifecycleHook(command=["sh", "-c", "sleep 0.5; echo ready > /tmp/prestarted; echo prepared"]),
        periodic=[PeriodicLifecycleHook(name="tick", schedule="@every 1s", command=["sh", "-c", "echo ticked"])],
    )
    entrypoint = ["sh", "-c", "test -s /tmp/prestarted && echo saw-prestart > /tmp/order; exec sleep 600"]
    async with created(server, entrypoint=entrypoint, lifecycle=hooks) as sandbox:
        assert await stdout_of(sandbox, "cat /tmp/order") == "saw-prestart"
        await _wait_for_event(sandbox, "HookSucceeded: periodic hook tick (@every 1s): exited with code 0")
        events = (await sandbox.get_diagnostic_events(scope="lifecycle")).content or ""
        assert "HookSucceeded: preStart hook: exited with code 0" in events and "output: ticked" in events, events


async def _wait_for_event(sandbox: Sandbox, text: str) -> None:
    for _ in range(60):
        if text in ((await sandbox.get_diagnostic_events(scope="lifecycle")).content or ""):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"no event {text!r}")


async def test_a_failing_pre_start_fails_the_create_and_leaves_nothing(
    server: KubernetesServer, kube: Client, namespace: str
) -> None:
    mark = uuid.uuid4().hex[:12]
    hooks = SandboxLifecycle(pre_start=LifecycleHook(command=["sh", "-c", "echo prep-went-wrong; exit 9"]))
    with pytest.raises(SandboxApiException) as refused:
        await Sandbox.create(
            TEST_IMAGE,
            connection_config=sdk_config(server),
            resource=SMALL,
            entrypoint=["sleep", "600"],
            metadata={"hooks-test": mark},
            lifecycle=hooks,
        )
    assert (refused.value.status_code, refused.value.error.code) == (400, "SANDBOX::PRESTART_FAILED")
    assert "exited with code 9" in str(refused.value.error.message)
    assert "prep-went-wrong" in str(refused.value.error.message)
    eventually(
        lambda: not list(kube.list(BatchSandbox, namespace=namespace, labels={"hooks-test": mark})),
        timeout=30,
        what="the BatchSandbox of a failed create gone",
    )
    eventually(
        lambda: not list(kube.list(Pod, namespace=namespace)),  # (the test's own namespace)
        timeout=60,
        what="its pod gone",
    )
