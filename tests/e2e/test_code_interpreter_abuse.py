"""Hostile code in a code context: it may exhaust contexts, flood output, ignore interrupts, kill
the kernel bridge or write into its pipes. The context may break; the sandbox and execd must not."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest
from code_interpreter import CodeInterpreter
from opensandbox import Sandbox
from opensandbox.exceptions import SandboxApiException, SandboxReadyTimeoutException
from opensandbox.models.execd import ExecutionHandlers, ExecutionInit, OutputMessage

from harness.server_process import ServerProcess
from tests.e2e.code_support import RawExecd, assert_error_body, config, connected, context, fresh_interpreter


async def assert_sandbox_healthy(interpreter: CodeInterpreter) -> None:
    assert await interpreter.sandbox.is_healthy()
    echoed = await interpreter.sandbox.commands.run("echo still-here")
    assert [m.text for m in echoed.logs.stdout] == ["still-here"]


async def test_contexts_are_bounded(server: ServerProcess) -> None:
    async with fresh_interpreter(server, env={"EXECD_CODE_MAX_CONTEXTS": "2"}) as interpreter:
        codes = interpreter.codes
        first = await codes.create_context("python")
        await codes.create_context("python")
        raw = await RawExecd.of(interpreter)
        refused = await raw.call("POST", "/code/context", json={"language": "python"})
        body = assert_error_body(refused, 429, "TOO_MANY_CONTEXTS")
        assert "2" in body["message"]
        with pytest.raises(SandboxApiException) as raised:  # the default context counts too
            await codes.run("1")
        assert raised.value.status_code == 429
        await codes.delete_context(first.id or "")
        assert [r.text for r in (await codes.run("6 * 7")).result] == ["42"]
        await assert_sandbox_healthy(interpreter)


async def test_idle_contexts_are_reclaimed(server: ServerProcess) -> None:
    async with fresh_interpreter(server, env={"EXECD_CODE_IDLE_TIMEOUT": "1"}) as interpreter:
        ctx = await interpreter.codes.create_context("python")
        await interpreter.codes.run("x = 1", context=ctx)
        await asyncio.sleep(2.5)
        with pytest.raises(SandboxApiException) as raised:
            await interpreter.codes.get_context(ctx.id or "")
        assert raised.value.status_code == 404
        assert await interpreter.codes.list_contexts("python") == []
        assert [r.text for r in (await interpreter.codes.run("'back'")).result] == ["'back'"]


async def test_flood_of_output_is_streamed_whole(server: ServerProcess, shared_sandbox: str) -> None:
    size = 0
    chunks = 0

    async def on_stdout(message: OutputMessage) -> None:
        nonlocal size, chunks
        size += len(message.text)
        chunks += 1

    handlers = ExecutionHandlers(on_stdout=on_stdout)
    code = "import sys\nblock = 'y' * (1 << 20)\nfor _ in range(64):\n    sys.stdout.write(block)"
    async with connected(server, shared_sandbox) as interpreter, context(interpreter) as ctx:
        execution = await interpreter.codes.run(code, context=ctx, handlers=handlers)
        assert execution.error is None and execution.complete is not None
        # All of it, or what execd could not hold dropped with a note (a client slower than the code).
        dropped = any("output dropped" in m.text for m in execution.logs.stderr)
        assert size == 64 << 20 or (dropped and size < 64 << 20)
        assert chunks >= (64 * 16 if not dropped else 32 * 16)  # forwarded in pieces of at most 64 KiB
        await assert_sandbox_healthy(interpreter)


async def test_huge_result_is_replaced_by_a_note(server: ServerProcess, shared_sandbox: str) -> None:
    async with connected(server, shared_sandbox) as interpreter, context(interpreter) as ctx:
        execution = await interpreter.codes.run("'z' * (40 << 20)", context=ctx)
        assert execution.error is None
        assert len(execution.result) == 1
        assert "was dropped" in (execution.result[0].text or "")
        await assert_sandbox_healthy(interpreter)


async def test_killing_the_bridge_costs_only_the_kernels(server: ServerProcess, shared_sandbox: str) -> None:
    async with connected(server, shared_sandbox) as interpreter:
        async with context(interpreter) as victim, context(interpreter) as bystander:
            await interpreter.codes.run("a = 1", context=bystander)
            # The kernel's parent is the kernel bridge: kill it from inside.
            killed = await interpreter.codes.run(
                "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", context=victim
            )
            assert killed.error is not None and killed.error.name == "KernelDied"
            assert "bridge" in killed.error.value
            for ctx in (victim, bystander):  # both get fresh kernels
                again = await interpreter.codes.run("'again' if 'a' not in globals() else 'stale'", context=ctx)
                assert [r.text for r in again.result] == ["'again'"]
        await assert_sandbox_healthy(interpreter)


async def test_code_that_ignores_interrupts_is_killed(server: ServerProcess, shared_sandbox: str) -> None:
    started = asyncio.Event()

    async def on_init(init: ExecutionInit) -> None:
        started.set()

    code = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass"
    async with connected(server, shared_sandbox) as interpreter, context(interpreter) as ctx:
        run = asyncio.create_task(interpreter.codes.run(code, context=ctx, handlers=ExecutionHandlers(on_init=on_init)))
        await asyncio.wait_for(started.wait(), 30)
        await asyncio.sleep(0.5)
        asked = time.monotonic()
        await interpreter.codes.interrupt(ctx.id or "")
        execution = await asyncio.wait_for(run, 30)
        assert time.monotonic() - asked < 6  # the interrupt grace is 3 s
        assert execution.error is not None and execution.error.name == "KernelDied"
        assert "did not stop" in execution.error.value
        assert [r.text for r in (await interpreter.codes.run("1 + 1", context=ctx)).result] == ["2"]


async def test_kernel_output_cannot_forge_protocol_lines(server: ServerProcess, shared_sandbox: str) -> None:
    forged = '{"ev":"done","run":"x","status":"ok","ms":0}'
    code = f"import os\nos.write(1, b'{forged}\\n')\nos.write(2, b'{forged}\\n')\nprint('after')"
    async with connected(server, shared_sandbox) as interpreter, context(interpreter) as ctx:
        execution = await interpreter.codes.run(code, context=ctx)
        assert execution.error is None and execution.complete is not None
        assert "after" in "".join(m.text for m in execution.logs.stdout)
        await assert_sandbox_healthy(interpreter)


async def test_no_kernels_is_a_clear_4xx(server: ServerProcess) -> None:
    if server.runtime == "docker":  # the test base image has no Python at all
        sandbox = await Sandbox.create(
            server.image, connection_config=config(server), entrypoint=["tail", "-f", "/dev/null"]
        )
        env: dict[str, str] = {}
    else:  # the local runtime's jails see the host's kernels: point execd at a Python that has none
        env = {"EXECD_CODE_PYTHON": "/bin/true"}
        sandbox = await Sandbox.create(
            server.image, connection_config=config(server), entrypoint=["tail", "-f", "/dev/null"], env=env
        )
    try:
        if server.runtime == "docker":
            with pytest.raises(SandboxReadyTimeoutException):
                await CodeInterpreter.create(sandbox, ready_timeout=timedelta(seconds=2))
        interpreter = await CodeInterpreter.create(sandbox, skip_health_check=True)
        with pytest.raises(SandboxApiException) as raised:
            await interpreter.codes.run("1")
        assert raised.value.status_code == 400
        assert "no Jupyter kernels in this image" in str(raised.value)
        with pytest.raises(SandboxApiException):
            await interpreter.codes.create_context("python")
        assert await interpreter.codes.list_contexts("python") == []
        await interpreter.aclose()
    finally:
        await sandbox.kill()
        await sandbox.close()
