"""Process facts from /proc and exit events from pidfds (no polling)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot: with the pid, it names one process
    even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])


def parent(pid: int) -> int | None:
    """The parent's pid, as the host sees it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def alive(pid: int, ticks: int) -> bool:
    return start_ticks(pid) == ticks


async def wait_exit(pid: int) -> None:
    """Returns once `pid` has exited (any process, not only our children)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def exited() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(fd, exited)
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def namespace_members(namespace: str) -> list[int]:
    """Every process (host pids) in that PID namespace."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and pid_namespace(int(entry)) == namespace:
            members.append(int(entry))
    return members


def signal_namespace(namespace: str, sig: signal.Signals) -> None:
    """Signal every process in the namespace until no new one shows up (a fork can race one pass)."""
    seen: set[int] = set()
    while True:
        fresh = [pid for pid in namespace_members(namespace) if pid not in seen]
        if not fresh:
            return
        for pid in sorted(fresh):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        seen.update(fresh)


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def processes_mentioning(text: str) -> list[int]:
    """Processes whose command line contains `text` (a jail's bwrap names its directory)."""
    needle = text.encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def state(pid: int) -> str | None:
    """The process's state letter (R, S, T, Z, ...)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def all_stopped(namespace: str) -> bool:
    """Whether every live process of the PID namespace has stopped (a SIGSTOP lands when the
    process next runs: on a busy machine, a moment after kill() returned)."""
    return all(state(pid) in ("T", "t", "Z", "X", None) for pid in namespace_members(namespace))
