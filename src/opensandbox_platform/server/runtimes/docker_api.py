"""The Docker Engine calls aiodocker's public API does not make the way the docker runtime needs.

Each wraps aiodocker's private `Docker._query` / `_query_json`, or its `Stream`, exactly once, with the
reason the public API does not do; tests/unit/server/test_docker_api.py fails when aiodocker changes them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiodocker
import aiohttp
from aiodocker.exceptions import DockerError
from aiodocker.stream import Stream
from aiohttp import ClientTimeout
from yarl import URL


def add_trace(docker: aiodocker.Docker, trace: aiohttp.TraceConfig) -> None:
    """Have every Engine API request of `docker` seen by `trace` (the engine-call metrics).
    aiohttp takes trace configs only when a session is made, and aiodocker makes its own session
    (with the connector it picks from DOCKER_HOST, contexts and default sockets), so the frozen
    config is added to the session's private list."""
    trace.freeze()
    docker.session._trace_configs.append(trace)


async def path_exists(docker: aiodocker.Docker, container_id: str, path: str) -> bool:
    """Whether `path` exists in a (created, not necessarily started) container: HEAD
    /containers/{id}/archive stats it. The public `get_archive` would download the file."""
    try:
        async with docker._query(f"containers/{container_id}/archive", method="HEAD", params={"path": path}) as resp:
            return resp.status == 200
    except (DockerError, ValueError):  # 404 (podman's comes with an empty "JSON" body)
        return False


async def list_containers(docker: aiodocker.Docker, label: str) -> list[dict[str, Any]]:
    """GET /containers/json?all with a label filter, as plain JSON: the public `containers.list`
    wraps each item in a DockerContainer whose fields (`_container`) are private."""
    params = {"all": "true", "filters": json.dumps({"label": [label]})}
    items: list[dict[str, Any]] = await docker._query_json("containers/json", params=params)
    return items


@asynccontextmanager
async def attach_output(docker: aiodocker.Docker, container_id: str) -> AsyncIterator[AsyncIterator[str]]:
    """The container's stdout and stderr from now on, as the container writes them (no TTY); the
    stream ends when the container exits, and is closed on leaving the context. Attached before the
    container starts, as `docker run` does, nothing it prints is missed. (Following its log instead,
    podman handed each line over ~0.2 s late: it polls its log file.) The public `attach()` first
    inspects the container to learn whether it has a TTY: one more round trip, for an answer we know;
    the Stream it returns is the one made here."""

    async def setup() -> tuple[URL, bytes | None, bool]:
        query = {"stream": "1", "stdout": "1", "stderr": "1", "logs": "0"}
        return URL(f"containers/{container_id}/attach").with_query(query), None, False

    async with Stream(docker, setup, ClientTimeout(total=None, sock_read=None)) as stream:

        async def chunks() -> AsyncIterator[str]:
            while (message := await stream.read_out()) is not None:
                yield message.data.decode(errors="replace")

        yield chunks()
