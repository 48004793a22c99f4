"""execd's terminals with a WebSocket client library (`websockets`), against execd as a real process:
a shell's echo, resize, exit code, replay and takeover; the access token; and a hostile user of the
terminal who sends huge frames, floods input a program never reads, or never reads the output."""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection, connect

from harness.execd_process import Execd, run_execd

TOKEN = "pty-token"


@pytest.fixture(scope="module")
def execd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Execd]:
    # A HOME of its own: login shells read no profile of this machine's user (pyenv's takes seconds).
    workdir = tmp_path_factory.mktemp("execd-pty")
    with run_execd(workdir, token=TOKEN, extra_env={"HOME": str(workdir)}) as proc:
        yield proc


async def call(execd: Execd, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=execd.url, headers=execd.headers()) as client:
        return await client.request(method, path, **kwargs)


async def new_session(execd: Execd, **body: str) -> str:
    response = await call(execd, "POST", "/pty", json=body)
    assert response.status_code == 200, response.text
    return str(response.json()["session_id"])


@pytest.fixture
async def terminal(execd: Execd) -> AsyncIterator[tuple[str, ClientConnection]]:
    session = await new_session(execd)
    async with connect(f"ws://{execd.endpoint}/pty/{session}/ws?since=0", additional_headers=execd.headers()) as ws:
        assert json.loads(await ws.recv()) == {"type": "connected", "session_id": session, "mode": "pty"}
        yield session, ws
    await call(execd, "DELETE", f"/pty/{session}")


async def read_until(ws: ClientConnection, needle: bytes, timeout: float = 15) -> bytes:
    """Output (0x01 and 0x03 frames) until `needle` appears; JSON control frames are skipped."""
    seen = b""
    async with asyncio.timeout(timeout):
        while needle not in seen:
            frame = await ws.recv()
            if isinstance(frame, bytes):
                seen += frame[9:] if frame[0] == 0x03 else frame[1:]
    return seen


async def type_line(ws: ClientConnection, line: str) -> None:
    await ws.send(b"\x00" + line.encode() + b"\r")


async def test_echo_resize_and_exit_code(terminal: tuple[str, ClientConnection], execd: Execd) -> None:
    session, ws = terminal
    await type_line(ws, "echo hi-$((6*7))")
    assert b"hi-42" in await read_until(ws, b"hi-42")
    await ws.send(json.dumps({"type": "resize", "cols": 133, "rows": 41}))
    await type_line(ws, "stty size")
    assert b"41 133" in await read_until(ws, b"41 133")
    await ws.send(json.dumps({"type": "ping"}))
    await type_line(ws, "exit 7")
    async with asyncio.timeout(15):
        messages = [m async for m in ws if isinstance(m, str)]
    assert {"type": "pong"} in [json.loads(m) for m in messages]
    assert json.loads(messages[-1]) == {"type": "exit", "exit_code": 7}
    assert ws.close_code == 1000
    status = (await call(execd, "GET", f"/pty/{session}")).json()
    assert status["running"] is False and status["output_offset"] > 0


async def test_ctrl_c_reaches_the_foreground_job(terminal: tuple[str, ClientConnection]) -> None:
    _, ws = terminal
    await type_line(ws, "sleep 300")
    await asyncio.sleep(0.5)
    await ws.send(b"\x00\x03")  # ^C through the line discipline: the terminal is the shell's controlling one
    await type_line(ws, "echo after-$?")
    assert b"after-130" in await read_until(ws, b"after-130")
    await type_line(ws, "sleep 300")
    await asyncio.sleep(0.5)
    await ws.send(json.dumps({"type": "signal", "signal": "SIGINT"}))  # to the foreground job
    await type_line(ws, "echo again-$?")
    assert b"again-130" in await read_until(ws, b"again-130")


async def test_a_second_client_is_refused_unless_it_takes_over_and_replay_catches_it_up(
    terminal: tuple[str, ClientConnection], execd: Execd
) -> None:
    session, ws = terminal
    await type_line(ws, "echo before-takeover")
    await read_until(ws, b"before-takeover")
    url = f"ws://{execd.endpoint}/pty/{session}/ws"
    with pytest.raises(websockets.InvalidStatus) as refused:
        await connect(url, additional_headers=execd.headers())
    assert refused.value.response.status_code == 409
    async with connect(f"{url}?takeover=1&since=0", additional_headers=execd.headers()) as second:
        assert json.loads(await second.recv())["type"] == "connected"
        replay = await second.recv()
        assert isinstance(replay, bytes) and replay[0] == 0x03 and struct.unpack("!Q", replay[1:9])[0] == 0
        assert b"before-takeover" in replay
        with pytest.raises(websockets.ConnectionClosed):
            await read_until(ws, b"never")
        assert ws.close_code == 4001
        await type_line(second, "echo after-takeover")
        await read_until(second, b"after-takeover")


async def test_the_token_is_required_and_unknown_sessions_are_404(execd: Execd) -> None:
    session = await new_session(execd)
    with pytest.raises(websockets.InvalidStatus) as refused:
        await connect(f"ws://{execd.endpoint}/pty/{session}/ws")
    assert refused.value.response.status_code == 401
    with pytest.raises(websockets.InvalidStatus) as missing:
        await connect(f"ws://{execd.endpoint}/pty/nope/ws", additional_headers=execd.headers())
    assert missing.value.response.status_code == 404
    assert (await call(execd, "POST", "/pty", json={"cwd": "/no/such/dir"})).status_code == 404
    assert (await call(execd, "DELETE", f"/pty/{session}")).status_code == 200


async def test_a_command_instead_of_a_shell_reports_its_exit_code(execd: Execd) -> None:
    session = await new_session(execd, command="printf done; exit 3")
    async with connect(f"ws://{execd.endpoint}/pty/{session}/ws?since=0", additional_headers=execd.headers()) as ws:
        frames = [m async for m in ws]
    assert any(isinstance(f, bytes) and b"done" in f for f in frames)
    assert json.loads(frames[-1]) == {"type": "exit", "exit_code": 3}


# --- a hostile user ------------------------------------------------------------------------------------------
async def test_a_huge_frame_is_refused_and_execd_lives_on(terminal: tuple[str, ClientConnection], execd: Execd) -> None:
    _, ws = terminal
    await ws.send(b"\x00" + b"x" * (1024 * 1024))
    with pytest.raises(websockets.ConnectionClosed):
        await read_until(ws, b"never", timeout=15)
    assert ws.close_code == 1009
    assert (await call(execd, "GET", "/ping")).status_code == 200


async def test_output_nobody_reads_and_input_nobody_reads_stay_bounded(execd: Execd) -> None:
    """`yes` floods a client that never reads; `sleep` never reads a flood of input (the terminal's
    line discipline drops what does not fit its buffer, or makes execd's write wait, which stops
    execd reading frames). execd's memory stays bounded by its buffers (socket, one frame, the
    replay) while both go on."""
    before = execd.rss_kib()
    session = await new_session(execd, command="yes flood-flood-flood")
    url = f"ws://{execd.endpoint}/pty/{session}/ws"
    reader_that_never_reads = await connect(url, additional_headers=execd.headers(), max_queue=1)
    await asyncio.sleep(3)  # yes writes as fast as it can; we read nothing
    grown_output = execd.rss_kib() - before
    assert reader_that_never_reads.state.name == "OPEN"
    reader_that_never_reads.transport.abort()  # a close handshake would wait behind the unread output
    await call(execd, "DELETE", f"/pty/{session}")
    session = await new_session(execd, command="sleep 600")
    ws = await connect(f"ws://{execd.endpoint}/pty/{session}/ws", additional_headers=execd.headers())
    chunk = b"\x00" + b"i" * 60_000
    with contextlib.suppress(TimeoutError):
        for _ in range(300):  # 18 MB: more than every buffer on the way
            await asyncio.wait_for(ws.send(chunk), 2)
    grown_input = execd.rss_kib() - before
    print(f"execd grew {grown_output} KiB under unread output, {grown_input} KiB under unread input")
    ws.transport.abort()
    assert (await call(execd, "DELETE", f"/pty/{session}")).status_code == 200
    assert grown_output < 16 * 1024 and grown_input < 16 * 1024, (grown_output, grown_input)


async def test_sessions_are_capped(execd: Execd, tmp_path: Path) -> None:
    made = []
    try:
        while True:
            response = await call(execd, "POST", "/pty", json={"command": "sleep 600"})
            if response.status_code != 200:
                break
            made.append(response.json()["session_id"])
            assert len(made) <= 64
        assert response.status_code == 429 and response.json()["code"] == "TOO_MANY_SESSIONS"
    finally:
        for session in made:
            await call(execd, "DELETE", f"/pty/{session}")
