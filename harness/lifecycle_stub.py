"""A stub of the lifecycle routes, for bench/execd_bench.py only: it measures execd on its own, so
the SDK is pointed at one execd subprocess without a server in between. The e2e tests do not use
it; they get their sandboxes from the real server (harness/server_process.py).

`Sandbox.create` calls `POST /v1/sandboxes`, then (concurrently) `GET .../endpoints/44772` and
`GET .../endpoints/18080` (the egress endpoint is always asked for, so it must answer 200), then
polls execd's `/ping`, then posts `/v1/metrics/events`. `Sandbox.connect` does the endpoint and
ping steps only; `kill` is `DELETE /v1/sandboxes/{id}`. Every sandbox here is the one execd the
test started: its endpoint is that execd's `host:port`, plus optional endpoint headers (how a
server hands out execd's access token).
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse

from harness.ports import free_port


def make_app(execd_endpoint: str, endpoint_headers: dict[str, str] | None = None) -> FastAPI:
    app = FastAPI()
    sandboxes: dict[str, dict[str, Any]] = {}

    def now() -> str:
        return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")

    def lookup(sandbox_id: str) -> dict[str, Any]:
        if sandbox_id not in sandboxes:
            raise HTTPException(404, {"code": "SANDBOX::NOT_FOUND", "message": f"no sandbox {sandbox_id}"})
        return sandboxes[sandbox_id]

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(exc.detail, exc.status_code)

    @app.post("/v1/sandboxes", status_code=202)
    async def create(request: Request) -> dict[str, Any]:
        body = await request.json()
        sandbox = {
            "id": str(uuid.uuid4()),
            "status": {"state": "Running", "reason": "TEST_DOUBLE"},
            "createdAt": now(),
            "entrypoint": body.get("entrypoint") or ["tail", "-f", "/dev/null"],
            "metadata": body.get("metadata") or {},
            "image": body.get("image"),
        }
        sandboxes[sandbox["id"]] = sandbox
        return {k: v for k, v in sandbox.items() if k != "image"}

    @app.get("/v1/sandboxes/{sandbox_id}")
    async def get(sandbox_id: str) -> dict[str, Any]:
        return lookup(sandbox_id)

    @app.delete("/v1/sandboxes/{sandbox_id}", status_code=204)
    async def delete(sandbox_id: str) -> Response:
        lookup(sandbox_id)
        del sandboxes[sandbox_id]
        return Response(status_code=204)

    @app.get("/v1/sandboxes/{sandbox_id}/endpoints/{port}")
    async def endpoint(sandbox_id: str, port: int) -> dict[str, Any]:
        lookup(sandbox_id)
        result: dict[str, Any] = {"endpoint": execd_endpoint}
        if endpoint_headers:
            result["headers"] = endpoint_headers
        return result

    @app.post("/v1/metrics/events", status_code=204)
    async def metrics_event() -> Response:
        return Response(status_code=204)

    return app


@dataclass
class Lifecycle:
    port: int

    @property
    def domain(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextmanager
def run_lifecycle(execd_endpoint: str, endpoint_headers: dict[str, str] | None = None) -> Iterator[Lifecycle]:
    port = free_port()
    config = uvicorn.Config(
        make_app(execd_endpoint, endpoint_headers), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("lifecycle double did not start")
        time.sleep(0.02)
    try:
        yield Lifecycle(port)
    finally:
        server.should_exit = True
        thread.join(10)
