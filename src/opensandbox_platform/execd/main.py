"""`opensandbox-execd`: the daemon inside every sandbox (commands, sessions, files, metrics)."""

from __future__ import annotations

import sys

# asyncio imports ssl when it can; execd serves plain HTTP inside the sandbox, and OpenSSL costs
# ~5 MiB of resident memory in every sandbox. Blocking the import keeps it out (asyncio copes).
if "ssl" not in sys.modules:
    sys.modules["ssl"] = None  # type: ignore[assignment]

import argparse
import asyncio
import logging
import os
import re
import signal
import time

from opensandbox_platform.execd.app import ExecdApp, Settings
from opensandbox_platform.execd.envfile import DEFAULT_ENVS_FILE
from opensandbox_platform.execd.httpserver import HttpServer
from opensandbox_platform.execd.procs import WATCHER

DEFAULT_PORT = 44772
log = logging.getLogger("execd")


_FIELDS = re.compile(r"^(.*?)((?:\s+[A-Za-z_]+=\S*)*)$", re.DOTALL)


class LogfmtFormatter(logging.Formatter):
    """`ts=... level=info logger=execd msg="phrase" key=value ...`: one line per record.

    Log calls are written as "phrase key=%s key=%s", so the trailing pairs stay machine-readable.
    """

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        match = _FIELDS.match(record.getMessage())
        assert match is not None  # the pattern matches any string
        phrase = match.group(1).replace('"', "'")
        out = f'ts={ts} level={record.levelname.lower()} logger={record.name} msg="{phrase}"{match.group(2)}'
        if record.exc_info:
            out += "\n" + self.formatException(record.exc_info)
        return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="opensandbox-execd",
        description="The daemon inside every sandbox: commands (SSE), sessions, files and metrics.",
    )
    parser.add_argument("--host", default=os.environ.get("EXECD_HOST", "0.0.0.0"), help="address to listen on")
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("EXECD_PORT", DEFAULT_PORT)), help="port (default 44772)"
    )
    parser.add_argument(
        "--access-token",
        default=os.environ.get("EXECD_ACCESS_TOKEN") or None,
        help="require this value in header X-EXECD-ACCESS-TOKEN on every request (env EXECD_ACCESS_TOKEN)",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("EXECD_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (env EXECD_LOG_LEVEL)",
    )
    parser.add_argument(
        "--envs-file",
        default=os.environ.get("EXECD_ENVS", DEFAULT_ENVS_FILE),
        help="KEY=VALUE file read before every command; commands.set_env appends to it (env EXECD_ENVS)",
    )
    parser.add_argument(
        "--state-dir",
        default=os.environ.get("EXECD_STATE_DIR"),
        help="where background command logs and session scripts live (default: a new temp dir)",
    )
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace, started: float) -> None:
    loop = asyncio.get_running_loop()
    WATCHER.install(loop)
    app = ExecdApp(Settings(access_token=args.access_token, envs_file=args.envs_file, state_dir=args.state_dir))
    server = HttpServer(app.dispatch)
    await server.start(args.host, args.port)
    log.info(
        "execd listening host=%s port=%d auth=%s startup_ms=%d",
        args.host,
        args.port,
        "token" if args.access_token else "none",
        (time.monotonic() - started) * 1000,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("execd stopping")
    await app.shutdown()
    await server.close()


def main(argv: list[str] | None = None) -> None:
    started = time.monotonic()
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    try:
        asyncio.run(serve(args, started))
    except OSError as exc:
        log.error("cannot start error=%s", exc)
        sys.exit(1)


if __name__ == "__main__":
    main()
