"""`opensandbox-code-interpreter` 1.1.1, unmodified, against our execd's `/code` on each runtime:
real Jupyter kernels (ipykernel, bash_kernel) in sandboxes the server created."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from code_interpreter import CodeInterpreter, CodeInterpreterSync
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from opensandbox import Sandbox
from opensandbox.exceptions import SandboxApiException, SandboxException
from opensandbox.models.execd import ExecutionHandlers, ExecutionInit, OutputMessage

from harness.server_process import ServerProcess
from tests.e2e.code_support import (
    RawExecd,
    assert_error_body,
    config,
    connected,
    context,
    create_sync,
    fresh_interpreter,
    has_bash_kernel,
)


def result_texts(execution: Any) -> list[str]:
    return [r.text for r in execution.result]


async def test_create_then_state_carries_over(server: ServerProcess) -> None:
    # CodeInterpreter.create with the SDK's strict health check: the readiness port must open.
    async with fresh_interpreter(server) as interpreter:
        first = await interpreter.codes.run("x = 41")
        assert first.error is None and first.complete is not None
        second = await interpreter.codes.run("x + 1")
        assert result_texts(second) == ["42"]
        assert second.id == first.id  # the default Python context, by its id
        assert second.execution_count == (first.execution_count or 0) + 1
        listed = await interpreter.codes.list_contexts("python")
        assert [c.id for c in listed] == [first.id]


async def test_print_output_streamed_in_order(server: ServerProcess, shared_sandbox: str) -> None:
    seen: list[OutputMessage] = []

    async def on_stdout(message: OutputMessage) -> None:
        seen.append(message)

    async with connected(server, shared_sandbox) as interpreter, context(interpreter) as ctx:
        execution = await interpreter.codes.run(
            "for i in range(10000):\n    print(f'line {i}')",
            context=ctx,
            handlers=ExecutionHandlers(on_stdout=on_stdout),
        )
    assert execution.error is None and execution.complete is not None
    assert "".join(m.text for m in seen) == "".join(f"line {i}\n" for i in range(10000))
    assert all(not m.is_error for m in seen)
    assert [m.timestamp for m in seen] == sorted(m.timestamp for m in seen)


async def test_matplotlib_figure_comes_back_as_png(server: ServerProcess, shared_sandbox: str) -> None:
    code = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [4, 1, 9])\nplt.title('e2e')\nplt.show()"
    async with connected(server, shared_sandbox) as interpreter, context(interpreter) as ctx:
        execution = await interpreter.codes.run(code, context=ctx)  # the SDK keeps text/plain only
        assert execution.error is None
        assert any("Figure" in (t or "") for t in result_texts(execution))
        raw = await RawExecd.of(interpreter)
        events = await raw.events({"code": code, "context": {"id": ctx.id, "language": "python"}})
    results = [e["results"] for e in events if e["type"] == "result"]
    assert len(results) == 1 and set(results[0]) >= {"text", "image/png"}
    assert base64.b64decode(results[0]["image/png"]).startswith(b"\x89PNG\r\n\x1a\n")
    assert events[-1]["type"] == "execution_complete"


async def test_rich_results_keep_their_mime_types(server: ServerProcess, shared_sandbox: str) -> None:
    code = (
        "from IPython.display import display, HTML, JSON\n"
        "display(HTML('<b>bold</b>'))\n"
        "display(JSON({'a': [1, 2]}))\n"
        "{'k': 1}"
    )
    async with connected(server, shared_sandbox) as interpreter, context(interpreter) as ctx:
        raw = await RawExecd.of(interpreter)
        events = await raw.events({"code": code, "context": {"id": ctx.id, "language": "python"}})
    results = [e["results"] for e in events if e["type"] == "result"]
    assert results[0]["text/html"] == "<b>bold</b>"
    assert results[1]["application/json"] == {"a": [1, 2]}
    assert results[2] == {"text": "{'k': 1}"}
    counts = [e for e in events if e["type"] == "execution_count"]
    assert len(counts) == 1 and counts[0]["execution_count"] >= 1
    assert events[0]["type"] == "init"


async def test_exception_gives_traceback_and_context_survives(server: ServerProcess, shared_sandbox: str) -> None:
    async with connected(server, shared_sandbox) as interpreter, context(interpreter) as ctx:
        await interpreter.codes.run("kept = 'still here'", context=ctx)
        failed = await interpreter.codes.run("def f():\n    return 1 / 0\nf()", context=ctx)
        assert failed.error is not None and failed.complete is None
        assert failed.error.name == "ZeroDivisionError"
        assert failed.error.value == "division by zero"
        assert any("return 1 / 0" in line for line in failed.error.traceback)
        assert not any("\x1b[" in line for line in failed.error.traceback)  # no terminal colours
        after = await interpreter.codes.run("kept", context=ctx)
        assert result_texts(after) == ["'still here'"]


async def test_sleep_interrupted_within_a_second_and_context_alive(server: ServerProcess, shared_sandbox: str) -> None:
    started = asyncio.Event()

    async def on_init(init: ExecutionInit) -> None:
        started.set()

    async with connected(server, shared_sandbox) as interpreter, context(interpreter) as ctx:
        await interpreter.codes.run("before = 7", context=ctx)
        handlers = ExecutionHandlers(on_init=on_init)
        run = asyncio.create_task(interpreter.codes.run("import time\ntime.sleep(60)", context=ctx, handlers=handlers))
        await asyncio.wait_for(started.wait(), 30)
        await asyncio.sleep(0.3)  # the kernel is inside time.sleep
        assert ctx.id is not None
        asked = time.monotonic()
        await interpreter.codes.interrupt(ctx.id)
        execution = await asyncio.wait_for(run, 10)
        assert time.monotonic() - asked < 1.0
        assert execution.error is not None and execution.error.name == "KeyboardInterrupt"
        assert execution.id == ctx.id
        after = await interpreter.codes.run("before * 6", context=ctx)
        assert result_texts(after) == ["42"]
        await interpreter.codes.interrupt(ctx.id)  # nothing runs: a no-op


async def test_two_contexts_do_not_share_variables(server: ServerProcess, shared_sandbox: str) -> None:
    async with (
        connected(server, shared_sandbox) as interpreter,
        context(interpreter) as one,
        context(interpreter) as two,
    ):
        await interpreter.codes.run("secret = 'one'", context=one)
        other = await interpreter.codes.run("secret", context=two)
        assert other.error is not None and other.error.name == "NameError"
        mine = await interpreter.codes.run("secret", context=one)
        assert result_texts(mine) == ["'one'"]
        fetched = await interpreter.codes.get_context(two.id or "")
        assert fetched.id == two.id and fetched.language == "python"


async def test_bash_context_keeps_cd_and_exports(server: ServerProcess, shared_sandbox: str) -> None:
    async with connected(server, shared_sandbox) as interpreter:
        if not has_bash_kernel(server):
            with pytest.raises(SandboxApiException) as raised:
                await interpreter.codes.create_context("bash")
            assert raised.value.status_code == 400
            assert "python" in str(raised.value)  # names the languages that do exist
            return
        async with context(interpreter, "bash") as ctx:
            await interpreter.codes.run("cd /tmp && mkdir -p ci-bash && cd ci-bash\nexport GREETING=hello", context=ctx)
            shown = await interpreter.codes.run('echo "$PWD $GREETING"', context=ctx)
            assert "".join(m.text for m in shown.logs.stdout).strip() == "/tmp/ci-bash hello"
            failed = await interpreter.codes.run("false", context=ctx)
            assert failed.error is not None
            assert ctx.language == "bash"


async def test_javascript_and_typescript(server: ServerProcess, shared_sandbox: str) -> None:
    async with connected(server, shared_sandbox) as interpreter:
        if server.runtime != "docker":  # only the code-interpreter image has tslab's kernels
            with pytest.raises(SandboxApiException) as raised:
                await interpreter.codes.create_context("javascript")
            assert raised.value.status_code == 400
            return
        async with context(interpreter, "javascript") as js:
            await interpreter.codes.run("const base = 20;", context=js)
            shown = await interpreter.codes.run("console.log('js says', base * 2 + 2)", context=js)
            assert "".join(m.text for m in shown.logs.stdout).strip() == "js says 42"
            failed = await interpreter.codes.run("throw new Error('js-error')", context=js)
            assert failed.error is not None and failed.complete is None
            assert "js-error" in "".join(m.text for m in failed.logs.stderr)  # tslab reports it there
        async with context(interpreter, "typescript") as ts:
            typed = await interpreter.codes.run("const n: number = 6 * 7;\nconsole.log(n)", context=ts)
            assert "".join(m.text for m in typed.logs.stdout).strip() == "42"
            wrong = await interpreter.codes.run("const s: string = 42;", context=ts)  # a type error
            assert wrong.error is not None


async def test_killed_kernel_gives_clear_error_then_fresh_kernel(server: ServerProcess, shared_sandbox: str) -> None:
    async with connected(server, shared_sandbox) as interpreter, context(interpreter) as ctx:
        await interpreter.codes.run("lost = 1", context=ctx)
        died = await interpreter.codes.run("import os\nos._exit(3)", context=ctx)
        assert died.error is not None and died.error.name == "KernelDied"
        assert "exited with status 3" in died.error.value and "fresh kernel" in died.error.value
        fresh = await interpreter.codes.run("'lost' in globals()", context=ctx)
        assert result_texts(fresh) == ["False"]
        assert fresh.complete is not None


async def test_unknown_language_is_a_4xx_naming_the_languages(server: ServerProcess, shared_sandbox: str) -> None:
    async with connected(server, shared_sandbox) as interpreter:
        with pytest.raises(SandboxApiException) as raised:
            await interpreter.codes.create_context("cobol")
        assert raised.value.status_code == 400
        assert "cobol" in str(raised.value) and "python" in str(raised.value)
        with pytest.raises(SandboxException) as run_raised:
            await interpreter.codes.run("1", language="cobol")
        assert "UNSUPPORTED_LANGUAGE" in str(run_raised.value)


async def test_context_management(server: ServerProcess, shared_sandbox: str) -> None:
    async with connected(server, shared_sandbox) as interpreter:
        codes = interpreter.codes
        one = await codes.create_context("python")
        two = await codes.create_context("python")
        ids = {c.id for c in await codes.list_contexts("python")}
        assert {one.id, two.id} <= ids
        await codes.delete_context(one.id or "")
        assert one.id not in {c.id for c in await codes.list_contexts("python")}
        with pytest.raises(SandboxApiException) as raised:
            await codes.get_context(one.id or "")
        assert raised.value.status_code == 404
        await codes.delete_contexts("python")
        assert await codes.list_contexts("python") == []
        ran = await codes.run("2 ** 10")  # a new default context after the bulk delete
        assert result_texts(ran) == ["1024"]
        await codes.delete_contexts("python")


def test_sync_client(server: ServerProcess) -> None:
    sandbox = create_sync(server)
    try:
        interpreter = CodeInterpreterSync.create(sandbox)
        codes = interpreter.codes
        ctx = codes.create_context("python")
        codes.run("x = 41", context=ctx)
        assert result_texts(codes.run("x + 1", context=ctx)) == ["42"]
        assert [c.id for c in codes.list_contexts("python")] == [ctx.id]
        assert codes.get_context(ctx.id or "").language == "python"
        failed = codes.run("raise ValueError('sync')", context=ctx)
        assert failed.error is not None and failed.error.value == "sync"
        codes.interrupt(ctx.id or "")
        codes.delete_context(ctx.id or "")
        assert codes.list_contexts("python") == []
        interpreter.close()
    finally:
        sandbox.kill()
        sandbox.close()


async def test_bad_input_is_a_4xx_with_code_and_message(server: ServerProcess, shared_sandbox: str) -> None:
    async with connected(server, shared_sandbox) as interpreter:
        raw = await RawExecd.of(interpreter)
        unknown = {"code": "1", "context": {"id": "no-such-context", "language": "python"}}
        assert_error_body(await raw.call("POST", "/code", json=unknown), 404, "CONTEXT_NOT_FOUND")
        assert_error_body(await raw.call("POST", "/code", json={"code": "   "}), 400, "INVALID_REQUEST_BODY")
        assert_error_body(await raw.call("POST", "/code", json={"context": {}}), 400)
        assert_error_body(await raw.call("POST", "/code", content=b"{not json"), 400, "INVALID_REQUEST_BODY")
        assert_error_body(await raw.call("POST", "/code", json=["code"]), 400)
        assert_error_body(await raw.call("POST", "/code", json={"code": "1", "context": "python"}), 400)
        huge = {"code": "#" * (5 * 1024 * 1024)}
        assert_error_body(await raw.call("POST", "/code", json=huge), 413, "PAYLOAD_TOO_LARGE")
        assert_error_body(await raw.call("POST", "/code/context", json={"language": 3}), 400)
        assert_error_body(await raw.call("POST", "/code/context", json={"language": "python", "cwd": "/nope"}), 400)
        assert_error_body(await raw.call("GET", "/code/contexts/no-such-context"), 404, "CONTEXT_NOT_FOUND")
        assert_error_body(await raw.call("DELETE", "/code/contexts/no-such-context"), 404, "CONTEXT_NOT_FOUND")
        assert_error_body(await raw.call("DELETE", "/code"), 400, "MISSING_QUERY")
        assert_error_body(await raw.call("DELETE", "/code", params={"id": "no-such-context"}), 404)
        assert_error_body(await raw.call("DELETE", "/code/contexts"), 400, "MISSING_QUERY")
        with pytest.raises(SandboxException):  # the SDK refuses empty code itself
            await interpreter.codes.run("  ")
        assert (await raw.call("GET", "/ping")).status_code == 200


async def test_context_cwd_and_sandbox_env(server: ServerProcess) -> None:
    async with fresh_interpreter(server, env={"CI_MARK": "from-create"}) as interpreter:
        raw = await RawExecd.of(interpreter)
        made = await raw.call("POST", "/code/context", json={"language": "python", "cwd": "/tmp"})
        assert made.status_code == 200
        ctx_id = made.json()["id"]
        events = await raw.events(
            {"code": "import os\n(os.getcwd(), os.environ['CI_MARK'])", "context": {"id": ctx_id}}
        )
        assert [e["results"]["text"] for e in events if e["type"] == "result"] == ["('/tmp', 'from-create')"]


async def test_sandbox_stays_usable_alongside_kernels(server: ServerProcess, shared_sandbox: str) -> None:
    sandbox = await Sandbox.connect(shared_sandbox, connection_config=config(server))
    try:
        interpreter = await CodeInterpreter.create(sandbox)
        async with context(interpreter) as ctx:
            await interpreter.codes.run("open('/tmp/from-kernel.txt', 'w').write('k')", context=ctx)
            assert (await sandbox.files.read_file("/tmp/from-kernel.txt")) == "k"
            echoed = await sandbox.commands.run("echo cmd-ok")
            assert [m.text for m in echoed.logs.stdout] == ["cmd-ok"]
        await interpreter.aclose()
    finally:
        await sandbox.close()


# -- what the official CLI and MCP server offer for code: commands running the image's Python --------


def test_osb_runs_python_code(server: ServerProcess, shared_sandbox: str, tmp_path: Path) -> None:
    bindir = Path(sys.executable).parent
    code = "import numpy; print(int(numpy.arange(7).sum() * 2))"
    result = subprocess.run(
        [str(bindir / "osb"), "--domain", server.domain, "--config", str(tmp_path / "osb.toml"), "--no-color",
         "command", "run", shared_sandbox, "-o", "raw", "--", "python3", "-c", code],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "42"


async def test_mcp_command_run_runs_python_code(server: ServerProcess, shared_sandbox: str) -> None:
    bindir = Path(sys.executable).parent
    params = StdioServerParameters(
        command=str(bindir / "opensandbox-mcp"),
        args=["--domain", server.domain, "--protocol", "http"],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    command = "python3 -c 'import pandas; print(pandas.Series([20, 22]).sum())'"
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        ran = await session.call_tool(
            "command_run", {"sandbox_id": shared_sandbox, "command": command, "connect_if_missing": True}
        )
        assert not ran.is_error, ran.content
        assert '"text": "42"' in json.dumps(ran.structured_content)
