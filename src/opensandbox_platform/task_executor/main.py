"""`opensandbox-task-executor`: runs BatchSandbox tasks, as a sidecar in the pod or on its own.

Start-up order, as execd's: the arguments, then the listening socket, then asyncio, the task store
(recovered from the data dir) and the routes; a request that comes meanwhile waits in the backlog.
"""

from __future__ import annotations

import sys

# As in execd: blocking ssl keeps OpenSSL (~5 MiB of RSS per pod) out; the executor serves plain HTTP.
if "ssl" not in sys.modules:
    sys.modules["ssl"] = None  # type: ignore[assignment]

import os
import socket  # (imported by daemon.listen anyway)
import time

from opensandbox_platform.daemon.cli import Args, Option, limit_options, parse
from opensandbox_platform.daemon.listen import listen_then_run

LOGGER = "task-executor"  # (logging itself is imported once the socket listens)
# (api.labels' TASK_EXECUTOR_PORT, TASK_TARGET_ENV and token names, not imported: this module runs before anything
# else is loaded; tests/unit/daemon/test_start_up.py checks they agree.)
TASK_EXECUTOR_PORT = 5758
TASK_TARGET_ENV = "OPENSANDBOX_MAIN_CONTAINER"
TASK_EXECUTOR_TOKEN_ENV = "TASK_EXECUTOR_ACCESS_TOKEN"
TASK_EXECUTOR_TOKEN_HEADER = "X-TASK-EXECUTOR-ACCESS-TOKEN"


def parse_args(argv: list[str] | None = None) -> Args:
    env = os.environ.get
    options = [
        Option("--host", env("TASK_EXECUTOR_HOST", "0.0.0.0"), help="address (default 0.0.0.0)"),
        Option(
            "--port",
            int(env("TASK_EXECUTOR_PORT", TASK_EXECUTOR_PORT)),
            type=int,
            help=f"port (default {TASK_EXECUTOR_PORT})",
        ),
        Option(
            "--data-dir",
            env("TASK_EXECUTOR_DATA_DIR", "/var/lib/opensandbox-tasks"),
            help="where task state and output live; keep it across restarts (default %(default)s)",
        ),
        Option(
            "--main-container",
            env("TASK_EXECUTOR_MAIN_CONTAINER") or None,
            help=f"sidecar mode: run tasks in the container whose processes carry {TASK_TARGET_ENV}=<this name>",
        ),
        Option(
            "--access-token",
            env(TASK_EXECUTOR_TOKEN_ENV) or None,
            help=f"require this value in header {TASK_EXECUTOR_TOKEN_HEADER} on every request but /health "
            f"(env {TASK_EXECUTOR_TOKEN_ENV}; the controller sets it in every pod)",
        ),
        Option("--max-running", 16, type=int, help="tasks running at once (default 16)"),
        Option("--max-attempts", 3, type=int, help="starts of a task interrupted by executor restarts (default 3)"),
        Option("--kill-grace", 3.0, type=float, help="seconds from SIGTERM to SIGKILL on timeout/cancel (default 3)"),
        Option("--output-tail", 4096, type=int, help="bytes of output returned (default 4096)"),
        Option(
            "--log-level",
            env("TASK_EXECUTOR_LOG_LEVEL", "info"),
            choices=["debug", "info", "warning", "error"],
            help="log verbosity (env TASK_EXECUTOR_LOG_LEVEL)",
        ),
        *limit_options("TASK_EXECUTOR"),
    ]
    description = (
        "Runs tasks (command, args, env, workingDir, timeoutSeconds) and reports their state over "
        "HTTP (OpenAPI at /openapi.json). With --main-container it is a sidecar: tasks run inside that "
        "container of the pod (needs shareProcessNamespace and CAP_SYS_ADMIN); without, they run here."
    )
    return parse(argv, "opensandbox-task-executor", description, options)


async def serve(args: Args, started: float, sock: socket.socket | None) -> None:
    import gc
    import logging

    from opensandbox_platform.daemon import process
    from opensandbox_platform.daemon.http import HttpServer, limits_from_args
    from opensandbox_platform.task_executor.app import ExecutorApp
    from opensandbox_platform.task_executor.manager import Limits, TaskManager
    from opensandbox_platform.task_executor.runner import Runner
    from opensandbox_platform.task_executor.tasks import Store

    limits = Limits(args.max_running, args.max_attempts, args.kill_grace, args.output_tail)
    manager = TaskManager(Store(args.data_dir), Runner(args.main_container), limits)
    manager.recover()
    server = HttpServer(ExecutorApp(manager, args.access_token).dispatch, limits_from_args(args))
    await server.start(args.host, args.port, sock)
    gc.freeze()  # what start-up made lives as long as the executor: no collection needs to look at it again
    gc.enable()
    log = logging.getLogger(LOGGER)
    log.info(
        "task-executor listening host=%s port=%d mode=%s tasks=%d startup_ms=%d",
        args.host,
        args.port,
        manager.runner.mode,
        len(manager.tasks),
        (time.monotonic() - started) * 1000,
    )
    await process.stop_on_signals().wait()
    log.info("task-executor stopping running=%d", len(manager.running))
    manager.shutdown()
    await server.close()


def main(argv: list[str] | None = None) -> None:
    started = time.monotonic()
    import gc

    gc.disable()  # start-up makes many objects and frees few: collections would only cost time
    args = parse_args(argv)
    os.environ.pop(TASK_EXECUTOR_TOKEN_ENV, None)  # tasks inherit the environment; the token is not theirs
    listen_then_run(args.host, args.port, lambda sock: serve(args, started, sock), args.log_level, LOGGER)


if __name__ == "__main__":
    main()
