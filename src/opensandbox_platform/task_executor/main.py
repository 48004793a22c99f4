"""`opensandbox-task-executor`: runs BatchSandbox tasks, as a sidecar in the pod or on its own."""

from __future__ import annotations

import sys

# As in execd: blocking ssl keeps OpenSSL (~5 MiB of RSS per pod) out; the executor serves plain HTTP.
if "ssl" not in sys.modules:
    sys.modules["ssl"] = None  # type: ignore[assignment]

import argparse
import logging
import os
import time

from opensandbox_platform.api.labels import (
    TASK_EXECUTOR_PORT,
    TASK_EXECUTOR_TOKEN_ENV,
    TASK_EXECUTOR_TOKEN_HEADER,
    TASK_TARGET_ENV,
)
from opensandbox_platform.daemon import process
from opensandbox_platform.daemon.http import HttpServer, add_limit_arguments, limits_from_args
from opensandbox_platform.task_executor.app import ExecutorApp
from opensandbox_platform.task_executor.manager import Limits, TaskManager
from opensandbox_platform.task_executor.runner import Runner
from opensandbox_platform.task_executor.tasks import Store

log = logging.getLogger("task-executor")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="opensandbox-task-executor",
        description="Runs tasks (command, args, env, workingDir, timeoutSeconds) and reports their state over "
        "HTTP (OpenAPI at /openapi.json). With --main-container it is a sidecar: tasks run inside that "
        "container of the pod (needs shareProcessNamespace and CAP_SYS_ADMIN); without, they run here.",
    )
    parser.add_argument("--host", default=env("TASK_EXECUTOR_HOST", "0.0.0.0"), help="address (default 0.0.0.0)")
    parser.add_argument(
        "--port",
        type=int,
        default=int(env("TASK_EXECUTOR_PORT", TASK_EXECUTOR_PORT)),
        help=f"port (default {TASK_EXECUTOR_PORT})",
    )
    parser.add_argument(
        "--data-dir",
        default=env("TASK_EXECUTOR_DATA_DIR", "/var/lib/opensandbox-tasks"),
        help="where task state and output live; keep it across restarts (default %(default)s)",
    )
    parser.add_argument(
        "--main-container",
        default=env("TASK_EXECUTOR_MAIN_CONTAINER") or None,
        help=f"sidecar mode: run tasks in the container whose processes carry {TASK_TARGET_ENV}=<this name>",
    )
    parser.add_argument(
        "--access-token",
        default=env(TASK_EXECUTOR_TOKEN_ENV) or None,
        help=f"require this value in header {TASK_EXECUTOR_TOKEN_HEADER} on every request but /health "
        f"(env {TASK_EXECUTOR_TOKEN_ENV}; the controller sets it in every pod)",
    )
    parser.add_argument("--max-running", type=int, default=16, help="tasks running at once (default 16)")
    parser.add_argument(
        "--max-attempts", type=int, default=3, help="starts of a task interrupted by executor restarts (default 3)"
    )
    parser.add_argument(
        "--kill-grace", type=float, default=3.0, help="seconds from SIGTERM to SIGKILL on timeout/cancel (default 3)"
    )
    parser.add_argument("--output-tail", type=int, default=4096, help="bytes of output returned (default 4096)")
    parser.add_argument(
        "--log-level",
        default=env("TASK_EXECUTOR_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (env TASK_EXECUTOR_LOG_LEVEL)",
    )
    add_limit_arguments(parser, "TASK_EXECUTOR")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace, started: float) -> None:
    limits = Limits(args.max_running, args.max_attempts, args.kill_grace, args.output_tail)
    manager = TaskManager(Store(args.data_dir), Runner(args.main_container), limits)
    manager.recover()
    server = HttpServer(ExecutorApp(manager, args.access_token).dispatch, limits_from_args(args))
    await server.start(args.host, args.port)
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
    args = parse_args(argv)
    os.environ.pop(TASK_EXECUTOR_TOKEN_ENV, None)  # tasks inherit the environment; the token is not theirs
    process.run(serve(args, started), args.log_level, log)


if __name__ == "__main__":
    main()
