"""The Docker Engine calls aiodocker's public API does not make the way the docker runtime needs.

Each wraps aiodocker's private `Docker._query` / `_query_json` exactly once, with the reason the
public API does not do; tests/unit/server/test_docker_api.py fails when aiodocker changes them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiodocker
import aiohttp
from aiodocker.exceptions import DockerError
from aiodocker.multiplexed import multiplexed_result_stream


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
async def follow_logs(docker: aiodocker.Docker, container_id: str) -> AsyncIterator[AsyncIterator[str]]:
    """The container's stdout and stderr as they come (a container without a TTY); the stream is
    closed on leaving the context. The public `log(follow=True)` first inspects the container to
    learn whether it has a TTY: one more round trip on every create, for an answer we know."""
    params = {"stdout": True, "stderr": True, "follow": True}
    async with docker._query(f"containers/{container_id}/logs", params=params, timeout=None) as resp:
        chunks: AsyncIterator[str] = multiplexed_result_stream(resp, is_tty=False)  # type: ignore[no-untyped-call]
        yield chunks
