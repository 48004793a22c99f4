"""Noticing dead parts: the engine behind a runtime, and execd inside each sandbox.

- `EngineMonitor` keeps the last known state of an engine (the Docker Engine API, the Kubernetes
  API server): a cheap call every `interval` seconds, bounded by `timeout`, and the outcome of
  every real call in between (`ok()` / `failed()`). `/health` reports it, `/ready` fails on it;
  it never makes a request wait on the engine.
- `ExecdProbe` is the "cheap periodic check" for runtimes without an event for execd's death (on
  docker, execd is a background process of the container's bootstrap script: the container lives
  on without it). Every `interval` seconds it sends `GET /ping` to the execd of each Running
  sandbox; after `failures` failed probes in a row it reports the sandbox's execd dead, once.
  The local runtime needs no probe: it watches execd's process exit (an event).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from opensandbox_platform.daemon import times
from opensandbox_platform.server.errors import ApiError
from opensandbox_platform.server.runtimes.base import Endpoint, RuntimeHealth

log = logging.getLogger("opensandbox.liveness")

EXECD_DEAD = "EXECD_UNREACHABLE"  # status.reason of a sandbox whose execd stopped answering


class EngineClient(Protocol):
    def unavailable_error(self, exc: BaseException) -> ApiError | None:
        """The 503 for an exception that means the engine did not answer (None: it is another error)."""


S = TypeVar("S", bound=EngineClient)
P = ParamSpec("P")
R = TypeVar("R")


def engine_call(
    method: Callable[Concatenate[S, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, R]]:
    """A runtime's API call: an engine that does not answer in its timeout, or cannot be reached,
    makes it the runtime's 503 (`unavailable_error`) instead of a hang or a 500."""

    async def call(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(self, *args, **kwargs)
        except Exception as exc:
            error = self.unavailable_error(exc)
            if error is None:
                raise
            raise error from None

    call.__doc__ = method.__doc__
    return call


class EngineMonitor:
    def __init__(self, name: str, check: Callable[[], Awaitable[object]], interval: float, timeout: float) -> None:
        self.name = name
        self._check = check
        self.interval = interval
        self.timeout = timeout
        self.reachable = True
        self.message = ""
        self.since = times.now()
        self.checked_at = self.since
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"engine-monitor-{self.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def ok(self) -> None:
        self.checked_at = times.now()
        if not self.reachable:
            log.info("%s reachable again", self.name)
            self.reachable, self.message, self.since = True, "", self.checked_at

    def failed(self, message: str) -> None:
        self.checked_at = times.now()
        if self.reachable:
            log.warning("%s unreachable: %s", self.name, message)
            self.reachable, self.since = False, self.checked_at
        self.message = message

    def health(self, **extra: object) -> RuntimeHealth:
        detail: dict[str, object] = {
            "engine": "reachable" if self.reachable else "unreachable",
            "since": times.rfc3339(self.since),
            "checkedAt": times.rfc3339(self.checked_at),
            **extra,
        }
        if self.message:
            detail["message"] = f"{self.name}: {self.message}"
        return RuntimeHealth(ready=self.reachable and all(v is not False for v in extra.values()), detail=detail)

    async def check_now(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self._check()
        except TimeoutError:
            self.failed(f"no answer within {self.timeout:g}s")
        except Exception as exc:
            self.failed(str(exc) or type(exc).__name__)
        else:
            self.ok()

    async def _run(self) -> None:
        while True:
            await self.check_now()
            await asyncio.sleep(self.interval)


async def ping_execd(endpoint: Endpoint, timeout: float) -> str | None:
    """None when execd answers `GET /ping` with 200 within `timeout`; else what went wrong."""
    host, _, port = endpoint.address.rpartition(":")
    extra = "".join(f"{name}: {value}\r\n" for name, value in endpoint.headers.items())
    request = f"GET /ping HTTP/1.1\r\nHost: {endpoint.address}\r\n{extra}Connection: close\r\n\r\n".encode()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
            writer.write(request)
            status = await reader.readline()
    except TimeoutError:
        return f"execd did not answer /ping within {timeout:g}s"
    except (OSError, ValueError) as exc:
        return f"cannot reach execd: {exc}"
    finally:
        if writer is not None:
            writer.close()
    if not status.startswith(b"HTTP/1.1 200"):
        return f"execd answered /ping with {status.decode('latin-1').strip() or 'nothing'}"
    return None


class ExecdProbe:
    """Pings the execd of each target; `on_dead(sandbox_id, why)` after `failures` failures in a row."""

    def __init__(
        self,
        targets: Callable[[], Iterable[tuple[str, Endpoint]]],
        on_dead: Callable[[str, str], None],
        *,
        interval: float,
        failures: int = 2,
        timeout: float = 5.0,
        concurrency: int = 16,
    ) -> None:
        self._targets = targets
        self._on_dead = on_dead
        self.interval = interval
        self.failures = failures
        self.timeout = timeout
        self._limit = asyncio.Semaphore(concurrency)
        self._misses: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.interval > 0:
            self._task = asyncio.create_task(self._run(), name="execd-probe")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def probe_all(self) -> None:
        targets = dict(self._targets())
        for gone in set(self._misses) - set(targets):
            del self._misses[gone]
        results = await asyncio.gather(*(self._probe(endpoint) for endpoint in targets.values()))
        for sandbox_id, problem in zip(targets, results, strict=True):
            if problem is None:
                self._misses.pop(sandbox_id, None)
                continue
            self._misses[sandbox_id] = self._misses.get(sandbox_id, 0) + 1
            if self._misses[sandbox_id] == self.failures:
                log.warning("execd is dead id=%s why=%s", sandbox_id, problem)
                self._on_dead(sandbox_id, problem)

    async def _probe(self, endpoint: Endpoint) -> str | None:
        async with self._limit:
            return await ping_execd(endpoint, self.timeout)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.probe_all()
            except Exception:
                log.exception("execd probe failed")
