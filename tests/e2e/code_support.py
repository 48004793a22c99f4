"""What the code-interpreter e2e tests share: sandboxes with kernels on each runtime, and raw
access to a sandbox's execd where the SDK hides what is checked (MIME bundles, status codes)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import httpx
from code_interpreter import CodeInterpreter
from code_interpreter.models.code import CodeContext
from opensandbox import Sandbox, SandboxSync
from opensandbox.config import ConnectionConfig
from opensandbox.config.connection_sync import ConnectionConfigSync

from harness.images import code_interpreter_image
from harness.server_process import ServerProcess
from opensandbox_platform.execd.code import kernelspecs

EXECD_PORT = 44772


def config(server: ServerProcess) -> ConnectionConfig:
    return ConnectionConfig(domain=server.domain, protocol="http", request_timeout=timedelta(seconds=120))


def sync_config(server: ServerProcess) -> ConnectionConfigSync:
    return ConnectionConfigSync(domain=server.domain, protocol="http", request_timeout=timedelta(seconds=120))


def image_with_kernels(server: ServerProcess) -> str:
    """The image whose sandboxes have kernels: the code-interpreter image (docker); the local
    runtime's jails run the host's /usr (python3-ipykernel from `make run`/`make test`)."""
    return code_interpreter_image() if server.runtime == "docker" else server.image


def has_bash_kernel(server: ServerProcess) -> bool:
    if server.runtime == "docker":
        return True  # the code-interpreter image has bash_kernel
    return kernelspecs.choose(kernelspecs.scan(os.environ), "bash") is not None


def create_sync(server: ServerProcess, env: dict[str, str] | None = None) -> SandboxSync:
    return SandboxSync.create(
        image_with_kernels(server),
        connection_config=sync_config(server),
        entrypoint=["tail", "-f", "/dev/null"],
        env=env,
        timeout=timedelta(minutes=30),
    )


@asynccontextmanager
async def fresh_interpreter(server: ServerProcess, env: dict[str, str] | None = None) -> AsyncIterator[CodeInterpreter]:
    sandbox = await Sandbox.create(
        image_with_kernels(server),
        connection_config=config(server),
        entrypoint=["tail", "-f", "/dev/null"],
        env=env,
        timeout=timedelta(minutes=30),
    )
    try:
        interpreter = await CodeInterpreter.create(sandbox)
        yield interpreter
        await interpreter.aclose()
    finally:
        await sandbox.kill()
        await sandbox.close()


@asynccontextmanager
async def connected(server: ServerProcess, sandbox_id: str) -> AsyncIterator[CodeInterpreter]:
    sandbox = await Sandbox.connect(sandbox_id, connection_config=config(server))
    try:
        interpreter = await CodeInterpreter.create(sandbox)
        yield interpreter
        await interpreter.aclose()
    finally:
        await sandbox.close()


@asynccontextmanager
async def context(interpreter: CodeInterpreter, language: str = "python") -> AsyncIterator[CodeContext]:
    ctx = await interpreter.codes.create_context(language)
    try:
        yield ctx
    finally:
        assert ctx.id is not None
        await interpreter.codes.delete_context(ctx.id)


class RawExecd:
    """execd of one sandbox over plain HTTP, with the endpoint's headers (the local runtime's token)."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.url = url
        self.headers = headers

    @classmethod
    async def of(cls, interpreter: CodeInterpreter) -> RawExecd:
        endpoint = await interpreter.sandbox.get_endpoint(EXECD_PORT)
        return cls(f"http://{endpoint.endpoint}", dict(endpoint.headers))

    async def events(self, body: Any, timeout: float = 120) -> list[dict[str, Any]]:
        """The SSE events of `POST /code` (asserts a 200)."""
        found = []
        async with (
            httpx.AsyncClient(timeout=timeout) as client,
            client.stream("POST", f"{self.url}/code", json=body, headers=self.headers) as response,
        ):
            assert response.status_code == 200, await response.aread()
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    found.append(json.loads(line[5:]))
        return found

    async def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async with httpx.AsyncClient(timeout=60) as client:
            return await client.request(method, f"{self.url}{path}", headers=self.headers, **kwargs)


def assert_error_body(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"code", "message"}, body
    assert body["message"], body
    if code is not None:
        assert body["code"] == code, body
    return body
