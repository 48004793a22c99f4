"""Run `opensandbox-server` as a real subprocess on 127.0.0.1 for e2e tests, with any runtime.

A `Flavor` per runtime says what the tests need to know of it: the config snippet, the image to
ask for, how to clean up and where a sandbox's files are on this host. `OSB_E2E_RUNTIMES`
(default `local,docker`) picks the runtimes the shared `server` fixture runs the suite with; a
runtime whose service is missing is skipped with the reason.

Sandboxes outlive the server by design; `ServerProcess.stop(cleanup=True)` therefore also removes
every sandbox the server left (jails recorded in the state dir, containers it created).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.server_process import ServerSubprocess

REPO = Path(__file__).resolve().parents[2]
DOCKER_SOCKET = REPO / ".podman" / "docker.sock"
DOCKER_TEST_IMAGE = "localhost/opensandbox-test-base:latest"
DOCKER_EXECD_IMAGE = "localhost/opensandbox/execd:dev"
EXECD_BINARY = REPO / "build" / "execd" / "opensandbox-execd"
EXECD_BOOTSTRAP = REPO / "images" / "execd-bootstrap.sh"
DOCKER_ID_LABEL = "opensandbox.io/id"


def runtimes_under_test() -> list[str]:
    return [r.strip() for r in os.environ.get("OSB_E2E_RUNTIMES", "local,docker").split(",") if r.strip()]


def docker_host() -> str:
    return os.environ.get("DOCKER_HOST") or f"unix://{DOCKER_SOCKET}"


def docker_api(method: str, path: str, **kwargs: object) -> httpx.Response:
    """One call to the Docker Engine API (podman's) the docker runtime uses."""
    host = docker_host()
    if not host.startswith("unix://"):
        raise RuntimeError(f"tests speak to a unix socket only, not {host}")
    transport = httpx.HTTPTransport(uds=host.removeprefix("unix://"))
    with httpx.Client(transport=transport, base_url="http://docker/v1.41", timeout=60) as client:
        return client.request(method, path, **kwargs)  # type: ignore[arg-type]


def docker_containers(label: str = DOCKER_ID_LABEL) -> list[dict[str, object]]:
    response = docker_api("GET", "/containers/json", params={"all": "true", "filters": json.dumps({"label": [label]})})
    response.raise_for_status()
    items: list[dict[str, object]] = response.json()
    return items


def docker_unavailable() -> str | None:
    """Why the docker runtime cannot be tested here, or None."""
    try:
        if docker_api("GET", "/_ping").status_code != 200:
            return "the Docker API does not answer"
        if docker_api("GET", f"/images/{DOCKER_TEST_IMAGE}/json").status_code != 200:
            return f"{DOCKER_TEST_IMAGE} is missing (make podman-up)"
    except (httpx.TransportError, RuntimeError) as exc:
        return f"no Docker API at {docker_host()}: {exc} (make podman-up)"
    if not EXECD_BINARY.exists():
        return f"{EXECD_BINARY} is missing (make execd-binary)"
    return None


@dataclass(frozen=True)
class Flavor:
    """What the e2e tests need to know of one runtime."""

    name: str
    image: str  # image.uri the tests create sandboxes from
    exited_reason: str  # status.reason of a sandbox whose entrypoint exited 0

    def config(self, server: ServerProcess) -> str:
        if self.name == "docker":
            # execd from the build (what `make test` just rebuilt) unless the test wants the image's.
            execd = (
                ""
                if server.execd_from_image
                else f'execdBinary = "{EXECD_BINARY}"\nexecdBootstrap = "{EXECD_BOOTSTRAP}"\n'
            )
            return (
                f'[runtime]\ntype = "docker"\nexecdImage = "{DOCKER_EXECD_IMAGE}"\n\n'
                f'[docker]\nhost = "{docker_host()}"\nstateDir = "{server.state_dir}"\n{execd}'
            )
        return f'[local]\nstateDir = "{server.state_dir}"\n'

    def unavailable(self) -> str | None:
        return docker_unavailable() if self.name == "docker" else None


FLAVORS = {
    "local": Flavor("local", image="ubuntu", exited_reason="JAIL_EXITED"),
    "docker": Flavor("docker", image=DOCKER_TEST_IMAGE, exited_reason="CONTAINER_EXITED"),
}


@dataclass
class ServerProcess(ServerSubprocess):
    api_key: str = ""
    extra_config: str = ""  # appended to the runtime's own section
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
        server = f'[server]\napiKey = "{self.api_key}"\nlogLevel = "INFO"\n\n'
        return f"{server}{self.flavor.config(self)}{self.extra_config}\n"

    def headers(self) -> dict[str, str]:
        return {"OPEN-SANDBOX-API-KEY": self.api_key} if self.api_key else {}

    def host_path(self, sandbox_id: str, jail_path: str) -> Path:
        """Where a path under the sandbox's /tmp is on this host."""
        relative = Path(jail_path).relative_to("/tmp")
        if self.runtime == "docker":  # the container's root, through its first process
            pid = docker_api("GET", f"/containers/sandbox-{sandbox_id}/json").json()["State"]["Pid"]
            return Path(f"/proc/{pid}/root/tmp") / relative
        return self.state_dir / "sandboxes" / sandbox_id / "tmp" / relative

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


def remove_recorded_containers(state_dir: Path) -> None:
    """Every sandbox the docker runtime finished creating has a file in its state dir."""
    for path in state_dir.glob("*.json"):
        docker_api("DELETE", f"/containers/sandbox-{path.stem}", params={"force": "true", "v": "true"})


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


def only_local(server: ServerProcess, why: str) -> None:
    """Skip a test of the local runtime's internals (jail directories, warm pool, records)."""
    if server.runtime != "local":
        import pytest

        pytest.skip(f"inspects local runtime internals: {why}")


@contextmanager
def running_server(
    workdir: Path, api_key: str = "", extra_config: str = "", runtime: str = "local"
) -> Iterator[ServerProcess]:
    server = ServerProcess(workdir, api_key=api_key, extra_config=extra_config, runtime=runtime).start()
    try:
        yield server
    finally:
        server.stop()
