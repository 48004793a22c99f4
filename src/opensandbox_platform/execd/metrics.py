"""CPU and memory of the sandbox: its cgroup's figures (v1 or v2) where present, else the host's.

CPU percent is the usage over the interval since the previous sample, divided by the CPUs the
sandbox may use (its CFS quota, else its CPU affinity), so it stays within 0..100.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any

CGROUP_ROOT = "/sys/fs/cgroup"
MIN_INTERVAL = 0.1
MAX_BASELINE_AGE = 5.0


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return None


def _stat_field(text: str | None, name: str) -> int | None:
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            return _int(value)
    return None


def host_memory(meminfo: str) -> tuple[int, int]:
    """(total, used) bytes from /proc/meminfo; used = total - available."""
    values: dict[str, int] = {}
    for line in meminfo.splitlines():
        key, _, rest = line.partition(":")
        number = _int(rest)
        if number is not None:
            values[key] = number * 1024
    total = values.get("MemTotal", 0)
    available = values.get("MemAvailable", values.get("MemFree", 0))
    return total, max(0, total - available)


def host_cpu_usage_ns(proc_stat: str) -> int:
    """Busy CPU time of the whole host (all but idle and iowait), in ns."""
    fields = proc_stat.splitlines()[0].split()[1:]
    ticks = [int(f) for f in fields]
    busy = sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)
    return busy * (1_000_000_000 // os.sysconf("SC_CLK_TCK"))


def cgroup_paths(proc_self_cgroup: str) -> dict[str, str]:
    """Controller -> path from /proc/self/cgroup ('' is the v2 unified hierarchy)."""
    paths: dict[str, str] = {}
    for line in proc_self_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(",") if parts[1] else [""]:
            paths[controller.removeprefix("name=")] = parts[2]
    return paths


def _dir(root: str, subsystem: str, path: str) -> str | None:
    """The cgroup directory as seen from here: our own path under the mount when it exists
    (no cgroup namespace), else the mount root (a namespaced or bind-mounted container view)."""
    base = os.path.join(root, subsystem) if subsystem else root
    if not os.path.isdir(base):
        return None
    nested = os.path.join(base, path.lstrip("/"))
    return nested if path not in ("", "/") and os.path.isdir(nested) else base


@dataclass
class Sources:
    """Where the figures come from; found once at start-up."""

    kind: str  # "v1", "v2" or "host"
    cpu_dir: str | None = None
    cpuacct_dir: str | None = None
    memory_dir: str | None = None

    @classmethod
    def detect(cls, root: str = CGROUP_ROOT) -> Sources:
        paths = cgroup_paths(_read("/proc/self/cgroup") or "")
        if os.path.exists(os.path.join(root, "memory", "memory.usage_in_bytes")) or os.path.isdir(
            os.path.join(root, "cpuacct")
        ):
            return cls(
                "v1",
                cpu_dir=_dir(root, "cpu", paths.get("cpu", "/")),
                cpuacct_dir=_dir(root, "cpuacct", paths.get("cpuacct", "/")),
                memory_dir=_dir(root, "memory", paths.get("memory", "/")),
            )
        if os.path.exists(os.path.join(root, "cgroup.controllers")):
            unified = _dir(root, "", paths.get("", "/"))
            return cls("v2", cpu_dir=unified, cpuacct_dir=unified, memory_dir=unified)
        return cls("host")


class Sampler:
    def __init__(self, sources: Sources | None = None) -> None:
        self.sources = sources or Sources.detect()
        self._last: tuple[float, int] | None = None

    def cpu_count(self) -> float:
        s = self.sources
        quota: float | None = None
        if s.kind == "v1" and s.cpu_dir:
            q = _int(_read(os.path.join(s.cpu_dir, "cpu.cfs_quota_us")))
            p = _int(_read(os.path.join(s.cpu_dir, "cpu.cfs_period_us")))
            if q and p and q > 0:
                quota = q / p
        elif s.kind == "v2" and s.cpu_dir:
            text = _read(os.path.join(s.cpu_dir, "cpu.max"))
            if text and not text.startswith("max"):
                parts = text.split()
                if len(parts) == 2 and int(parts[1]) > 0:
                    quota = int(parts[0]) / int(parts[1])
        cpus = float(len(os.sched_getaffinity(0)))
        return round(min(quota, cpus), 2) if quota else cpus

    def cpu_usage_ns(self) -> int:
        s = self.sources
        if s.kind == "v1" and s.cpuacct_dir:
            value = _int(_read(os.path.join(s.cpuacct_dir, "cpuacct.usage")))
            if value is not None:
                return value
        if s.kind == "v2" and s.cpu_dir:
            usec = _stat_field(_read(os.path.join(s.cpu_dir, "cpu.stat")), "usage_usec")
            if usec is not None:
                return usec * 1000
        return host_cpu_usage_ns(_read("/proc/stat") or "cpu 0 0 0 0")

    def memory(self) -> tuple[int, int]:
        """(total, used) bytes. Used excludes reclaimable page cache, as `docker stats` does."""
        host_total, host_used = host_memory(_read("/proc/meminfo") or "")
        s = self.sources
        if s.memory_dir is None or s.kind == "host":
            return host_total, host_used
        if s.kind == "v1":
            usage = _int(_read(os.path.join(s.memory_dir, "memory.usage_in_bytes")))
            limit = _int(_read(os.path.join(s.memory_dir, "memory.limit_in_bytes")))
            inactive = _stat_field(_read(os.path.join(s.memory_dir, "memory.stat")), "total_inactive_file")
        else:
            usage = _int(_read(os.path.join(s.memory_dir, "memory.current")))
            limit_text = _read(os.path.join(s.memory_dir, "memory.max"))
            limit = None if limit_text in (None, "max") else _int(limit_text)
            inactive = _stat_field(_read(os.path.join(s.memory_dir, "memory.stat")), "inactive_file")
        if usage is None:
            return host_total, host_used
        total = min(limit, host_total) if limit and host_total else (limit or host_total)
        return total, max(0, min(usage - (inactive or 0), total))

    async def sample(self) -> dict[str, Any]:
        now = time.monotonic()
        usage = self.cpu_usage_ns()
        if self._last is None or not MIN_INTERVAL <= now - self._last[0] <= MAX_BASELINE_AGE:
            # Too short an interval says nothing, and an old baseline gives a long-term average
            # instead of current use: measure over MIN_INTERVAL from here.
            self._last = (now, usage)
            await asyncio.sleep(MIN_INTERVAL)
            now, usage = time.monotonic(), self.cpu_usage_ns()
        last_time, last_usage = self._last
        self._last = (now, usage)
        cpus = self.cpu_count()
        pct = (usage - last_usage) / ((now - last_time) * 1e9 * cpus) * 100 if cpus else 0.0
        total, used = self.memory()
        return {
            "cpu_count": cpus,
            "cpu_used_pct": round(max(0.0, min(100.0, pct)), 2),
            "mem_total_mib": round(total / 1048576, 2),
            "mem_used_mib": round(used / 1048576, 2),
            "timestamp": time.time_ns() // 1_000_000,
        }
