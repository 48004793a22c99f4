"""The official SDK (opensandbox 1.1.1, async and sync) against our server, with each runtime.

Every test that talks to execd runs twice: with endpoints straight to the jail's execd, and with
`use_server_proxy=True` (every execd call then goes through the server's proxy route).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from opensandbox import Sandbox, SandboxManager, SandboxManagerSync, SandboxSync
from opensandbox.config import ConnectionConfig
from opensandbox.config.connection_sync import ConnectionConfigSync
from opensandbox.exceptions import SandboxApiException
from opensandbox.models.execd import ExecutionHandlers, ExecutionInit, RunCommandOpts
from opensandbox.models.filesystem import (
    ContentReplaceEntry,
    DirectoryListEntry,
    MoveEntry,
    SearchEntry,
    SetPermissionEntry,
    WriteEntry,
)
from opensandbox.models.sandboxes import SandboxFilter
from opensandbox.transport.retry import RetryPolicy

from harness.jails import live_processes_with_hostname_arg
from harness.server_process import ServerProcess

MODES = [pytest.param(False, id="direct"), pytest.param(True, id="server-proxy")]


def config(server: ServerProcess, proxy: bool = False, **kwargs: Any) -> ConnectionConfig:
    return ConnectionConfig(
        domain=server.domain, api_key=server.api_key or None, use_server_proxy=proxy, disable_metrics=True, **kwargs
    )


def stdout(execution: Any) -> list[str]:
    return [m.text for m in execution.logs.stdout]


@pytest.fixture(params=MODES)
async def sandbox(server: ServerProcess, request: pytest.FixtureRequest) -> AsyncIterator[Sandbox]:
    sb = await Sandbox.create(
        server.image,
        connection_config=config(server, request.param),
        env={"FROM_CREATE": "create-env"},
        metadata={"suite": "server-sdk"},
    )
    yield sb
    with contextlib.suppress(SandboxApiException):  # some tests kill it themselves
        await sb.kill()
    await sb.close()


# What differs between runtimes in a default sandbox: PID 1 and whether the image's root is writable.
PID1_AND_ROOT = {"local": ["bwrap", "read-only"], "docker": ["/bin/sh"]}


async def test_create_with_defaults_gives_a_running_sandbox(server: ServerProcess) -> None:
    sb = await Sandbox.create(server.image, connection_config=config(server))
    try:
        info = await sb.get_info()
        assert info.id == sb.id and info.status.state == "Running"
        assert info.entrypoint == ["tail", "-f", "/dev/null"]
        assert info.expires_at is not None
        assert 9 * 60 <= (info.expires_at - info.created_at).total_seconds() <= 11 * 60
        probe = await sb.commands.run(
            "hostname; pwd; echo $HOME; cat /proc/1/cmdline | tr '\\0' ' ' | cut -d' ' -f1; "
            "ls -d /proc/[0-9]* | wc -l; touch /usr/x 2>/dev/null || echo read-only; "
            "touch /tmp/t /workspace/w ~/h && echo writable"
        )
        lines = stdout(probe)
        pid1, *root = PID1_AND_ROOT[server.runtime]
        assert lines[:4] == [sb.id, "/workspace", "/root", pid1]
        assert int(lines[4]) < 10  # its own PID namespace: PID 1, execd, tail, this shell, ls
        assert lines[5:] == [*root, "writable"]
    finally:
        await sb.kill()
        await sb.close()


async def test_commands(sandbox: Sandbox) -> None:
    run = await sandbox.commands.run("echo out; echo err >&2; echo $FROM_CREATE")
    assert stdout(run) == ["out", "create-env"]
    assert [m.text for m in run.logs.stderr] == ["err"] and run.exit_code == 0

    failed = await sandbox.commands.run("exit 4")
    assert failed.exit_code == 4 and failed.error is not None and failed.error.name == "CommandExecError"

    cwd = await sandbox.commands.run("pwd", opts=RunCommandOpts(working_directory="/tmp"))
    assert stdout(cwd) == ["/tmp"]
    envs = await sandbox.commands.run("echo $ONE", opts=RunCommandOpts(envs={"ONE": "1"}))
    assert stdout(envs) == ["1"]

    background = await sandbox.commands.run("echo bg-1; sleep 0.3; echo bg-2", opts=RunCommandOpts(background=True))
    assert background.id is not None and background.exit_code is None
    for _ in range(100):
        if not (await sandbox.commands.get_command_status(background.id)).running:
            break
        await asyncio.sleep(0.05)
    logs = await sandbox.commands.get_background_command_logs(background.id)
    assert logs.content.splitlines() == ["bg-1", "bg-2"]

    started: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def on_init(init: ExecutionInit) -> None:
        started.set_result(init.id)

    long = asyncio.create_task(sandbox.commands.run("sleep 60", handlers=ExecutionHandlers(on_init=on_init)))
    await sandbox.commands.interrupt(await asyncio.wait_for(started, 10))
    interrupted = await asyncio.wait_for(long, 20)
    assert interrupted.exit_code not in (0, None)

    session = await sandbox.commands.create_session(working_directory="/tmp")
    await sandbox.commands.run_in_session(session, "export KEPT=yes; cd /workspace")
    assert stdout(await sandbox.commands.run_in_session(session, "echo $KEPT; pwd")) == ["yes", "/workspace"]
    await sandbox.commands.delete_session(session)


async def test_files(sandbox: Sandbox) -> None:
    files = sandbox.files
    await files.create_directories([WriteEntry(path="/workspace/d/deep", mode=755)])
    await files.write_file("/workspace/d/a.txt", "alpha\nbeta\n", mode=644)
    await files.write_files(
        [
            WriteEntry(path="/workspace/d/b.bin", data=bytes(range(256))),
            WriteEntry(path="/workspace/d/deep/c.txt", data=io.BytesIO(b"streamed" * 1000), owner="nobody"),
        ]
    )
    assert await files.read_file("/workspace/d/a.txt") == "alpha\nbeta\n"
    assert await files.read_file("/workspace/d/a.txt", range_header="bytes=0-4") == "alpha"
    assert await files.read_bytes("/workspace/d/b.bin") == bytes(range(256))
    stream = await files.read_bytes_stream("/workspace/d/deep/c.txt", chunk_size=1024)
    assert b"".join([chunk async for chunk in stream]) == b"streamed" * 1000

    info = await files.get_file_info(["/workspace/d/a.txt", "/workspace/d/deep/c.txt"])
    assert info["/workspace/d/a.txt"].size == 11 and info["/workspace/d/a.txt"].mode == 644
    assert info["/workspace/d/deep/c.txt"].owner == "nobody"
    listed = await files.list_directory(DirectoryListEntry(path="/workspace/d"))
    assert [e.path for e in listed] == ["/workspace/d/a.txt", "/workspace/d/b.bin", "/workspace/d/deep"]
    found = await files.search(SearchEntry(path="/workspace/d", pattern="*.txt"))
    assert sorted(e.path for e in found) == ["/workspace/d/a.txt", "/workspace/d/deep/c.txt"]

    await files.set_permissions([SetPermissionEntry(path="/workspace/d/a.txt", mode=600)])
    assert (await files.get_file_info(["/workspace/d/a.txt"]))["/workspace/d/a.txt"].mode == 600
    replaced = await files.replace_contents_detailed(
        [ContentReplaceEntry(path="/workspace/d/a.txt", old_content="beta", new_content="gamma")]
    )
    assert replaced[0].replaced_count == 1
    await files.replace_contents([ContentReplaceEntry(path="/workspace/d/a.txt", old_content="alpha", new_content="x")])
    await files.move_files([MoveEntry(src="/workspace/d/a.txt", dest="/workspace/moved.txt")])
    assert await files.read_file("/workspace/moved.txt") == "x\ngamma\n"
    await files.delete_files(["/workspace/moved.txt", "/workspace/d/b.bin"])
    await files.delete_directories(["/workspace/d"])
    assert await files.list_directory(DirectoryListEntry(path="/workspace")) == []


async def test_info_renew_metadata_metrics_pause_resume_and_kill(server: ServerProcess, sandbox: Sandbox) -> None:
    proxy = sandbox.connection_config.use_server_proxy
    info = await sandbox.get_info()
    assert info.metadata == {"suite": "server-sdk"} and info.status.state == "Running"

    renewed = await sandbox.renew(timedelta(minutes=20))
    remaining = (renewed.expires_at - info.created_at).total_seconds()
    assert 19 * 60 <= remaining <= 21 * 60
    assert (await sandbox.get_info()).expires_at == renewed.expires_at

    await sandbox.patch_metadata({"added": "yes"})
    await sandbox.patch_metadata({"suite": None})
    assert (await sandbox.get_info()).metadata == {"added": "yes"}

    metrics = await sandbox.get_metrics()
    assert metrics.cpu_count > 0 and 0 < metrics.memory_used_in_mib <= metrics.memory_total_in_mib

    endpoint = await sandbox.get_endpoint(44772)
    if proxy:
        assert endpoint.endpoint.endswith(f"/v1/sandboxes/{sandbox.id}/proxy/44772")
    else:
        assert endpoint.endpoint.startswith("127.0.0.1:") and endpoint.headers

    await sandbox.commands.run("sleep 1000 >/dev/null 2>&1 &")
    await sandbox.pause()
    assert (await sandbox.get_info()).status.state == "Paused"
    quick = config(server, proxy, request_timeout=timedelta(seconds=1), retry_policy=RetryPolicy(max_retries=0))
    paused = await Sandbox.connect(sandbox.id, connection_config=quick, skip_health_check=True)
    assert not await paused.is_healthy()
    await paused.close()

    resumed = await Sandbox.resume(sandbox.id, connection_config=config(server, proxy))
    assert (await resumed.get_info()).status.state == "Running"
    assert stdout(await resumed.commands.run("echo resume-ok")) == ["resume-ok"]
    await resumed.close()

    assert live_processes_with_hostname_arg(sandbox.id)
    await sandbox.kill()
    for _ in range(50):  # a container engine's monitor process (conmon) exits just after the removal
        if not (left := live_processes_with_hostname_arg(sandbox.id)):
            break
        await asyncio.sleep(0.1)
    assert left == []
    manager = await SandboxManager.create(config(server))
    with pytest.raises(SandboxApiException) as err:
        await manager.get_sandbox_info(sandbox.id)
    assert err.value.status_code == 404
    await manager.close()


async def test_manager_lists_with_state_and_metadata_filters_and_pages(server: ServerProcess) -> None:
    tag = f"list-{time.monotonic_ns()}"
    created = [
        await Sandbox.create(server.image, connection_config=config(server), metadata={"tag": tag, "team": team})
        for team in ("t1", "t1", "t2")
    ]
    manager = await SandboxManager.create(config(server))
    try:
        await manager.pause_sandbox(created[2].id)

        async def ids(**filters: Any) -> set[str]:
            page = await manager.list_sandbox_infos(SandboxFilter(**filters))
            return {info.id for info in page.sandbox_infos}

        everyone = {sb.id for sb in created}
        assert await ids(states=["Running", "Paused"], metadata={"tag": tag}) == everyone
        assert await ids(states=["paused"], metadata={"tag": tag}) == {created[2].id}
        assert await ids(states=["Running"], metadata={"tag": tag}) == {created[0].id, created[1].id}
        assert await ids(metadata={"tag": tag, "team": "t1"}) == {created[0].id, created[1].id}
        assert await ids(metadata={"tag": tag, "team": "t3"}) == set()

        first = await manager.list_sandbox_infos(SandboxFilter(metadata={"tag": tag}, page_size=2, page=1))
        second = await manager.list_sandbox_infos(SandboxFilter(metadata={"tag": tag}, page_size=2, page=2))
        assert first.pagination.total_items == 3 and first.pagination.total_pages == 2
        assert first.pagination.has_next_page and not second.pagination.has_next_page
        newest_first = [info.id for info in first.sandbox_infos + second.sandbox_infos]
        assert newest_first == [sb.id for sb in reversed(created)]
    finally:
        for sb in created:
            await manager.kill_sandbox(sb.id)
            await sb.close()
        await manager.close()


async def test_request_id_is_passed_through_on_errors(server: ServerProcess) -> None:
    headers = {"X-Request-ID": "e2e-request-id-1"}
    with pytest.raises(SandboxApiException) as err:
        await Sandbox.connect("no-such-sandbox", connection_config=config(server, headers=headers))
    assert err.value.status_code == 404 and err.value.request_id == "e2e-request-id-1"


@pytest.mark.parametrize("proxy", MODES)
def test_sync_sdk(server: ServerProcess, proxy: bool) -> None:
    sync_config = ConnectionConfigSync(
        domain=server.domain, api_key=server.api_key or None, use_server_proxy=proxy, disable_metrics=True
    )
    sb = SandboxSync.create(server.image, connection_config=sync_config, env={"SYNC": "1"}, metadata={"kind": "sync"})
    try:
        assert stdout(sb.commands.run("echo $SYNC; pwd")) == ["1", "/workspace"]
        assert sb.commands.run("exit 3").exit_code == 3
        sb.files.write_file("/tmp/s.txt", "sync")
        assert sb.files.read_file("/tmp/s.txt") == "sync"
        assert sb.get_info().metadata == {"kind": "sync"}
        sb.renew(timedelta(minutes=5))
        sb.pause()
        assert sb.get_info().status.state == "Paused"
        resumed = SandboxSync.resume(sb.id, connection_config=sync_config)
        assert stdout(resumed.commands.run("echo again")) == ["again"]
        manager = SandboxManagerSync.create(sync_config)
        listed = manager.list_sandbox_infos(SandboxFilter(metadata={"kind": "sync"}))
        assert [info.id for info in listed.sandbox_infos] == [sb.id]
        resumed.close()
    finally:
        sb.kill()
        sb.close()
    with pytest.raises(SandboxApiException) as err:
        manager.get_sandbox_info(sb.id)
    assert err.value.status_code == 404
    manager.close()
