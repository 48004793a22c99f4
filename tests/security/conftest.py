"""The hostile-code battery's set-up: a server per runtime, canaries planted on the host, a victim
sandbox, and the tenant: a sandbox whose code is the attacker, driven through the official SDK.

Each runtime is a `Target` (tests/security/targets.py): how to start its server and what is known
about it; adding a runtime is adding a target builder there. Canaries (what the tenant must not
reach) are planted before the tenant exists: secret files in the host's /root and /etc and in the
server's state dir, TCP listeners on the host's loopback, its own address and (docker) its bridge
address, a process on the host, and a second sandbox (the victim) with a secret file and its
execd endpoint and token. Every connection a listener accepts is recorded: a test asserts its
listener saw nothing.

The tenant's tools are tests/security/probe.c, compiled statically once per session and copied in,
so the battery does not depend on what the image has.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
from opensandbox import SandboxSync
from opensandbox.config.connection_sync import ConnectionConfigSync
from opensandbox.models.execd import RunCommandOpts
from opensandbox.models.filesystem import WriteEntry

from harness.real_node import enabled as real_node_enabled
from harness.server_process import runtimes_under_test
from tests.security.targets import TARGETS, Target

PROBE_SOURCE = Path(__file__).with_name("probe.c")
PROBE = "/tmp/probe"  # where the tenant keeps it


# -- the runtime and its server ------------------------------------------------------------------


def security_runtimes() -> list[str]:
    """The e2e runtimes, and kubernetes when the real node is on (its pods are the sandboxes)."""
    return [*runtimes_under_test(), *(["kubernetes"] if real_node_enabled() else [])]


@pytest.fixture(scope="session", params=security_runtimes())
def target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    name: str = request.param
    builder = TARGETS.get(name)
    if builder is None:
        pytest.skip(f"no security target for the {name} runtime yet")
    if name == "docker":
        request.getfixturevalue("docker_host")  # podman's Docker API (started if it is not running)
    with builder(tmp_path_factory.mktemp(f"security-{name}")) as built:
        yield built


@pytest.fixture(autouse=True)
def known_gap(request: pytest.FixtureRequest) -> None:
    """A case the runtime cannot block is a strict xfail with the reason (docs/security.md lists them)."""
    if "target" not in request.fixturenames:
        return
    target: Target = request.getfixturevalue("target")
    reason = target.gaps.get(request.node.originalname)
    if reason:
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"{target.name}: {reason}"))


# -- canaries --------------------------------------------------------------------------------------


@dataclass
class Listener:
    """A TCP listener on the host that records every connection it accepts."""

    host: str
    sock: socket.socket = field(init=False)
    accepted: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((self.host, 0))
        self.sock.listen(16)
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.accepted.append(f"{peer[0]}:{peer[1]}")
            with contextlib.suppress(OSError):
                conn.sendall(b"CANARY\n")
                conn.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@dataclass
class Victim:
    sandbox: SandboxSync
    secret: str
    path: str  # its secret file, inside it
    execd: str  # its execd endpoint as the server hands it out (host:port)
    token: str
    address: str  # where other sandboxes on a shared network would reach its execd, if anywhere


@dataclass
class Canaries:
    secret: str
    files: dict[str, Path]  # "root", "etc", "state" -> host path
    listeners: dict[str, Listener]  # "loopback", "host", "bridge", "metadata"
    process: subprocess.Popen[bytes]  # a process on the host
    victim: Victim

    def touched(self) -> dict[str, list[str]]:
        return {name: listener.accepted for name, listener in self.listeners.items() if listener.accepted}


def connection(target: Target) -> ConnectionConfigSync:
    return ConnectionConfigSync(
        domain=target.domain, api_key=target.api_key or None, request_timeout=timedelta(seconds=120)
    )


@pytest.fixture(scope="module")
def canaries(target: Target) -> Iterator[Canaries]:
    secret = "osb-canary-" + secrets.token_hex(8)
    files = {
        "root": Path("/root") / f".{secret}",
        "etc": Path("/etc") / f"{secret}.conf",
        "state": target.state_dir / f"{secret}.secret",
    }
    for path in files.values():
        path.write_text(secret + "\n")
        path.chmod(0o644)  # readable by anyone on the host: only isolation can keep it from the tenant
    victim = _victim(target)  # first: a bridge address exists once a container uses it
    listeners = {"loopback": Listener("127.0.0.1"), "metadata": Listener(target.metadata_listener)}
    for name, address in target.host_addresses.items():
        listeners[name] = Listener(address)
    process = subprocess.Popen(["sleep", "3600"], start_new_session=True)
    try:
        yield Canaries(secret, files, listeners, process, victim)
    finally:
        with contextlib.suppress(Exception):
            victim.sandbox.kill()
        victim.sandbox.close()
        process.kill()
        process.wait()
        for listener in listeners.values():
            listener.close()
        for path in files.values():
            path.unlink(missing_ok=True)


def _victim(target: Target) -> Victim:
    sandbox = SandboxSync.create(target.image, connection_config=connection(target), resource=target.limits)
    secret = "osb-victim-" + secrets.token_hex(8)
    path = "/tmp/victim-secret.txt"
    sandbox.files.write_file(path, secret)
    endpoint = sandbox.get_endpoint(44772)
    token = endpoint.headers.get("X-EXECD-ACCESS-TOKEN", "")
    return Victim(sandbox, secret, path, endpoint.endpoint, token, target.sandbox_address(sandbox.id))


# -- the tenant ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def probe_binary(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.fail("the security battery needs a C compiler (gcc) to build its probe")
    out = tmp_path_factory.mktemp("probe") / "probe"
    subprocess.run([compiler, "-static", "-O1", "-o", str(out), str(PROBE_SOURCE)], check=True, capture_output=True)
    return out.read_bytes()


@dataclass
class Tenant:
    sandbox: SandboxSync

    def probe(self, *args: str, timeout: float = 60) -> str:
        """Run the probe in the sandbox; its output (stdout, then stderr), one line per line."""
        return "\n".join(self.sh(" ".join([PROBE, *(_quote(a) for a in args)]), timeout)[1])

    def sh(self, command: str, timeout: float = 60) -> tuple[int | None, list[str]]:
        run = self.sandbox.commands.run(command, opts=RunCommandOpts(timeout=timedelta(seconds=timeout)))
        return run.exit_code, [m.text for m in run.logs.stdout] + [m.text for m in run.logs.stderr]


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


def new_tenant(target: Target, probe: bytes) -> SandboxSync:
    sandbox = SandboxSync.create(target.image, connection_config=connection(target), resource=target.limits)
    sandbox.files.write_files([WriteEntry(path=PROBE, data=probe, mode=755)])
    return sandbox


@contextlib.contextmanager
def _tenant(target: Target, probe: bytes) -> Iterator[Tenant]:
    sandbox = new_tenant(target, probe)
    try:
        yield Tenant(sandbox)
    finally:
        with contextlib.suppress(Exception):
            sandbox.kill()  # every process of it, whatever it was doing
        sandbox.close()


@pytest.fixture(scope="module")
def tenant(target: Target, canaries: Canaries, probe_binary: bytes) -> Iterator[Tenant]:
    """The attacker for the escape cases (shared: none of them changes it)."""
    with _tenant(target, probe_binary) as attacker:
        yield attacker


@pytest.fixture
def fresh_tenant(target: Target, canaries: Canaries, probe_binary: bytes) -> Iterator[Tenant]:
    """An attacker of its own for one resource attack, deleted (every process killed) afterwards."""
    with _tenant(target, probe_binary) as attacker:
        yield attacker


def host_process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
