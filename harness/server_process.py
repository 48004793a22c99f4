"""`opensandbox-server` as a real subprocess on 127.0.0.1: its config written to its workdir, started,
waited for on /health, stopped with SIGTERM.

`ServerSubprocess` does that for every runtime; what the config says is its subclasses': `ServerProcess`
here (the local and docker runtimes) and `KubernetesServer` (harness/kubernetes_server.py).

For the local and docker runtimes, a `Flavor` per runtime says what the tests need to know of it: the
config snippet, the image to ask for, how to clean up and where a sandbox's files are on this host.
`OSB_E2E_RUNTIMES` (default `local,docker`) picks the runtimes the shared `server` fixture runs the suite
with; a runtime whose service is missing is skipped with the reason.

Sandboxes outlive the server by design; `ServerProcess.stop(cleanup=True)` therefore also removes
every sandbox the server left (jails recorded in the state dir, containers it created).
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
from typing import ClassVar, Self

import httpx

from harness.docker_api import (
    DOCKER_ID_LABEL,
    docker_api,
    docker_containers,
    docker_host,
    docker_unavailable,
    remove_recorded_containers,
)
from harness.images import EXECD_IMAGE, TEST_IMAGE
from harness.jails import kill_recorded_jails
from harness.paths import EXECD_DIR
from harness.ports import free_port


@dataclass
class ServerSubprocess:
    workdir: Path
    port: int = field(default_factory=free_port, kw_only=True)
    proc: subprocess.Popen[bytes] | None = field(default=None, kw_only=True)
    started: ClassVar[list[ServerSubprocess]] = []  # every server this test session started (log_since)

    def config(self) -> str:
        """The server's TOML config."""
        raise NotImplementedError

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

    def start(self) -> Self:
        """Starts the server and returns once it answers /health (RuntimeError with its log if not)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config())
        ServerSubprocess.started.append(self)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "opensandbox_platform.server.main", "--config", str(self.config_path),
                 "--port", str(self.port)],
                stdout=log, stderr=log,
                env={k: v for k, v in os.environ.items() if not k.startswith("OPEN_SANDBOX_")},
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.logs()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not answer /health: {self.logs()[-3000:]}")
            time.sleep(0.05)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_since(self, offset: int) -> str:
        """What the server logged after `offset` (a `log_size()`)."""
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- the local and docker runtimes ----------------------------------------------------------------------------
def runtimes_under_test() -> list[str]:
    return [r.strip() for r in os.environ.get("OSB_E2E_RUNTIMES", "local,docker").split(",") if r.strip()]


@dataclass(frozen=True)
class Flavor:
    """What the e2e tests need to know of one runtime."""

    name: str
    image: str  # image.uri the tests create sandboxes from
    exited_reason: str  # status.reason of a sandbox whose entrypoint exited 0

    def config(self, server: ServerProcess) -> str:
        if self.name == "docker":
            # execd from the build (what `make test` just rebuilt) unless the test wants the image's.
            execd = "" if server.execd_from_image else f'execdDir = "{EXECD_DIR}"\n'
            return (
                f'[runtime]\ntype = "docker"\nexecdImage = "{EXECD_IMAGE}"\n\n'
                f'[docker]\nhost = "{server.engine_host or docker_host()}"\nstateDir = "{server.state_dir}"\n{execd}'
            )
        return f'[local]\nstateDir = "{server.state_dir}"\n'

    def unavailable(self) -> str | None:
        return docker_unavailable() if self.name == "docker" else None


FLAVORS = {
    "local": Flavor("local", image="ubuntu", exited_reason="JAIL_EXITED"),
    "docker": Flavor("docker", image=TEST_IMAGE, exited_reason="CONTAINER_EXITED"),
}


@dataclass
class ServerProcess(ServerSubprocess):
    api_key: str = ""
    extra_config: str = ""  # appended to the runtime's own section
    server_config: str = ""  # appended to the [server] section
    engine_host: str = ""  # docker: this Docker API instead of the shared podman service
    runtime: str = "local"
    execd_from_image: bool = False  # docker: copy execd out of runtime.execdImage, not build/execd

    @property
    def flavor(self) -> Flavor:
        return FLAVORS[self.runtime]

    @property
    def image(self) -> str:
        return self.flavor.image

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    def config(self) -> str:
        server = f'[server]\napiKey = "{self.api_key}"\nlogLevel = "INFO"\n{self.server_config}\n\n'
        return f"{server}{self.flavor.config(self)}{self.extra_config}\n"

    def headers(self) -> dict[str, str]:
        return {"OPEN-SANDBOX-API-KEY": self.api_key} if self.api_key else {}

    def host_path(self, sandbox_id: str, jail_path: str) -> Path:
        """Where a path of the sandbox is seen from this host: through its first process's root."""
        if self.runtime == "docker":
            pid = int(docker_api("GET", f"/containers/sandbox-{sandbox_id}/json").json()["State"]["Pid"])
        else:
            (pid,) = [int(str(r["pid"])) for r in self.records() if r["id"] == sandbox_id]
        return Path(f"/proc/{pid}/root") / Path(jail_path).relative_to("/")

    def make_dirs(self, sandbox_id: str, jail_path: str) -> None:
        """mkdir -p in the sandbox, owned by the sandbox's root (a host uid of its own on local)."""
        path = self.host_path(sandbox_id, jail_path)
        owner = path.parents[len(Path(jail_path).parts) - 2].stat()  # the sandbox's /
        path.mkdir(parents=True)
        for made in [path, *path.parents][: len(Path(jail_path).parts) - 2]:
            os.chown(made, owner.st_uid, owner.st_gid)

    def sandboxes_on_host(self) -> set[str]:
        """Ids of what the runtime holds on this host: jail directories, or labelled containers."""
        if self.runtime == "docker":
            return {str(c["Labels"][DOCKER_ID_LABEL]) for c in docker_containers()}  # type: ignore[index]
        return {p.name for p in (self.state_dir / "sandboxes").iterdir()}

    def stop(self, cleanup: bool = True) -> None:
        super().stop()
        if cleanup:
            if self.runtime == "docker":
                remove_recorded_containers(self.state_dir)
            else:
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


def only_local(server: ServerProcess, why: str) -> None:
    """Skip a test of the local runtime's internals (jail directories, warm pool, records)."""
    if server.runtime != "local":
        import pytest

        pytest.skip(f"inspects local runtime internals: {why}")


@contextmanager
def running_server(
    workdir: Path, api_key: str = "", extra_config: str = "", runtime: str = "local", server_config: str = ""
) -> Iterator[ServerProcess]:
    server = ServerProcess(
        workdir, api_key=api_key, extra_config=extra_config, runtime=runtime, server_config=server_config
    ).start()
    try:
        yield server
    finally:
        server.stop()
