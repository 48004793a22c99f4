"""`opensandbox-execd`: the daemon inside every sandbox (commands, sessions, files, metrics).

Start-up order (docs/execd.md, "Start-up"): the arguments, then the listening socket, and only then
asyncio and the routes. A connection that comes while execd still starts waits in the backlog and is
answered once the event loop runs, instead of being refused. Whatever only some requests need
(files, sessions, metrics, the code interpreter) is imported when one first comes.
"""

from __future__ import annotations

import sys

# asyncio imports ssl when it can; execd serves plain HTTP inside the sandbox, and OpenSSL costs
# ~5 MiB of resident memory in every sandbox. Blocking the import keeps it out (asyncio copes).
if "ssl" not in sys.modules:
    sys.modules["ssl"] = None  # type: ignore[assignment]

import os
import socket  # (imported by daemon.listen anyway)
import time

from opensandbox_platform.daemon.cli import Args, Option, limit_options, parse
from opensandbox_platform.daemon.listen import listen_then_run

LOGGER = "execd"  # (logging itself is imported once the socket listens)

# (api.labels' EXECD_PORT, EXECD_TOKEN_HEADER and envfile's DEFAULT_ENVS_FILE, not imported: this
# module runs before anything else is loaded; tests/unit/daemon/test_start_up.py checks they agree.)
EXECD_PORT = 44772
TOKEN_HEADER = "X-EXECD-ACCESS-TOKEN"
DEFAULT_ENVS_FILE = "/opt/opensandbox/.env"
MAX_SESSIONS = 64  # (and execd.app.Settings' defaults)
SESSION_IDLE_TIMEOUT = 3600.0


def parse_args(argv: list[str] | None = None) -> Args:
    env = os.environ.get
    options = [
        Option("--host", env("EXECD_HOST", "0.0.0.0"), help="address to listen on"),
        Option("--port", int(env("EXECD_PORT", EXECD_PORT)), type=int, help=f"port (default {EXECD_PORT})"),
        Option(
            "--access-token",
            env("EXECD_ACCESS_TOKEN") or None,
            help=f"require this value in header {TOKEN_HEADER} on every request (env EXECD_ACCESS_TOKEN)",
        ),
        Option(
            "--log-level",
            env("EXECD_LOG_LEVEL", "info"),
            choices=["debug", "info", "warning", "error"],
            help="log verbosity (env EXECD_LOG_LEVEL)",
        ),
        Option(
            "--envs-file",
            env("EXECD_ENVS", DEFAULT_ENVS_FILE),
            help="KEY=VALUE file read before every command; commands.set_env appends to it (env EXECD_ENVS)",
        ),
        Option(
            "--state-dir",
            env("EXECD_STATE_DIR"),
            help="where background command logs and session scripts live (default: a new temp dir)",
        ),
        Option(
            "--code-prestart",
            env("EXECD_CODE_PRESTART") or None,
            metavar="LANGUAGE",
            help="create LANGUAGE's default code context (a Jupyter kernel) at start-up, e.g. python "
            "(env EXECD_CODE_PRESTART); the code interpreter's readiness port opens once it answers",
        ),
        Option(
            "--max-sessions",
            int(env("EXECD_MAX_SESSIONS", MAX_SESSIONS)),
            type=int,
            help=f"bash sessions at once; more is a 429 (env EXECD_MAX_SESSIONS; default {MAX_SESSIONS})",
        ),
        Option(
            "--session-idle-timeout",
            float(env("EXECD_SESSION_IDLE_TIMEOUT", SESSION_IDLE_TIMEOUT)),
            type=float,
            help="seconds a session may go unused before it is deleted; 0: never"
            f" (env EXECD_SESSION_IDLE_TIMEOUT; default {SESSION_IDLE_TIMEOUT:g})",
        ),
        *limit_options("EXECD"),
    ]
    description = "The daemon inside every sandbox: commands (SSE), sessions, files and metrics."
    return parse(argv, "opensandbox-execd", description, options)


async def serve(args: Args, started: float, sock: socket.socket | None) -> None:
    import asyncio
    import gc
    import logging

    from opensandbox_platform.daemon import process
    from opensandbox_platform.daemon.http import HttpServer, limits_from_args
    from opensandbox_platform.execd.app import ExecdApp, Settings
    from opensandbox_platform.execd.procs import WATCHER

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
    await server.start(args.host, args.port, sock)
    app.start_code()
    gc.freeze()  # what start-up made lives as long as execd: no collection needs to look at it again
    gc.enable()
    log = logging.getLogger(LOGGER)
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
    import gc

    gc.disable()  # start-up makes many objects and frees few: collections would only cost time
    args = parse_args(argv)
    os.environ.pop("EXECD_ACCESS_TOKEN", None)  # commands inherit the environment; the token is not theirs
    listen_then_run(args.host, args.port, lambda sock: serve(args, started, sock), args.log_level, LOGGER)


if __name__ == "__main__":
    main()
