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
import time

from opensandbox_platform.api.labels import EXECD_PORT, EXECD_TOKEN_HEADER
from opensandbox_platform.daemon import process
from opensandbox_platform.daemon.http import HttpServer, add_limit_arguments, limits_from_args
from opensandbox_platform.execd.app import ExecdApp, Settings
from opensandbox_platform.execd.envfile import DEFAULT_ENVS_FILE
from opensandbox_platform.execd.procs import WATCHER

log = logging.getLogger("execd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="opensandbox-execd",
        description="The daemon inside every sandbox: commands (SSE), sessions, files and metrics.",
    )
    parser.add_argument("--host", default=os.environ.get("EXECD_HOST", "0.0.0.0"), help="address to listen on")
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("EXECD_PORT", EXECD_PORT)),
        help=f"port (default {EXECD_PORT})",
    )
    parser.add_argument(
        "--access-token",
        default=os.environ.get("EXECD_ACCESS_TOKEN") or None,
        help=f"require this value in header {EXECD_TOKEN_HEADER} on every request (env EXECD_ACCESS_TOKEN)",
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
    parser.add_argument(
        "--code-prestart",
        default=os.environ.get("EXECD_CODE_PRESTART") or None,
        metavar="LANGUAGE",
        help="create LANGUAGE's default code context (a Jupyter kernel) at start-up, e.g. python "
        "(env EXECD_CODE_PRESTART); the code interpreter's readiness port opens once it answers",
    )
    parser.add_argument(
        "--max-sessions",
        type=int,
        default=int(os.environ.get("EXECD_MAX_SESSIONS", Settings.max_sessions)),
        help=f"bash sessions at once; more is a 429 (env EXECD_MAX_SESSIONS; default {Settings.max_sessions})",
    )
    parser.add_argument(
        "--session-idle-timeout",
        type=float,
        default=float(os.environ.get("EXECD_SESSION_IDLE_TIMEOUT", Settings.session_idle_timeout)),
        help="seconds a session may go unused before it is deleted; 0: never"
        f" (env EXECD_SESSION_IDLE_TIMEOUT; default {Settings.session_idle_timeout:g})",
    )
    add_limit_arguments(parser, "EXECD")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace, started: float) -> None:
    loop = asyncio.get_running_loop()
    WATCHER.install(loop)
    settings = Settings(
        access_token=args.access_token,
        envs_file=args.envs_file,
        state_dir=args.state_dir,
        code_prestart=args.code_prestart,
        max_sessions=args.max_sessions,
        session_idle_timeout=args.session_idle_timeout,
    )
    app = ExecdApp(settings)
    server = HttpServer(app.dispatch, limits_from_args(args))
    await server.start(args.host, args.port)
    app.start_code()
    log.info(
        "execd listening host=%s port=%d auth=%s startup_ms=%d",
        args.host,
        args.port,
        "token" if args.access_token else "none",
        (time.monotonic() - started) * 1000,
    )
    await process.stop_on_signals().wait()
    log.info("execd stopping")
    await app.shutdown()
    await server.close()


def main(argv: list[str] | None = None) -> None:
    started = time.monotonic()
    args = parse_args(argv)
    os.environ.pop("EXECD_ACCESS_TOKEN", None)  # commands inherit the environment; the token is not theirs
    process.run(serve(args, started), args.log_level, log)


if __name__ == "__main__":
    main()
