"""Host uid/gid ranges of local sandboxes: one range of 65536 ids per sandbox, never shared.

Slot N is the host ids `first + N * 65536 ...` (uid and gid alike); the sandbox's root is the first
of them, its uid 1000 the 1001st, and no host id outside the range exists for it (host-owned files
show as `nobody`). Who holds a slot is written in `<dir>/<N>`, a host-wide directory every server on
this host shares: the pid and start time of the jail's first process (before it exists, of the
server starting it). A slot is free when that process is gone: a jail's processes all end with its
first one, so a slot frees itself when its jail ends, across servers, crashes and restarts, with
nothing to clean up. Reading and changing a slot's file happens under an exclusive `flock` of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

RANGE_SIZE = 65536
UID_MAX = 0xFFFFFFFE  # (uid_t)-1 is "no id"


@dataclass(frozen=True)
class IdRange:
    slot: int
    start: int
    size: int = RANGE_SIZE

    def map_line(self) -> str:
        """/proc/PID/uid_map (and gid_map): the sandbox's 0..size-1 are the host's start.."""
        return f"0 {self.start} {self.size}\n"

    def host_id(self, sandbox_id: int) -> int:
        if not 0 <= sandbox_id < self.size:
            raise ValueError(f"id {sandbox_id} is not mapped")
        return self.start + sandbox_id


def slot_range(first: int, slot: int) -> IdRange:
    return IdRange(slot, first + slot * RANGE_SIZE)


def check_layout(first: int, slots: int) -> None:
    """ValueError unless every slot fits in the id space above the host's usual ids."""
    if first < RANGE_SIZE:
        raise ValueError(f"uidRangeStart {first} overlaps the host's own users (must be >= {RANGE_SIZE})")
    last = first + slots * RANGE_SIZE - 1
    if last > UID_MAX:
        raise ValueError(f"uidRangeStart + uidRangeSlots * {RANGE_SIZE} exceeds the uid space ({last} > {UID_MAX})")


def overlaps(first: int, slots: int, subid_text: str) -> list[str]:
    """Lines of /etc/subuid or /etc/subgid (`name:start:count`) that overlap our ranges."""
    ours = range(first, first + slots * RANGE_SIZE)
    found = []
    for line in subid_text.splitlines():
        parts = line.strip().split(":")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            continue
        theirs = range(int(parts[1]), int(parts[1]) + int(parts[2]))
        if theirs.start < ours.stop and ours.start < theirs.stop:
            found.append(line.strip())
    return found


class NoFreeSlot(Exception):
    pass


Alive = Callable[[int, int], bool]


def parse_owner(text: str) -> tuple[int, int] | None:
    parts = text.split()
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1])


class UidSlots:
    """Claims free slots for jails; `alive(pid, start_ticks)` says whether an owner still runs."""

    def __init__(self, directory: Path, first: int, slots: int, alive: Alive) -> None:
        check_layout(first, slots)
        self.directory = directory
        self.first = first
        self.slots = slots
        self.alive = alive
        self._next = 0

    def prepare(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)

    def claim(self, owner: tuple[int, int]) -> IdRange:
        """A free slot, now held by `owner` (pid, start ticks). NoFreeSlot when all are taken.
        Slots are handed out round-robin, so a range just freed is the last to be used again."""
        for offset in range(self.slots):
            slot = (self._next + offset) % self.slots
            if self._take(slot, owner, only_if_free=True):
                self._next = (slot + 1) % self.slots
                return slot_range(self.first, slot)
        raise NoFreeSlot(f"all {self.slots} uid ranges are in use")

    def hold(self, slot: int, owner: tuple[int, int]) -> None:
        """The slot's holder is now `owner` (the jail's first process, once it exists)."""
        self._take(slot, owner, only_if_free=False)

    def holder(self, slot: int) -> tuple[int, int] | None:
        """The live process holding `slot`, if any."""
        with self._locked(slot) as fd:
            return self._live_owner(fd)

    def _take(self, slot: int, owner: tuple[int, int], only_if_free: bool) -> bool:
        with self._locked(slot) as fd:
            if only_if_free and self._live_owner(fd) is not None:
                return False
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{owner[0]} {owner[1]}\n".encode(), 0)
            return True

    def _live_owner(self, fd: int) -> tuple[int, int] | None:
        owner = parse_owner(os.pread(fd, 64, 0).decode(errors="replace"))
        return owner if owner is not None and self.alive(*owner) else None

    @contextlib.contextmanager
    def _locked(self, slot: int) -> Iterator[int]:
        fd = os.open(self.directory / str(slot), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)
