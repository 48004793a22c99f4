"""The console's terminal: keystroke echo and command round trips through the server (the console's
WebSocket, /console/api/sandboxes/{id}/terminal) next to the same PTY protocol straight to execd,
and the time to open a terminal. Prints the figures and writes bench/results/console.json.

Run: `uv run python bench/console_bench.py [--keys 300] [--commands 100]` (a local-runtime server on
127.0.0.1 and one sandbox made with the SDK; all traffic stays on loopback).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from opensandbox import SandboxSync  # noqa: E402
from opensandbox.config.connection_sync import ConnectionConfigSync  # noqa: E402
from websockets.asyncio.client import ClientConnection, connect  # noqa: E402

from bench.common import summary_ms, write  # noqa: E402
from harness.server_process import ServerProcess, running_server  # noqa: E402
from opensandbox_platform.api import labels  # noqa: E402

KEY = "bench-key"


async def read_until(ws: ClientConnection, needle: bytes) -> None:
    seen = b""
    async with asyncio.timeout(15):
        while needle not in seen:
            frame = await ws.recv()
            if isinstance(frame, bytes) and frame[:1] == b"\x01":
                seen = seen[-64:] + frame[1:]


async def round_trips(ws: ClientConnection, keys: int, commands: int) -> dict[str, Any]:
    await ws.send(b"\x00export PS1='$ '\r")
    await read_until(ws, b"$ ")
    key_times = []
    for i in range(keys):
        char = "abcdefghijklmnopqrstuvwxyz"[i % 26]
        started = time.perf_counter()
        await ws.send(b"\x00" + char.encode())
        await read_until(ws, char.encode())  # the line discipline's (readline's) echo
        key_times.append(time.perf_counter() - started)
        if i % 50 == 49:
            await ws.send(b"\x00\x15")  # ^U: an empty line again
    await ws.send(b"\x00\x15")
    command_times = []
    for i in range(commands):
        started = time.perf_counter()
        await ws.send(f"\x00echo r$((1000+{i}))\r".encode())
        await read_until(ws, f"r{1000 + i}\r\n".encode())
        command_times.append(time.perf_counter() - started)
    return {"keystroke_echo": summary_ms(key_times), "command_echo": summary_ms(command_times)}


async def through_console(server: ServerProcess, sandbox_id: str, keys: int, commands: int) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=server.url) as client:
        login = await client.post("/console/login", data={"api_key": KEY})
        assert login.status_code in (200, 303), login.text
        cookie = client.cookies["osb_console"]
    url = f"ws://{server.domain}/console/api/sandboxes/{sandbox_id}/terminal"
    opens = []
    for _ in range(10):
        started = time.perf_counter()
        async with connect(url, additional_headers={"cookie": f"osb_console={cookie}"}) as ws:
            await ws.recv()  # execd's {"type": "connected"}
            opens.append(time.perf_counter() - started)
    async with connect(url, additional_headers={"cookie": f"osb_console={cookie}"}) as ws:
        await ws.recv()
        figures = await round_trips(ws, keys, commands)
    return {"open_terminal": summary_ms(opens), **figures}


async def straight_to_execd(server: ServerProcess, sandbox_id: str, keys: int, commands: int) -> dict[str, Any]:
    headers = {"OPEN-SANDBOX-API-KEY": KEY}
    async with httpx.AsyncClient(base_url=server.url, headers=headers) as client:
        endpoint = (await client.get(f"/v1/sandboxes/{sandbox_id}/endpoints/{labels.EXECD_PORT}")).json()
    execd_headers = endpoint.get("headers") or {}
    async with httpx.AsyncClient(headers=execd_headers) as client:
        session = (await client.post(f"http://{endpoint['endpoint']}/pty", json={})).json()["session_id"]
    async with connect(f"ws://{endpoint['endpoint']}/pty/{session}/ws", additional_headers=execd_headers) as ws:
        await ws.recv()
        return await round_trips(ws, keys, commands)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=300)
    parser.add_argument("--commands", type=int, default=100)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work, running_server(Path(work), api_key=KEY) as server:
        config = ConnectionConfigSync(
            domain=server.domain, protocol="http", api_key=KEY, request_timeout=timedelta(seconds=120)
        )
        sandbox = SandboxSync.create(server.image, connection_config=config, entrypoint=["tail", "-f", "/dev/null"])
        try:
            figures = {
                "runtime": "local",
                "console": asyncio.run(through_console(server, sandbox.id, args.keys, args.commands)),
                "execd_direct": asyncio.run(straight_to_execd(server, sandbox.id, args.keys, args.commands)),
            }
        finally:
            sandbox.kill()
            sandbox.close()
    write("console", figures)


if __name__ == "__main__":
    main(sys.argv[1:])
