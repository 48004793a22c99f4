"""`POST /bootstrap`: our own endpoint (not upstream's) for pooled sandboxes.

A pooled pod starts execd with no user entrypoint; when the controller hands the pod to a
sandbox it calls this once with the sandbox's env, working directory and entrypoint. The env and
cwd become the defaults of every later command and session; the entrypoint runs as the sandbox's
main process, in its own process group, writing to execd's stdout/stderr (the container log).

Body: `{"env": {"K": "V"}, "cwd": "/workspace", "argv": ["python", "app.py"]}`, all optional.
Answers `{"pid": <int or null>}`; 409 while a main process from an earlier call is running.
`GET /bootstrap` reports `{"pid", "argv", "running", "exit_code", "env_keys", "cwd"}`.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from typing import Any

from opensandbox_platform.daemon import errors
from opensandbox_platform.daemon.errors import ApiError
from opensandbox_platform.execd import procs
from opensandbox_platform.execd.envfile import Environment, valid_key

log = logging.getLogger("execd.bootstrap")


class Bootstrap:
    def __init__(self, environment: Environment, default_cwd: str) -> None:
        self.environment = environment
        self.cwd = default_cwd
        self.argv: list[str] | None = None
        self.child: procs.Child | None = None
        self.exit_code: int | None = None
        # Called after an apply with its env and cwd (a pre-started kernel adopts them).
        self.on_apply: list[Callable[[dict[str, str], str], None]] = []

    def apply(self, body: Any) -> dict[str, Any]:
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise errors.bad_request("request body must be a JSON object")
        env = body.get("env") or {}
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and valid_key(k) and isinstance(v, str) for k, v in env.items()
        ):
            raise errors.bad_request("'env' must map variable names to strings")
        argv = body.get("argv")
        if argv is not None and (
            not isinstance(argv, list) or not argv or not all(isinstance(a, str) and a for a in argv)
        ):
            raise errors.bad_request("'argv' must be a non-empty list of non-empty strings")
        cwd = body.get("cwd")
        if cwd is not None and (not isinstance(cwd, str) or not os.path.isabs(cwd)):
            raise errors.bad_request("'cwd' must be an absolute path")
        if argv is not None and self.child is not None and self.child.running:
            raise ApiError(409, errors.CONFLICT, f"the main process (pid {self.child.pid}) is still running")
        if cwd is not None:
            try:
                os.makedirs(cwd, exist_ok=True)
            except OSError as exc:
                raise errors.os_error(exc, cwd) from None

        self.environment.bootstrap = dict(env)
        if cwd is not None:
            self.cwd = cwd
        for hook in self.on_apply:
            hook(dict(env), self.cwd)
        if argv is None:
            log.info("bootstrap env applied keys=%d", len(env))
            return {"pid": None}
        try:
            child = procs.spawn(argv, env=self.environment.compose(), cwd=self.cwd, stdin=None)
        except OSError as exc:
            raise errors.bad_request(f"cannot start {argv[0]}: {exc.strerror or exc}") from None
        self.argv, self.child, self.exit_code = list(argv), child, None
        child.exited.add_done_callback(lambda fut: self._on_exit(child, fut.result()))
        log.info("bootstrap started main process pid=%d argv0=%s", child.pid, argv[0])
        return {"pid": child.pid}

    def _on_exit(self, child: procs.Child, status: int) -> None:
        if child is self.child:
            self.exit_code = procs.exit_code(status)
            log.info("main process exited pid=%d code=%d", child.pid, self.exit_code)

    def status(self) -> dict[str, Any]:
        return {
            "pid": None if self.child is None else self.child.pid,
            "argv": self.argv,
            "running": self.child is not None and self.child.running,
            "exit_code": self.exit_code,
            "env_keys": sorted(self.environment.bootstrap),
            "cwd": self.cwd,
        }

    def shutdown(self) -> None:
        if self.child is not None and self.child.running:
            self.child.signal_group(signal.SIGTERM)
