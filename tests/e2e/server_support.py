"""Run `opensandbox-server` (local runtime) as a real subprocess on 127.0.0.1 for e2e tests.

Sandboxes outlive the server by design; `ServerProcess.stop(cleanup=True)` therefore also kills
every jail still recorded in the state dir, so a test never leaves a jail behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.ports import free_port


@dataclass
class ServerProcess:
    workdir: Path
    api_key: str = ""
    port: int = field(default_factory=free_port)
    extra_config: str = ""
    proc: subprocess.Popen[bytes] | None = None

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    @property
    def config_path(self) -> Path:
        return self.workdir / "server.toml"

    @property
    def domain(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.domain}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    def headers(self) -> dict[str, str]:
        return {"OPEN-SANDBOX-API-KEY": self.api_key} if self.api_key else {}

    def host_path(self, sandbox_id: str, jail_path: str) -> Path:
        """Where a path under the jail's private /tmp lives on the host."""
        relative = Path(jail_path).relative_to("/tmp")
        return self.state_dir / "sandboxes" / sandbox_id / "tmp" / relative

    def start(self) -> ServerProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            f'[server]\napiKey = "{self.api_key}"\nlogLevel = "INFO"\n\n'
            f'[local]\nstateDir = "{self.state_dir}"\n{self.extra_config}\n'
        )
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "opensandbox_platform.server.main",
                "--config",
                str(self.config_path),
                "--port",
                str(self.port),
            ],
            stdout=log,
            stderr=log,
            env={k: v for k, v in os.environ.items() if not k.startswith("OPEN_SANDBOX_")},
        )
        log.close()
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not answer /health: {self.log_path.read_text()[-3000:]}")
            time.sleep(0.05)

    def stop(self, cleanup: bool = True) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if cleanup:
            kill_recorded_jails(self.state_dir)

    def records(self) -> list[dict[str, object]]:
        """The records of sandboxes on disk (warm jails nobody claimed yet are left out)."""
        found = []
        for path in (self.state_dir / "sandboxes").glob("*/sandbox.json"):
            with contextlib.suppress(OSError, ValueError):
                record = json.loads(path.read_text())
                if record.get("claimed"):
                    found.append(record)
        return found


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
        pid = int(record.get("pid") or 0)
        if pid and start_ticks(pid) == record.get("start_ticks"):
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


@contextmanager
def running_server(workdir: Path, api_key: str = "", extra_config: str = "") -> Iterator[ServerProcess]:
    server = ServerProcess(workdir, api_key=api_key, extra_config=extra_config).start()
    try:
        yield server
    finally:
        server.stop()
