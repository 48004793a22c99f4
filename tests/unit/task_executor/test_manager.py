"""The task manager with real processes (direct mode, and sidecar mode into a mount namespace made here)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from opensandbox_platform.api.labels import TASK_TARGET_ENV
from opensandbox_platform.task_executor.manager import Limits, TaskManager
from opensandbox_platform.task_executor.runner import Runner, process_start_time
from opensandbox_platform.task_executor.tasks import Spec, Store, Task


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[TaskManager]:
    m = TaskManager(Store(str(tmp_path / "data")), Runner(None), Limits(kill_grace=0.5))
    yield m
    m.shutdown()


async def finished(m: TaskManager, task_id: str, timeout: float = 10) -> Task:
    since = -1
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        task = m.get(task_id)
        assert task is not None
        if task.done:
            return task
        since = task.revision
        await m.wait_change(since, deadline - loop.time(), [task_id])
    raise AssertionError(f"task {task_id} did not finish in {timeout}s")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie counts as gone.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


async def test_a_task_runs_with_its_env_and_directory_and_submitting_again_is_idempotent(
    manager: TaskManager, tmp_path: Path
) -> None:
    spec = Spec("t", ["sh", "-c"], ["echo $GREETING; pwd"], [{"name": "GREETING", "value": "hi"}], str(tmp_path))
    task, created = manager.submit(spec)
    assert created and task.state == "running" and task.attempts == 1
    again, created = manager.submit(Spec("t", ["false"]))
    assert again is task and not created
    done = await finished(manager, "t")
    assert (done.state, done.exitCode, done.reason) == ("succeeded", 0, "Completed")
    assert manager.output(done) == f"hi\n{tmp_path}\n"
    assert done.startedAt and done.finishedAt and done.startedAt <= done.finishedAt


async def test_exit_codes_and_start_failures(manager: TaskManager) -> None:
    manager.submit(Spec("exit3", ["sh", "-c", "exit 3"]))
    manager.submit(Spec("missing", ["/nonexistent/binary"]))
    manager.submit(Spec("baddir", ["true"], workingDir="/nonexistent-dir"))
    assert (await finished(manager, "exit3")).exitCode == 3
    for name in ("missing", "baddir"):
        task = await finished(manager, name)
        assert (task.state, task.reason, task.exitCode) == ("failed", "StartFailed", None)
        assert task.message


async def test_a_timeout_kills_the_whole_process_group(manager: TaskManager, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    manager.submit(Spec("slow", ["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], timeoutSeconds=0.5))
    task = await finished(manager, "slow")
    assert (task.state, task.reason) == ("failed", "Timeout") and task.exitCode == 143
    assert not alive(int(pidfile.read_text()))


async def test_cancel_a_running_and_a_pending_task(tmp_path: Path) -> None:
    m = TaskManager(Store(str(tmp_path / "d")), Runner(None), Limits(max_running=1, kill_grace=0))
    m.submit(Spec("first", ["sleep", "60"]))
    second, _ = m.submit(Spec("second", ["true"]))
    assert second.state == "pending"  # max_running=1
    m.cancel("second")
    assert (second.state, second.reason) == ("failed", "Cancelled")
    m.cancel("first")
    first = await finished(m, "first")
    assert (first.state, first.reason, first.exitCode) == ("failed", "Cancelled", 137)
    assert m.cancel("nope") is None


async def test_pending_tasks_start_when_a_slot_frees(tmp_path: Path) -> None:
    m = TaskManager(Store(str(tmp_path / "d")), Runner(None), Limits(max_running=1))
    for n in range(3):
        m.submit(Spec(f"t{n}", ["true"]))
    for n in range(3):
        assert (await finished(m, f"t{n}")).state == "succeeded"


async def test_remove_forgets_the_task_and_its_files(manager: TaskManager) -> None:
    manager.submit(Spec("gone", ["sleep", "60"]))
    assert manager.remove("gone") and manager.get("gone") is None
    assert not manager.remove("gone")
    assert manager.store.load() == []


async def test_wait_change_returns_on_a_change_or_after_the_timeout(manager: TaskManager) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    await manager.wait_change(manager.revision, 0.2)
    assert loop.time() - start >= 0.19
    waiter = asyncio.create_task(manager.wait_change(manager.revision, 5))
    await asyncio.sleep(0)
    manager.submit(Spec("w", ["true"]))
    await asyncio.wait_for(waiter, 1)


@pytest.fixture
def orphan() -> Iterator[subprocess.Popen[bytes]]:
    """A task process that outlived its executor (direct mode: its own session)."""
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


async def test_a_restart_runs_interrupted_tasks_again_and_keeps_finished_ones(
    tmp_path: Path, orphan: subprocess.Popen[bytes]
) -> None:
    data = str(tmp_path / "d")
    store = Store(data)
    # What a killed executor leaves on disk: a finished task, and a running one whose process survived
    # (direct mode: its own session) and another whose process is gone.
    done = Task(Spec("done", ["true"]), state="succeeded", exitCode=0, reason="Completed", attempts=1, revision=3)
    survived = Task(Spec("survived", ["sleep", "60"]), state="running", attempts=1, revision=5,
                    pid=orphan.pid, pidStart=process_start_time(orphan.pid))  # fmt: skip
    lost = Task(Spec("lost", ["true"]), state="running", attempts=1, revision=4, pid=999999, pidStart=1)
    for task in (done, survived, lost):
        store.save(task)

    m = TaskManager(Store(data), Runner(None), Limits(max_attempts=2))
    m.recover()
    assert m.get("done") == done
    assert orphan.poll() == -9 or orphan.wait(5) == -9, "the orphan is killed: its exit status is not ours to read"
    again = m.get("survived")
    assert again is not None and again.state == "running" and again.attempts == 2 and again.pid != orphan.pid
    assert (await finished(m, "lost")).state == "succeeded"
    assert m.revision > 5
    m.shutdown()

    # Another restart: "survived" was started twice already, so it fails instead of a third start.
    third = TaskManager(Store(data), Runner(None), Limits(max_attempts=2))
    third.recover()
    interrupted = third.get("survived")
    assert interrupted is not None and (interrupted.state, interrupted.reason) == ("failed", "Interrupted")


# --- sidecar mode -------------------------------------------------------------------------------
@pytest.fixture
def main_container(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A process in its own mount namespace, with a tmpfs only visible there: a stand-in for the main
    container of a pod (needs root for unshare)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1)")
    name = f"main-{uuid.uuid4().hex[:8]}"
    mount = tmp_path / "private"
    mount.mkdir()
    script = f"mount -t tmpfs none {mount} && echo inside > {mount}/marker && exec sleep 60"
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        env={"PATH": os.environ["PATH"], TASK_TARGET_ENV: name, "FROM_MAIN": "yes"},
    )
    try:
        deadline = 100
        while not Path(f"/proc/{proc.pid}/root{mount}/marker").exists() and deadline:
            deadline -= 1
            subprocess.run(["sleep", "0.05"], check=True)
        yield name, mount
    finally:
        proc.kill()
        proc.wait()


async def test_sidecar_mode_runs_the_task_in_the_main_containers_mount_namespace(
    tmp_path: Path, main_container: tuple[str, Path]
) -> None:
    name, mount = main_container
    m = TaskManager(Store(str(tmp_path / "d")), Runner(name))
    script = f"cat {mount}/marker; echo $FROM_MAIN $OWN; pwd; echo written > {mount}/out"
    m.submit(Spec("in", ["sh", "-c", script], env=[{"name": "OWN", "value": "task"}], workingDir=str(mount)))
    task = await finished(m, "in")
    assert task.state == "succeeded", m.output(task)
    assert m.output(task) == f"inside\nyes task\n{mount}\n"
    assert not (mount / "out").exists(), "the file went to the main container's tmpfs, not ours"


async def test_sidecar_mode_without_the_main_container_fails_to_start(tmp_path: Path) -> None:
    m = TaskManager(Store(str(tmp_path / "d")), Runner(f"absent-{uuid.uuid4().hex[:8]}"))
    m.submit(Spec("x", ["true"]))
    task = await finished(m, "x")
    assert (task.state, task.reason) == ("failed", "StartFailed")
    assert task.message and "shareProcessNamespace" in task.message
