"""execd's `/code` as a plain subprocess (the packaged build with EXECD_BINARY), where the server
would hide what is checked: the readiness port, pre-started kernels, execd's memory while a slow
client reads a flood of output, and that nothing of the kernel machinery runs before it is needed.
Needs a Python kernel on this machine (python3-ipykernel, which `make test` installs)."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.execd_process import Execd, run_execd
from harness.ports import free_port
from opensandbox_platform.execd.code import kernelspecs

pytestmark = pytest.mark.skipif(
    kernelspecs.choose(kernelspecs.scan(os.environ), "python") is None,
    reason="no Python kernel on this machine (apt-get install python3-ipykernel)",
)


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def descendants(pid: int) -> list[int]:
    found = children(pid)
    for child in list(found):
        found += descendants(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def execd_rss_kib(execd: Execd) -> int:
    """The daemon's own RSS (the packaged build is one process too: its bootloader execs itself)."""
    return rss_kib(execd.pid)


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def code_execd(tmp_path: Path, port: int) -> Iterator[Execd]:
    with run_execd(tmp_path / "execd", extra_env={"JUPYTER_PORT": str(port)}) as proc:
        yield proc


def events(execd: Execd, body: object) -> list[dict[str, object]]:
    with httpx.stream("POST", f"{execd.url}/code", json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        return [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]


def test_readiness_port_open_with_kernels_and_nothing_started(code_execd: Execd, port: int) -> None:
    deadline = time.monotonic() + 10
    while not accepts(port):
        assert time.monotonic() < deadline, "the readiness port never opened"
        time.sleep(0.05)
    # Nothing of the kernel machinery runs until /code is used.
    assert not any("kernel_bridge" in cmdline(p) for p in descendants(code_execd.pid))
    done = events(code_execd, {"code": "1 + 1"})
    assert [e["results"] for e in done if e["type"] == "result"] == [{"text": "2"}]


def test_prestart_opens_the_port_once_the_kernel_answers(tmp_path: Path, port: int) -> None:
    env = {"JUPYTER_PORT": str(port), "EXECD_CODE_PRESTART": "python"}
    with run_execd(tmp_path / "execd", extra_env=env) as execd:
        deadline = time.monotonic() + 30
        while not accepts(port):
            assert time.monotonic() < deadline, "the readiness port never opened"
            time.sleep(0.05)
        listed = httpx.get(f"{execd.url}/code/contexts", params={"language": "python"}).json()
        assert len(listed) == 1  # the default context, with its kernel running
        # A pool hands the pod over: the claim's env and cwd reach the kernel started before it.
        claimed = tmp_path / "claimed"
        claim = {"env": {"CLAIMED_BY": "e2e"}, "cwd": str(claimed)}
        assert httpx.post(f"{execd.url}/bootstrap", json=claim).status_code == 200
        started = time.monotonic()
        code = "import os\nprint(40 + 2, os.environ.get('CLAIMED_BY'), os.getcwd())"
        done = events(execd, {"code": code, "context": {"language": "python"}})
        assert time.monotonic() - started < 1.0  # no kernel start on the first cell
        assert done[0]["text"] == listed[0]["id"]
        assert "".join(str(e["text"]) for e in done if e["type"] == "stdout") == f"42 e2e {claimed}\n"
        counts = [e["execution_count"] for e in done if e["type"] == "execution_count"]
        assert counts == [1]  # execd's own cell did not count


def test_a_claim_while_the_prestarted_kernel_starts_reaches_it(tmp_path: Path, port: int) -> None:
    # A pool's pod claimed right after it listens: its kernel is still starting (the readiness
    # port is not open yet), and must still run the first cell with the claim's env and cwd.
    env = {"JUPYTER_PORT": str(port), "EXECD_CODE_PRESTART": "python"}
    with run_execd(tmp_path / "execd", extra_env=env) as execd:
        deadline = time.monotonic() + 30
        while not any("ipykernel" in cmdline(p) for p in descendants(execd.pid)):  # its start was asked
            assert time.monotonic() < deadline, "no kernel process started"
            time.sleep(0.01)
        claimed = tmp_path / "claimed"
        claim = {"env": {"CLAIMED_BY": "early"}, "cwd": str(claimed)}
        assert httpx.post(f"{execd.url}/bootstrap", json=claim).status_code == 200
        assert not accepts(port), "the kernel answered before the claim: this test did not race"
        done = events(execd, {"code": "import os\nprint(os.environ.get('CLAIMED_BY'), os.getcwd())"})
        assert "".join(str(e["text"]) for e in done if e["type"] == "stdout") == f"early {claimed}\n"


def test_slow_client_pauses_the_kernel_and_execd_memory_stays_flat(code_execd: Execd) -> None:
    total = 256 << 20
    code = f"import sys\nblock = 'q' * (1 << 20)\nfor _ in range({total >> 20}):\n    sys.stdout.write(block)"
    events(code_execd, {"code": "1"})  # the bridge and kernel are up
    idle = execd_rss_kib(code_execd)
    peak = idle
    received = 0
    dropped = False
    with httpx.stream("POST", f"{code_execd.url}/code", json={"code": code}, timeout=120) as response:
        assert response.status_code == 200
        for i, line in enumerate(response.iter_lines()):
            if line.startswith("data:"):
                event = json.loads(line[5:])
                if event["type"] == "stdout":
                    received += len(event["text"])
                dropped = dropped or (event["type"] == "stderr" and "dropped" in event["text"])
            if i % 400 == 0:
                peak = max(peak, execd_rss_kib(code_execd))
                if received < total // 4:
                    time.sleep(0.01)  # a slow reader for the first quarter
    # Either everything arrived, or execd dropped what it could not hold and said so.
    assert received == total or (dropped and received < total)
    assert peak - idle < 48 * 1024, f"execd grew from {idle} to {peak} KiB"


def test_last_context_deleted_stops_the_bridge(code_execd: Execd) -> None:
    made = httpx.post(f"{code_execd.url}/code/context", json={"language": "python"}, timeout=60).json()
    bridges = [p for p in descendants(code_execd.pid) if "kernel_bridge" in cmdline(p)]
    assert len(bridges) == 1
    assert httpx.delete(f"{code_execd.url}/code/contexts/{made['id']}", timeout=30).status_code == 200
    deadline = time.monotonic() + 10
    while Path(f"/proc/{bridges[0]}").exists() and "Z" not in Path(f"/proc/{bridges[0]}/stat").read_text().split()[2]:
        assert time.monotonic() < deadline, "the bridge outlived the last context"
        time.sleep(0.05)


def test_client_gone_mid_run_interrupts_the_code(code_execd: Execd) -> None:
    made = httpx.post(f"{code_execd.url}/code/context", json={"language": "python"}, timeout=60).json()
    context = {"id": made["id"], "language": "python"}
    with httpx.stream(
        "POST", f"{code_execd.url}/code", json={"code": "import time\ntime.sleep(60)", "context": context}
    ) as r:
        next(r.iter_lines())  # the run started; now the client goes away
    started = time.monotonic()
    done = events(code_execd, {"code": "'next'", "context": context})
    assert time.monotonic() - started < 20, "the abandoned sleep(60) was not interrupted"
    assert [e["results"] for e in done if e["type"] == "result"] == [{"text": "'next'"}]
