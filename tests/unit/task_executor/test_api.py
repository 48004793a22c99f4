"""The real `opensandbox-task-executor` program as a subprocess on 127.0.0.1: its HTTP API, long polls,
errors, restart with state on disk, and its memory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.paths import TASK_EXECUTOR_BINARY
from harness.ports import free_port

BINARY = TASK_EXECUTOR_BINARY  # the one-dir build (tools/build-task-executor.sh)


class Executor:
    def __init__(self, data: Path, *extra: str) -> None:
        self.data = data
        self.extra = extra
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Executor:
        argv = [sys.executable, "-m", "opensandbox_platform.task_executor.main"]
        self.proc = subprocess.Popen(
            [*argv, "--host", "127.0.0.1", "--port", str(self.port), "--data-dir", str(self.data), *self.extra],
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "the executor exited"
            try:
                if httpx.get(f"{self.url}/health").status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.05)
        raise AssertionError("the executor did not answer /health")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def submit(self, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(f"{self.url}/tasks", json=body)

    def finished(self, task_id: str, timeout: float = 15) -> dict[str, Any]:
        """Long-polls until the task ended."""
        since = -1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            task: dict[str, Any] = httpx.get(
                f"{self.url}/tasks/{task_id}", params={"since": since, "wait": 5}, timeout=10
            ).json()
            if task["state"] in ("succeeded", "failed"):
                return task
            since = task["revision"]
        raise AssertionError(f"{task_id} did not finish")


@pytest.fixture
def executor(tmp_path: Path) -> Iterator[Executor]:
    e = Executor(tmp_path / "data", "--kill-grace", "0.5").start()
    yield e
    e.stop()


def test_health_and_openapi(executor: Executor) -> None:
    assert httpx.get(f"{executor.url}/health").json() == {"status": "ok", "mode": "direct", "tasks": 0, "running": 0}
    spec = httpx.get(f"{executor.url}/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    assert set(spec["paths"]) == {"/health", "/openapi.json", "/tasks", "/tasks/{id}", "/tasks/{id}/cancel"}


def test_submit_is_idempotent_and_a_long_poll_answers_at_the_exit(executor: Executor) -> None:
    body = {"id": "job-1", "command": ["sh", "-c", "sleep 0.3; echo out; echo err >&2"]}
    first = executor.submit(body)
    assert first.status_code == 201 and first.json()["state"] == "running"
    again = executor.submit({**body, "command": ["false"]})
    assert again.status_code == 200 and again.json()["createdAt"] == first.json()["createdAt"]
    started = time.monotonic()
    task = httpx.get(
        f"{executor.url}/tasks/job-1", params={"since": first.json()["revision"], "wait": 10}, timeout=15
    ).json()
    assert time.monotonic() - started < 2, "the long poll answers at the exit, not at the wait's end"
    assert (task["state"], task["exitCode"], task["output"]) == ("succeeded", 0, "out\nerr\n")
    listing = httpx.get(f"{executor.url}/tasks", params={"output": "false"}).json()
    assert [t["id"] for t in listing["tasks"]] == ["job-1"] and "output" not in listing["tasks"][0]
    assert listing["revision"] >= task["revision"]
    # Nothing newer: the wait runs out and the current state comes back.
    started = time.monotonic()
    same = httpx.get(f"{executor.url}/tasks", params={"since": listing["revision"], "wait": 0.3}).json()
    assert time.monotonic() - started >= 0.25 and same["revision"] == listing["revision"]


def test_timeout_and_cancel_and_delete(executor: Executor) -> None:
    executor.submit({"id": "slow", "command": ["sleep", "30"], "timeoutSeconds": 0.5})
    executor.submit({"id": "cancelme", "command": ["sleep", "30"]})
    timed_out = executor.finished("slow")
    assert (timed_out["state"], timed_out["reason"], timed_out["exitCode"]) == ("failed", "Timeout", 143)
    cancelled = httpx.post(f"{executor.url}/tasks/cancelme/cancel")
    assert cancelled.status_code == 200
    assert executor.finished("cancelme")["reason"] == "Cancelled"
    assert httpx.delete(f"{executor.url}/tasks/cancelme").status_code == 204
    assert httpx.get(f"{executor.url}/tasks/cancelme").status_code == 404


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/tasks", {"id": "x"}, 400),
        ("POST", "/tasks", {"id": "../../etc", "command": ["true"]}, 400),
        ("POST", "/tasks", "not json", 400),
        ("GET", "/tasks?wait=999", None, 400),
        ("GET", "/tasks?since=abc", None, 400),
        ("GET", "/tasks/unknown", None, 404),
        ("POST", "/tasks/unknown/cancel", None, 404),
        ("DELETE", "/tasks/unknown", None, 404),
        ("PUT", "/tasks", None, 405),
        ("GET", "/nothing", None, 404),
    ],
)
def test_bad_requests_are_4xx_with_code_and_message(
    executor: Executor, method: str, path: str, body: Any, status: int
) -> None:
    content = body if isinstance(body, str) else None
    response = httpx.request(method, executor.url + path, json=None if content else body, content=content)
    assert response.status_code == status
    error = response.json()
    assert set(error) == {"code", "message"} and error["message"]


def test_state_survives_a_killed_executor_and_the_interrupted_task_runs_again(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = Executor(data).start()
    marker = tmp_path / "runs"
    assert first.submit({"id": "quick", "command": ["true"]}).status_code == 201
    first.finished("quick")
    script = f"echo run >> {marker}; sleep 1"
    first.submit({"id": "long", "command": ["sh", "-c", script]})
    first.stop(signal.SIGKILL)

    second = Executor(data).start()
    try:
        quick = httpx.get(f"{second.url}/tasks/quick").json()
        assert quick["state"] == "succeeded" and quick["attempts"] == 1
        long = second.finished("long")
        assert (long["state"], long["attempts"]) == ("succeeded", 2)
        assert marker.read_text() == "run\nrun\n"
        assert second.submit({"id": "quick", "command": ["true"]}).status_code == 200, "still idempotent"
    finally:
        second.stop()


@pytest.mark.skipif(not BINARY.exists(), reason="build/task-executor not built (tools/build-task-executor.sh)")
def test_the_built_executable_stays_small_in_memory(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [str(BINARY), "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(tmp_path)],
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{url}/health")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        for n in range(50):
            httpx.post(f"{url}/tasks", json={"id": f"t{n}", "command": ["true"]})
        httpx.get(f"{url}/tasks", params={"since": 149, "wait": 5})  # 50 tasks x 3 revisions: all ended
        # The one-file bootloader and the Python process it starts.
        pids = [proc.pid, *map(int, Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split())]
        rss_kib = sum(int(Path(f"/proc/{p}/status").read_text().split("VmRSS:")[1].split()[0]) for p in pids)
        assert rss_kib < 40 * 1024, f"{rss_kib} KiB"
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(10)
