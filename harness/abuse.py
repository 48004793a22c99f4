"""Abusive clients for the reliability tests and benchmark, against a server on 127.0.0.1 only.

Each attack runs in its own process (`python -m harness.abuse ATTACK --port P --seconds S ...`,
or `attack_process(...)`), so that it does not share an interpreter with the client that
measures how the server answers everyone else meanwhile (`HealthProbe`: `GET /health` on a
kept-alive connection, reconnecting when the server closes it, as an SDK's pool does).

Attacks:
- `huge-header`: requests with one header of `--size` bytes, back to back;
- `slowloris`: `--connections` connections sending a request head one byte every `--interval` s,
  reopened when the server closes them;
- `idle`: `--connections` connections that send nothing (no API key, no request), reopened when
  closed: the descriptor-exhaustion attack.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

LOOPBACK = "127.0.0.1"


# -- the attacks ---------------------------------------------------------------------------------


def huge_header(port: int, seconds: float, size: int) -> dict[str, int]:
    """Requests with a `size`-byte header until `seconds` are up; counts the answers by status
    ("reset": the server's refusal was lost in the reset of a connection we were still writing to)."""
    answers: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    chunk = b"a" * (1 << 20)
    while time.monotonic() < deadline:
        status = "none"
        try:
            with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
                with contextlib.suppress(OSError):  # the server stops reading: our writes fail
                    for offset in range(0, size, len(chunk)):
                        sock.sendall(chunk[: min(len(chunk), size - offset)])
                    sock.sendall(b"\r\n\r\n")
                try:
                    line = sock.recv(4096).split(b"\r\n", 1)[0]
                    status = line.split(b" ")[1].decode() if line.count(b" ") >= 2 else "none"
                except OSError:
                    status = "reset"
        except OSError:
            status = "connect-error"
        answers[status] = answers.get(status, 0) + 1
    return answers


async def slowloris(port: int, seconds: float, connections: int, interval: float) -> dict[str, int]:
    """`connections` heads trickled byte by byte; counts how often the server cut one off."""
    counts = {"opened": 0, "closed_by_server": 0}
    deadline = time.monotonic() + seconds
    head = b"GET /v1/sandboxes HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 100_000

    async def one() -> None:
        while time.monotonic() < deadline:
            try:
                reader, writer = await asyncio.open_connection(LOOPBACK, port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            counts["opened"] += 1
            try:
                for byte in head:
                    if time.monotonic() > deadline or reader.at_eof():
                        break
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(interval)
            except ConnectionError:
                pass
            if reader.at_eof() or writer.is_closing():
                counts["closed_by_server"] += 1
            writer.close()

    await asyncio.gather(*(one() for _ in range(connections)))
    return counts


async def idle(port: int, seconds: float, connections: int) -> dict[str, int]:
    """`connections` sockets that never send a byte, each reopened when the server closes it."""
    counts = {"opened": 0, "closed_by_server": 0, "connect_errors": 0}
    deadline = time.monotonic() + seconds

    async def one() -> None:
        while time.monotonic() < deadline:
            try:
                reader, writer = await asyncio.open_connection(LOOPBACK, port)
            except OSError:
                counts["connect_errors"] += 1
                await asyncio.sleep(0.05)
                continue
            counts["opened"] += 1
            with contextlib.suppress(TimeoutError, ConnectionError):
                await asyncio.wait_for(reader.read(), max(deadline - time.monotonic(), 0.01))
                counts["closed_by_server"] += 1
            writer.close()

    await asyncio.gather(*(one() for _ in range(connections)))
    return counts


def attack_process(attack: str, port: int, seconds: float, **options: int | float) -> subprocess.Popen[str]:
    """The attack in its own process; its counts are the last line of its stdout (JSON)."""
    args = [sys.executable, "-m", "harness.abuse", attack, "--port", str(port), "--seconds", str(seconds)]
    for name, value in options.items():
        args += [f"--{name}", str(value)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def main(argv: list[str] | None = None) -> None:
    import json
    import resource

    parser = argparse.ArgumentParser(prog="harness.abuse", description=__doc__)
    parser.add_argument("attack", choices=["huge-header", "slowloris", "idle"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=96 << 20)
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--interval", type=float, default=0.5)
    args = parser.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.attack == "huge-header":
        result = huge_header(args.port, args.seconds, args.size)
    elif args.attack == "slowloris":
        result = asyncio.run(slowloris(args.port, args.seconds, args.connections, args.interval))
    else:
        result = asyncio.run(idle(args.port, args.seconds, args.connections))
    print(json.dumps(result), flush=True)


# -- the client that measures ----------------------------------------------------------------------


@dataclass
class HealthProbe:
    """`GET /health` every `interval` seconds on one kept-alive connection, in a thread; latencies
    in milliseconds (a request that fails counts as a failure, its time is not kept)."""

    port: int
    interval: float = 0.02
    timeout: float = 10.0
    latencies: list[float] = field(default_factory=list)
    failures: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((LOOPBACK, self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _one(self, sock: socket.socket) -> None:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: probe\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
        )
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            body += chunk
        if not head.startswith(b"HTTP/1.1 200"):
            raise ConnectionError(head.split(b"\r\n")[0].decode())

    def _run(self) -> None:
        sock: socket.socket | None = None
        while not self._stop.is_set():
            started = time.perf_counter()
            for attempt in (1, 2):  # a kept-alive connection the server closed: once more, on a new one
                try:
                    if sock is None:
                        sock = self._connect()
                    self._one(sock)
                    self.latencies.append((time.perf_counter() - started) * 1000)
                    break
                except OSError:
                    if sock is not None:
                        sock.close()
                    sock = None
                    if attempt == 2:
                        self.failures += 1
            self._stop.wait(self.interval)
        if sock is not None:
            sock.close()

    def start(self) -> HealthProbe:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> HealthProbe:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout + 5)
        return self

    def summary(self) -> dict[str, float]:
        values = sorted(self.latencies)
        if not values:
            return {"n": 0, "failures": self.failures}
        return {
            "n": len(values),
            "failures": self.failures,
            "p50_ms": round(statistics.median(values), 2),
            "p99_ms": round(values[min(len(values) - 1, int(len(values) * 0.99))], 2),
            "max_ms": round(values[-1], 2),
        }


@contextlib.contextmanager
def probing(port: int, interval: float = 0.02) -> Iterator[HealthProbe]:
    probe = HealthProbe(port, interval).start()
    try:
        yield probe
    finally:
        probe.stop()


if __name__ == "__main__":
    main()
