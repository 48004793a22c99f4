"""How the small daemons start: the listening socket first, nothing heavy before it, and little at all
(docs/execd.md, "Start-up")."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness.ports import free_port
from opensandbox_platform.api import labels
from opensandbox_platform.daemon import cli, http
from opensandbox_platform.daemon.cli import HelpFormatter
from opensandbox_platform.daemon.listen import listen_early
from opensandbox_platform.execd import envfile
from opensandbox_platform.execd import main as execd_main
from opensandbox_platform.execd.app import Settings
from opensandbox_platform.execd.procs import which
from opensandbox_platform.task_executor import main as executor_main

SRC = Path(__file__).resolve().parents[3] / "src"


def test_constants_copied_into_the_mains_agree() -> None:
    assert execd_main.EXECD_PORT == labels.EXECD_PORT
    assert execd_main.TOKEN_HEADER == labels.EXECD_TOKEN_HEADER
    assert execd_main.DEFAULT_ENVS_FILE == envfile.DEFAULT_ENVS_FILE
    settings = Settings()
    assert settings.max_sessions == execd_main.MAX_SESSIONS
    assert settings.session_idle_timeout == execd_main.SESSION_IDLE_TIMEOUT
    assert executor_main.TASK_EXECUTOR_PORT == labels.TASK_EXECUTOR_PORT
    assert executor_main.TASK_TARGET_ENV == labels.TASK_TARGET_ENV
    assert executor_main.TASK_EXECUTOR_TOKEN_ENV == labels.TASK_EXECUTOR_TOKEN_ENV
    assert executor_main.TASK_EXECUTOR_TOKEN_HEADER == labels.TASK_EXECUTOR_TOKEN_HEADER


def run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("module", ["opensandbox_platform.execd.main", "opensandbox_platform.task_executor.main"])
def test_nothing_heavy_before_the_socket_listens(module: str) -> None:
    """What a daemon's main imports and parses before listen_early: no asyncio, logging, typing,
    shutil (bz2, lzma) or ssl."""
    out = run_python(f"""
        import sys, json
        import {module} as main
        main.parse_args(["--host", "127.0.0.1", "--port", "0"])
        heavy = ["asyncio", "logging", "typing", "shutil", "bz2", "lzma", "ssl", "dataclasses", "urllib.parse",
                 "argparse", "gettext", "locale"]
        print(json.dumps([m for m in heavy if sys.modules.get(m) is not None]))
    """)
    assert json.loads(out) == []


def test_an_idle_execd_has_not_imported_what_only_some_requests_need() -> None:
    """Files, sessions, metrics, terminals and the code interpreter come with their first request."""
    out = run_python("""
        import sys, json
        sys.modules["ssl"] = None
        from opensandbox_platform.execd import app
        lazy = ["opensandbox_platform.execd.files", "opensandbox_platform.execd.sessions",
                "opensandbox_platform.execd.metrics", "opensandbox_platform.execd.multipart",
                "opensandbox_platform.execd.code.settings", "opensandbox_platform.execd.code.contexts",
                "opensandbox_platform.execd.pty", "opensandbox_platform.daemon.websocket", "pty", "termios",
                "tempfile", "shutil", "dataclasses", "urllib.parse", "datetime"]
        print(json.dumps([m for m in lazy if m in sys.modules]))
    """)
    assert json.loads(out) == []


def test_listen_early_listens_at_once_and_asyncio_serves_it_later() -> None:
    sock = listen_early("127.0.0.1", 0)
    assert sock is not None
    port = sock.getsockname()[1]
    try:
        # accepted by the kernel before anything serves it: the client's connect succeeds
        client = socket.create_connection(("127.0.0.1", port), timeout=2)
        client.close()
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
    finally:
        sock.close()


def test_listen_early_only_for_one_numeric_address() -> None:
    assert listen_early("localhost", 0) is None  # a name may be several addresses: asyncio binds those
    assert listen_early("", 0) is None
    v6 = listen_early("::1", 0) if socket.has_ipv6 else None
    if v6 is not None:
        assert v6.family == socket.AF_INET6 and v6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
        v6.close()


def test_listen_early_reports_a_taken_port() -> None:
    taken = listen_early("127.0.0.1", 0)
    assert taken is not None
    try:
        with pytest.raises(OSError):
            listen_early("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()


def test_a_taken_port_is_a_logged_exit_1(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "opensandbox_platform.execd.main", "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, "PYTHONPATH": str(SRC), "EXECD_STATE_DIR": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert "level=error" in result.stderr and "cannot start error=" in result.stderr


def test_execd_answers_a_connection_made_while_it_started(tmp_path: Path) -> None:
    """A connection made the moment the port listens (before asyncio is even imported) is served."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "opensandbox_platform.execd.main", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, "PYTHONPATH": str(SRC), "EXECD_STATE_DIR": str(tmp_path), "EXECD_LOG_LEVEL": "warning"},
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                client = socket.create_connection(("127.0.0.1", port), timeout=30)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.001)
        with client:
            client.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert client.recv(64).startswith(b"HTTP/1.1 200")
    finally:
        proc.terminate()
        proc.wait(10)


def test_query_and_path_decoding_match_urllib() -> None:
    from urllib.parse import parse_qs, unquote

    for text in ["a=1&b=2", "a=%20x+y&a=2", "path=%2Ftmp%2Fx%C3%A9", "x", "x=&y", "a=1&&b", "%zz=%4", "=v", "+%2B+"]:
        assert http.parse_query(text) == parse_qs(text, keep_blank_values=True)
        assert http.unquote(text) == unquote(text)
    assert http.unquote("%C3") == unquote("%C3") == "\ufffd"


def test_which_finds_executables_like_shutil(tmp_path: Path) -> None:
    import shutil

    program = tmp_path / "prog"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    (tmp_path / "plain").write_text("")
    (tmp_path / "dir").mkdir()
    search = f"/nonexistent:{tmp_path}"
    for name in ("prog", "plain", "dir", "missing", str(program)):
        assert which(name, search) == shutil.which(name, path=search)


def test_help_formatter_without_shutil(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "60")
    formatter = HelpFormatter("prog")
    assert formatter._width == 58  # as argparse's: the columns less 2
    monkeypatch.setenv("COLUMNS", "not a number")
    assert HelpFormatter("prog")._width >= 18


OPTIONS = [
    cli.Option("--host", "0.0.0.0"),
    cli.Option("--port", 44772, type=int),
    cli.Option("--grace", 3.0, type=float),
    cli.Option("--level", "info", choices=["debug", "info"]),
    cli.Option("--token", None),
]


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--host", "127.0.0.1", "--port", "1"],
        ["--port=2", "--host=::", "--grace", "0.5", "--level", "debug"],
        ["--token", "abc=def"],
        ["--token=-x"],
        ["--port", "1", "--port", "2"],
    ],
)
def test_the_fast_path_reads_what_argparse_reads(argv: list[str]) -> None:
    expected = vars(cli.argparser("p", "", OPTIONS).parse_args(argv))
    assert cli._fast(argv, OPTIONS) == expected
    assert vars(cli.parse(argv, "p", "", OPTIONS)) == expected


@pytest.mark.parametrize(
    "argv",
    [
        ["--ho", "1.2.3.4"],  # an abbreviation
        ["--port", "x"],  # not an int
        ["--level", "loud"],  # not a choice
        ["--token", "-x"],  # a value that looks like a flag
        ["--port"],  # no value
        ["-h"],
        ["positional"],
    ],
)
def test_anything_else_goes_to_argparse(argv: list[str]) -> None:
    assert cli._fast(argv, OPTIONS) is None


def test_argparse_decides_the_rest() -> None:
    assert cli.parse(["--ho", "1.2.3.4"], "p", "", OPTIONS).host == "1.2.3.4"
    with pytest.raises(SystemExit):
        cli.parse(["--port", "x"], "p", "", OPTIONS)


def test_jail_bytecode_written_for_what_a_jail_imports(tmp_path: Path) -> None:
    import shutil

    from opensandbox_platform.server.runtimes import jail_bytecode

    copy = tmp_path / "opensandbox_platform"
    shutil.copytree(SRC / "opensandbox_platform", copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert jail_bytecode.precompile(copy)
    for module in ("execd/app.py", "execd/commands.py", "daemon/http.py", "server/runtimes/jail_init.py"):
        source = copy / module
        assert list((source.parent / "__pycache__").glob(source.stem + ".cpython-*.pyc")), module
    assert not (copy / "controller" / "__pycache__").exists()  # only what jails need


def test_connections_on_an_early_socket_get_tcp_nodelay() -> None:
    """asyncio sets TCP_NODELAY on a transport only when its socket's proto is TCP (an SSE stream's
    events written back to back otherwise wait for the client's delayed ACK: ~40 ms a command)."""
    import asyncio

    async def check() -> int:
        sock = listen_early("127.0.0.1", 0)
        assert sock is not None and sock.proto == socket.IPPROTO_TCP
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            raw = writer.get_extra_info("socket")
            seen.set_result(raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
            nodelay = await asyncio.wait_for(seen, 5)
            writer.close()
        return nodelay

    assert asyncio.run(check()) == 1
