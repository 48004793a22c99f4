"""Isolated sessions (OSEP-0013) through the official SDK (opensandbox 1.1.1, `sandbox.isolation`)
against our server and execd, on each runtime: a bubblewrap namespace inside the sandbox whose writes
land in copy-on-write overlays until they are committed.

The SDK exposes diff and commit only as generated stubs (`isolated_session_diff`,
`isolated_session_commit`, which send no body); they are called through the SDK's own generated
client. What the SDK has no call for (discard, a commit narrowed to paths, a log page smaller than
16 MiB, raw bad input) goes over plain HTTP to the same execd endpoint.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from opensandbox import Sandbox
from opensandbox.api.execd import Client
from opensandbox.api.execd.api.isolated_execution import isolated_session_commit, isolated_session_diff
from opensandbox.config import ConnectionConfig
from opensandbox.exceptions import SandboxApiException, SandboxException
from opensandbox.models.filesystem import MoveEntry, SearchEntry, WriteEntry
from opensandbox.models.isolated import (
    BindMount,
    CreateIsolatedSessionRequest,
    IsolatedOverlaySpec,
    IsolatedRunOpts,
    IsolatedWorkspaceSpec,
)

from harness.server_process import ServerProcess

EXECD_PORT = 44772
# Upstream's extension that turns on execd's bwrap isolation: a runtime whose hardening forbids user
# namespaces in a sandbox is asked to allow them for this one (docs/isolated-sessions.md).
ISOLATION = {"bootstrap.execd.isolation": "enable"}


@pytest.fixture
async def sandbox(server: ServerProcess) -> AsyncIterator[Sandbox]:
    config = ConnectionConfig(domain=server.domain, protocol="http", request_timeout=timedelta(seconds=60))
    sb = await Sandbox.create(
        server.image, connection_config=config, entrypoint=["tail", "-f", "/dev/null"], extensions=ISOLATION
    )
    yield sb
    await sb.kill()
    await sb.close()


@pytest.fixture
async def execd(sandbox: Sandbox) -> AsyncIterator[Client]:
    """The SDK's generated execd client, on the sandbox's execd endpoint (with its token)."""
    endpoint = await sandbox.get_endpoint(EXECD_PORT)
    client = Client(base_url=f"http://{endpoint.endpoint}", headers=dict(endpoint.headers), timeout=httpx.Timeout(60))
    async with client:
        yield client


@pytest.fixture
async def project(sandbox: Sandbox, request: pytest.FixtureRequest) -> str:
    """A real project directory in the sandbox: app.py, README, old.txt, lib/util.py."""
    path = f"/workspace/iso-{uuid.uuid4().hex[:8]}"
    await sh(
        sandbox,
        f"mkdir -p {path}/lib && cd {path} && printf 'print(1)\\n' > app.py && printf 'readme\\n' > README "
        f"&& printf 'old\\n' > old.txt && printf 'def f(): pass\\n' > lib/util.py",
    )
    return path


async def sh(sandbox: Sandbox, command: str) -> str:
    """A plain command in the sandbox (outside any session): the real filesystem."""
    execution = await sandbox.commands.run(command)
    assert execution.error is None, (command, execution.error, execution.logs.stderr)
    return "\n".join(m.text for m in execution.logs.stdout)


async def run(session: Any, code: str, timeout: int | None = None) -> tuple[int | None, str, str]:
    opts = IsolatedRunOpts(timeout_seconds=timeout) if timeout else None
    execution = await session.run(code, opts=opts)
    out = "\n".join(m.text for m in execution.logs.stdout)
    err = "\n".join(m.text for m in execution.logs.stderr)
    return execution.exit_code, out, err


async def diff(execd: Client, session_id: str) -> dict[str, Any]:
    response = await isolated_session_diff.asyncio_detailed(uuid.UUID(session_id), client=execd)
    assert response.status_code == 200, response.content
    result: dict[str, Any] = json.loads(response.content)
    return result


def changed(report: dict[str, Any]) -> dict[str, str]:
    return {c["path"]: c["kind"] for o in report["overlays"] for c in o.get("changes", [])}


async def raw(execd: Client, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return await execd.get_async_httpx_client().request(method, path, **kwargs)


async def commit_paths(execd: Client, session_id: str, paths: list[str]) -> httpx.Response:
    """Our commit narrowed to paths (the SDK's stub commits everything)."""
    return await raw(execd, "POST", f"/v1/isolated/session/{session_id}/commit", json={"paths": paths})


def workspace(path: str) -> CreateIsolatedSessionRequest:
    return CreateIsolatedSessionRequest(workspace=IsolatedWorkspaceSpec(path=path, mode="overlay"))


# -- capabilities -------------------------------------------------------------------------------


async def test_capabilities_are_measured_and_complete(sandbox: Sandbox, execd: Client, server: ServerProcess) -> None:
    caps = await sandbox.isolation.capabilities()
    assert caps.available, caps.message
    assert caps.isolator == "bubblewrap" and caps.version
    assert caps.diff_supported and caps.commit_supported and caps.userns_available and caps.setpriv_available
    assert caps.hardening is not None and caps.hardening.cap_drop is not None
    # Our fields beyond the SDK's model (which drops them): what was measured.
    extra = (await raw(execd, "GET", "/v1/isolated/capabilities")).json()
    assert extra["overlay"]["supported"] and extra["steps"]["overlay"] == "ok", extra
    # A new /proc cannot be mounted in a user namespace unless the sandbox's own is fully visible:
    # a container masks parts of it, and bwrap (the local jail) binds /proc/sys, /proc/irq, /proc/bus
    # read-only. The session then sees the sandbox's, read-only (see docs/isolated-sessions.md).
    assert extra["proc"] == "shared" and "cannot be mounted" in extra["message"], extra
    assert "Operation not permitted" in extra["steps"]["namespaces (private /proc: True)"]
    # Where execd's state is an overlayfs (a container's root), upper layers go to a private tmpfs.
    # (the local jail's state directory is on its /run tmpfs).
    expected = "the state directory (tmpfs)" if server.runtime == "local" else "a tmpfs of each session's"
    assert extra["overlay"]["upper"].startswith(expected), extra


async def test_a_sandbox_that_did_not_ask_cannot_make_namespaces(server: ServerProcess) -> None:
    """The runtimes' seccomp policy refuses user namespaces to a sandbox created without the
    extension: `capabilities` says so and why, and a create is a 503 naming the cause."""
    config = ConnectionConfig(domain=server.domain, protocol="http", request_timeout=timedelta(seconds=60))
    sandbox = await Sandbox.create(server.image, connection_config=config, entrypoint=["tail", "-f", "/dev/null"])
    try:
        caps = await sandbox.isolation.capabilities()
        assert not caps.available and caps.message is not None
        assert "unshare" in caps.message and "bootstrap.execd.isolation" in caps.message, caps.message
        with pytest.raises(SandboxApiException) as caught:
            await sandbox.isolation.create(workspace("/tmp"))
        assert caught.value.status_code == 503
    finally:
        await sandbox.kill()
        await sandbox.close()


# -- overlays, diff, commit -------------------------------------------------------------------------


async def test_writes_stay_in_the_overlay_until_commit(sandbox: Sandbox, execd: Client, project: str) -> None:
    home = (await sh(sandbox, "echo $HOME")).strip()  # `pip install --user` writes under it
    request = CreateIsolatedSessionRequest(
        workspace=IsolatedWorkspaceSpec(path=project, mode="overlay"),
        overlays=[IsolatedOverlaySpec(path=home, mode="overlay")],
        idle_timeout_seconds=600,
    )
    site, bin_ = f"{home}/.local/lib/python3/site-packages", f"{home}/.local/bin"
    async with sandbox.isolation.session(request) as session:
        assert session.info.workspace is not None and session.info.workspace.path == project
        code, out, err = await run(
            session,
            "pwd; echo 'print(2)' >> app.py; rm old.txt; echo new > new.txt; mkdir -p data && echo d > data/x; "
            # what `pip install --user fakepkg` leaves behind: a package, its metadata, an entry point
            f"mkdir -p {site}/fakepkg {site}/fakepkg-1.0.dist-info {bin_}; "
            f"echo 'VERSION = 1' > {site}/fakepkg/__init__.py; "
            f"printf 'Name: fakepkg\\n' > {site}/fakepkg-1.0.dist-info/METADATA; "
            f"printf '#!/bin/sh\\necho fake\\n' > {bin_}/fakepkg; chmod 755 {bin_}/fakepkg; "
            f"{bin_}/fakepkg; cat app.py",
        )
        assert code == 0, err
        assert out.splitlines() == [project, "fake", "print(1)", "print(2)"], err

        # The real files are untouched.
        real = await sh(sandbox, f"cd {project} && ls -a && cat app.py && ls -a {home}")
        assert "new.txt" not in real and "old.txt" in real and "print(2)" not in real and ".local" not in real

        report = await diff(execd, session.session_id)
        kinds = changed(report)
        assert kinds[f"{project}/app.py"] == "modified"
        assert kinds[f"{project}/old.txt"] == "deleted"
        assert kinds[f"{project}/new.txt"] == "added" and kinds[f"{project}/data/x"] == "added"
        assert kinds[f"{site}/fakepkg/__init__.py"] == "added" and kinds[f"{bin_}/fakepkg"] == "added"
        sizes = {c["path"]: c for o in report["overlays"] for c in o.get("changes", [])}
        assert sizes[f"{project}/app.py"]["size"] == 18 and sizes[f"{project}/app.py"]["previous_size"] == 9
        first, second = report["overlays"]
        assert first["path"] == project and first["summary"] == {"added": 3, "modified": 1, "deleted": 1}
        assert second["path"] == home and second["summary"]["added"] >= 8

        # Narrowed to the project (the SDK's own commit, without a body, applies everything).
        response = await commit_paths(execd, session.session_id, [project])
        assert response.status_code == 200, response.text
        result = response.json()
        assert not result["failed"], result
        assert {a["path"] for a in result["applied"]} == {
            f"{project}/app.py", f"{project}/old.txt", f"{project}/new.txt", f"{project}/data", f"{project}/data/x"
        }  # fmt: skip
        real = await sh(sandbox, f"cd {project} && ls -a && cat app.py new.txt data/x")
        assert "old.txt" not in real and "print(2)" in real and "new" in real and "d" in real.splitlines()
        # Committed changes are no longer changes; the home's still are (and stay out of the real home).
        kinds = changed(await diff(execd, session.session_id))
        assert not any(path.startswith(project) for path in kinds) and f"{bin_}/fakepkg" in kinds
        assert ".local" not in await sh(sandbox, f"ls -a {home}")

        # The session goes on seeing its files; a shell error message is output like any other.
        code, out, err = await run(session, "cat app.py new.txt; echo x > /proc/nope")
        assert (code, out) == (1, "print(1)\nprint(2)\nnew") and "/proc/nope" in err


async def test_an_overlay_of_the_whole_root(sandbox: Sandbox, execd: Client, project: str) -> None:
    """`/` holds mount points (a container's /etc/hosts, a jail's host directories): the kernel
    refuses an overlay of it in a user namespace, so execd copies its top level and overlays each
    directory; the session sees one copy-on-write root either way."""
    request = CreateIsolatedSessionRequest(overlays=[IsolatedOverlaySpec(path="/")])
    async with sandbox.isolation.session(request) as session:
        code, out, _ = await run(
            session,
            "echo conf > /etc/osb-session.conf && mkdir -p /var/lib/osb && echo x > /var/lib/osb/x "
            f"&& echo y >> {project}/README && rm {project}/old.txt && mkdir /osb-top && cat /etc/osb-session.conf",
        )
        assert (code, out) == (0, "conf")
        kinds = changed(await diff(execd, session.session_id))
        assert kinds["/etc/osb-session.conf"] == "added" and kinds["/var/lib/osb/x"] == "added"
        assert kinds[f"{project}/README"] == "modified" and kinds[f"{project}/old.txt"] == "deleted"
        assert kinds["/osb-top"] == "added"
        real = await sh(sandbox, f"ls /etc/osb-session.conf /var/lib/osb /osb-top {project}/old.txt 2>&1; true")
        assert "No such file" in real and f"{project}/old.txt" in real.splitlines()[-1]
        # the session's /tmp is still its own
        assert (await run(session, "ls -A /tmp | wc -l"))[1] == "0"


async def test_sdk_commit_applies_everything_and_reports_it(sandbox: Sandbox, execd: Client, project: str) -> None:
    session = await sandbox.isolation.create(workspace(project))
    try:
        await run(session, "echo more >> README && ln -s app.py link && mkdir -p pkg && echo 1 > pkg/m.py")
        response = await isolated_session_commit.asyncio_detailed(uuid.UUID(session.session_id), client=execd)
        assert response.status_code == 200, response.content
        result = json.loads(response.content)
        assert result["summary"] == {"added": 3, "modified": 1, "deleted": 0} and not result["failed"]
        real = await sh(sandbox, f"cd {project} && cat README && readlink link && cat pkg/m.py")
        assert real == "readme\nmore\napp.py\n1"
        assert changed(await diff(execd, session.session_id)) == {}
    finally:
        await session.delete()


async def test_the_copy_fallback_where_overlayfs_is_missing(server: ServerProcess) -> None:
    """Without overlayfs in a user namespace (a kernel before 5.11), a session's copy-on-write layers
    are copies of their trees; `EXECD_ISOLATED_METHOD=copy` makes execd use them here."""
    config = ConnectionConfig(domain=server.domain, protocol="http", request_timeout=timedelta(seconds=60))
    sandbox = await Sandbox.create(
        server.image, connection_config=config, entrypoint=["tail", "-f", "/dev/null"],
        env={"EXECD_ISOLATED_METHOD": "copy"}, extensions=ISOLATION,
    )  # fmt: skip
    try:
        project = "/workspace/copy-fallback"
        await sh(sandbox, f"mkdir -p {project}/sub && echo a > {project}/a.txt && echo s > {project}/sub/s.txt")
        endpoint = await sandbox.get_endpoint(EXECD_PORT)
        async with Client(base_url=f"http://{endpoint.endpoint}", headers=dict(endpoint.headers)) as execd:
            caps = (await raw(execd, "GET", "/v1/isolated/capabilities")).json()
            assert caps["commit_supported"] and caps["overlay"]["method"] == "copies of the trees", caps
            session = await sandbox.isolation.create(workspace(project))
            await run(session, "echo b > b.txt; rm a.txt; echo more >> sub/s.txt")
            await sh(sandbox, f"echo later > {project}/later.txt")  # a real change meanwhile is no deletion
            assert changed(await diff(execd, session.session_id)) == {
                f"{project}/a.txt": "deleted", f"{project}/b.txt": "added", f"{project}/sub/s.txt": "modified"
            }  # fmt: skip
            assert await sh(sandbox, f"ls {project}") == "a.txt\nlater.txt\nsub"
            response = await isolated_session_commit.asyncio_detailed(uuid.UUID(session.session_id), client=execd)
            assert response.status_code == 200 and not json.loads(response.content)["failed"]
            assert await sh(sandbox, f"ls {project}; cat {project}/sub/s.txt") == "b.txt\nlater.txt\nsub\ns\nmore"
            assert changed(await diff(execd, session.session_id)) == {}
            await session.delete()
    finally:
        await sandbox.kill()
        await sandbox.close()


async def test_discard_leaves_the_real_workspace_untouched(sandbox: Sandbox, execd: Client, project: str) -> None:
    session = await sandbox.isolation.create(workspace(project))
    try:
        await run(session, "export KEPT=no; rm -rf lib; echo junk > junk.txt; mkdir sub; cd sub")
        expected = {f"{project}/lib", f"{project}/junk.txt", f"{project}/sub"}
        assert set(changed(await diff(execd, session.session_id))) == expected
        response = await raw(execd, "POST", f"/v1/isolated/session/{session.session_id}/commit?discard=true")
        assert response.status_code == 200 and response.json()["discarded"] is True, response.text
        assert changed(await diff(execd, session.session_id)) == {}
        assert await sh(sandbox, f"cd {project} && ls") == "README\napp.py\nlib\nold.txt"
        # The session goes on over the real content (its shell restarted: variables are gone).
        code, out, _ = await run(session, "ls; cat lib/util.py; echo kept=${KEPT:-unset}")
        assert code == 0 and out.splitlines() == ["README", "app.py", "lib", "old.txt", "def f(): pass", "kept=unset"]
    finally:
        await session.delete()
    # Deleting a session without a commit discards its changes too.
    assert await sh(sandbox, f"cd {project} && ls") == "README\napp.py\nlib\nold.txt"


async def test_two_sessions_do_not_see_each_other(sandbox: Sandbox, execd: Client, project: str) -> None:
    a = await sandbox.isolation.create(workspace(project))
    b = await sandbox.isolation.create(workspace(project))
    try:
        await run(a, "echo from-a > a.txt && echo a >> README")
        await run(b, "echo from-b > b.txt && rm app.py")
        seen_by_a = (await run(a, "ls; cat README"))[1].splitlines()
        assert seen_by_a == ["README", "a.txt", "app.py", "lib", "old.txt", "readme", "a"]
        assert (await run(b, "ls; cat README"))[1].splitlines() == ["README", "b.txt", "lib", "old.txt", "readme"]
        assert set(changed(await diff(execd, a.session_id))) == {f"{project}/a.txt", f"{project}/README"}
        assert set(changed(await diff(execd, b.session_id))) == {f"{project}/b.txt", f"{project}/app.py"}
        # Nor through the files API.
        with pytest.raises(SandboxException):
            await b.files.read_file(f"{project}/a.txt")
        listed = {s.session_id: s.status for s in await sandbox.isolation.list()}
        assert listed[a.session_id] == listed[b.session_id] == "active"
    finally:
        await a.delete()
        await b.delete()


async def test_files_api_works_inside_the_session(sandbox: Sandbox, execd: Client, project: str) -> None:
    session = await sandbox.isolation.create(workspace(project))
    try:
        files = session.files
        await files.write_files([WriteEntry(path=f"{project}/notes/todo.md", data="- ship\n", mode=640)])
        assert await files.read_file(f"{project}/notes/todo.md") == "- ship\n"
        assert (await run(session, "cat notes/todo.md; stat -c %a notes/todo.md"))[1] == "- ship\n640"
        await run(session, "echo made-by-code > code.txt")
        assert await files.read_file(f"{project}/code.txt") == "made-by-code\n"
        await files.move_files([MoveEntry(src=f"{project}/code.txt", dest=f"{project}/lib/code.txt")])
        found = {e.path for e in await files.search(SearchEntry(path=project, pattern="*.txt"))}
        assert found == {f"{project}/old.txt", f"{project}/lib/code.txt"}
        await files.delete_files([f"{project}/old.txt"])
        info = await files.get_file_info([f"{project}/lib/code.txt"])
        assert info[f"{project}/lib/code.txt"].size == len("made-by-code\n")
        listed = (await run(session, "ls; ls lib"))[1].splitlines()
        assert listed == ["README", "app.py", "lib", "notes", "code.txt", "util.py"]
        # All of it in the overlay only.
        assert await sh(sandbox, f"cd {project} && ls -R") == ".:\nREADME\napp.py\nlib\nold.txt\n\n./lib:\nutil.py"
        kinds = changed(await diff(execd, session.session_id))
        assert kinds[f"{project}/old.txt"] == "deleted" and kinds[f"{project}/notes/todo.md"] == "added"
    finally:
        await session.delete()


# -- runs -------------------------------------------------------------------------------------------


async def test_shell_state_timeouts_and_exit(sandbox: Sandbox, project: str) -> None:
    session = await sandbox.isolation.create(workspace(project))
    try:
        assert (await run(session, "cd lib; export X=1; f() { echo func; }"))[0] == 0
        assert (await run(session, "pwd; echo $X; f"))[1] == f"{project}/lib\n1\nfunc"
        execution = await session.run("echo $Y", opts=IsolatedRunOpts(envs={"Y": "from-envs"}))
        assert execution.logs.stdout[0].text == "from-envs"
        started = time.monotonic()
        code, _, _ = await run(session, "sleep 30", timeout=1)
        assert code not in (0, None) and time.monotonic() - started < 10
        assert (await run(session, "exit 7"))[0] == 7
        # A new shell, in the last directory.
        assert (await run(session, "pwd"))[1] == f"{project}/lib"
        state = await session.get()
        assert state.status == "active" and state.workspace is not None
    finally:
        await session.delete()


async def test_a_client_that_leaves_mid_run_does_not_wedge_the_session(sandbox: Sandbox, project: str) -> None:
    session = await sandbox.isolation.create(workspace(project))
    try:
        with pytest.raises(TimeoutError):  # the SDK's stream is closed: execd sees it at its next write
            await asyncio.wait_for(session.run("trap '' INT; echo start; sleep 60; echo never"), 1.5)
        started = time.monotonic()
        code, out, _ = await run(session, "echo after")
        assert (code, out) == (0, "after")  # nothing of the abandoned run, which was stopped
        assert time.monotonic() - started < 20
    finally:
        await session.delete()


async def test_background_run_logs_are_paged(sandbox: Sandbox, execd: Client, project: str) -> None:
    session = await sandbox.isolation.create(workspace(project))
    try:
        # ~190 KB in 2,000 lines over ~1 s, then an exit code.
        handle = await session.run_background(
            f"for i in $(seq 1 2000); do printf 'line %05d %s\\n' $i {'x' * 78}; "
            "[ $((i % 200)) -eq 0 ] && sleep 0.1; done; echo done >&2; exit 3"
        )
        pages, cursor = [], 0
        deadline = time.monotonic() + 60
        while True:
            status = await session.run_status(handle.run_id)
            logs = await session.run_logs(handle.run_id, cursor=cursor)
            if logs.text:
                pages.append(logs.text)
            cursor = logs.cursor
            if not status.running and not logs.text:
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert status.exit_code == 3 and status.finished_at is not None
        text = "".join(pages)
        lines = text.splitlines()
        assert lines[0].startswith("line 00001 ") and lines[1999].startswith("line 02000 ") and lines[-1] == "done"
        assert len(pages) > 1, "the run was still writing while the first pages were read"
        # Smaller pages through the raw route (?limit=): the same bytes, in order.
        path = f"/v1/isolated/session/{session.session_id}/runs/{handle.run_id}/logs"
        collected, cursor = b"", 0
        while True:
            response = await raw(execd, "GET", path, params={"cursor": cursor, "limit": 65536})
            assert response.status_code == 200
            if not response.content:
                break
            assert len(response.content) <= 65536
            collected += response.content
            cursor = int(response.headers["EXECD-ISOLATED-TAIL-CURSOR"])
        assert collected.decode() == text and cursor == len(text.encode())
    finally:
        await session.delete()


async def test_a_run_log_keeps_16_mib(sandbox: Sandbox, project: str) -> None:
    session = await sandbox.isolation.create(workspace(project))
    try:
        handle = await session.run_background("head -c 17825792 /dev/zero | tr '\\0' x; echo; echo end")
        deadline = time.monotonic() + 60
        while (status := await session.run_status(handle.run_id)).running:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        assert status.exit_code == 0
        logs = await session.run_logs(handle.run_id)
        assert len(logs.text) == 16 * 1024 * 1024 and logs.cursor == 16 * 1024 * 1024
        assert set(logs.text) == {"x"}  # the first 16 MiB; the rest was read and dropped
        assert (await session.run_logs(handle.run_id, cursor=logs.cursor)).text == ""
    finally:
        await session.delete()


async def test_idle_timeout_reaps_a_session(sandbox: Sandbox, project: str) -> None:
    request = workspace(project)
    request.idle_timeout_seconds = 2
    session = await sandbox.isolation.create(request)
    # A background run keeps it alive while it runs.
    run_handle = await session.run_background("sleep 3")
    await asyncio.sleep(2.5)
    assert (await session.get()).status == "active"
    assert (await session.run_status(run_handle.run_id)).running
    deadline = time.monotonic() + 15
    while (await session.get()).status == "active":
        assert time.monotonic() < deadline, "the idle session was not reaped"
        await asyncio.sleep(0.5)
    state = await session.get()
    assert state.status == "destroyed"
    with pytest.raises(SandboxApiException) as caught:
        await session.run("true")
    assert caught.value.status_code == 404
    assert {s.session_id: s.status for s in await sandbox.isolation.list()}[session.session_id] == "destroyed"


async def test_uid_in_a_user_namespace(sandbox: Sandbox, project: str) -> None:
    request = workspace(project)
    request.uid, request.gid, request.uid_mode = 1000, 1000, "userns"
    async with sandbox.isolation.session(request) as session:
        assert (await run(session, "id -u; id -g"))[1] == "1000\n1000"
    request.uid_mode = "setpriv"  # a real identity switch needs privileges execd does not have here
    with pytest.raises(SandboxApiException) as caught:
        await sandbox.isolation.create(request)
    assert caught.value.status_code == 503


async def test_binds_and_env_passthrough(sandbox: Sandbox, project: str) -> None:
    await sh(sandbox, f"mkdir -p {project}-shared && echo shared > {project}-shared/s.txt")
    request = CreateIsolatedSessionRequest(
        workspace=IsolatedWorkspaceSpec(path=project),
        binds=[BindMount(source=f"{project}-shared", dest="/tmp/shared", readonly=True)],
        extra_writable=[f"{project}/lib"],
        env_passthrough={"mode": "allow", "keys": ["PATH"]},
        share_net=False,
    )
    async with sandbox.isolation.session(request) as session:
        code, out, _ = await run(
            session, "cat /tmp/shared/s.txt; echo direct > lib/direct.txt; env | cut -d= -f1 | sort | tr '\\n' ' '"
        )
        assert code == 0 and out.splitlines()[0] == "shared"
        assert set(out.splitlines()[1].split()) <= {"PATH", "PWD", "SHLVL", "_", "OLDPWD"}
        assert (await run(session, "echo x > /tmp/shared/no"))[0] != 0  # read-only
    # extra_writable is the real directory: written through.
    assert await sh(sandbox, f"cat {project}/lib/direct.txt") == "direct"


# -- bad input ---------------------------------------------------------------------------------------


async def test_bad_input_is_a_4xx_with_code_and_message(sandbox: Sandbox, execd: Client, project: str) -> None:
    cases: list[tuple[str, str, Any, int]] = [
        ("POST", "/v1/isolated/session", {}, 400),
        ("POST", "/v1/isolated/session", {"workspace": {"path": "relative"}}, 400),
        ("POST", "/v1/isolated/session", {"workspace": {"path": project + "/../etc"}}, 400),
        ("POST", "/v1/isolated/session", {"workspace": {"path": "/proc"}}, 400),
        ("POST", "/v1/isolated/session", {"workspace": {"path": project, "mode": "bogus"}}, 400),
        ("POST", "/v1/isolated/session", {"overlays": [{"path": project, "mode": "rw", "persist": True}]}, 400),
        ("POST", "/v1/isolated/session", {"overlays": [{"path": project}, {"path": project}]}, 400),
        ("POST", "/v1/isolated/session", {"workspace": {"path": project + "/missing"}}, 400),
        ("POST", "/v1/isolated/session", {"workspace": {"path": project}, "uid": -1, "uid_mode": "userns"}, 400),
        ("POST", "/v1/isolated/session", {"workspace": {"path": project}, "idle_timeout_seconds": "x"}, 400),
        ("POST", "/v1/isolated/session", "not an object", 400),
        ("GET", f"/v1/isolated/session/{uuid.uuid4()}", None, 404),
        ("POST", f"/v1/isolated/session/{uuid.uuid4()}/run", {"code": "true"}, 404),
        ("GET", f"/v1/isolated/session/{uuid.uuid4()}/diff", None, 404),
    ]
    for method, path, body, status in cases:
        response = await raw(execd, method, path, json=body)
        assert response.status_code == status, (method, path, body, response.text)
        payload = response.json()
        assert set(payload) == {"code", "message"} and payload["message"], payload
        assert "Traceback" not in response.text
    session = await sandbox.isolation.create(workspace(project))
    try:
        base = f"/v1/isolated/session/{session.session_id}"
        for method, path, body, status in [
            ("POST", f"{base}/run", {"code": ""}, 400),
            ("POST", f"{base}/run", {"code": "true", "timeout_seconds": -1}, 400),
            ("POST", f"{base}/run", {"code": "true", "envs": {"1BAD": "x"}}, 400),
            ("GET", f"{base}/runs/{uuid.uuid4()}", None, 404),
            ("POST", f"{base}/commit", {"paths": "x"}, 400),
            ("GET", f"{base}/files/download?path=relative", None, 400),
            ("GET", f"{base}/files/download?path={project}/nope", None, 404),
            ("GET", f"{base}/files/info", None, 400),
            ("DELETE", f"{base}/directories?path=/", None, 400),
        ]:
            response = await raw(execd, method, path, json=body)
            assert response.status_code == status, (method, path, body, response.text)
            assert set(response.json()) == {"code", "message"}
        response = await raw(execd, "GET", f"{base}/runs/x/logs", params={"cursor": "-1"})
        assert response.status_code in (400, 404)
    finally:
        await session.delete()


# -- hostile code -----------------------------------------------------------------------------------


async def test_session_code_cannot_escape_its_overlay(
    sandbox: Sandbox, execd: Client, project: str, server: ServerProcess
) -> None:
    victim = f"{project}-victim"  # a real directory next to the session's overlay
    await sh(sandbox, f"mkdir -p {victim} && echo intact > {victim}/file")
    session = await sandbox.isolation.create(workspace(project))
    try:
        _, out, _ = await run(
            session,
            # `..` out of the overlay: the rest of the sandbox is read-only in a session.
            f"echo x > ../escape-dotdot 2>/dev/null; echo x > {victim}/file 2>/dev/null; "
            # symlinks pointing out of the overlay, written through
            f"ln -s {victim} out; echo x > out/file 2>/dev/null; ln -s {victim}/file f; echo x > f 2>/dev/null; "
            # the real workspace through another process's root (or cwd) in /proc
            f"for p in /proc/[0-9]*; do echo pwned > $p/root{project}/pwned-$(basename $p) 2>/dev/null; "
            f"echo pwned > $p/cwd/pwned-cwd-$(basename $p) 2>/dev/null; done; "
            # signals to what is outside: PID 1 of the session is its own; kill -9 -1 stays inside
            "kill -9 1 2>/dev/null; echo survived",
        )
        assert "survived" in out
        # Nothing reached the real files.
        real = await sh(sandbox, f"ls -a {project} /workspace; cat {victim}/file")
        assert "pwned" not in real and "escape-dotdot" not in real and real.endswith("intact")
        # The files API resolves symlinks and `..` inside the session too.
        for target in (f"{project}/out/file", f"{project}/f", f"{project}/../{victim.rsplit('/', 1)[1]}/file"):
            with pytest.raises(SandboxException):
                await session.files.write_file(target, "via-api")
        assert await sh(sandbox, f"cat {victim}/file") == "intact"
        # The commit recreates a symlink as a symlink; it never writes through one.
        response = await commit_paths(execd, session.session_id, [project])
        assert response.status_code == 200, response.text
        assert await sh(sandbox, f"readlink {project}/out; cat {victim}/file") == f"{victim}\nintact"
        # kill -9 -1 ends every process of the session but its first: the session lives on.
        await run(session, "kill -9 -1")
        assert (await run(session, "echo alive"))[1] == "alive"
        # execd's own state (other sessions' layers, logs) is not visible in a session.
        assert (await run(session, "ls /dev/.osb | grep -v '^r-' | wc -l"))[1] == "0"
    finally:
        await session.delete()
    assert (await sandbox.commands.run("echo healthy")).logs.stdout[0].text == "healthy"


async def test_sessions_and_runs_cannot_be_exhausted(sandbox: Sandbox, execd: Client, project: str) -> None:
    caps = (await raw(execd, "GET", "/v1/isolated/capabilities")).json()
    limit = caps["max_sessions"]
    sessions = []
    try:
        for _ in range(limit):
            sessions.append(await sandbox.isolation.create(workspace(project)))
        response = await raw(execd, "POST", "/v1/isolated/session", json={"workspace": {"path": project}})
        assert response.status_code == 429 and response.json()["code"] == "TOO_MANY_SESSIONS", response.text
        first = sessions[0]
        for _ in range(16):
            await first.run_background("sleep 30")
        with pytest.raises(SandboxApiException) as caught:
            await first.run_background("sleep 30")
        assert caught.value.status_code == 429
    finally:
        for session in sessions:
            await session.delete()
    # execd is fine: commands, a new session.
    assert (await sandbox.commands.run("echo healthy")).logs.stdout[0].text == "healthy"
    async with sandbox.isolation.session(workspace(project)) as session:
        assert (await run(session, "echo ok"))[1] == "ok"
