"""Lifecycle hooks as the SDK sends them: checks naming the field, schedules, failure messages."""

from __future__ import annotations

import datetime as dt

import pytest

from opensandbox_platform.execd import lifecycle
from opensandbox_platform.execd.lifecycle import LifecycleError, Schedule


def periodic(**fields: object) -> dict[str, object]:
    return {"periodic": [{"name": "tick", "schedule": "@every 30s", "command": ["true"], **fields}]}


def test_parses_the_sdk_wire_form_with_defaults() -> None:
    spec = lifecycle.parse(
        {
            "preStart": {"command": ["sh", "-c", "echo hi"]},
            "periodic": [{"name": "a", "schedule": "*/5 * * * *", "command": ["date"], "timeoutSeconds": 300}],
        }
    )
    assert spec.pre_start is not None and spec.pre_start.timeout_seconds == 60
    assert spec.to_json() == {
        "preStart": {"command": ["sh", "-c", "echo hi"], "timeoutSeconds": 60},
        "periodic": [{"name": "a", "schedule": "*/5 * * * *", "command": ["date"], "timeoutSeconds": 300}],
    }


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"preStart": {"command": []}}, "lifecycle.preStart.command"),
        ({"preStart": {"command": [""]}}, "lifecycle.preStart.command"),
        ({"preStart": {"command": ["x"], "timeoutSeconds": 10801}}, "lifecycle.preStart.timeoutSeconds"),
        ({"preStart": {"command": ["x"], "timeoutSeconds": 0}}, "lifecycle.preStart.timeoutSeconds"),
        ({"preStart": {"command": ["x"], "timeoutSeconds": True}}, "lifecycle.preStart.timeoutSeconds"),
        (periodic(timeoutSeconds=301), "lifecycle.periodic[0].timeoutSeconds"),
        (periodic(schedule="61 * * * *"), "lifecycle.periodic[0].schedule"),
        (periodic(schedule="* * * * * *"), "lifecycle.periodic[0].schedule"),  # six fields: seconds are @every's
        (periodic(schedule="@every 0s"), "lifecycle.periodic[0].schedule"),
        (periodic(schedule="@every 1.5s"), "lifecycle.periodic[0].schedule"),
        (periodic(schedule="@every 1m"), "lifecycle.periodic[0].schedule"),
        (periodic(schedule="@reboot"), "lifecycle.periodic[0].schedule"),
        (periodic(name="no spaces"), "lifecycle.periodic[0].name"),
        (periodic(command=["sh", "a\0b"]), "lifecycle.periodic[0].command"),
        ({"postStop": {}}, "lifecycle.postStop"),
    ],
)
def test_refuses_naming_the_field(raw: object, field: str) -> None:
    with pytest.raises(LifecycleError) as caught:
        lifecycle.parse(raw)
    assert str(caught.value).startswith(field)


def test_refuses_two_periodic_hooks_of_one_name() -> None:
    raw = periodic()
    raw["periodic"] = raw["periodic"] * 2  # type: ignore[operator]
    with pytest.raises(LifecycleError, match=r"periodic\[1\]\.name"):
        lifecycle.parse(raw)


def test_every_counts_whole_intervals_from_the_anchor() -> None:
    every = Schedule("@every 30s")
    assert every.next_after(1000.0, 1000.0) == 1030.0
    assert every.next_after(1030.0, 1000.0) == 1060.0  # never the same time twice
    assert every.next_after(1095.5, 1000.0) == 1120.0  # missed times are not caught up
    anchor = 1732961234.123
    assert every.next_after(anchor + 3 * 30, anchor) > anchor + 3 * 30


def test_cron_is_in_utc() -> None:
    after = dt.datetime(2026, 11, 30, 10, 30, 5, tzinfo=dt.UTC).timestamp()
    due = Schedule("0 * * * *").next_after(after, after)
    assert dt.datetime.fromtimestamp(due, dt.UTC) == dt.datetime(2026, 11, 30, 11, 0, tzinfo=dt.UTC)
    hourly = Schedule("@hourly").next_after(after, after)
    assert hourly == due


def test_failure_tells_the_exit_code_and_the_output_end() -> None:
    assert lifecycle.failure({"exitCode": 0, "timedOut": False}) is None
    why = lifecycle.failure({"exitCode": 3, "timedOut": False, "output": "x" * 5000 + "boom\n"})
    assert why is not None and "code 3" in why and why.endswith("boom") and len(why) < 1200
    timed = lifecycle.failure({"exitCode": 137, "timedOut": True, "durationMs": 2004, "output": ""})
    assert timed is not None and "timed out after 2.0 s" in timed and "(no output)" in timed
