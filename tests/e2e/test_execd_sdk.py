"""The official SDK (opensandbox 1.1.1, async `Sandbox` and sync `SandboxSync`) against a real execd.

The SDK's sandboxes come from our server, with each runtime (a bubblewrap jail, a container): the
SDK reaches execd in it through the endpoints the server hands out. Raw HTTP against an execd started
as a plain subprocess is used where the SDK hides
what is being checked (stream framing, status codes, memory during a 1 GiB stream).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from opensandbox import Sandbox, SandboxSync
from opensandbox.config import ConnectionConfig
from opensandbox.config.connection_sync import ConnectionConfigSync
from opensandbox.exceptions import SandboxApiException, SandboxException
from opensandbox.models.execd import ExecutionHandlers, ExecutionInit, OutputMessage, RunCommandOpts
from opensandbox.models.execd_sync import ExecutionHandlersSync
from opensandbox.models.filesystem import (
    ContentReplaceEntry,
    DirectoryListEntry,
    MoveEntry,
    SearchEntry,
    SetPermissionEntry,
    WriteEntry,
)

from harness.execd_process import Execd, run_execd
from harness.images import TEST_IMAGE
from harness.paths import EXECD_BINARY, ROOT
from harness.ports import free_port
from harness.server_process import ServerProcess

# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def execd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Execd]:
    with run_execd(tmp_path_factory.mktemp("execd")) as proc:
        yield proc


@pytest.fixture
async def sandbox(server: ServerProcess) -> AsyncIterator[Sandbox]:
    config = ConnectionConfig(domain=server.domain, protocol="http", request_timeout=timedelta(seconds=60))
    sb = await Sandbox.create(server.image, connection_config=config, entrypoint=["tail", "-f", "/dev/null"])
    yield sb
    await sb.kill()
    await sb.close()


@pytest.fixture
def sandbox_sync(server: ServerProcess) -> Iterator[SandboxSync]:
    config = ConnectionConfigSync(domain=server.domain, protocol="http", request_timeout=timedelta(seconds=60))
    sb = SandboxSync.create(server.image, connection_config=config, entrypoint=["tail", "-f", "/dev/null"])
    yield sb
    sb.kill()
    sb.close()


@pytest.fixture
def work(server: ServerProcess, request: pytest.FixtureRequest) -> Path:
    """A fresh directory (its path inside the sandbox) for one test's files."""
    name = "sandbox" if "sandbox" in request.fixturenames else "sandbox_sync"
    sandbox_id = request.getfixturevalue(name).id
    path = Path("/tmp/files") / request.node.name.replace("[", "_").replace("]", "_")
    server.make_dirs(sandbox_id, str(path))
    return path


def stdout(execution: Any) -> list[str]:
    return [m.text for m in execution.logs.stdout]


def processes_matching(*cmdlines: str) -> list[int]:
    """PIDs whose whole command line is one of `cmdlines` (the process table, as `ps` reads it)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        if cmdline in cmdlines:
            found.append(int(entry))
    return found


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- commands (async SDK) -------------------------------------------------------------------


async def test_run_streams_output_events_and_completes(sandbox: Sandbox) -> None:
    inits: list[ExecutionInit] = []
    lines: list[OutputMessage] = []
    completes: list[Any] = []

    async def on_init(init: ExecutionInit) -> None:
        inits.append(init)

    async def on_stdout(msg: OutputMessage) -> None:
        lines.append(msg)

    async def on_complete(done: Any) -> None:
        completes.append(done)

    handlers = ExecutionHandlers(on_init=on_init, on_stdout=on_stdout, on_execution_complete=on_complete)
    execution = await sandbox.commands.run("echo one; echo two >&2; printf 'three'", handlers=handlers)

    assert execution.exit_code == 0
    assert execution.error is None
    assert execution.complete is not None
    assert stdout(execution) == ["one", "three"]
    assert [m.text for m in execution.logs.stderr] == ["two"]
    assert all(m.is_error for m in execution.logs.stderr)
    assert [i.id for i in inits] == [execution.id]
    assert len(completes) == 1 and len(lines) == 2
    assert abs(lines[0].timestamp - time.time() * 1000) < 60_000


async def test_nonzero_exit_is_an_error_event_with_the_exit_code(sandbox: Sandbox) -> None:
    execution = await sandbox.commands.run("echo oops >&2; exit 3")
    assert execution.exit_code == 3
    assert execution.error is not None
    assert execution.error.name == "CommandExecError"
    assert execution.error.value == "3"
    assert execution.complete is None
    assert [m.text for m in execution.logs.stderr] == ["oops"]


async def test_unknown_program_reports_127(sandbox: Sandbox) -> None:
    assert (await sandbox.commands.run("no-such-program-xyz")).exit_code == 127
    argv_run = await sandbox.commands.run(["no-such-program-xyz", "arg"])
    assert argv_run.exit_code == 127
    assert argv_run.error is not None and "failed to start" in argv_run.error.traceback[0]


async def test_argv_runs_without_a_shell(sandbox: Sandbox) -> None:
    execution = await sandbox.commands.run(["printf", "%s|", "$HOME", "a b", "*"])
    assert stdout(execution) == ["$HOME|a b|*|"]


async def test_cwd_envs_and_set_env(sandbox: Sandbox, work: Path) -> None:
    pwd = await sandbox.commands.run("pwd", opts=RunCommandOpts(working_directory=str(work)))
    assert stdout(pwd) == [str(work)]
    unset = await sandbox.commands.run('echo "[$E2E_VAR]"')
    assert stdout(unset) == ["[]"]
    injected = await sandbox.commands.run('echo "[$E2E_VAR]"', opts=RunCommandOpts(envs={"E2E_VAR": "x y"}))
    assert stdout(injected) == ["[x y]"]

    await sandbox.commands.set_env("E2E_PERSISTED", "it's $HOME")
    persisted = await sandbox.commands.run('echo "$E2E_PERSISTED"')
    assert stdout(persisted)[0].startswith("it's ")
    # The request's envs win over the env file.
    overridden = await sandbox.commands.run(
        "echo $E2E_PERSISTED", opts=RunCommandOpts(envs={"E2E_PERSISTED": "request"})
    )
    assert stdout(overridden) == ["request"]


async def test_cwd_expands_variables_and_rejects_missing_directories(sandbox: Sandbox, work: Path) -> None:
    expanded = await sandbox.commands.run(
        "pwd", opts=RunCommandOpts(working_directory="$E2E_DIR", envs={"E2E_DIR": str(work)})
    )
    assert stdout(expanded) == [str(work)]
    with pytest.raises(SandboxApiException) as err:
        await sandbox.commands.run("pwd", opts=RunCommandOpts(working_directory=str(work / "missing")))
    assert err.value.status_code == 400


async def test_uid_and_gid(sandbox: Sandbox) -> None:
    nobody = await sandbox.commands.run("id -u; id -g; id -G", opts=RunCommandOpts(uid=65534))
    assert stdout(nobody) == ["65534", "65534", "65534"]
    explicit = await sandbox.commands.run(["id", "-g"], opts=RunCommandOpts(uid=65534, gid=100))
    assert stdout(explicit) == ["100"]


async def test_timeout_kills_the_command(sandbox: Sandbox) -> None:
    opts = RunCommandOpts(timeout=timedelta(seconds=0.5))
    execution = await sandbox.commands.run("echo started; sleep 30", opts=opts)
    assert stdout(execution) == ["started"]
    assert execution.exit_code == 137
    assert execution.error is not None and "timeout" in execution.error.traceback[0]


async def test_background_command_status_and_incremental_logs(sandbox: Sandbox) -> None:
    execution = await sandbox.commands.run(
        "echo log-line-1; sleep 0.5; echo log-line-2; exit 5", opts=RunCommandOpts(background=True)
    )
    assert execution.id and execution.exit_code is None

    status = await sandbox.commands.get_command_status(execution.id)
    assert status.id == execution.id and status.running is True and status.exit_code is None

    collected = ""
    cursor: int | None = None
    deadline = time.monotonic() + 10
    while "log-line-2" not in collected and time.monotonic() < deadline:
        logs = await sandbox.commands.get_background_command_logs(execution.id, cursor=cursor)
        collected += logs.content
        cursor = logs.cursor
        await asyncio.sleep(0.1)
    assert collected.splitlines() == ["log-line-1", "log-line-2"]

    for _ in range(100):
        status = await sandbox.commands.get_command_status(execution.id)
        if not status.running:
            break
        await asyncio.sleep(0.05)
    assert status.running is False and status.exit_code == 5 and status.finished_at is not None


async def test_interrupt_stops_the_command_and_leaves_no_orphans(sandbox: Sandbox) -> None:
    # The background `sleep` ignores SIGINT (as `&` jobs of a non-interactive shell do), so only the
    # SIGKILL to the whole process group after the grace period can end it.
    command = "sleep 3001 & sleep 3002; wait"
    started = asyncio.get_running_loop().create_future()

    async def on_init(init: ExecutionInit) -> None:
        started.set_result(init.id)

    run = asyncio.create_task(sandbox.commands.run(command, handlers=ExecutionHandlers(on_init=on_init)))
    command_id = await asyncio.wait_for(started, 10)
    sleeps = ("sleep 3001", "sleep 3002")
    await asyncio.to_thread(wait_until, lambda: len(processes_matching(*sleeps)) == 2, 10, "sleeps to start")

    await sandbox.commands.interrupt(command_id)
    execution = await asyncio.wait_for(run, 20)
    assert execution.error is not None and execution.exit_code != 0
    await asyncio.to_thread(wait_until, lambda: not processes_matching(*sleeps), 10, "the group to die")
    status = await sandbox.commands.get_command_status(command_id)
    assert status.running is False


async def test_unknown_command_id_is_404(sandbox: Sandbox) -> None:
    for call in (
        sandbox.commands.get_command_status("nope"),
        sandbox.commands.get_background_command_logs("nope"),
        sandbox.commands.interrupt("nope"),
    ):
        with pytest.raises(SandboxApiException) as err:
            await call
        assert err.value.status_code == 404


async def test_sessions_keep_cwd_and_exports(sandbox: Sandbox, work: Path) -> None:
    session = await sandbox.commands.create_session(working_directory=str(work / "s"))
    first = await sandbox.commands.run_in_session(session, "pwd; export KEPT=yes; plain=also; cd ..; mkdir -p sub")
    assert stdout(first) == [str(work / "s")]
    second = await sandbox.commands.run_in_session(session, "pwd; echo $KEPT $plain")
    assert stdout(second) == [str(work), "yes also"]

    override = await sandbox.commands.run_in_session(session, "pwd", working_directory=str(work / "sub"))
    assert stdout(override) == [str(work / "sub")]

    failed = await sandbox.commands.run_in_session(session, "echo bad >&2; false")
    assert failed.exit_code == 1 and failed.error is not None
    assert [m.text for m in failed.logs.stderr] == ["bad"]

    exited = await sandbox.commands.run_in_session(session, "exit 7")
    assert exited.exit_code == 7 and exited.error is not None and exited.error.value == "7"
    after_exit = await sandbox.commands.run_in_session(session, "pwd")
    assert after_exit.exit_code == 0 and stdout(after_exit) == [str(work / "sub")]

    await sandbox.commands.delete_session(session)
    with pytest.raises(SandboxException):
        await sandbox.commands.run_in_session(session, "true")
    with pytest.raises(SandboxApiException) as err:
        await sandbox.commands.delete_session(session)
    assert err.value.status_code == 404


async def test_session_syntax_error_reports_the_error_and_keeps_the_session(sandbox: Sandbox) -> None:
    # bash names the run's script file in the message; the run must still end on its own exit code.
    session = await sandbox.commands.create_session()
    broken = await sandbox.commands.run_in_session(session, "echo before\nif then fi")
    assert broken.exit_code == 2 and broken.error is not None
    assert stdout(broken) == ["before"]
    assert any("syntax error" in m.text for m in broken.logs.stderr)
    after = await sandbox.commands.run_in_session(session, "echo after")
    assert after.exit_code == 0 and stdout(after) == ["after"]
    await sandbox.commands.delete_session(session)


async def test_session_output_without_trailing_newline_and_timeout(sandbox: Sandbox) -> None:
    session = await sandbox.commands.create_session()
    partial = await sandbox.commands.run_in_session(session, "printf 'a\\nb'")
    assert stdout(partial) == ["a", "b"]
    timed_out = await sandbox.commands.run_in_session(session, "sleep 30", timeout=timedelta(seconds=0.3))
    assert timed_out.exit_code == 137
    assert (await sandbox.commands.run_in_session(session, "echo alive")).exit_code == 0
    await sandbox.commands.delete_session(session)


async def test_binary_and_invalid_utf8_output_do_not_break_the_stream(sandbox: Sandbox) -> None:
    execution = await sandbox.commands.run("printf 'ok \\377\\376 \\000 end\\n'; head -c 200000 /dev/urandom; echo")
    assert execution.exit_code == 0 and execution.complete is not None
    assert stdout(execution)[0] == "ok \ufffd\ufffd \x00 end"


async def test_lines_split_on_cr_and_crlf(sandbox: Sandbox) -> None:
    execution = await sandbox.commands.run("printf 'a\\rb\\r\\nc\\n\\nd'")
    assert stdout(execution) == ["a", "b", "c", "", "d"]


async def test_thousand_commands_in_a_row_without_stream_errors(sandbox: Sandbox) -> None:
    failures = []
    for i in range(1000):
        execution = await sandbox.commands.run(["echo", str(i)])
        if execution.exit_code != 0 or execution.complete is None or stdout(execution) != [str(i)]:
            failures.append((i, execution))
    assert failures == []


async def test_hundred_concurrent_commands(sandbox: Sandbox) -> None:
    async def one(i: int) -> Any:
        return await sandbox.commands.run(f"sleep 0.2; echo {i}")

    executions = await asyncio.gather(*(one(i) for i in range(100)))
    assert [stdout(e) for e in executions] == [[str(i)] for i in range(100)]
    assert all(e.exit_code == 0 for e in executions)


# -- raw HTTP: stream framing, memory, disconnects -------------------------------------------


def sse_events(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(frame.removeprefix(b"data: ")) for frame in raw.split(b"\n\n") if frame.strip()]


def test_stream_ends_right_after_the_final_event(execd: Execd) -> None:
    with httpx.Client(base_url=execd.url) as client:
        for command in ("true", "exit 2"):
            with client.stream("POST", "/command", json={"command": command}) as response:
                assert response.headers["content-type"] == "text/event-stream"
                raw = b""
                final_at = None
                for chunk in response.iter_raw():
                    raw += chunk
                    if b'"execution_complete"' in raw or b'"error"' in raw:
                        final_at = final_at or time.monotonic()
                ended_at = time.monotonic()
            assert final_at is not None
            # Upstream holds every stream open for 1 s after the last event; we must not.
            assert ended_at - final_at < 0.5
            types = [e["type"] for e in sse_events(raw)]
            assert types == ["init", "execution_complete"] if command == "true" else ["init", "error"]


def test_one_gibibyte_of_output_keeps_execd_memory_flat(execd: Execd) -> None:
    peak = [execd.rss_kib()]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], execd.rss_kib())
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    total = 0
    tail = b""
    try:
        command = "head -c 1073741824 /dev/zero | tr '\\0' x"
        with (
            httpx.Client(base_url=execd.url, timeout=120) as client,
            client.stream("POST", "/command", json={"command": command}) as response,
        ):
            for chunk in response.iter_raw(1 << 20):
                total += len(chunk)
                tail = (tail + chunk)[-4096:]
    finally:
        done.set()
        watcher.join()
    assert total > 1 << 30
    assert b'"execution_complete"' in tail
    assert peak[0] < 100 * 1024, f"execd RSS peaked at {peak[0]} KiB"


def test_client_disconnect_kills_the_foreground_command(execd: Execd) -> None:
    with (
        httpx.Client(base_url=execd.url) as client,
        client.stream("POST", "/command", json={"command": "sleep 3003"}) as response,
    ):
        events = response.iter_raw()  # held: a dropped iterator closes the connection at once
        next(events)  # the init event
        wait_until(lambda: bool(processes_matching("sleep 3003")), 5, "the command to start")
    wait_until(lambda: not processes_matching("sleep 3003"), 10, "the command to be killed")


def test_children_are_reaped(execd: Execd) -> None:
    with httpx.Client(base_url=execd.url) as client:
        for _ in range(5):
            # The shell exits at once; its background child becomes an orphan that execd adopts.
            client.post("/command", json={"command": "sleep 0.2 & true"}).read()
    time.sleep(1)

    def zombies() -> list[str]:
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                fields = stat.rsplit(")", 1)[1].split()
                if fields[0] == "Z" and int(fields[1]) == execd.pid:
                    found.append(entry)
        return found

    wait_until(lambda: not zombies(), 5, "zombies to be reaped")


# -- files (async SDK) -------------------------------------------------------------------------


async def test_write_and_read_files(sandbox: Sandbox, work: Path) -> None:
    text_path, bin_path, stream_path = str(work / "a.txt"), str(work / "b.bin"), str(work / "c.dat")
    await sandbox.files.write_file(text_path, "hello world\nline 2\nline 3\n", mode=644)
    await sandbox.files.write_files(
        [
            WriteEntry(path=bin_path, data=bytes(range(256)), mode=600),
            WriteEntry(path=stream_path, data=io.BytesIO(b"streamed" * 10000), owner="nobody", group="nogroup"),
        ]
    )
    assert await sandbox.files.read_file(text_path) == "hello world\nline 2\nline 3\n"
    assert await sandbox.files.read_file(text_path, range_header="bytes=0-4") == "hello"
    assert await sandbox.files.read_file(text_path, offset=2, limit=1) == "line 2\n"
    assert await sandbox.files.read_bytes(bin_path) == bytes(range(256))
    streamed = b"".join([c async for c in await sandbox.files.read_bytes_stream(stream_path, chunk_size=4096)])
    assert streamed == b"streamed" * 10000

    info = await sandbox.files.get_file_info([text_path, bin_path, stream_path])
    assert info[text_path].mode == 644 and info[text_path].size == 26 and info[text_path].entry_type == "file"
    assert info[bin_path].mode == 600
    assert (info[stream_path].owner, info[stream_path].group, info[stream_path].mode) == ("nobody", "nogroup", 755)
    assert abs((info[text_path].modified_at - info[text_path].created_at).total_seconds()) < 5

    before = info[text_path].modified_at
    await asyncio.sleep(0.02)
    await sandbox.files.write_file(text_path, "rewritten")
    after = (await sandbox.files.get_file_info([text_path]))[text_path]
    assert after.modified_at > before and after.size == 9


async def test_directories_search_move_and_delete(sandbox: Sandbox, work: Path) -> None:
    await sandbox.files.create_directories(
        [WriteEntry(path=str(work / "d1" / "deep"), mode=755), WriteEntry(path=str(work / "d2"), mode=700)]
    )
    for name in ("d1/x.py", "d1/deep/y.py", "d1/deep/z.txt", "top.py"):
        await sandbox.files.write_file(str(work / name), name)

    info = await sandbox.files.get_file_info([str(work / "d2")])
    assert info[str(work / "d2")].mode == 700 and info[str(work / "d2")].entry_type == "directory"

    one = await sandbox.files.list_directory(DirectoryListEntry(path=str(work)))
    assert [e.path for e in one] == [str(work / n) for n in ("d1", "d2", "top.py")]
    two = await sandbox.files.list_directory(DirectoryListEntry(path=str(work), depth=2))
    assert [e.path for e in two] == [str(work / n) for n in ("d1", "d1/deep", "d1/x.py", "d2", "top.py")]

    py = await sandbox.files.search(SearchEntry(path=str(work), pattern="*.py"))
    assert sorted(e.path for e in py) == sorted(str(work / n) for n in ("d1/x.py", "d1/deep/y.py", "top.py"))
    nested = await sandbox.files.search(SearchEntry(path=str(work), pattern="d1/**/*.txt"))
    assert [e.path for e in nested] == [str(work / "d1/deep/z.txt")]

    await sandbox.files.move_files([MoveEntry(src=str(work / "top.py"), dest=str(work / "d2" / "moved.py"))])
    assert await sandbox.files.read_file(str(work / "d2" / "moved.py")) == "top.py"
    await sandbox.files.move_files([MoveEntry(src=str(work / "d1"), dest=str(work / "renamed"))])

    await sandbox.files.delete_files([str(work / "d2" / "moved.py")])
    await sandbox.files.delete_directories([str(work / "renamed")])
    remaining = await sandbox.files.list_directory(DirectoryListEntry(path=str(work)))
    assert [e.path for e in remaining] == [str(work / "d2")]


async def test_permissions_and_replace(sandbox: Sandbox, work: Path) -> None:
    path = str(work / "conf.ini")
    await sandbox.files.write_file(path, "host=localhost\nport=80\nhost2=localhost\n")
    await sandbox.files.set_permissions([SetPermissionEntry(path=path, mode=600, owner="nobody", group="nogroup")])
    info = (await sandbox.files.get_file_info([path]))[path]
    assert (info.mode, info.owner, info.group) == (600, "nobody", "nogroup")

    results = await sandbox.files.replace_contents_detailed(
        [ContentReplaceEntry(path=path, old_content="localhost", new_content="0.0.0.0")]
    )
    assert [(r.path, r.replaced_count) for r in results] == [(path, 2)]
    none = await sandbox.files.replace_contents_detailed(
        [ContentReplaceEntry(path=path, old_content="absent", new_content="x")]
    )
    assert none[0].replaced_count == 0
    await sandbox.files.replace_contents([ContentReplaceEntry(path=path, old_content="port=80", new_content="port=81")])
    assert await sandbox.files.read_file(path) == "host=0.0.0.0\nport=81\nhost2=0.0.0.0\n"
    assert (await sandbox.files.get_file_info([path]))[path].mode == 600


async def test_uploads_with_bad_metadata_are_rejected(sandbox: Sandbox, work: Path, server: ServerProcess) -> None:
    await sandbox.files.create_directories([WriteEntry(path=str(work / "a-directory"), mode=755)])
    for path, mode, owner in (
        (work / "bad-mode.txt", 999, None),
        (work / "bad-owner.txt", 644, "no-such-user-x"),
        (work / "a-directory", 644, None),
    ):
        with pytest.raises(SandboxApiException) as err:
            await sandbox.files.write_file(str(path), "x", mode=mode, owner=owner)
        assert err.value.status_code == 400
    on_host = [server.host_path(sandbox.id, str(work / name)) for name in ("bad-mode.txt", "bad-owner.txt")]
    assert on_host[0].parent.is_dir() and not any(path.exists() for path in on_host)


async def test_metrics_health_and_connect(sandbox: Sandbox, server: ServerProcess) -> None:
    assert await sandbox.is_healthy()
    metrics = await sandbox.get_metrics()
    assert metrics.cpu_count > 0
    assert 0 <= metrics.cpu_used_percentage <= 100
    assert 0 < metrics.memory_used_in_mib <= metrics.memory_total_in_mib
    assert abs(metrics.timestamp - time.time() * 1000) < 120_000

    config = ConnectionConfig(domain=server.domain, protocol="http")
    connected = await Sandbox.connect(sandbox.id, connection_config=config)
    assert stdout(await connected.commands.run("echo connect-ok")) == ["connect-ok"]
    await connected.close()


# -- the sync SDK ---------------------------------------------------------------------------


def test_sync_sdk_commands(sandbox_sync: SandboxSync, work: Path) -> None:
    commands = sandbox_sync.commands
    seen: list[str] = []
    handlers = ExecutionHandlersSync(on_stdout=lambda m: seen.append(m.text))
    execution = commands.run("echo sync-ok; exit 0", handlers=handlers)
    assert execution.exit_code == 0 and stdout(execution) == ["sync-ok"] and seen == ["sync-ok"]
    assert commands.run("exit 9").exit_code == 9
    assert stdout(commands.run(["echo", "$X"], opts=RunCommandOpts(envs={"X": "1"}))) == ["$X"]
    commands.set_env("SYNC_SET", "v")
    assert stdout(commands.run("echo $SYNC_SET")) == ["v"]

    background = commands.run("echo bg-1; sleep 0.2; echo bg-2", opts=RunCommandOpts(background=True))
    assert background.id is not None
    wait_until(lambda: not commands.get_command_status(background.id).running, 10, "the background command")
    logs = commands.get_background_command_logs(background.id)
    assert logs.content.splitlines() == ["bg-1", "bg-2"] and logs.cursor == len("bg-1\nbg-2\n")

    long_running = commands.run("sleep 3004", opts=RunCommandOpts(background=True))
    assert long_running.id is not None
    wait_until(lambda: bool(processes_matching("sleep 3004")), 5, "the sleep to start")
    commands.interrupt(long_running.id)
    wait_until(lambda: not processes_matching("sleep 3004"), 10, "the interrupted command to end")

    session = commands.create_session(working_directory=str(work))
    commands.run_in_session(session, "export S=1; cd /")
    assert stdout(commands.run_in_session(session, "echo $S; pwd")) == ["1", "/"]
    commands.delete_session(session)


def test_sync_sdk_files(sandbox_sync: SandboxSync, work: Path) -> None:
    files = sandbox_sync.files
    path = str(work / "f.txt")
    files.write_file(path, "abc\ndef\n", mode=640)
    files.write_files([WriteEntry(path=str(work / "g.bin"), data=b"\x00\xff")])
    assert files.read_file(path) == "abc\ndef\n"
    assert files.read_file(path, range_header="bytes=-4") == "def\n"
    assert files.read_bytes(str(work / "g.bin")) == b"\x00\xff"
    assert b"".join(files.read_bytes_stream(path)) == b"abc\ndef\n"
    assert files.get_file_info([path])[path].mode == 640
    files.create_directories([WriteEntry(path=str(work / "dir"), mode=755)])
    assert [e.path for e in files.search(SearchEntry(path=str(work), pattern="*.txt"))] == [path]
    assert [e.path for e in files.list_directory(DirectoryListEntry(path=str(work)))] == [
        str(work / "dir"),
        path,
        str(work / "g.bin"),
    ]
    files.set_permissions([SetPermissionEntry(path=path, mode=600)])
    assert (
        files.replace_contents_detailed([ContentReplaceEntry(path=path, old_content="abc", new_content="x")])[
            0
        ].replaced_count
        == 1
    )
    files.replace_contents([ContentReplaceEntry(path=path, old_content="def", new_content="y")])
    files.move_files([MoveEntry(src=path, dest=str(work / "dir" / "f.txt"))])
    assert files.read_file(str(work / "dir" / "f.txt")) == "x\ny\n"
    files.delete_files([str(work / "g.bin")])
    files.delete_directories([str(work / "dir")])
    assert files.list_directory(DirectoryListEntry(path=str(work))) == []
    assert sandbox_sync.is_healthy()


# -- contract: auth, bad input, metrics stream, bootstrap ------------------------------------


def test_access_token_is_required_when_configured(tmp_path: Path, server: ServerProcess) -> None:
    token = "s3cret-token"
    with run_execd(tmp_path, token=token) as proc:
        for headers in ({}, {"X-EXECD-ACCESS-TOKEN": "wrong"}):
            for method, path in (("GET", "/ping"), ("POST", "/command"), ("GET", "/files/info?path=/")):
                response = httpx.request(method, proc.url + path, headers=headers)
                assert response.status_code == 401
                assert response.json()["code"] == "UNAUTHORIZED" and response.json()["message"]
        assert httpx.get(proc.url + "/ping", headers={"X-EXECD-ACCESS-TOKEN": token}).status_code == 200

    # The server gives every jail's execd its own token and hands it out with the endpoint; the
    # SDK sends the endpoint's headers on every call.
    config = ConnectionConfigSync(domain=server.domain, protocol="http")
    sb = SandboxSync.create(server.image, connection_config=config)
    try:
        endpoint = sb.get_endpoint(44772)
        assert set(endpoint.headers) == {"X-EXECD-ACCESS-TOKEN"}
        assert httpx.get(f"http://{endpoint.endpoint}/ping").status_code == 401
        assert stdout(sb.commands.run("echo authed")) == ["authed"]
        sb.files.write_file("/tmp/t.txt", "t")
        assert sb.files.read_file("/tmp/t.txt") == "t"
    finally:
        sb.kill()
        sb.close()


BAD_REQUESTS = [
    ("POST", "/command", "not json", 400, "INVALID_REQUEST_BODY"),
    ("POST", "/command", {"command": ""}, 400, "INVALID_REQUEST_BODY"),
    ("POST", "/command", {"command": "true", "argv": ["true"]}, 400, "INVALID_REQUEST_BODY"),
    ("POST", "/command", {"command": "true", "timeout": "soon"}, 400, "INVALID_REQUEST_BODY"),
    ("POST", "/command", {"command": "true", "gid": 1}, 400, "INVALID_REQUEST_BODY"),
    ("POST", "/command", {"command": "true", "envs": {"1BAD": "x"}}, 400, "INVALID_REQUEST_BODY"),
    ("POST", "/command", {"command": "true", "cwd": "/no/such/dir"}, 400, "INVALID_REQUEST_BODY"),
    ("POST", "/command", {"command": "true", "cwd": "$UNDEFINED_VAR_X"}, 400, "INVALID_REQUEST_BODY"),
    ("DELETE", "/command", None, 400, "MISSING_QUERY"),
    ("DELETE", "/command?id=unknown", None, 404, "NOT_FOUND"),
    ("GET", "/command/status/unknown", None, 404, "NOT_FOUND"),
    ("GET", "/command/unknown/logs?cursor=0", None, 404, "NOT_FOUND"),
    ("POST", "/session/unknown/run", {"command": "true"}, 404, "NOT_FOUND"),
    ("DELETE", "/session/unknown", None, 404, "NOT_FOUND"),
    ("GET", "/files/info?path=/no/such/file", None, 404, "FILE_NOT_FOUND"),
    ("GET", "/files/info", None, 400, "MISSING_QUERY"),
    ("GET", "/files/download?path=/no/such/file", None, 404, "FILE_NOT_FOUND"),
    ("GET", "/files/download?path=/tmp", None, 400, "INVALID_FILE"),
    ("DELETE", "/files?path=/tmp", None, 400, "INVALID_FILE"),
    ("DELETE", "/files?path=/no/such/file", None, 404, "FILE_NOT_FOUND"),
    ("POST", "/files/permissions", {"/tmp": {"mode": 999}}, 400, "INVALID_REQUEST_BODY"),
    ("POST", "/files/permissions", {"/tmp": {"mode": 755, "owner": "no-such-user-x"}}, 400, "INVALID_FILE_METADATA"),
    ("POST", "/files/mv", [{"src": "/no/such/file", "dest": "/tmp/x"}], 404, "FILE_NOT_FOUND"),
    ("POST", "/files/mv", {"src": "a"}, 400, "INVALID_REQUEST_BODY"),
    ("POST", "/files/replace", {"/no/such/file": {"old": "a", "new": "b"}}, 404, "FILE_NOT_FOUND"),
    ("POST", "/files/replace", {"/tmp": {"old": "a", "new": "b"}}, 400, "INVALID_FILE"),
    ("GET", "/files/search?path=/no/such/dir", None, 404, "FILE_NOT_FOUND"),
    ("GET", "/directories/list?path=/tmp&depth=-1", None, 400, "INVALID_REQUEST_BODY"),
    ("GET", "/directories/list?path=/etc/hostname", None, 400, "INVALID_FILE"),
    ("DELETE", "/directories?path=/etc/hostname", None, 400, "INVALID_FILE"),
    ("POST", "/files/upload", b"plain body", 400, "INVALID_FILE"),
    ("POST", "/bootstrap", {"argv": []}, 400, "INVALID_REQUEST_BODY"),
    ("GET", "/no/such/route", None, 404, "NOT_FOUND"),
    ("PUT", "/command", None, 405, "METHOD_NOT_ALLOWED"),
    ("POST", "/code", {"code": ""}, 400, "INVALID_REQUEST_BODY"),
    ("GET", "/code/contexts/no-such-context", None, 404, "CONTEXT_NOT_FOUND"),
    ("POST", "/pty", {"command": ""}, 400, "INVALID_REQUEST_BODY"),
    ("GET", "/pty/no-such-terminal", None, 404, "SESSION_GONE"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "code"), BAD_REQUESTS)
def test_bad_input_gets_a_json_error(execd: Execd, method: str, path: str, body: Any, status: int, code: str) -> None:
    kwargs: dict[str, Any] = {}
    if isinstance(body, bytes):
        kwargs["content"] = body
    elif isinstance(body, str):
        kwargs["content"] = body.encode()
    elif body is not None:
        kwargs["json"] = body
    response = httpx.request(method, execd.url + path, **kwargs)
    assert response.status_code == status
    payload = response.json()
    assert payload["code"] == code and isinstance(payload["message"], str) and payload["message"]


@pytest.mark.parametrize("cwd", [False, 0, ["/tmp"], "/no/such/dir", "a\0b"])
def test_a_session_run_with_a_bad_cwd_is_a_400(execd: Execd, cwd: Any) -> None:
    session_id = httpx.post(f"{execd.url}/session", json={}).json()["session_id"]
    try:
        response = httpx.post(f"{execd.url}/session/{session_id}/run", json={"command": "true", "cwd": cwd})
        assert (response.status_code, response.json()["code"]) == (400, "INVALID_REQUEST_BODY")
    finally:
        httpx.delete(f"{execd.url}/session/{session_id}")


def test_range_outside_the_file_is_416(execd: Execd, tmp_path: Path) -> None:
    (tmp_path / "small").write_bytes(b"12345")
    params = {"path": str(tmp_path / "small")}
    response = httpx.get(f"{execd.url}/files/download", params=params, headers={"Range": "bytes=10-"})
    assert response.status_code == 416
    assert response.headers["content-range"] == "bytes */5"
    assert response.json()["code"] == "RANGE_NOT_SATISFIABLE"


def test_metrics_watch_streams_samples(execd: Execd) -> None:
    samples = []
    with httpx.Client(base_url=execd.url) as client, client.stream("GET", "/metrics/watch") as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                samples.append(json.loads(line[6:]))
                if len(samples) == 2:
                    break
    assert all(set(s) == {"cpu_count", "cpu_used_pct", "mem_total_mib", "mem_used_mib", "timestamp"} for s in samples)
    assert samples[1]["timestamp"] > samples[0]["timestamp"]


def test_bootstrap_sets_the_default_env_and_starts_the_main_process(tmp_path: Path) -> None:
    with run_execd(tmp_path) as proc, httpx.Client(base_url=proc.url) as client:
        marker = tmp_path / "main-ran"
        response = client.post(
            "/bootstrap",
            json={
                "env": {"POOL_VAR": "from-bootstrap"},
                "cwd": str(tmp_path / "app"),
                "argv": ["sh", "-c", f'echo "$POOL_VAR" > {marker}; exec sleep 3005'],
            },
        )
        assert response.status_code == 200 and isinstance(response.json()["pid"], int)
        wait_until(marker.exists, 5, "the main process")
        assert marker.read_text().strip() == "from-bootstrap"
        status = client.get("/bootstrap").json()
        assert status["running"] is True and status["env_keys"] == ["POOL_VAR"]

        raw = client.post("/command", json={"command": 'echo "$POOL_VAR"; pwd'}).content
        texts = [e.get("text") for e in sse_events(raw) if e["type"] == "stdout"]
        assert texts == ["from-bootstrap", str(tmp_path / "app")]

        again = client.post("/bootstrap", json={"argv": ["true"]})
        assert again.status_code == 409 and again.json()["code"] == "CONFLICT"


# -- the packaged executable in an image without Python --------------------------------------


def podman(*args: str, check: bool = True) -> str:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {result.stderr}")
    return result.stdout.strip()


def test_packaged_executable_in_an_image_without_python(tmp_path: Path, docker_host: str) -> None:
    """The upstream layout: an init step copies execd (one-dir: execd, execd-lib/) and bootstrap.sh
    into a shared volume, then the sandbox container (no Python in it) runs `bootstrap.sh
    <entrypoint>` as PID 1.

    `docker_host` makes sure podman is set up and the test image exists. `make test` builds the
    executable first; elsewhere a missing build is a skip, in CI a failure."""
    if not EXECD_BINARY.exists():
        message = f"{EXECD_BINARY} is not built: run tools/build-execd.sh (make execd-binary)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    tag = f"localhost/opensandbox-execd:e2e-{os.getpid()}"
    volume, name = f"osb-execd-{os.getpid()}", f"osb-execd-{os.getpid()}"
    port = free_port()
    podman(
        "build", "-q", "-f", "images/execd.Dockerfile", "--build-arg", f"BASE_IMAGE={TEST_IMAGE}", "-t", tag, str(ROOT)
    )
    try:
        podman("volume", "create", volume)
        mount = f"{volume}:/opt/opensandbox"
        podman(
            "run",
            "--rm",
            "--entrypoint",
            "/bin/sh",
            "-v",
            mount,
            tag,
            "-c",
            "cp -a ./. /opt/opensandbox/",
        )
        podman(
            "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:44772", "-v", mount,
            "-e", "EXECD=/opt/opensandbox/execd", TEST_IMAGE, "/opt/opensandbox/bootstrap.sh", "sleep", "1000",
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"

        def pinged() -> bool:
            try:
                return httpx.get(url + "/ping", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(pinged, 30, "execd in the container")
        probe = httpx.post(
            url + "/command",
            json={"command": "command -v python3 python || echo no-python; cat /proc/1/cmdline | tr '\\0' ' '"},
            timeout=30,
        )
        texts = [e.get("text") for e in sse_events(probe.content) if e["type"] == "stdout"]
        assert texts == ["no-python", "/bin/sh /opt/opensandbox/bootstrap.sh sleep 1000 "]
        upload = httpx.post(
            url + "/files/upload",
            files=[
                ("metadata", ("metadata", json.dumps({"path": "/tmp/in-container.txt"}), "application/json")),
                ("file", ("in-container.txt", b"hello", "application/octet-stream")),
            ],
        )
        assert upload.status_code == 200
        assert httpx.get(url + "/files/download", params={"path": "/tmp/in-container.txt"}).content == b"hello"

        # PID 1 reaps orphans that are re-parented to it (here: from a `podman exec`).
        podman("exec", name, "sh", "-c", "sleep 0.2 & exit 0")
        time.sleep(1)
        states = podman("exec", name, "sh", "-c", "cat /proc/[0-9]*/stat")
        assert not [line for line in states.splitlines() if line.rsplit(")", 1)[1].split()[0] == "Z"]

        # SIGTERM reaches the entrypoint, and the container stops long before podman's 10 s timeout.
        started = time.monotonic()
        podman("stop", "-t", "10", name)
        assert time.monotonic() - started < 5
        assert podman("inspect", name, "--format", "{{.State.ExitCode}}") == "143"
    finally:
        podman("rm", "-f", name, check=False)
        podman("volume", "rm", "-f", volume, check=False)
        podman("rmi", "-f", tag, check=False)
