"""execd's hook runs with real processes: exit codes, timeouts that kill the whole group (a hook
that forks a lot and never ends), bounded output under a flood, periodic runs that never overlap."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from opensandbox_platform.execd import hooks, procs
from opensandbox_platform.execd.envfile import Environment
from opensandbox_platform.execd.lifecycle import Hook


@pytest.fixture
async def runner(tmp_path: Path) -> AsyncIterator[hooks.Runner]:
    procs.WATCHER.install(asyncio.get_running_loop())
    yield hooks.Runner(Environment(str(tmp_path / ".env")), lambda: str(tmp_path))
    procs.WATCHER.uninstall()


async def group_gone(pgid: int, within: float = 3.0) -> bool:
    """True once no process of the group is left (killed ones may take a moment to be reaped)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_a_run_reports_exit_code_output_and_duration(runner: hooks.Runner, tmp_path: Path) -> None:
    run = await runner.run(Hook(["sh", "-c", "pwd; echo oops >&2; exit 3"], 10))
    assert (run.exit_code, run.timed_out, run.ok) == (3, False, False)
    assert run.output.decode().split() == [str(tmp_path), "oops"]
    assert 0 <= run.duration < 5


async def test_a_program_that_cannot_start_is_a_failed_run(runner: hooks.Runner) -> None:
    run = await runner.run(Hook(["/no/such/program"], 10))
    assert run.exit_code == hooks.EXIT_CANNOT_START and b"cannot start /no/such/program" in run.output


async def test_a_forking_hook_that_never_ends_is_killed_with_its_group(runner: hooks.Runner, tmp_path: Path) -> None:
    script = f"echo $$ > {tmp_path}/pgid; i=0; while [ $i -lt 200 ]; do sleep 600 & i=$((i+1)); done; sleep 600"
    started = time.monotonic()
    run = await runner.run(Hook(["sh", "-c", script], 1))
    assert run.timed_out and run.exit_code == 137
    assert time.monotonic() - started < 5
    assert await group_gone(int((tmp_path / "pgid").read_text()))


async def test_what_a_hook_leaves_in_the_background_ends_with_it(runner: hooks.Runner, tmp_path: Path) -> None:
    run = await runner.run(Hook(["sh", "-c", f"echo $$ > {tmp_path}/pgid; sleep 600 & exit 0"], 10))
    assert run.ok
    assert await group_gone(int((tmp_path / "pgid").read_text()))


async def test_an_output_flood_keeps_only_the_end(runner: hooks.Runner) -> None:
    run = await runner.run(Hook(["sh", "-c", "yes flood | head -c 20000000; echo THE-END"], 30))
    assert run.ok and run.truncated
    assert len(run.output) <= hooks.OUTPUT_TAIL and run.output.endswith(b"THE-END\n")


async def test_periodic_runs_never_overlap_and_skips_are_counted(tmp_path: Path) -> None:
    procs.WATCHER.install(asyncio.get_running_loop())
    manager = hooks.Hooks(Environment(str(tmp_path / ".env")), lambda: str(tmp_path))
    try:
        await manager.begin(
            {
                "periodic": [
                    {"name": "slow", "schedule": "@every 1s", "command": ["sleep", "2.5"], "timeoutSeconds": 10},
                    {"name": "fast", "schedule": "@every 1s", "command": ["echo", "tick"]},
                ]
            }
        )
        await asyncio.sleep(3.6)
        status = manager.status()
    finally:
        manager.shutdown()
        procs.WATCHER.uninstall()
    slow, fast = status["periodic"]
    # slow started at 1 s and ran until 3.5 s: due at 2 s and 3 s meanwhile, both skipped
    done = [run for run in slow["runs"] if not run["skipped"]]
    assert slow["skipped"] >= 2 and sum(run["skipped"] for run in slow["runs"]) == slow["skipped"]
    assert len(done) == 1 and done[0]["durationMs"] >= 2400
    assert fast["skipped"] == 0 and len(fast["runs"]) >= 2
    assert all(run["exitCode"] == 0 and run["output"] == "tick\n" for run in fast["runs"])


async def test_a_failed_pre_start_schedules_nothing(tmp_path: Path) -> None:
    procs.WATCHER.install(asyncio.get_running_loop())
    manager = hooks.Hooks(Environment(str(tmp_path / ".env")), lambda: str(tmp_path))
    try:
        raw = {
            "preStart": {"command": ["sh", "-c", "echo no; exit 4"]},
            "periodic": [{"name": "p", "schedule": "@every 1s", "command": ["true"]}],
        }
        run = await manager.begin(raw)
        assert run is not None and run.exit_code == 4
        assert manager.status()["periodic"] == []
        with pytest.raises(Exception, match="already started"):
            await manager.begin(raw)
    finally:
        manager.shutdown()
        procs.WATCHER.uninstall()


async def test_shutdown_kills_a_running_hook(tmp_path: Path) -> None:
    procs.WATCHER.install(asyncio.get_running_loop())
    manager = hooks.Hooks(Environment(str(tmp_path / ".env")), lambda: str(tmp_path))
    try:
        script = f"echo $$ > {tmp_path}/pgid; sleep 600"
        await manager.begin({"periodic": [{"name": "p", "schedule": "@every 1s", "command": ["sh", "-c", script]}]})
        pgid = tmp_path / "pgid"
        for _ in range(100):
            if pgid.exists() and pgid.read_text():
                break
            await asyncio.sleep(0.05)
        manager.shutdown()
        assert await group_gone(int((tmp_path / "pgid").read_text()))
    finally:
        procs.WATCHER.uninstall()
