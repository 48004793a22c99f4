"""Resource attacks by the tenant: each stays inside its sandbox's limits while a second sandbox and
the server keep answering. Each prints the second sandbox's command latency (p50/p99) and the
server's /health p99 during the attack, next to a baseline measured the same way without one.

Every attack runs inside a fresh tenant with its limits (1 CPU, 256 MiB, the runtime's pids limit,
the sandbox's storage), ends on its own (the probe sets alarms), and the tenant is deleted (every
process killed) after the test whatever happened: nothing can be left running on the host.
"""

from __future__ import annotations

import os
import shutil
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from harness.locks import machine_lock
from tests.security.conftest import PROBE, Canaries, Tenant
from tests.security.targets import Target

DISK_MIB = 128  # the tenant's storage quota on targets that have one (local: diskSizeMib)
MIN_SECONDS = 3.0  # measure at least this long, however quickly the attack is over
MAX_VICTIM_P99 = 3.0  # seconds: generous, the machine is shared; the printed figures are the point
MAX_SERVER_P99 = 2.0


@pytest.fixture(autouse=True)
def alone_on_the_machine() -> Iterator[None]:
    """These attacks are measured on the whole host (its processes, memory and disk): the other part of
    `make test` (tools/test.sh) runs them for its runtimes at the same time; one attack at a time."""
    with machine_lock("resource-attacks"):
        yield


@dataclass
class Measured:
    victim: list[float] = field(default_factory=list)
    server: list[float] = field(default_factory=list)
    host_processes: list[int] = field(default_factory=list)
    host_available_mib: list[int] = field(default_factory=list)

    def p(self, values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    def line(self, what: str) -> str:
        return (
            f"{what}: second sandbox command p50 {self.p(self.victim, 0.5) * 1000:.0f} ms,"
            f" p99 {self.p(self.victim, 0.99) * 1000:.0f} ms (n={len(self.victim)});"
            f" server /health p99 {self.p(self.server, 0.99) * 1000:.0f} ms"
        )


def host_processes() -> int:
    return sum(1 for entry in os.listdir("/proc") if entry.isdigit())


def available_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


def measure(target: Target, canaries: Canaries, seconds: float, done: threading.Event | None = None) -> Measured:
    """Commands in the second sandbox and /health of the server, back to back, for `seconds`
    (or until `done`), with the host's process count and available memory sampled alongside."""
    measured = Measured()
    stop = time.monotonic() + seconds
    at_least = time.monotonic() + MIN_SECONDS

    def going() -> bool:
        now = time.monotonic()
        return now < at_least or (now < stop and not (done and done.is_set()))

    def health() -> None:
        with httpx.Client(timeout=30) as client:
            while going():
                start = time.monotonic()
                client.get(f"http://{target.domain}/health")
                measured.server.append(time.monotonic() - start)
                time.sleep(0.05)

    thread = threading.Thread(target=health, daemon=True)
    thread.start()
    while going():
        start = time.monotonic()
        run = canaries.victim.sandbox.commands.run("true")
        measured.victim.append(time.monotonic() - start)
        assert run.exit_code == 0
        measured.host_processes.append(host_processes())
        measured.host_available_mib.append(available_mib())
    thread.join()
    return measured


@pytest.fixture(scope="module")
def baseline(target: Target, canaries: Canaries) -> Measured:
    measured = measure(target, canaries, 5)
    print("\n" + measured.line(f"[{target.name}] baseline, no attack"))
    return measured


def attack(tenant: Tenant, target: Target, canaries: Canaries, command: str, seconds: float) -> tuple[str, Measured]:
    """Run `command` in the tenant (foreground, in a thread) while measuring; its output and the figures."""
    output: list[str] = []

    def run() -> None:
        try:
            code, lines = tenant.sh(command, timeout=seconds + 60)
            output.extend([f"exit={code}", *lines])
        except Exception as exc:  # the tenant's own commands may fail: that is containment too
            output.append(f"failed: {exc}")
        finally:
            done.set()

    done = threading.Event()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    measured = measure(target, canaries, seconds + 30, done)
    thread.join(timeout=90)
    return "\n".join(output), measured


def check_neighbours(measured: Measured, baseline: Measured, what: str, target: Target) -> None:
    print("\n" + measured.line(f"[{target.name}] {what}"))
    assert measured.victim, "the second sandbox answered no command during the attack"
    assert measured.p(measured.victim, 0.99) < MAX_VICTIM_P99, measured.line(what)
    assert measured.p(measured.server, 0.99) < MAX_SERVER_P99, measured.line(what)


def test_a_fork_bomb_is_contained(fresh_tenant: Tenant, target: Target, canaries: Canaries, baseline: Measured) -> None:
    before = host_processes()
    output, measured = attack(fresh_tenant, target, canaries, f"{PROBE} forkbomb 10", 10)
    check_neighbours(measured, baseline, "fork bomb", target)
    peak = max(measured.host_processes)
    assert peak - before <= target.max_processes + 200, f"host processes {before} -> {peak}: {output}"
    assert "failures=0" not in output, output  # it did hit the limit


def test_a_memory_bomb_is_contained(
    fresh_tenant: Tenant, target: Target, canaries: Canaries, baseline: Measured
) -> None:
    before = available_mib()
    output, measured = attack(fresh_tenant, target, canaries, f"{PROBE} membomb 4096", 10)
    check_neighbours(measured, baseline, "memory bomb", target)
    assert "mib=4096" not in output, output  # killed by its memory limit (or refused) long before
    assert before - min(measured.host_available_mib) < 1024, f"host MemAvailable {before} -> {measured}"


def test_filling_the_disk_hits_the_sandboxs_own_quota(
    fresh_tenant: Tenant, target: Target, canaries: Canaries, baseline: Measured
) -> None:
    free_before = shutil.disk_usage("/").free
    output, measured = attack(fresh_tenant, target, canaries, f"{PROBE} fill /workspace/fill {DISK_MIB * 2}", 20)
    check_neighbours(measured, baseline, "disk fill", target)
    written = int(output.split("written_mib=")[1].split()[0]) if "written_mib=" in output else 0
    assert written <= DISK_MIB, f"wrote {written} MiB past a {DISK_MIB} MiB quota: {output}"
    assert "errno=28" in output, output  # ENOSPC: its own quota, not the host's disk
    assert free_before - shutil.disk_usage("/").free < 128 << 20


def test_ten_thousand_open_files_are_contained(
    fresh_tenant: Tenant, target: Target, canaries: Canaries, baseline: Measured
) -> None:
    output, measured = attack(fresh_tenant, target, canaries, f"{PROBE} files 10000", 3)
    check_neighbours(measured, baseline, "10,000 open files", target)
    assert "opened=" in output, output


def test_a_cpu_spin_is_contained(fresh_tenant: Tenant, target: Target, canaries: Canaries, baseline: Measured) -> None:
    _, measured = attack(fresh_tenant, target, canaries, f"{PROBE} spin 10 4", 10)
    check_neighbours(measured, baseline, "CPU spin (4 processes)", target)
    assert statistics.median(measured.victim) < 1.0, measured.line("CPU spin")
