"""The executor's HTTP routes (documented in openapi.py, served at /openapi.json).

It reuses execd's small HTTP server: the executor runs in every pod, and uvicorn + a framework would
cost it tens of MiB.
"""

from __future__ import annotations

import json

from opensandbox_platform.api.labels import TASK_EXECUTOR_TOKEN_HEADER
from opensandbox_platform.daemon import errors
from opensandbox_platform.daemon.errors import ApiError
from opensandbox_platform.daemon.http import AnyResponse, Request, Response, Router, require_token
from opensandbox_platform.task_executor.manager import TaskManager
from opensandbox_platform.task_executor.openapi import SPEC
from opensandbox_platform.task_executor.tasks import Task, not_found, parse_spec

MAX_BODY = 1024 * 1024
MAX_WAIT = 60.0
NO_CONTENT = Response(status=204)


class ExecutorApp:
    def __init__(self, manager: TaskManager, access_token: str | None = None) -> None:
        self.manager = manager
        self.access_token = access_token
        self.router = Router()
        r = self.router
        r.add("GET", "/health", self.health)
        r.add("GET", "/openapi.json", self.openapi)
        r.add("POST", "/tasks", self.submit)
        r.add("GET", "/tasks", self.list)
        r.add("GET", "/tasks/{id}", self.get)
        r.add("DELETE", "/tasks/{id}", self.delete)
        r.add("POST", "/tasks/{id}/cancel", self.cancel)
        self._openapi = json.dumps(SPEC).encode()

    async def dispatch(self, request: Request) -> AnyResponse:
        if request.path != "/health":  # the kubelet's readiness probe; it tells nothing about tasks
            require_token(request, TASK_EXECUTOR_TOKEN_HEADER, self.access_token)
        handler, request.params = self.router.resolve(request.method, request.path)
        return await handler(request)

    async def health(self, request: Request) -> AnyResponse:
        m = self.manager
        return Response.json({"status": "ok", "mode": m.runner.mode, "tasks": len(m.tasks), "running": len(m.running)})

    async def openapi(self, request: Request) -> AnyResponse:
        return Response(self._openapi, content_type="application/json")

    async def submit(self, request: Request) -> AnyResponse:
        spec = parse_spec(await request.json(MAX_BODY))
        task, created = self.manager.submit(spec)
        return Response.json(self._view(task, request), 201 if created else 200)

    async def list(self, request: Request) -> AnyResponse:
        since, wait = _long_poll(request)
        if wait:
            await self.manager.wait_change(since, wait)
        tasks = [self._view(t, request) for t in self.manager.tasks.values()]
        return Response.json({"revision": self.manager.revision, "tasks": tasks})

    async def get(self, request: Request) -> AnyResponse:
        task_id = request.params["id"]
        since, wait = _long_poll(request)
        if wait:
            await self.manager.wait_change(since, wait, [task_id])
        task = self.manager.get(task_id)
        if task is None:
            raise not_found(task_id)
        return Response.json(self._view(task, request))

    async def cancel(self, request: Request) -> AnyResponse:
        task_id = request.params["id"]
        task = self.manager.cancel(task_id)
        if task is None:
            raise not_found(task_id)
        return Response.json(self._view(task, request))

    async def delete(self, request: Request) -> AnyResponse:
        if not self.manager.remove(request.params["id"]):
            raise not_found(request.params["id"])
        return NO_CONTENT

    def _view(self, task: Task, request: Request) -> dict[str, object]:
        with_output = request.arg("output") not in ("false", "0")
        return task.to_json(self.manager.output(task) if with_output else None)


def _long_poll(request: Request) -> tuple[int, float]:
    """(since, wait) from the query: answer once a revision above `since` exists, waiting up to `wait` s."""
    try:
        since = int(request.arg("since") or -1)
        wait = float(request.arg("wait") or 0)
    except ValueError:
        message = "since must be an integer and wait a number of seconds"
        raise errors.bad_request(message, errors.MISSING_QUERY) from None
    if not 0 <= wait <= MAX_WAIT:
        raise ApiError(400, errors.MISSING_QUERY, f"wait must be between 0 and {MAX_WAIT:g} seconds")
    return since, wait
