"""cgroup v1 groups per sandbox: memory, cpu and pids limits, and the freezer for pause.

Each controller's group is created under this server's own group of that controller (plus
`opensandbox/`), so sandboxes stay inside whatever limits the server itself was given. A
controller that is missing or read-only is skipped; `available` says which ones work.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

log = logging.getLogger("opensandbox.local.cgroups")

ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("memory", "cpu", "pids", "freezer")
CPU_PERIOD_US = 100_000


def _own_groups() -> dict[str, str]:
    groups: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, names, path = line.split(":", 2)
            for name in names.split(","):
                groups[name] = path
    return groups


class Cgroups:
    def __init__(self, root: Path = ROOT, enabled: bool = True) -> None:
        self.parents: dict[str, Path] = {}
        own = _own_groups()
        for controller in CONTROLLERS if enabled else ():
            parent = root / controller / own.get(controller, "/").lstrip("/") / "opensandbox"
            try:
                parent.mkdir(parents=True, exist_ok=True)
                probe = parent / ".probe"
                probe.mkdir(exist_ok=True)
                probe.rmdir()
            except OSError:
                continue
            self.parents[controller] = parent
        log.info("cgroup controllers available=%s", ",".join(self.parents) or "none")

    @property
    def available(self) -> list[str]:
        return list(self.parents)

    def create(self, name: str) -> dict[str, str]:
        paths = {}
        for controller, parent in self.parents.items():
            path = parent / name
            path.mkdir(exist_ok=True)
            paths[controller] = str(path)
        return paths

    @staticmethod
    def attach(paths: dict[str, str], pid: int) -> None:
        for path in paths.values():
            Path(path, "cgroup.procs").write_text(str(pid))

    @staticmethod
    def set_limits(
        paths: dict[str, str], cpu_millis: int | None, memory_bytes: int | None, max_processes: int | None
    ) -> None:
        if memory_bytes and "memory" in paths:
            Path(paths["memory"], "memory.limit_in_bytes").write_text(str(memory_bytes))
        if cpu_millis and "cpu" in paths:
            Path(paths["cpu"], "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
            Path(paths["cpu"], "cpu.cfs_quota_us").write_text(str(cpu_millis * CPU_PERIOD_US // 1000))
        if max_processes and "pids" in paths:
            Path(paths["pids"], "pids.max").write_text(str(max_processes))

    @staticmethod
    def freezer_state(paths: dict[str, str]) -> str | None:
        if "freezer" not in paths:
            return None
        try:
            return Path(paths["freezer"], "freezer.state").read_text().strip()
        except OSError:
            return None

    @staticmethod
    def oom_kills(paths: dict[str, str]) -> int:
        """Processes the kernel's OOM killer ended in the memory group (`oom_kill` of memory.oom_control)."""
        if "memory" not in paths:
            return 0
        try:
            lines = Path(paths["memory"], "memory.oom_control").read_text().splitlines()
        except OSError:
            return 0
        for line in lines:
            name, _, value = line.partition(" ")
            if name == "oom_kill" and value.strip().isdigit():
                return int(value)
        return 0

    @staticmethod
    def set_frozen(paths: dict[str, str], frozen: bool) -> None:
        Path(paths["freezer"], "freezer.state").write_text("FROZEN" if frozen else "THAWED")

    @staticmethod
    def procs(paths: dict[str, str]) -> list[int]:
        for path in paths.values():
            with contextlib.suppress(OSError):
                return [int(p) for p in Path(path, "cgroup.procs").read_text().split()]
        return []

    @staticmethod
    def remove(paths: dict[str, str]) -> bool:
        """Remove the groups; False while some still hold processes."""
        done = True
        for path in paths.values():
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError:
                done = False
        return done
