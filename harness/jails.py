"""The local runtime's jails seen from this host: their processes, and removing the ones a server left."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path


def kill_recorded_jails(state_dir: Path) -> None:
    for path in (state_dir / "sandboxes").glob("*/sandbox.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for controller_path in record.get("cgroups", {}).values():
            if controller_path.endswith(record["id"]) and "freezer" in controller_path:
                with contextlib.suppress(OSError):
                    Path(controller_path, "freezer.state").write_text("THAWED")
        for pid_key, ticks_key in (("pid", "start_ticks"), ("helper_pid", "helper_ticks")):  # the jail, slirp4netns
            pid = int(record.get(pid_key) or 0)
            if pid and start_ticks(pid) == record.get(ticks_key):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for _ in range(100):  # a cgroup can be removed once its last process is gone
            remaining = [p for p in record.get("cgroups", {}).values() if Path(p).exists()]
            for controller_path in remaining:
                with contextlib.suppress(OSError):
                    os.rmdir(controller_path)
            if not remaining:
                break
            time.sleep(0.02)


def start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def live_processes_with_hostname_arg(sandbox_id: str) -> list[int]:
    """Live (not zombie) processes of a jail: bwrap's command line names the sandbox id, and
    every process inside has the jail's hostname in its UTS namespace; we look for both."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if sandbox_id.encode() in cmdline or f"HOSTNAME={sandbox_id}".encode() in environ:
            found.append(int(entry))
    return found


def live_processes_mentioning(text: str) -> list[int]:
    """Live (not zombie) processes whose command line contains `text`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if text.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                found.append(int(entry))
        except OSError:
            continue
    return found
