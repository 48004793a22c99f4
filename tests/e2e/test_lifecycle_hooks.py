"""Lifecycle hooks (issue 19) through the official SDK, on the local and docker runtimes: preStart
runs before the entrypoint and a failing one fails the create leaving nothing; periodic hooks run
without overlapping and show in the diagnostics events; hostile hooks (forking, never ending,
leaving processes behind) are killed at their timeout and never outlive the sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from opensandbox import Sandbox
from opensandbox.exceptions import SandboxApiException
from opensandbox.models.sandboxes import LifecycleHook, PeriodicLifecycleHook, SandboxLifecycle

from harness.docker_api import docker_containers
from harness.server_process import ServerProcess
from opensandbox_platform.api import labels
from tests.e2e.test_server_sdk import config


def marker() -> str:
    """A `sleep` duration no other process on this host has: its processes can be found on the host."""
    return f"3600.{random.randrange(10**8, 10**9)}"


def processes_with(argument: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if argument.encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                found.append(int(pid))
    return found


async def eventually(check: Callable[[], bool], within: float = 10.0) -> bool:
    for _ in range(int(within / 0.1)):
        if check():
            return True
        await asyncio.sleep(0.1)
    return check()


def left_behind(server: ServerProcess, mark: str, before: set[str]) -> list[str]:
    """What a failed create left: sandboxes the API lists, jails or containers on the host."""
    listed = httpx.get(
        f"{server.url}/v1/sandboxes", params={"metadata": f"hooks-test={mark}"}, headers=server.headers()
    ).json()["items"]
    if server.runtime == "docker":
        held = [c["Id"] for c in docker_containers(f"{labels.DOCKER_METADATA_PREFIX}hooks-test={mark}")]
    else:
        held = sorted(name for name in server.sandboxes_on_host() - before if not warm_jail(server, name))
    return [item["id"] for item in listed] + [str(h) for h in held]


def warm_jail(server: ServerProcess, name: str) -> bool:
    """A jail the local runtime keeps warm for the next create (unclaimed, alive): not a leftover."""
    try:
        record = json.loads((server.state_dir / "sandboxes" / name / "sandbox.json").read_text())
    except (OSError, ValueError):
        return False
    return not record.get("claimed") and Path(f"/proc/{record.get('pid')}").exists()


@pytest.fixture
async def created() -> AsyncIterator[list[Sandbox]]:
    made: list[Sandbox] = []
    yield made
    for sandbox in made:
        with contextlib.suppress(SandboxApiException):
            await sandbox.kill()
        await sandbox.close()


async def create(server: ServerProcess, mark: str, entrypoint: list[str], hooks: SandboxLifecycle) -> Sandbox:
    return await Sandbox.create(
        server.image,
        connection_config=config(server),
        entrypoint=entrypoint,
        metadata={"hooks-test": mark},
        env={"GREETING": "hello-from-env"},
        lifecycle=hooks,
    )


async def test_pre_start_runs_before_the_entrypoint_with_the_sandbox_env(
    server: ServerProcess, created: list[Sandbox]
) -> None:
    # The entrypoint only says "saw-prestart" if preStart's file is there when it starts.
    pre_start = LifecycleHook(command=["sh", "-c", "sleep 0.5; echo $GREETING > /tmp/prestarted; echo prepared"])
    entrypoint = ["sh", "-c", "test -s /tmp/prestarted && echo saw-prestart; exec sleep 600"]
    sandbox = await create(server, uuid.uuid4().hex[:12], entrypoint, SandboxLifecycle(pre_start=pre_start))
    created.append(sandbox)
    assert (await sandbox.commands.run("cat /tmp/prestarted")).logs.stdout[0].text.strip() == "hello-from-env"
    logs = await sandbox.get_diagnostic_logs(scope="container")
    assert "saw-prestart" in (logs.content or ""), logs.content
    events = (await sandbox.get_diagnostic_events(scope="lifecycle")).content or ""
    assert "HookSucceeded: preStart hook: exited with code 0" in events and "output: prepared" in events, events


@pytest.mark.parametrize(
    ("command", "timeout", "says"),
    [
        (["sh", "-c", "echo prep-went-wrong >&2; exit 7"], None, ["exited with code 7", "prep-went-wrong"]),
        (["/no/such/prestart"], None, ["exited with code 127", "cannot start /no/such/prestart"]),
        # a flood: the message carries only the end of it
        (["sh", "-c", "yes flood | head -c 20000000; echo flood-end; exit 3"], None, ["code 3", "flood-end"]),
        # forks a lot and never ends: killed at its timeout with everything it started
        (["sh", "-c", "i=0; while [ $i -lt 40 ]; do sleep MARK & i=$((i+1)); done; sleep MARK"], 1, ["timed out"]),
    ],
)
async def test_a_failing_pre_start_fails_the_create_and_leaves_nothing(
    server: ServerProcess, command: list[str], timeout: int | None, says: list[str]
) -> None:
    mark, sleep = uuid.uuid4().hex[:12], marker()
    command = [part.replace("MARK", sleep) for part in command]
    before = server.sandboxes_on_host() if server.runtime == "local" else set()
    with pytest.raises(SandboxApiException) as refused:
        await create(
            server,
            mark,
            ["sleep", "600"],
            SandboxLifecycle(pre_start=LifecycleHook(command=command, timeout_seconds=timeout)),
        )
    error = refused.value
    assert (error.status_code, error.error.code) == (400, "SANDBOX::PRESTART_FAILED"), error
    message = str(error.error.message)
    assert all(part in message for part in says), message
    assert len(message) < 1500
    assert await eventually(lambda: not left_behind(server, mark, before)), left_behind(server, mark, before)
    assert await eventually(lambda: not processes_with(sleep)), "the hook's processes outlived the failed create"


async def test_periodic_hooks_run_without_overlapping_and_show_in_events(
    server: ServerProcess, created: list[Sandbox]
) -> None:
    hooks = SandboxLifecycle(
        periodic=[
            PeriodicLifecycleHook(
                name="tick", schedule="@every 1s", command=["sh", "-c", "echo tick >> /tmp/ticks; echo ticked"]
            ),
            PeriodicLifecycleHook(name="slow", schedule="@every 1s", command=["sleep", "2.4"], timeout_seconds=10),
        ]
    )
    sandbox = await create(server, uuid.uuid4().hex[:12], ["sleep", "600"], hooks)
    created.append(sandbox)
    await asyncio.sleep(3.7)
    ticks = (await sandbox.commands.run("cat /tmp/ticks")).logs.stdout
    assert "".join(t.text for t in ticks).count("tick") >= 2
    events = (await sandbox.get_diagnostic_events(scope="lifecycle")).content or ""
    assert "HookSucceeded: periodic hook tick (@every 1s): exited with code 0" in events, events
    assert "output: ticked" in events
    # slow ran from 1 s to 3.4 s: due at 2 s and 3 s meanwhile, both skipped, never a second copy
    assert events.count("HookSkipped: periodic hook slow (@every 1s): skipped") >= 2, events
    assert events.count("periodic hook slow (@every 1s): exited") <= 1, events


async def test_a_periodic_hook_is_killed_at_its_timeout_and_none_outlives_the_sandbox(
    server: ServerProcess, created: list[Sandbox]
) -> None:
    stuck, lingering = marker(), marker()
    hooks = SandboxLifecycle(
        periodic=[
            # never ends, and forks: killed with its group after 1 s
            PeriodicLifecycleHook(
                name="stuck",
                schedule="@every 1s",
                command=["sh", "-c", f"sleep {stuck} & sleep {stuck} & sleep {stuck}"],
                timeout_seconds=1,
            ),
            # leaves a process outside its group (setsid): it ends with the sandbox
            PeriodicLifecycleHook(
                name="escape",
                schedule="@every 1s",
                command=["sh", "-c", f"setsid sleep {lingering} >/dev/null 2>&1 & sleep 0.3"],
            ),
        ]
    )
    sandbox = await create(server, uuid.uuid4().hex[:12], ["sleep", "600"], hooks)
    created.append(sandbox)
    await asyncio.sleep(2.6)
    events = (await sandbox.get_diagnostic_events(scope="lifecycle")).content or ""
    assert "HookFailed: periodic hook stuck (@every 1s): timed out and was killed with code 137" in events, events
    assert len(processes_with(stuck)) <= 3  # one run's worth at most: the earlier ones were killed
    assert processes_with(lingering)
    await sandbox.kill()
    assert await eventually(lambda: not processes_with(stuck) and not processes_with(lingering)), (
        "a hook's process outlived its sandbox"
    )


async def test_bad_hooks_are_400_naming_the_field_before_anything_is_made(server: ServerProcess) -> None:
    mark = uuid.uuid4().hex[:12]
    before = server.sandboxes_on_host() if server.runtime == "local" else set()
    cases = [
        (
            SandboxLifecycle(periodic=[PeriodicLifecycleHook(name="p", schedule="61 * * * *", command=["true"])]),
            "lifecycle.periodic[0].schedule",
        ),
        (
            SandboxLifecycle(periodic=[PeriodicLifecycleHook(name="p", schedule="@every 0s", command=["true"])]),
            "lifecycle.periodic[0].schedule",
        ),
        (
            SandboxLifecycle(
                periodic=[PeriodicLifecycleHook(name="p", schedule="@hourly", command=["true"], timeout_seconds=301)]
            ),
            "lifecycle.periodic[0].timeoutSeconds",
        ),
        (
            SandboxLifecycle(pre_start=LifecycleHook(command=["true"], timeout_seconds=10801)),
            "lifecycle.preStart.timeoutSeconds",
        ),
    ]
    for hooks, field in cases:
        with pytest.raises(SandboxApiException) as refused:
            await create(server, mark, ["sleep", "600"], hooks)
        assert (refused.value.status_code, refused.value.error.code) == (400, "SANDBOX::INVALID_PARAMETER")
        assert str(refused.value.error.message).startswith(field), refused.value.error.message
    # An empty argv (the SDK itself refuses it, so straight to the API)
    body = {
        "image": {"uri": server.image},
        "entrypoint": ["sleep", "600"],
        "metadata": {"hooks-test": mark},
        "lifecycle": {"preStart": {"command": []}},
    }
    async with httpx.AsyncClient(headers=server.headers(), timeout=30) as client:
        answer = await client.post(f"{server.url}/v1/sandboxes", json=body)
    assert answer.status_code == 400 and answer.json()["message"].startswith("lifecycle.preStart.command"), answer.text
    assert not left_behind(server, mark, before)
