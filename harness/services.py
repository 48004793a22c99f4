"""Starting and stopping the services the tests need: the local cluster and podman's Docker API.

A service that is already up (started by `make cluster-up` / `make podman-up`) is reused and left
running; one the tests start is stopped at the end of the session.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from harness.paths import DOCKER_SOCKET, ROOT, TOOLS, cache_dir


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, text=True, capture_output=True, check=False)


def _up_or_fail(script: str, command: str = "up") -> None:
    result = _run(str(TOOLS / script), command)
    if result.returncode != 0:
        raise RuntimeError(f"tools/{script} {command} failed:\n{result.stderr[-4000:]}")


@dataclass(frozen=True)
class LocalCluster:
    kubeconfig: Path
    bin_dir: Path

    def env(self) -> dict[str, str]:
        """The environment for subprocesses (kubectl, helm) that talk to this cluster."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PATH": f"{self.bin_dir}:{os.environ['PATH']}"}

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        result = subprocess.run(
            [str(self.bin_dir / "kubectl"), *args],
            env=self.env(),
            input=input,
            text=True,
            capture_output=True,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result.stdout

    def kill_apiserver(self) -> None:
        """SIGKILL the API server, as a crash would (fault tests; `start_apiserver` brings it back)."""
        _up_or_fail("cluster.sh", "kill-apiserver")

    def start_apiserver(self) -> None:
        """Start the API server again and wait until it is ready."""
        _up_or_fail("cluster.sh", "start-apiserver")


@contextmanager
def local_cluster() -> Iterator[LocalCluster]:
    started = _run(str(TOOLS / "cluster.sh"), "status").returncode != 0
    try:
        if started:
            _up_or_fail("cluster.sh")  # (a failed start is taken down too: nothing half-up is left)
        yield LocalCluster(kubeconfig=ROOT / ".cluster" / "kubeconfig", bin_dir=cache_dir() / "bin")
    finally:
        if started:
            _run(str(TOOLS / "cluster.sh"), "down")


@contextmanager
def podman_docker_host() -> Iterator[str]:
    """Yields a DOCKER_HOST served by `podman system service` (with the test image built)."""
    started = _run(str(TOOLS / "podman.sh"), "status").returncode != 0
    _up_or_fail("podman.sh")  # also makes sure the test image exists
    try:
        yield f"unix://{DOCKER_SOCKET}"
    finally:
        if started:
            _run(str(TOOLS / "podman.sh"), "down")


@dataclass
class PodmanService:
    """A `podman system service` of the caller's own (same storage as every other): a test may
    stop it (SIGSTOP) without stalling anyone else's engine."""

    proc: subprocess.Popen[bytes]
    socket: Path

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"


@contextmanager
def private_podman_service(workdir: Path) -> Iterator[PodmanService]:
    import signal
    import time

    workdir.mkdir(parents=True, exist_ok=True)
    sock = workdir / "docker.sock"
    with open(workdir / "podman-service.log", "ab") as log:
        proc = subprocess.Popen(
            ["podman", "system", "service", "--time=0", f"unix://{sock}"], stdout=log, stderr=log, cwd=workdir
        )
    service = PodmanService(proc, sock)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() or _run("curl", "-sf", "--unix-socket", str(sock), "http://d/_ping").returncode:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"podman service did not start: {(workdir / 'podman-service.log').read_text()}")
            time.sleep(0.1)
        yield service
    finally:
        proc.send_signal(signal.SIGCONT)  # whatever a test did to it
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
