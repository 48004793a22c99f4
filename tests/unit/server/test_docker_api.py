"""docker_api.py's use of aiodocker's private API: each call is checked against the real
`aiodocker.Docker` signatures, so an aiodocker that changes them fails here, not in production."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import aiodocker
import pytest
from aiodocker.exceptions import DockerError

from opensandbox_platform.server.runtimes import docker_api


def test_the_private_methods_we_use_still_exist_as_we_use_them() -> None:
    query = aiodocker.Docker._query
    assert inspect.isasyncgenfunction(inspect.unwrap(query))  # an async context manager
    assert list(inspect.signature(query).parameters)[:3] == ["self", "path", "method"]
    assert {"params", "timeout"} <= set(inspect.signature(query).parameters)
    query_json = aiodocker.Docker._query_json
    assert inspect.iscoroutinefunction(query_json)
    assert {"path", "params"} <= set(inspect.signature(query_json).parameters)


class Response:
    def __init__(self, status: int, body: bytes = b"") -> None:
        self.status = status
        self.content = Content(body)
        self.closed = False

    async def release(self) -> None:
        """Called by aiodocker at the end of the stream."""


class Content:
    """What aiodocker's multiplexed stream reads: 8-byte frame headers, then payloads."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def readexactly(self, n: int) -> bytes:
        if not self.body:
            raise asyncio.IncompleteReadError(b"", n)
        chunk, self.body = self.body[:n], self.body[n:]
        return chunk


class FakeDocker:
    """Answers like the Engine, after binding every call to aiodocker's real signature."""

    def __init__(self, response: Response | DockerError | Any) -> None:
        self.response = response
        self.calls: list[inspect.BoundArguments] = []

    def _bind(self, real: Any, *args: Any, **kwargs: Any) -> inspect.BoundArguments:
        bound = inspect.signature(real).bind(self, *args, **kwargs)
        bound.apply_defaults()
        self.calls.append(bound)
        return bound

    @asynccontextmanager
    async def _query(self, *args: Any, **kwargs: Any) -> AsyncIterator[Response]:
        self._bind(aiodocker.Docker._query, *args, **kwargs)
        if isinstance(self.response, DockerError):
            raise self.response
        yield self.response
        self.response.closed = True

    async def _query_json(self, *args: Any, **kwargs: Any) -> Any:
        self._bind(aiodocker.Docker._query_json, *args, **kwargs)
        return self.response


def as_docker(fake: FakeDocker) -> aiodocker.Docker:
    return fake  # type: ignore[return-value]


@pytest.mark.parametrize(("answer", "exists"), [(Response(200), True), (DockerError(404, "no such file"), False)])
async def test_path_exists_heads_the_archive(answer: Response | DockerError, exists: bool) -> None:
    docker = FakeDocker(answer)
    assert await docker_api.path_exists(as_docker(docker), "c1", "/usr/bin/python3") is exists
    (call,) = docker.calls
    assert call.arguments["path"] == "containers/c1/archive" and call.arguments["method"] == "HEAD"
    assert call.arguments["params"] == {"path": "/usr/bin/python3"}


async def test_list_containers_filters_by_label_and_returns_plain_json() -> None:
    items = [{"Id": "c1", "Labels": {"opensandbox.io/id": "s1"}}]
    docker = FakeDocker(items)
    assert await docker_api.list_containers(as_docker(docker), "opensandbox.io/id") == items
    (call,) = docker.calls
    assert call.arguments["path"] == "containers/json" and call.arguments["method"] == "GET"
    assert call.arguments["params"] == {"all": "true", "filters": '{"label": ["opensandbox.io/id"]}'}


def test_the_stream_class_we_build_still_takes_what_we_give_it() -> None:
    from aiodocker.stream import Message, Stream

    assert list(inspect.signature(Stream.__init__).parameters)[:4] == ["self", "docker", "setup", "timeout"]
    assert inspect.iscoroutinefunction(Stream.__aenter__) and inspect.iscoroutinefunction(Stream.read_out)
    assert Message._fields == ("stream", "data")


class FakeStream:
    """aiodocker's Stream as attach_output uses it: made with a setup, entered, read until None."""

    made: ClassVar[list[FakeStream]] = []

    def __init__(self, docker: Any, setup: Any, timeout: Any) -> None:
        self.setup, self.timeout, self.closed = setup, timeout, False
        self.messages = [(1, b"starting\n"), (2, b'msg="execd listening"\n')]
        FakeStream.made.append(self)

    async def __aenter__(self) -> FakeStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.closed = True

    async def read_out(self) -> Any:
        from aiodocker.stream import Message

        return Message(*self.messages.pop(0)) if self.messages else None


async def test_attach_output_streams_stdout_and_stderr_and_closes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(docker_api, "Stream", FakeStream)
    async with docker_api.attach_output(as_docker(FakeDocker(None)), "c1") as chunks:
        assert [chunk async for chunk in chunks] == ["starting\n", 'msg="execd listening"\n']
    (stream,) = FakeStream.made
    assert stream.closed and stream.timeout.total is None and stream.timeout.sock_read is None
    url, body, tty = await stream.setup()
    assert url.path == "containers/c1/attach" and body is None and tty is False  # no inspect to learn it
    assert dict(url.query) == {"stream": "1", "stdout": "1", "stderr": "1", "logs": "0"}
