"""Task validation, the on-disk store, and finding the main container in /proc."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from opensandbox_platform.api.labels import TASK_TARGET_ENV
from opensandbox_platform.daemon.errors import ApiError
from opensandbox_platform.task_executor.runner import find_target
from opensandbox_platform.task_executor.tasks import Spec, Store, Task, parse_spec


def test_a_full_spec_parses() -> None:
    spec = parse_spec(
        {"id": "bs-uid-0", "command": ["sh", "-c"], "args": ["echo $A"], "env": [{"name": "A", "value": "b"}],
         "workingDir": "/w", "timeoutSeconds": 2.5}
    )  # fmt: skip
    assert spec.argv == ["sh", "-c", "echo $A"]
    assert spec.env == [{"name": "A", "value": "b"}] and spec.workingDir == "/w" and spec.timeoutSeconds == 2.5


def test_env_value_defaults_to_empty() -> None:
    assert parse_spec({"id": "a", "command": ["x"], "env": [{"name": "A"}]}).env == [{"name": "A", "value": ""}]


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ([], "object"),
        ({"command": ["x"]}, "id"),
        ({"id": "../etc", "command": ["x"]}, "id"),
        ({"id": ".hidden", "command": ["x"]}, "id"),
        ({"id": "a" * 254, "command": ["x"]}, "id"),
        ({"id": "a", "command": []}, "command"),
        ({"id": "a", "command": "echo hi"}, "command"),
        ({"id": "a", "command": ["x\0y"]}, "NUL"),
        ({"id": "a", "command": ["x"], "args": [1]}, "args"),
        ({"id": "a", "command": ["x"], "env": {"A": "b"}}, "env"),
        ({"id": "a", "command": ["x"], "env": [{"name": "A=B", "value": "c"}]}, "env[].name"),
        ({"id": "a", "command": ["x"], "env": [{"name": "A", "value": 3}]}, "env[A].value"),
        ({"id": "a", "command": ["x"], "workingDir": "relative"}, "workingDir"),
        ({"id": "a", "command": ["x"], "timeoutSeconds": 0}, "timeoutSeconds"),
        ({"id": "a", "command": ["x"], "timeoutSeconds": True}, "timeoutSeconds"),
        ({"id": "a", "command": ["x"], "image": "y"}, "unknown field(s): image"),
    ],
)
def test_bad_specs_are_400_naming_the_field(body: Any, names: str) -> None:
    with pytest.raises(ApiError) as err:
        parse_spec(body)
    assert err.value.status == 400 and names in err.value.message


def test_store_round_trip_tail_and_remove(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "tasks"))
    task = Task(Spec("t1", ["echo"], ["hi"]), state="running", attempts=1, revision=7, pid=42, pidStart=99)
    store.save(task)
    Path(store.log_path("t1")).write_bytes(b"x" * 5000 + "é\n".encode())
    (tmp_path / "tasks" / "broken.json").write_text("{not json")
    [loaded] = store.load()
    assert loaded == task
    assert store.tail("t1", 4).endswith("é\n") and len(store.tail("t1", 100)) <= 100
    assert store.tail("missing", 10) == ""
    store.remove("t1")
    assert store.load() == [] and not os.path.exists(store.log_path("t1"))


def _fake_process(proc: Path, pid: int, env: dict[str, str], mnt: str) -> None:
    (proc / str(pid) / "ns").mkdir(parents=True)
    (proc / str(pid) / "environ").write_bytes(b"".join(f"{k}={v}\0".encode() for k, v in env.items()))
    (proc / str(pid) / "ns" / "mnt").symlink_to(mnt)


def test_find_target_picks_the_lowest_pid_of_the_named_container_outside_our_mount_namespace(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "self" / "ns").mkdir(parents=True)
    (proc / "self" / "ns" / "mnt").symlink_to("mnt:[100]")
    _fake_process(proc, 7, {TASK_TARGET_ENV: "sandbox"}, "mnt:[100]")  # our own mount ns: a task we ran, skipped
    _fake_process(proc, 9, {TASK_TARGET_ENV: "other"}, "mnt:[300]")
    _fake_process(proc, 12, {"PATH": "/bin", TASK_TARGET_ENV: "sandbox"}, "mnt:[200]")
    _fake_process(proc, 30, {TASK_TARGET_ENV: "sandbox"}, "mnt:[200]")
    (proc / "15").mkdir()  # vanished: no environ
    assert find_target("sandbox", str(proc)) == 12
    assert find_target("other", str(proc)) == 9
    assert find_target("missing", str(proc)) is None
