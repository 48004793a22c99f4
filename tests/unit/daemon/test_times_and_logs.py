"""RFC 3339 as every program writes it, and log lines that keep each call's fields."""

from __future__ import annotations

import datetime as dt
import json
import logging

import pytest

from opensandbox_platform.daemon import logs, times

AT = dt.datetime(2026, 11, 30, 4, 29, 19, 123456, tzinfo=dt.UTC)


def test_rfc3339_precisions_and_round_trip() -> None:
    assert times.rfc3339(AT) == "2026-11-30T04:29:19Z"
    assert times.rfc3339(AT, digits=3) == "2026-11-30T04:29:19.123Z"
    assert times.rfc3339(AT, digits=6) == "2026-11-30T04:29:19.123456Z"
    assert times.rfc3339(AT.timestamp(), digits=6) == "2026-11-30T04:29:19.123456Z"
    assert times.rfc3339(times.from_ns(1_796_014_989_123_456_789), digits=6).endswith(".123456Z")
    assert times.parse("2026-11-30T04:29:19.123456Z") == AT
    assert times.parse("2026-11-30T05:29:19.123456+01:00") == AT
    assert times.parse("2026-11-30T04:29:19.123456") == AT, "naive means UTC"
    assert times.parse_optional("") is None and times.parse_optional(None) is None
    with pytest.raises(ValueError):
        times.parse("tomorrow")


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("execd", logging.INFO, __file__, 1, message, args, None)
    rec.__dict__.update(extra)
    return rec


def test_logfmt_keeps_trailing_pairs_and_extra_fields() -> None:
    line = logs.LogfmtFormatter().format(record("execd listening host=%s port=%d", "0.0.0.0", 44772, key="ns/a b"))
    assert line.endswith('level=info logger=execd msg="execd listening" host=0.0.0.0 port=44772 key="ns/a b"')


def test_json_lines_carry_extra_fields() -> None:
    entry = json.loads(logs.JsonFormatter().format(record("reconciled", controller="pool", ms=1.5)))
    assert (entry["msg"], entry["controller"], entry["ms"], entry["level"]) == ("reconciled", "pool", 1.5, "info")
