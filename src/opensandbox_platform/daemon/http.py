"""A small HTTP/1.1 server on asyncio streams, shared by execd, the task executor and the jail init.

Why not uvicorn + Starlette: every sandbox pays execd's idle memory, and uvicorn alone (h11, no app)
idles at ~30 MiB RSS while this server idles at ~18 MiB (see docs/execd.md). It also gives exact
control over the two things execd cares most about: a streamed response ends with its chunked
terminator the moment the last event is written, and writes wait for the socket to drain, so a
command's output is read only as fast as the client consumes it.

Scope: HTTP/1.1 and 1.0, keep-alive, Content-Length and chunked request bodies (with
`Expect: 100-continue`), fixed, chunked-streamed and sendfile responses, HEAD (the GET route's
headers without its body), and the upgrade to WebSocket (a route answers with `websocket.accept`;
daemon/websocket.py). TLS only when the caller passes an SSL context (the controller's metrics
server; execd never imports ssl). No HTTP/2, no pipelining beyond sequential processing.

Limits (`Limits`, from flags or environment variables: daemon/cli.py's `limit_options`): a request line
longer than `max_request_line` is a 414, a head larger than `max_head_bytes` a 431; the first
request's head must be complete `head_timeout` seconds after the connection opened, a later
request's within `head_timeout` of its first byte (else 408 and close); a connection idle between
requests is closed after `keep_alive_timeout`; at most `max_connections` connections are held,
the longest idle one is closed to make room for a new one, and a new one is refused (503) only when
every connection is serving a request (daemon/connections.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from opensandbox_platform.daemon import errors
from opensandbox_platform.daemon.cli import LIMIT_DEFAULTS, limit_options, limit_values
from opensandbox_platform.daemon.connections import ConnectionTable
from opensandbox_platform.daemon.errors import ApiError

if TYPE_CHECKING:  # imported with the first upgrade
    from opensandbox_platform.daemon.websocket import WebSocket

log = logging.getLogger("daemon.http")

READ_CHUNK = 256 * 1024
# A request body left unread by a handler is drained (to keep the connection) only up to this size.
MAX_DRAIN = 1024 * 1024


class Limits:
    """What one listener accepts; the defaults suit every daemon (see the module's docstring).
    (A plain class: a dataclass costs every daemon's start-up its import and generated methods.)"""

    __slots__ = ("head_timeout", "keep_alive_timeout", "max_connections", "max_head_bytes", "max_request_line")

    def __init__(
        self,
        *,
        max_head_bytes: int = int(LIMIT_DEFAULTS["max_head_bytes"]),
        max_request_line: int = int(LIMIT_DEFAULTS["max_request_line"]),
        head_timeout: float = LIMIT_DEFAULTS["head_timeout"],
        keep_alive_timeout: float = LIMIT_DEFAULTS["keep_alive_timeout"],
        max_connections: int = int(LIMIT_DEFAULTS["max_connections"]),
    ) -> None:
        if max_request_line < 16 or max_head_bytes < max_request_line:
            raise ValueError("max_head_bytes must be at least max_request_line, which must be at least 16")
        if head_timeout <= 0 or keep_alive_timeout <= 0 or max_connections < 1:
            raise ValueError("timeouts must be positive and max_connections at least 1")
        self.max_head_bytes = max_head_bytes
        self.max_request_line = max_request_line
        self.head_timeout = head_timeout
        self.keep_alive_timeout = keep_alive_timeout
        self.max_connections = max_connections

    def _values(self) -> tuple[float, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Limits) and self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        return "Limits(" + ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__) + ")"


def limits_from_args(args: Any) -> Limits:
    """The limits from arguments parsed with daemon/cli.py's `limit_options`."""
    return Limits(**limit_values(args))


def limits_from_env(env_prefix: str, env: Mapping[str, str] = os.environ) -> Limits:
    """The same limits read from the environment only (a daemon without flags of its own: the jail init)."""
    return Limits(**{o.dest.removeprefix("limit_"): o.default for o in limit_options(env_prefix, env)})


_REASONS = {
    100: "Continue",
    101: "Switching Protocols",
    200: "OK",
    204: "No Content",
    206: "Partial Content",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    411: "Length Required",
    413: "Payload Too Large",
    414: "URI Too Long",
    416: "Range Not Satisfiable",
    426: "Upgrade Required",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


class ClientGone(Exception):
    """The peer closed the connection or sent a malformed body; drop the connection."""


class _Body:
    """Reads one request's body from the connection, de-chunking as needed."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        length: int | None,
        chunked: bool,
        expect_continue: bool,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._remaining = length or 0
        self._chunked = chunked
        self._chunk_left = 0
        self._expect_continue = expect_continue
        self.done = not chunked and not length

    async def read(self) -> bytes:
        """The next piece of the body, or b"" at its end."""
        if self.done:
            return b""
        if self._expect_continue:
            self._expect_continue = False
            self._writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            if not self._chunked:
                data = await self._reader.read(min(self._remaining, READ_CHUNK))
                if not data:
                    raise ClientGone("body ended early")
                self._remaining -= len(data)
                self.done = self._remaining == 0
                return data
            if self._chunk_left == 0:
                line = await self._reader.readuntil(b"\r\n")
                size_text = line.split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise ClientGone("bad chunk size") from None
                if size < 0:
                    raise ClientGone("bad chunk size")
                if size == 0:
                    while (await self._reader.readuntil(b"\r\n")) != b"\r\n":
                        pass  # trailers are ignored
                    self.done = True
                    return b""
                self._chunk_left = size
            data = await self._reader.read(min(self._chunk_left, READ_CHUNK))
            if not data:
                raise ClientGone("body ended early")
            self._chunk_left -= len(data)
            if self._chunk_left == 0 and await self._reader.readexactly(2) != b"\r\n":
                raise ClientGone("bad chunk terminator")
            return data
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError) as exc:
            raise ClientGone(str(exc)) from exc

    async def drain(self, limit: int) -> bool:
        """Discard the rest of the body; False if it is larger than `limit` (close instead)."""
        total = 0
        while not self.done:
            total += len(await self.read())
            if total > limit:
                return False
        return True


class Request:
    """One HTTP request. Query and header names are as sent; header names are lower-cased."""

    def __init__(
        self,
        method: str,
        path: str,
        query: dict[str, list[str]],
        headers: dict[str, str],
        body: _Body,
        disconnected: asyncio.Future[None],
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.params: dict[str, str] = {}
        self.disconnected = disconnected
        self._body = body

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None

    def args(self, name: str) -> list[str]:
        return self.query.get(name, [])

    async def read_body(self, limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        while data := await self._body.read():
            size += len(data)
            if size > limit:
                raise ApiError(413, errors.PAYLOAD_TOO_LARGE, f"request body larger than {limit} bytes")
            parts.append(data)
        return b"".join(parts)

    async def iter_body(self) -> AsyncIterator[bytes]:
        while data := await self._body.read():
            yield data

    async def json(self, limit: int = 16 * 1024 * 1024, *, allow_empty: bool = False) -> Any:
        raw = await self.read_body(limit)
        if not raw.strip():
            if allow_empty:
                return {}  # no body: an empty object (a body of `null` is not one)
            raise errors.bad_request("request body is empty; a JSON document is required")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise errors.bad_request(f"request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise errors.bad_request("request body is nested too deeply") from None


class Response:
    """A complete response held in memory."""

    def __init__(
        self,
        body: bytes = b"",
        status: int = 200,
        headers: dict[str, str] | None = None,
        content_type: str | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.headers = dict(headers or {})
        if content_type:
            self.headers["content-type"] = content_type

    @classmethod
    def json(cls, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        return cls(body, status, headers, "application/json")


class StreamResponse:
    """A response whose body is produced piece by piece (chunked on HTTP/1.1).

    Each piece is written and drained before the next is requested, so the producer runs only as
    fast as the client reads. When the client goes away the producer is closed (`aclose`), which
    is where it releases what it holds.
    """

    def __init__(self, chunks: AsyncIterator[bytes], status: int = 200, headers: dict[str, str] | None = None):
        self.status = status
        self.chunks = chunks
        self.headers = dict(headers or {})


class FileResponse:
    """A byte range of an open file, sent with sendfile(2); the file is closed afterwards."""

    def __init__(self, file: Any, offset: int, count: int, status: int = 200, headers: dict[str, str] | None = None):
        self.status = status
        self.file = file
        self.offset = offset
        self.count = count
        self.headers = dict(headers or {})


class Upgrade:
    """A route's answer that switches the connection to WebSocket (made by daemon/websocket.py's
    `accept`; that module is imported only then: an idle daemon never loads it)."""

    def __init__(self, headers: dict[str, str], run: Callable[[WebSocket], Awaitable[None]], max_message: int) -> None:
        self.status = 101
        self.headers = headers
        self.run = run
        self.max_message = max_message


AnyResponse = Response | StreamResponse | FileResponse | Upgrade
Handler = Callable[[Request], Awaitable[AnyResponse]]


class Router:
    """Method + path routing; `{name}` matches one path segment."""

    def __init__(self) -> None:
        self._static: dict[str, dict[str, Handler]] = {}
        self._dynamic: list[tuple[list[str], dict[str, Handler]]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        if "{" not in pattern:
            self._static.setdefault(pattern, {})[method] = handler
            return
        segments = pattern.strip("/").split("/")
        for existing, methods in self._dynamic:
            if existing == segments:
                methods[method] = handler
                return
        self._dynamic.append((segments, {method: handler}))

    def resolve(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        """The handler and path parameters; HEAD is served by the GET handler (the writer drops the body)."""
        methods = self._static.get(path)
        params: dict[str, str] = {}
        if methods is None:
            parts = path.strip("/").split("/")
            for segments, candidate in self._dynamic:
                if len(segments) != len(parts):
                    continue
                found: dict[str, str] = {}
                for seg, part in zip(segments, parts, strict=True):
                    if seg.startswith("{"):
                        if not part:
                            break
                        found[seg[1:-1]] = part
                    elif seg != part:
                        break
                else:
                    methods, params = candidate, found
                    break
        if methods is None:
            raise errors.not_found(f"no route for {path}")
        handler = methods.get(method) or (methods.get("GET") if method == "HEAD" else None)
        if handler is None:
            allowed = sorted({*methods, *(["HEAD"] if "GET" in methods else [])})
            raise ApiError(
                405, errors.METHOD_NOT_ALLOWED, f"{method} is not allowed on {path}", {"allow": ", ".join(allowed)}
            )
        return handler, params


def error_response(exc: ApiError) -> Response:
    return Response.json({"code": exc.code, "message": exc.message}, exc.status, exc.headers)


OnConnect = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "asyncio.Future[None]"], None]


class _Protocol(asyncio.StreamReaderProtocol):
    """Adds a public future that resolves when the client closes its side or the connection is lost."""

    def __init__(self, reader: asyncio.StreamReader, on_connect: OnConnect) -> None:
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        super().__init__(reader, lambda r, w: on_connect(r, w, self.lost))

    def eof_received(self) -> bool | None:
        # An HTTP client does not half-close and wait for a stream: its FIN means it went away. Seen
        # here, a stream stops its command now rather than at a later write's reset (seconds of pings).
        if not self.lost.done():
            self.lost.set_result(None)
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.lost.done():
            self.lost.set_result(None)


class HttpServer:
    """Serves `dispatch` (routing, auth and error mapping live in the app) over HTTP/1.1."""

    def __init__(self, dispatch: Handler, limits: Limits | None = None) -> None:
        self._dispatch = dispatch
        self.limits = limits or Limits()
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._table: ConnectionTable[asyncio.StreamWriter] = ConnectionTable(self.limits.max_connections)

    async def start(self, host: str, port: int, sock: socket.socket | None = None, ssl: Any = None) -> asyncio.Server:
        """Serve on `host`:`port`, or on `sock` when given (already listening: daemon/listen.py)."""
        loop = asyncio.get_running_loop()

        def factory() -> _Protocol:
            return _Protocol(asyncio.StreamReader(limit=self.limits.max_head_bytes, loop=loop), self._on_connect)

        if sock is not None:
            self._server = await loop.create_server(factory, sock=sock, backlog=1024, ssl=ssl)
        else:
            self._server = await loop.create_server(factory, host, port, reuse_address=True, backlog=1024, ssl=ssl)
        return self._server

    @property
    def connection_count(self) -> int:
        return len(self._table)

    def _on_connect(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, lost: asyncio.Future[None]
    ) -> None:
        admitted, victims = self._table.admit(writer)
        for victim in victims:
            victim.close()  # its task sees EOF and ends
        if not admitted:
            busy = ApiError(503, errors.RUNTIME_ERROR, "too many connections", {"retry-after": "1"})
            response = error_response(busy)
            response.headers.update({"connection": "close", "content-length": str(len(response.body))})
            writer.write(_head(503, response.headers) + response.body)
            writer.close()
            return
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer, lost))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, lost: asyncio.Future[None]
    ) -> None:
        # The first request's head must be complete head_timeout after the connection opened.
        deadline: float | None = asyncio.get_running_loop().time() + self.limits.head_timeout
        try:
            while await self._one_request(reader, writer, lost, deadline):
                deadline = None
        except (ClientGone, ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("connection failed")
        finally:
            self._table.remove(writer)
            writer.close()

    async def _read_head(self, reader: asyncio.StreamReader, deadline: float | None) -> bytes | None:
        """A request's head up to its empty line; None when the client closed or stayed idle."""
        loop = asyncio.get_running_loop()
        limits = self.limits
        try:
            if deadline is None:  # keep-alive: wait for the next request's first byte
                first = await asyncio.wait_for(reader.read(1), limits.keep_alive_timeout)
                deadline = loop.time() + limits.head_timeout
            else:
                async with asyncio.timeout_at(deadline):
                    first = await reader.read(1)
        except TimeoutError:
            return None
        if not first:
            return None
        lines: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    try:
                        line = await reader.readuntil(b"\r\n")
                    except asyncio.LimitOverrunError:
                        raise _too_large(request_line=not lines) from None
                    if first:
                        line, first = first + line, b""
                    size += len(line)
                    if size > limits.max_head_bytes:
                        raise _too_large(request_line=not lines)
                    if not lines:
                        if line == b"\r\n":
                            continue  # a stray CRLF between requests
                        if len(line) > limits.max_request_line:
                            raise _too_large(request_line=True)
                    lines.append(line)
                    if line == b"\r\n":
                        return b"".join(lines)
        except TimeoutError:
            raise ApiError(408, errors.INVALID_REQUEST_BODY, "the request head did not arrive in time") from None
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip() or any(line.strip() for line in lines):
                log.debug("connection closed inside a request head")
            return None

    async def _one_request(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        lost: asyncio.Future[None],
        deadline: float | None,
    ) -> bool:
        """Serve one request; True to keep the connection for another."""
        try:
            head = await self._read_head(reader, deadline)
        except ApiError as exc:
            await self._write(writer, error_response(exc), False)
            return False
        if head is None:
            return False
        started = time.monotonic()
        try:
            method, target, version, headers = _parse_head(head)
        except ApiError as exc:
            await self._write(writer, error_response(exc), False)
            return False
        self._table.busy(writer)

        connection = headers.get("connection", "").lower()
        keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection

        try:
            body = _body_for(reader, writer, headers)
        except ApiError as exc:
            await self._write(writer, error_response(exc), False)
            return False

        raw_path, _, raw_query = target.partition("?")
        request = Request(
            method,
            unquote(raw_path),
            parse_query(raw_query) if raw_query else {},
            headers,
            body,
            lost,
        )
        try:
            response = await self._dispatch(request)
        except ApiError as exc:
            response = error_response(exc)
        except ClientGone:
            return False
        except Exception:
            log.exception("handler failed: %s %s", method, request.path)
            response = error_response(ApiError(500, errors.RUNTIME_ERROR, "internal error"))

        if isinstance(response, Upgrade):
            if body.done:
                await self._switch(reader, writer, response)
                return False
            response = error_response(errors.bad_request("a WebSocket handshake has no body"))
        if not body.done and not await body.drain(MAX_DRAIN):
            keep_alive = False
        keep_alive = await self._write(
            writer, response, keep_alive, chunked_ok=version == "HTTP/1.1", head_only=method == "HEAD"
        )
        self._table.idle(writer)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "request method=%s path=%s status=%d ms=%.1f",
                method,
                request.path,
                response.status,
                (time.monotonic() - started) * 1000,
            )
        return keep_alive

    async def _switch(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upgrade: Upgrade) -> None:
        """101, then the connection is the route's WebSocket until its `run` returns."""
        from opensandbox_platform.daemon.websocket import INTERNAL_ERROR, WebSocket

        writer.write(_head(101, upgrade.headers))
        await writer.drain()
        ws = WebSocket(reader, writer, upgrade.max_message)
        code = 1000
        try:
            await upgrade.run(ws)
        except Exception:
            log.exception("websocket handler failed")
            code = INTERNAL_ERROR
        finally:
            if not ws.closed.done():
                await ws.close(code)

    async def _write(
        self,
        writer: asyncio.StreamWriter,
        response: Response | StreamResponse | FileResponse,
        keep_alive: bool,
        chunked_ok: bool = True,
        head_only: bool = False,
    ) -> bool:
        """Write the response (for HEAD: its head only, as GET's would be); True to keep the connection."""
        headers = dict(response.headers)  # responses may be shared (e.g. the empty 200)
        if isinstance(response, StreamResponse) and not chunked_ok and not head_only:
            keep_alive = False  # HTTP/1.0: the body ends when the connection closes
        if not keep_alive:
            headers["connection"] = "close"
        if head_only:
            return await self._write_head_only(writer, response, headers, keep_alive, chunked_ok)
        if isinstance(response, Response):
            headers["content-length"] = str(len(response.body))
            writer.write(_head(response.status, headers) + response.body)
            await writer.drain()
            return keep_alive
        if isinstance(response, FileResponse):
            headers["content-length"] = str(response.count)
            try:
                writer.write(_head(response.status, headers))
                await writer.drain()
                if response.count:
                    loop = asyncio.get_running_loop()
                    await loop.sendfile(writer.transport, response.file, response.offset, response.count)
            finally:
                response.file.close()
            return keep_alive
        return await self._write_stream(writer, response, headers, keep_alive, chunked_ok)

    async def _write_head_only(
        self,
        writer: asyncio.StreamWriter,
        response: Response | StreamResponse | FileResponse,
        headers: dict[str, str],
        keep_alive: bool,
        chunked: bool,
    ) -> bool:
        """A HEAD answer: the headers a GET would get, and no body (a body would be read by the
        client as the start of the next response on this connection)."""
        if isinstance(response, Response):
            headers["content-length"] = str(len(response.body))
        elif isinstance(response, FileResponse):
            headers["content-length"] = str(response.count)
            response.file.close()
        else:
            if chunked:
                headers["transfer-encoding"] = "chunked"
            aclose = getattr(response.chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        writer.write(_head(response.status, headers))
        await writer.drain()
        return keep_alive

    async def _write_stream(
        self,
        writer: asyncio.StreamWriter,
        response: StreamResponse,
        headers: dict[str, str],
        keep_alive: bool,
        chunked: bool,
    ) -> bool:
        if chunked:
            headers["transfer-encoding"] = "chunked"
        writer.write(_head(response.status, headers))
        chunks = response.chunks
        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                if chunked:
                    writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                else:
                    writer.write(chunk)
                await writer.drain()
        except (ConnectionError, ClientGone):
            raise
        except Exception:
            # The status line is gone already: end the body cleanly, then drop the connection.
            log.exception("stream producer failed")
            keep_alive = False
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        if chunked:
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        return keep_alive


_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")


def unquote(text: str) -> str:
    """urllib.parse.unquote (UTF-8, malformed sequences replaced), without importing urllib.parse
    (and with it ipaddress) into every sandbox's execd."""
    if "%" not in text:
        return text
    raw = _PERCENT.sub(lambda m: bytes((int(m.group(1), 16),)), text.encode("utf-8", "surrogateescape"))
    return raw.decode("utf-8", "replace")


def parse_query(query: str) -> dict[str, list[str]]:
    """urllib.parse.parse_qs(query, keep_blank_values=True): `&`-separated `name=value` pairs, `+`
    meaning a space, percent-decoded; empty fields are skipped."""
    result: dict[str, list[str]] = {}
    for field in query.split("&"):
        if not field:
            continue
        name, _, value = field.partition("=")
        result.setdefault(unquote(name.replace("+", " ")), []).append(unquote(value.replace("+", " ")))
    return result


def _head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _too_large(request_line: bool) -> ApiError:
    if request_line:
        return ApiError(414, errors.INVALID_REQUEST_BODY, "request line too long")
    return ApiError(431, errors.INVALID_REQUEST_BODY, "request head too large")


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    lines = head[:-4].split(b"\r\n")
    while lines and not lines[0]:
        lines.pop(0)  # tolerate stray CRLFs between requests
    if not lines:
        raise errors.bad_request("empty request")
    parts = lines[0].decode("latin-1").split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1]:
        raise errors.bad_request("malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise ApiError(505, errors.INVALID_REQUEST_BODY, f"unsupported version {version}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or line[:1] in (b" ", b"\t"):
            raise errors.bad_request("malformed header line")
        key = name.decode("latin-1").lower()
        text = value.strip(b" \t").decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return method, target, version, headers


def _body_for(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: dict[str, str]) -> _Body:
    expect = headers.get("expect", "").lower() == "100-continue"
    encoding = headers.get("transfer-encoding")
    length_text = headers.get("content-length")
    if encoding is not None:
        if length_text is not None:
            raise errors.bad_request("both Content-Length and Transfer-Encoding")
        if encoding.lower().split(",")[-1].strip() != "chunked":
            raise ApiError(501, errors.NOT_SUPPORTED, f"unsupported transfer-encoding {encoding}")
        return _Body(reader, writer, None, True, expect)
    if length_text is not None:
        if not length_text.isdigit():
            raise errors.bad_request("invalid Content-Length")
        return _Body(reader, writer, int(length_text), False, expect)
    return _Body(reader, writer, 0, False, False)


def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison (hmac.compare_digest would pull in OpenSSL: ~4 MiB of RSS)."""
    a, b = given.encode(), expected.encode()
    diff = len(a) ^ len(b)
    for i, byte in enumerate(b):
        diff |= (a[i] if i < len(a) else 0) ^ byte
    return diff == 0


def require_token(request: Request, header: str, token: str | None) -> None:
    """401 unless the request carries `token` in `header` (no token configured: anyone may call)."""
    if token and not same_secret(request.headers.get(header.lower(), ""), token):
        raise ApiError(401, errors.UNAUTHORIZED, f"invalid or missing header {header}")
