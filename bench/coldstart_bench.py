"""Cold start: how soon execd and the task executor listen and answer after `exec`, next to a bare
`python3 -m http.server` started the same way in the same run; where that time goes; and what an
idle execd costs a sandbox's memory, as the runtime's own stats (podman's) count it.

  startup     each program started N times, interleaved round by round (the machine is shared and
              its load moves: only figures of the same run compare): `listen_ms`, exec -> the first
              TCP connection accepted (connect() succeeds; tried every millisecond), and
              `answer_ms`, exec -> the first HTTP answer on it (execd `/ping`, the executor
              `/health`, http.server `/` of an empty directory). `vs_http_server` divides each p50
              by http.server's. `--baseline PATH` adds another execd build (e.g. the one-file
              executable of an earlier commit) to the same rounds.
  breakdown   one start of execd under `strace -f -ttt`: the bootloader, the interpreter, the
              socket listening, the first answer (strace slows every system call: proportions,
              not absolute times).
  memory      (podman's Docker API up) sandboxes of the docker runtime, each after one command and
              2 s idle: `docker stats` memory usage (the cgroup's, what podman stats shows) and its
              parts (rss = anonymous memory, cache = page cache charged to the sandbox), next to a
              container of the same image running only `sleep infinity`: the difference is what execd
              (with bootstrap.sh) costs the sandbox. `--baseline` adds a container set up as the docker
              runtime did before (that executable and bootstrap.sh copied in with an archive upload).

Run: `uv run python -m bench coldstart` or `uv run python -m bench.coldstart_bench [--n 30]
[--baseline PATH] [--skip-memory]`. Needs build/execd and build/task-executor (tools/build-*.sh).
Writes bench/results/coldstart.json. All traffic goes to 127.0.0.1 and the local Docker socket.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opensandbox import Sandbox  # noqa: E402
from opensandbox.config import ConnectionConfig  # noqa: E402

from bench.common import percentile, summary_ms, write  # noqa: E402
from harness.docker_api import docker_api, docker_unavailable  # noqa: E402
from harness.images import TEST_IMAGE  # noqa: E402
from harness.paths import EXECD_BINARY, TASK_EXECUTOR_BINARY  # noqa: E402
from harness.ports import free_port  # noqa: E402
from harness.server_process import ServerProcess  # noqa: E402

MiB = 1024 * 1024
BOOTSTRAP = ROOT / "images" / "execd-bootstrap.sh"


@dataclass
class Program:
    name: str
    argv: list[str]  # "{port}" and "{dir}" are filled in per start
    path: str  # what to ask once connected

    def args(self, port: int, directory: str) -> list[str]:
        return [a.format(port=port, dir=directory) for a in self.argv]


def programs(baseline: str | None) -> list[Program]:
    loopback = ["--host", "127.0.0.1", "--port", "{port}"]
    found = [
        Program("execd", [str(EXECD_BINARY), *loopback, "--state-dir", "{dir}", "--envs-file", "{dir}/.env"], "/ping"),
        Program("task_executor", [str(TASK_EXECUTOR_BINARY), *loopback, "--data-dir", "{dir}"], "/health"),
        # execd as the local runtime starts it: the Python that runs the server, no site
        Program("execd_python", [sys.executable, "-S", "-m", "opensandbox_platform.execd.main", *loopback], "/ping"),
        Program(
            "http_server", [shutil.which("python3") or "python3", "-m", "http.server", "-b", "127.0.0.1", "{port}"], "/"
        ),
    ]
    if baseline:
        found.append(
            Program("baseline", [baseline, *loopback, "--state-dir", "{dir}", "--envs-file", "{dir}/.env"], "/ping")
        )
    return found


def start_once(program: Program) -> tuple[float, float]:
    """Seconds from exec to the first accepted connection, and to the first answer on it."""
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        env = {**os.environ, "EXECD_LOG_LEVEL": "warning", "TASK_EXECUTOR_LOG_LEVEL": "warning"}
        env["PYTHONPATH"] = str(ROOT / "src")  # (execd_python: -S has no site-packages)
        started = time.perf_counter()
        proc = subprocess.Popen(
            program.args(port, directory),
            cwd=directory,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = started + 20
            while True:
                sock = socket.socket()
                try:
                    sock.connect(("127.0.0.1", port))
                    break
                except ConnectionRefusedError:
                    sock.close()
                    if time.perf_counter() > deadline or proc.poll() is not None:
                        raise RuntimeError(f"{program.name} did not listen") from None
                    time.sleep(0.001)
            listening = time.perf_counter() - started
            with sock:
                sock.sendall(f"GET {program.path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                head = sock.recv(64)
            answered = time.perf_counter() - started
            assert head.startswith(b"HTTP/1."), head
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return listening, answered


def bench_startup(n: int, baseline: str | None) -> dict[str, Any]:
    progs = [p for p in programs(baseline) if Path(p.argv[0]).exists() or shutil.which(p.argv[0])]
    samples: dict[str, list[tuple[float, float]]] = {p.name: [] for p in progs}
    for p in progs:  # a warm-up start each: page cache, not what a sandbox's first start sees
        start_once(p)
    for i in range(n):
        for p in progs[i % len(progs) :] + progs[: i % len(progs)]:  # rotate who goes first
            samples[p.name].append(start_once(p))
    results: dict[str, Any] = {}
    for name, pairs in samples.items():
        results[name] = {
            "listen": summary_ms([a for a, _ in pairs]),
            "answer": summary_ms([b for _, b in pairs]),
        }
    reference = results.get("http_server")
    if reference:
        for figures in results.values():
            figures["vs_http_server"] = {
                kind: round(figures[kind]["p50_ms"] / reference[kind]["p50_ms"], 2) for kind in ("listen", "answer")
            }
    return results


def bench_breakdown(runs: int) -> dict[str, Any] | None:
    """execd under strace: when the bootloader restarts itself, when libpython is opened, when the
    socket listens, when the first answer is written (medians of `runs` starts)."""
    if not shutil.which("strace"):
        return None
    marks: dict[str, list[float]] = {}
    for _ in range(runs):
        port = free_port()
        with tempfile.TemporaryDirectory() as directory:
            trace = Path(directory) / "trace"
            argv = [str(EXECD_BINARY), "--host", "127.0.0.1", "--port", str(port), "--state-dir", directory]
            proc = subprocess.Popen(
                [
                    "strace",
                    "-f",
                    "-ttt",
                    "-e",
                    "trace=execve,openat,listen,accept4,write,sendto",
                    "-o",
                    str(trace),
                    *argv,
                ],
                env={**os.environ, "EXECD_LOG_LEVEL": "warning", "EXECD_ENVS": f"{directory}/.env"},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # strace and execd: one process group to stop
            )
            try:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    try:
                        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                            sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                            sock.recv(64)
                        break
                    except ConnectionRefusedError:
                        time.sleep(0.005)
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
            for mark, at in _trace_marks(trace.read_text(), port).items():
                marks.setdefault(mark, []).append(at)
    return {mark: round(percentile(values, 50), 1) for mark, values in marks.items()} | {"runs": runs}


def _trace_marks(text: str, port: int) -> dict[str, float]:
    """Milliseconds after the first execve of: the bootloader's restart (second execve), libpython
    opened, the socket listening, the first connection accepted, the first answer written."""
    found: dict[str, float] = {}
    start = None
    execs = 0
    for line in text.splitlines():
        match = re.match(r"\d+\s+(\d+\.\d+) (.*)", line)
        if not match:
            continue
        at, call = float(match.group(1)), match.group(2)
        if start is None:
            start = at
        ms = (at - start) * 1000
        if call.startswith("execve(") and "= 0" in call:
            execs += 1
            if execs == 2:
                found.setdefault("bootloader_restarted_ms", ms)
        elif "libpython" in call and call.startswith("openat("):
            found.setdefault("libpython_opened_ms", ms)
        elif call.startswith("listen(") and "listening_ms" not in found:
            found["listening_ms"] = ms
        elif call.startswith("accept4(") and "= -1" not in call and "accepted_ms" not in found:
            found["accepted_ms"] = ms
        elif call.startswith(("write(", "sendto(")) and "HTTP/1.1 200" in call and "answered_ms" not in found:
            found["answered_ms"] = ms
    return found


# -- memory -------------------------------------------------------------------------------------


def container_memory(container: str) -> dict[str, float]:
    stats = docker_api("GET", f"/containers/{container}/stats", params={"stream": "false"}).json()
    memory = stats.get("memory_stats") or {}
    parts = memory.get("stats") or {}
    figures = {"usage_mib": round(memory.get("usage", 0) / MiB, 2)}
    for key in ("rss", "cache", "mapped_file", "inactive_file", "shmem"):
        if key in parts:
            figures[f"{key}_mib"] = round(parts[key] / MiB, 2)
    return figures


def run_container(name: str, body: dict[str, Any], archive: bytes | None = None) -> str:
    created = docker_api("POST", "/containers/create", params={"name": name}, json=body)
    created.raise_for_status()
    container_id: str = created.json()["Id"]
    if archive is not None:
        put = docker_api(
            "PUT", f"/containers/{container_id}/archive", params={"path": "/"}, content=archive,
            headers={"Content-Type": "application/x-tar"},
        )  # fmt: skip
        put.raise_for_status()
    docker_api("POST", f"/containers/{container_id}/start").raise_for_status()
    return container_id


def one_file_archive(binary: Path) -> bytes:
    """opt/opensandbox/{execd,bootstrap.sh}: what the docker runtime copied in before execd was one-dir."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for directory in ("opt", "opt/opensandbox"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in (("execd", binary.read_bytes()), ("bootstrap.sh", BOOTSTRAP.read_bytes())):
            info = tarfile.TarInfo(f"opt/opensandbox/{name}")
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def one_command(port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                body = b'{"command":"true"}'
                sock.sendall(b"POST /command HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%b"
                             % (len(body), body))  # fmt: skip
                reply = b""
                while chunk := sock.recv(65536):
                    reply += chunk
            if b"execution_complete" in reply:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the baseline execd did not run a command")
        time.sleep(0.1)


async def sandboxes_memory(server: ServerProcess, count: int) -> list[dict[str, Any]]:
    config = ConnectionConfig(domain=server.domain, disable_metrics=True)
    sandboxes = [await Sandbox.create(server.image, connection_config=config) for _ in range(count)]
    try:
        own = []
        for sb in sandboxes:
            run = await sb.commands.run("grep -E '^(VmRSS|RssAnon|RssFile)' /proc/$PPID/status")  # $PPID: execd
            own.append({line.text.split(":")[0]: int(line.text.split()[1]) / 1024 for line in run.logs.stdout})
        await asyncio.sleep(2)
        figures = []
        for sb, rss in zip(sandboxes, own, strict=True):
            memory = container_memory(f"sandbox-{sb.id}")
            # The sandbox's own cgroup: anonymous memory and page cache charged to it (v1, else v2 names).
            stat = await sb.commands.run(
                "cat /sys/fs/cgroup/memory/memory.stat 2>/dev/null || cat /sys/fs/cgroup/memory.stat"
            )
            values = dict(line.text.split()[:2] for line in stat.logs.stdout if len(line.text.split()) >= 2)
            cgroup = {f"cgroup_{key}_mib": round(int(values[key]) / MiB, 2)
                      for key in ("rss", "cache", "mapped_file", "shmem", "anon", "file") if key in values}  # fmt: skip
            figures.append({**memory, **cgroup, "execd_rss_mib": round(rss.get("VmRSS", 0), 2),
                            "execd_rss_anon_mib": round(rss.get("RssAnon", 0), 2),
                            "execd_rss_file_mib": round(rss.get("RssFile", 0), 2)})  # fmt: skip
        return figures
    finally:
        for sb in sandboxes:
            await sb.kill()
            await sb.close()


def bench_memory(count: int, baseline: str | None) -> dict[str, Any]:
    results: dict[str, Any] = {}
    suffix = os.getpid()
    made: list[str] = []
    try:
        # The reference: the same image, nothing but its entrypoint.
        made.append(run_container(f"coldstart-ref-{suffix}", {"Image": TEST_IMAGE, "Cmd": ["sleep", "infinity"]}))
        if baseline:
            body = {
                "Image": TEST_IMAGE,
                "Entrypoint": ["/opt/opensandbox/bootstrap.sh"],
                "Cmd": ["sleep", "infinity"],
                "Env": ["EXECD=/opt/opensandbox/execd", "EXECD_ENVS=/opt/opensandbox/.env"],
                "ExposedPorts": {"44772/tcp": {}},
                "HostConfig": {"PortBindings": {"44772/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]}},
            }
            made.append(run_container(f"coldstart-baseline-{suffix}", body, one_file_archive(Path(baseline))))
            ports = docker_api("GET", f"/containers/{made[-1]}/json").json()["NetworkSettings"]["Ports"]
            one_command(int(ports["44772/tcp"][0]["HostPort"]))  # as the runtime's sandboxes get, then idle
        with tempfile.TemporaryDirectory(prefix="coldstart-bench-") as tmp:
            server = ServerProcess(Path(tmp), runtime="docker").start()
            try:
                sandboxes = asyncio.run(sandboxes_memory(server, count))
            except Exception:
                print(server.logs()[-4000:])
                raise
            finally:
                server.stop()
        results["reference_sleep_only"] = container_memory(made[0])
        if baseline:
            results["baseline_one_file_archive"] = container_memory(made[1])
        results["sandboxes"] = sandboxes
        usage = sorted(s["usage_mib"] for s in sandboxes)
        median = usage[len(usage) // 2]
        results["sandbox_usage_p50_mib"] = median
        results["charged_by_execd_mib"] = round(median - results["reference_sleep_only"]["usage_mib"], 2)
        if baseline:
            base = results["baseline_one_file_archive"]["usage_mib"]
            results["baseline_charged_by_execd_mib"] = round(base - results["reference_sleep_only"]["usage_mib"], 2)
    finally:
        for container in made:
            docker_api("DELETE", f"/containers/{container}", params={"force": "true"})
    return results


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=30, help="starts of each program")
    parser.add_argument("--baseline", help="another execd executable to compare (e.g. an earlier one-file build)")
    parser.add_argument("--sandboxes", type=int, default=3, help="docker sandboxes measured for memory")
    parser.add_argument("--skip-memory", action="store_true", help="no podman part")
    args = parser.parse_args(argv)
    for needed in (EXECD_BINARY, TASK_EXECUTOR_BINARY):
        if not needed.exists():
            print(f"coldstart: {needed} is missing (tools/build-execd.sh, tools/build-task-executor.sh)")
            return
    results: dict[str, Any] = {"load_avg_at_start": os.getloadavg()}
    results["startup"] = bench_startup(args.n, args.baseline)
    for name, figures in results["startup"].items():
        listen, answer = figures["listen"]["p50_ms"], figures["answer"]["p50_ms"]
        ratio = figures.get("vs_http_server")
        print(f"{name:14s} listen p50 {listen:6.1f} ms  answer p50 {answer:6.1f} ms  vs http.server {ratio}")
    results["breakdown_under_strace"] = bench_breakdown(5)
    print("breakdown (under strace)", results["breakdown_under_strace"], flush=True)
    reason = None if not args.skip_memory else "--skip-memory"
    reason = reason or docker_unavailable()
    if reason:
        print(f"memory: skipped: {reason}")
    else:
        results["memory"] = bench_memory(args.sandboxes, args.baseline)
        print("memory", json.dumps({k: v for k, v in results["memory"].items() if k != "sandboxes"}), flush=True)
    results["load_avg_at_end"] = os.getloadavg()
    write("coldstart", {"params": vars(args), **results})


if __name__ == "__main__":
    main(sys.argv[1:])
