"""Host uid ranges of local sandboxes: layout, the /etc/subuid check, and claims between servers."""

from pathlib import Path

import pytest

from opensandbox_platform.server.runtimes import uidmap


def test_slot_ranges_are_disjoint_and_map_root_to_their_start() -> None:
    a, b = uidmap.slot_range(1_000_000_000, 0), uidmap.slot_range(1_000_000_000, 1)
    assert a.start + a.size == b.start
    assert a.map_line() == "0 1000000000 65536\n"
    assert b.host_id(1000) == 1_000_066_536
    with pytest.raises(ValueError):
        a.host_id(65536)


def test_layout_must_fit_above_the_host_users_and_in_the_uid_space() -> None:
    uidmap.check_layout(1_000_000_000, 16384)
    with pytest.raises(ValueError):
        uidmap.check_layout(1000, 1)
    with pytest.raises(ValueError):
        uidmap.check_layout(4_000_000_000, 10_000)


def test_overlapping_subuid_entries_are_found() -> None:
    text = "root:100000:65536\nalice:1000065536:65536\nbroken\n"
    assert uidmap.overlaps(1_000_000_000, 4, text) == ["alice:1000065536:65536"]
    assert uidmap.overlaps(2_000_000_000, 4, text) == []


def test_claims_are_exclusive_until_the_holder_is_gone(tmp_path: Path) -> None:
    living: set[int] = {1, 2}
    slots = uidmap.UidSlots(tmp_path, 1_000_000_000, 3, alive=lambda pid, ticks: pid in living)
    slots.prepare()
    first = slots.claim((1, 10))
    second = slots.claim((2, 20))
    assert first.slot != second.slot
    # a second server on the same host sees the same files
    other = uidmap.UidSlots(tmp_path, 1_000_000_000, 3, alive=lambda pid, ticks: pid in living)
    third = other.claim((1, 10))
    assert third.slot not in (first.slot, second.slot)
    with pytest.raises(uidmap.NoFreeSlot):
        other.claim((1, 10))
    slots.hold(first.slot, (7, 70))  # the jail's first process holds it now...
    assert slots.holder(first.slot) is None  # ...and it has ended: the slot is free again
    assert other.claim((2, 20)).slot == first.slot


def test_owner_files_are_parsed_strictly() -> None:
    assert uidmap.parse_owner("12 345\n") == (12, 345)
    assert uidmap.parse_owner("") is None and uidmap.parse_owner("x y") is None
