"""The connection table every listener caps its connections with."""

from __future__ import annotations

import pytest

from opensandbox_platform.daemon.connections import ConnectionTable


def test_admits_up_to_the_limit_then_closes_the_longest_idle() -> None:
    table: ConnectionTable[str] = ConnectionTable(3)
    for name in ("a", "b", "c"):
        assert table.admit(name) == (True, [])
    table.busy("a")
    table.idle("a")  # a served a request: now the newest idle
    assert table.admit("d") == (True, ["b"])
    assert "b" not in table and len(table) == 3


def test_busy_connections_are_never_closed_and_a_full_busy_table_refuses() -> None:
    table: ConnectionTable[str] = ConnectionTable(2)
    table.admit("a")
    table.admit("b")
    table.busy("a")
    table.busy("b")
    assert table.admit("c") == (False, [])
    assert len(table) == 2 and "c" not in table
    table.idle("b")
    assert table.admit("c") == (True, ["b"])


def test_remove_forgets_and_unknown_connections_are_ignored() -> None:
    table: ConnectionTable[str] = ConnectionTable(1)
    table.admit("a")
    table.busy("a")
    table.remove("a")
    table.busy("gone")
    table.idle("gone")
    assert len(table) == 0 and table.idle_count == 0
    assert table.admit("b") == (True, [])


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ConnectionTable(0)
