"""The code interpreter's pure parts: kernelspec discovery and choice, request parsing, settings,
backpressure accounting, result frames, the readiness socket, and a one-file build's environment."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from pathlib import Path

import pytest

from opensandbox_platform.daemon.errors import ApiError
from opensandbox_platform.execd.code import channel, kernelspecs
from opensandbox_platform.execd.code.contexts import _result_event, exit_note, parse_create, parse_run
from opensandbox_platform.execd.code.readiness import Readiness
from opensandbox_platform.execd.code.settings import CodeSettings, jupyter_port
from opensandbox_platform.execd.envfile import without_bundle

pytestmark = pytest.mark.unit


def spec_dir(root: Path, name: str, language: str, argv: list[str] | None = None) -> None:
    path = root / "kernels" / name
    path.mkdir(parents=True)
    data = {"argv": argv or ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"], "language": language}
    (path / "kernel.json").write_text(json.dumps({**data, "display_name": name}))


def test_scan_follows_jupyters_search_order(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    spec_dir(first, "python3", "python", ["/opt/venv/bin/python", "-m", "ipykernel_launcher"])
    spec_dir(second, "python3", "python", ["/usr/bin/python3"])
    spec_dir(second, "bash", "bash")
    (second / "kernels" / "broken").mkdir()
    (second / "kernels" / "broken" / "kernel.json").write_text("{not json")
    env = {"JUPYTER_PATH": f"{first}:{second}", "HOME": str(tmp_path), "PATH": ""}
    specs = kernelspecs.scan(env)
    assert set(specs) >= {"python3", "bash"} and "broken" not in specs
    assert specs["python3"].argv[0] == "/opt/venv/bin/python"  # the first data dir wins


def test_prefixes_on_path_are_searched(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python3").write_text("")
    spec_dir(venv / "share" / "jupyter", "venvkernel", "python")
    env = {"PATH": str(venv / "bin"), "HOME": str(tmp_path)}
    assert "venvkernel" in kernelspecs.scan(env)


def test_choose_by_language_alias_or_name() -> None:
    specs = {
        "python3": kernelspecs.KernelSpec("python3", "python", ("python3",), "Python 3"),
        "apython": kernelspecs.KernelSpec("apython", "python", ("python3",), "A Python"),
        "jslab": kernelspecs.KernelSpec("jslab", "javascript", ("tslab",), "JavaScript"),
    }
    assert kernelspecs.choose(specs, "python").name == "python3"  # type: ignore[union-attr]
    assert kernelspecs.choose(specs, "Python3").name == "python3"  # type: ignore[union-attr]
    assert kernelspecs.choose(specs, "js").name == "jslab"  # type: ignore[union-attr]
    assert kernelspecs.choose(specs, "apython").name == "apython"  # type: ignore[union-attr]
    assert kernelspecs.choose(specs, "go") is None
    assert kernelspecs.languages(specs) == ["javascript", "python"]


def test_bridge_python_prefers_the_python_kernels_interpreter(tmp_path: Path) -> None:
    python = tmp_path / "python3.11"
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    specs = {"python3": kernelspecs.KernelSpec("python3", "python", (str(python), "-m", "x"), "P")}
    assert kernelspecs.bridge_python(specs, {"PATH": ""}) == str(python)
    assert kernelspecs.bridge_python({}, {"PATH": str(tmp_path)}) is None  # no `python3` there
    assert kernelspecs.bridge_python(specs, {"PATH": "", "EXECD_CODE_PYTHON": "/nonexistent"}) is None


def test_parse_run_and_create() -> None:
    assert parse_run({"code": "1", "context": {"id": "c", "language": "python"}}) == ("1", "c", "python")
    assert parse_run({"code": "1"}) == ("1", None, "")
    for bad in ({}, {"code": ""}, {"code": " \n"}, {"code": 1}, [], {"code": "1", "context": "x"},
                {"code": "1", "context": {"id": 3}}):  # fmt: skip
        with pytest.raises(ApiError) as raised:
            parse_run(bad)
        assert raised.value.status == 400
    assert parse_create(None) == ("python", None)
    assert parse_create({"language": "bash", "cwd": "/tmp"}) == ("bash", "/tmp")
    with pytest.raises(ApiError):
        parse_create({"language": ["python"]})


def test_settings_from_env_ignore_nonsense() -> None:
    settings = CodeSettings.from_env({"EXECD_CODE_MAX_CONTEXTS": "3", "EXECD_CODE_IDLE_TIMEOUT": "0"}, 3.0, 3.0)
    assert settings.max_contexts == 3 and settings.idle_timeout == 0
    fallback = CodeSettings.from_env({"EXECD_CODE_MAX_CONTEXTS": "-1", "EXECD_CODE_IDLE_TIMEOUT": "soon"}, 3.0, 3.0)
    assert fallback.max_contexts == CodeSettings.max_contexts
    assert fallback.idle_timeout == CodeSettings.idle_timeout
    assert jupyter_port({}) == 44771 and jupyter_port({"JUPYTER_PORT": "8888"}) == 8888
    assert jupyter_port({"JUPYTER_PORT": "x"}) == 44771


def test_result_event_renames_text_plain_as_the_sdk_reads_it() -> None:
    frame = _result_event({"text/plain": "42", "image/png": "iVBOR", "application/json": {"a": 1}})
    payload = json.loads(frame.decode().removeprefix("data: "))
    assert payload["type"] == "result" and isinstance(payload["timestamp"], int)
    assert payload["results"] == {"text": "42", "image/png": "iVBOR", "application/json": {"a": 1}}


def test_exit_notes() -> None:
    assert exit_note(3) == "exited with status 3"
    assert "SIGKILL" in exit_note(-9) and "out of memory" in exit_note(-9)
    assert "SIGSEGV" in exit_note(-11)


async def test_run_queue_pauses_above_high_and_resumes_below_low() -> None:
    calls: list[str] = []
    queue = channel.RunQueue(lambda: calls.append("pause"), lambda: calls.append("resume"))
    for _ in range(5):
        queue.put({"ev": "result"}, channel.HIGH // 4)
    assert calls == ["pause"] and queue.paused
    for _ in range(4):
        await queue.get()
    assert calls == ["pause"] and queue.unread == channel.LOW  # not below LOW yet
    await queue.get()
    assert calls == ["pause", "resume"] and not queue.paused


async def test_readiness_refuses_until_opened() -> None:
    readiness = Readiness(0)
    port = readiness.port
    assert port > 0 and not readiness.listening
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    await readiness.open()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await reader.read() == b""  # accepted, then closed at once
    writer.close()
    readiness.close()


def test_readiness_port_taken_is_not_fatal() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    readiness = Readiness(taken.getsockname()[1])
    assert not readiness.listening
    readiness.close()
    taken.close()


def test_one_file_bundle_environment_is_not_inherited(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "_MEIPASS", "/tmp/_MEIabc", raising=False)
    env = {"LD_LIBRARY_PATH": "/tmp/_MEIabc", "_PYI_APPLICATION_HOME_DIR": "/tmp/_MEIabc", "PATH": "/bin"}
    assert without_bundle(env) == {"PATH": "/bin"}
    kept = {"LD_LIBRARY_PATH": "/tmp/_MEIabc", "LD_LIBRARY_PATH_ORIG": "/opt/lib", "PATH": "/bin"}
    assert without_bundle(kept) == {"LD_LIBRARY_PATH": "/opt/lib", "PATH": "/bin"}
    monkeypatch.delattr(sys, "_MEIPASS")
    assert without_bundle(env) == env


async def test_run_queue_drops_stream_output_past_the_hard_limit_and_says_so() -> None:
    queue = channel.RunQueue(lambda: None, lambda: None)
    piece = "x" * 1024
    for _ in range(channel.HARD // 1024 + 10):
        queue.put({"ev": "stream", "text": piece}, 1024)
    assert queue.unread <= channel.HARD and queue.dropped == 10 * 1024
    queue.put({"ev": "done"}, 10)
    events = [await queue.get() for _ in range(channel.HARD // 1024 + 2)]
    assert "10240 characters of output dropped" in events[-2]["text"] and events[-1]["ev"] == "done"
