"""execd's routes: the wire contract of upstream execd as the official SDK 1.1.1 uses it.

Every handler validates its input by hand and raises ApiError for anything a client got wrong;
the HTTP layer turns that into a 4xx with `{code, message}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from opensandbox_platform.api.labels import EXECD_TOKEN_HEADER
from opensandbox_platform.daemon import errors
from opensandbox_platform.daemon.errors import ApiError
from opensandbox_platform.daemon.http import (
    AnyResponse,
    Request,
    Response,
    Router,
    StreamResponse,
    require_token,
)
from opensandbox_platform.execd import sse
from opensandbox_platform.execd.bootstrap import Bootstrap
from opensandbox_platform.execd.code.readiness import JUPYTER_PORT, Readiness, jupyter_port
from opensandbox_platform.execd.commands import CommandManager, parse_run_request
from opensandbox_platform.execd.envfile import DEFAULT_ENVS_FILE, Environment
from opensandbox_platform.execd.isolated.routes import IsolatedApi

if TYPE_CHECKING:  # imported on first use: an idle execd only holds what /ping and commands need
    from opensandbox_platform.execd.code.contexts import CodeContexts
    from opensandbox_platform.execd.hooks import Hooks
    from opensandbox_platform.execd.identity import Identity
    from opensandbox_platform.execd.metrics import Sampler
    from opensandbox_platform.execd.pty import PtyManager
    from opensandbox_platform.execd.sessions import SessionManager

log = logging.getLogger("execd")

T = TypeVar("T")

CURSOR_HEADER = "EXECD-COMMANDS-TAIL-CURSOR"
EMPTY = Response()


class Settings:
    """execd's settings. (A plain class, as the other classes execd needs at start: a dataclass
    generates its methods with exec() at import, about a millisecond each at every start.)"""

    def __init__(
        self,
        *,
        access_token: str | None = None,
        envs_file: str = DEFAULT_ENVS_FILE,
        state_dir: str | None = None,
        ping_interval: float = 3.0,
        interrupt_grace: float = 3.0,
        metrics_interval: float = 1.0,
        code_port: int | None = None,
        code_prestart: str | None = None,
        max_sessions: int = 64,
        session_idle_timeout: float = 3600.0,
        max_terminals: int = 16,
    ) -> None:
        self.access_token = access_token
        self.envs_file = envs_file
        self.state_dir = state_dir
        self.ping_interval = ping_interval
        self.interrupt_grace = interrupt_grace
        self.metrics_interval = metrics_interval
        # The code interpreter's readiness port: None reads $JUPYTER_PORT (default 44771); 0 picks a
        # free one and tells commands through $JUPYTER_PORT (sandboxes sharing the host's network).
        self.code_port = code_port
        self.code_prestart = code_prestart  # a language whose default context is created at start-up
        self.max_sessions = max_sessions  # bash sessions at once; one more is a 429
        self.session_idle_timeout = session_idle_timeout  # seconds unused before a session is deleted; 0: never
        self.max_terminals = max_terminals  # PTY sessions at once; one more is a 429


def _flag(value: str | None, name: str) -> bool:
    """A boolean query parameter: absent, true/false or 1/0 (any case); anything else is a 400."""
    if value is None:
        return False
    lowered = value.lower()
    if lowered not in ("true", "false", "1", "0"):
        raise errors.bad_request(f"query parameter {name!r} must be true or false", errors.MISSING_QUERY)
    return lowered in ("true", "1")


def _new_temp_dir(prefix: str) -> str:
    """tempfile.mkdtemp without importing tempfile (random, hashlib, shutil: ~1 MiB in every sandbox)."""
    parent = os.environ.get("TMPDIR") or "/tmp"
    while True:
        path = os.path.join(parent, prefix + os.urandom(6).hex())
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue


class ExecdApp:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state_dir = settings.state_dir or _new_temp_dir("execd-")
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        self.environment = Environment(settings.envs_file)
        self.bootstrap = Bootstrap(self.environment, os.getcwd())
        self._hooks: Hooks | None = None
        self.commands = CommandManager(
            self.environment,
            self.state_dir,
            ping_interval=settings.ping_interval,
            interrupt_grace=settings.interrupt_grace,
        )
        self._sessions: SessionManager | None = None
        self._sampler: Sampler | None = None
        self._ptys: PtyManager | None = None
        self.isolated = IsolatedApi(self.environment, self.state_dir, settings.ping_interval, settings.interrupt_grace)
        port = settings.code_port
        self.readiness = Readiness(jupyter_port(os.environ) if port is None else port)
        if port == 0:
            self.environment.daemon[JUPYTER_PORT] = str(self.readiness.port)
        self._code: CodeContexts | None = None
        self._code_started: asyncio.Task[None] | None = None
        self.bootstrap.on_apply.append(self._bootstrap_applied)
        self.router = self._routes()

    def _routes(self) -> Router:
        r = Router()
        files = [
            ("GET", "/files/info", self.files_info),
            ("DELETE", "/files", self.delete_files),
            ("POST", "/files/mv", self.move_files),
            ("POST", "/files/permissions", self.set_permissions),
            ("GET", "/files/search", self.search_files),
            ("POST", "/files/replace", self.replace_contents),
            ("POST", "/files/upload", self.upload_files),
            ("GET", "/files/download", self.download_file),
            ("GET", "/directories/list", self.list_directory),
            ("POST", "/directories", self.make_directories),
            ("DELETE", "/directories", self.delete_directories),
        ]
        for method, path, handler in files:
            r.add(method, path, handler)
            # The SDK's files_with_identity(uid, gid): the same routes, acting as that user (_fs).
            r.add(method, "/v1/filesystem/{uid}/{gid}" + path, handler)
        r.add("GET", "/ping", self.ping)
        r.add("POST", "/command", self.run_command)
        r.add("DELETE", "/command", self.interrupt_command)
        r.add("GET", "/command/status/{id}", self.command_status)
        r.add("GET", "/command/{id}/logs", self.command_logs)
        r.add("POST", "/session", self.create_session)
        r.add("POST", "/session/{id}/run", self.run_in_session)
        r.add("DELETE", "/session/{id}", self.delete_session)
        r.add("GET", "/metrics", self.metrics)
        r.add("GET", "/metrics/watch", self.watch_metrics)
        r.add("POST", "/bootstrap", self.apply_bootstrap)
        r.add("GET", "/bootstrap", self.bootstrap_status)
        r.add("POST", "/lifecycle", self.begin_lifecycle)
        r.add("GET", "/lifecycle", self.lifecycle_status)
        r.add("POST", "/code", self.run_code)
        r.add("DELETE", "/code", self.interrupt_code)
        r.add("POST", "/code/context", self.create_context)
        r.add("GET", "/code/contexts", self.list_contexts)
        r.add("DELETE", "/code/contexts", self.delete_contexts)
        r.add("GET", "/code/contexts/{id}", self.get_context)
        r.add("DELETE", "/code/contexts/{id}", self.delete_context)
        self.isolated.register(r)  # /v1/isolated/... (execd/isolated/)
        r.add("POST", "/pty", self.create_pty)
        r.add("GET", "/pty/{id}", self.pty_status)
        r.add("DELETE", "/pty/{id}", self.delete_pty)
        r.add("GET", "/pty/{id}/ws", self.pty_socket)
        return r

    async def dispatch(self, request: Request) -> AnyResponse:
        require_token(request, EXECD_TOKEN_HEADER, self.settings.access_token)
        handler, request.params = self.router.resolve(request.method, request.path)
        return await handler(request)

    async def shutdown(self) -> None:
        self.readiness.close()
        if self._code_started is not None:
            self._code_started.cancel()
        if self._code is not None:
            await self._code.shutdown()
        await self.commands.shutdown()
        if self._sessions is not None:
            self._sessions.shutdown()
        if self._ptys is not None:
            self._ptys.shutdown()
        self.isolated.shutdown()
        self.bootstrap.shutdown()
        if self._hooks is not None:
            self._hooks.shutdown()
        if self.settings.state_dir is None:  # our own temp dir: background logs die with execd
            import shutil

            shutil.rmtree(self.state_dir, ignore_errors=True)

    @property
    def sessions(self) -> SessionManager:
        """The bash sessions, created (and their module imported) on first use."""
        if self._sessions is None:
            from opensandbox_platform.execd.sessions import SessionManager

            self._sessions = SessionManager(
                self.environment,
                self.state_dir,
                ping_interval=self.settings.ping_interval,
                max_sessions=self.settings.max_sessions,
                idle_timeout=self.settings.session_idle_timeout,
            )
        return self._sessions

    @property
    def hooks(self) -> Hooks:
        """The lifecycle hooks, created (and their modules imported) on first use."""
        if self._hooks is None:
            from opensandbox_platform.execd.hooks import Hooks

            gate = os.environ.get("EXECD_START_GATE") or None
            self._hooks = Hooks(self.environment, lambda: self.bootstrap.cwd, gate)
        return self._hooks

    @property
    def sampler(self) -> Sampler:
        """The metrics sampler, created (and its module imported) on first use."""
        if self._sampler is None:
            from opensandbox_platform.execd.metrics import Sampler

            self._sampler = Sampler()
        return self._sampler

    @property
    def ptys(self) -> PtyManager:
        """The terminals, created (and the PTY and WebSocket modules imported) on first use."""
        if self._ptys is None:
            from opensandbox_platform.execd.pty import PtyManager

            self._ptys = PtyManager(self.environment, self.settings.max_terminals)
        return self._ptys

    # -- health and bootstrap ----------------------------------------------------------------

    async def ping(self, request: Request) -> AnyResponse:
        return EMPTY

    async def apply_bootstrap(self, request: Request) -> AnyResponse:
        return Response.json(self.bootstrap.apply(await request.json(allow_empty=True)))

    async def bootstrap_status(self, request: Request) -> AnyResponse:
        return Response.json(self.bootstrap.status())

    async def begin_lifecycle(self, request: Request) -> AnyResponse:
        """Our own route (docker runtime): run preStart, then schedule the periodic hooks (hooks.py)."""
        run = await self.hooks.begin(await request.json())
        return Response.json({"preStart": None if run is None else run.to_json()})

    async def lifecycle_status(self, request: Request) -> AnyResponse:
        return Response.json(self.hooks.status())

    # -- commands ----------------------------------------------------------------------------

    async def run_command(self, request: Request) -> AnyResponse:
        spec = parse_run_request(await request.json(), self.environment, self.bootstrap.cwd, self.commands.shell)
        return StreamResponse(self.commands.run(spec, request.disconnected), headers=dict(sse.SSE_HEADERS))

    async def interrupt_command(self, request: Request) -> AnyResponse:
        command_id = request.arg("id")
        if not command_id:
            raise errors.bad_request("query parameter 'id' is required", errors.MISSING_QUERY)
        if self._sessions is not None and command_id in self._sessions:
            self._sessions.interrupt(command_id, self.settings.interrupt_grace)
        else:
            self.commands.interrupt(command_id)
        return EMPTY

    async def command_status(self, request: Request) -> AnyResponse:
        return Response.json(self.commands.status(request.params["id"]))

    async def command_logs(self, request: Request) -> AnyResponse:
        cursor_text = request.arg("cursor") or "0"
        if not cursor_text.isdigit():
            raise errors.bad_request(f"invalid cursor {cursor_text!r}: a byte offset >= 0 is required")
        data, cursor = self.commands.logs(request.params["id"], int(cursor_text))
        return Response(data, headers={CURSOR_HEADER: str(cursor)}, content_type="text/plain; charset=utf-8")

    # -- sessions ----------------------------------------------------------------------------

    async def create_session(self, request: Request) -> AnyResponse:
        session_id = self.sessions.create(await request.json(allow_empty=True), self.bootstrap.cwd)
        return Response.json({"session_id": session_id})

    async def run_in_session(self, request: Request) -> AnyResponse:
        session, command, cwd, timeout = self.sessions.prepare_run(request.params["id"], await request.json())
        stream = self.sessions.run(session, command, cwd, timeout, request.disconnected)
        return StreamResponse(stream, headers=dict(sse.SSE_HEADERS))

    async def delete_session(self, request: Request) -> AnyResponse:
        self.sessions.delete(request.params["id"])
        return EMPTY

    # -- terminals (execd/pty.py, imported on first use) --------------------------------------

    async def create_pty(self, request: Request) -> AnyResponse:
        session = self.ptys.create(await request.json(allow_empty=True), self.bootstrap.cwd)
        return Response.json({"session_id": session.id})

    async def pty_status(self, request: Request) -> AnyResponse:
        return Response.json(self.ptys.get(request.params["id"]).wire())

    async def delete_pty(self, request: Request) -> AnyResponse:
        self.ptys.delete(request.params["id"])
        return EMPTY

    async def pty_socket(self, request: Request) -> AnyResponse:
        from opensandbox_platform.daemon import websocket
        from opensandbox_platform.execd.pty import MAX_MESSAGE

        session = self.ptys.get(request.params["id"])
        if request.arg("pty") is not None and not _flag(request.arg("pty"), "pty"):
            raise ApiError(501, errors.NOT_SUPPORTED, "pipe mode (pty=0) is not supported: terminals only")
        since_text = request.arg("since")
        if since_text is not None and not since_text.isdigit():
            raise errors.bad_request(f"invalid since {since_text!r}: a byte offset >= 0 is required")
        since = None if since_text is None else int(since_text)
        takeover = _flag(request.arg("takeover"), "takeover")
        if session.client is not None and not session.client.closed.done() and not takeover:
            raise ApiError(409, "ALREADY_CONNECTED", "another client holds this terminal; ask takeover=1")
        return websocket.accept(
            request.method, request.headers, lambda ws: session.attach(ws, since, takeover), MAX_MESSAGE
        )

    # -- files (execd/files.py, imported on first use) ---------------------------------------

    async def _fs(self, request: Request, fn: Callable[..., T], *args: Any, inline: bool = False) -> T:
        """`fn(*args)` as the request's user: under /v1/filesystem/{uid}/{gid}, in a thread that has
        become that user (execd/identity.py); otherwise as execd, in a worker thread (or `inline`
        for calls too quick to be worth one)."""
        who = self._identity(request)
        if who is not None:
            from opensandbox_platform.execd import identity

            return await identity.run_as(who, fn, *args)
        return fn(*args) if inline else await asyncio.to_thread(fn, *args)

    def _identity(self, request: Request) -> Identity | None:
        """The user a files request acts as (400 on a bad uid/gid), None for execd itself."""
        uid = request.params.get("uid")
        if uid is None:
            return None
        from opensandbox_platform.execd import identity

        return identity.parse(uid, request.params["gid"])

    async def files_info(self, request: Request) -> AnyResponse:
        from opensandbox_platform.execd import files

        return Response.json(await self._fs(request, files.files_info, request.args("path")))

    async def delete_files(self, request: Request) -> AnyResponse:
        from opensandbox_platform.execd import files

        await self._fs(request, files.delete_files, request.args("path"), inline=True)
        return EMPTY

    async def delete_directories(self, request: Request) -> AnyResponse:
        from opensandbox_platform.execd import files

        await self._fs(request, files.delete_dirs, request.args("path"))
        return EMPTY

    async def move_files(self, request: Request) -> AnyResponse:
        from opensandbox_platform.execd import files

        await self._fs(request, files.move, await request.json())
        return EMPTY

    async def set_permissions(self, request: Request) -> AnyResponse:
        from opensandbox_platform.execd import files

        await self._fs(request, files.set_permissions, await request.json(), inline=True)
        return EMPTY

    async def make_directories(self, request: Request) -> AnyResponse:
        from opensandbox_platform.execd import files

        await self._fs(request, files.make_dirs, await request.json(), inline=True)
        return EMPTY

    async def search_files(self, request: Request) -> AnyResponse:
        from opensandbox_platform.execd import files

        found = await self._fs(request, files.search, request.arg("path"), request.arg("pattern"))
        return Response.json(found)

    async def list_directory(self, request: Request) -> AnyResponse:
        from opensandbox_platform.execd import files

        entries = await self._fs(request, files.list_dir, request.arg("path"), request.arg("depth"))
        return Response.json(entries)

    async def replace_contents(self, request: Request) -> AnyResponse:
        from opensandbox_platform.execd import files

        results = await self._fs(request, files.replace, await request.json())
        if _flag(request.arg("verbose"), "verbose"):
            return Response.json(results)
        return EMPTY

    async def upload_files(self, request: Request) -> AnyResponse:
        from opensandbox_platform.execd import files

        self._identity(request)  # a bad uid/gid is a 400 before the body is read
        # Opening (and making parents) and the final chown/chmod are the user's; the bytes in
        # between go to the descriptor the user opened.

        async def run(fn: Callable[..., T], *args: Any) -> T:
            return await self._fs(request, fn, *args, inline=True)

        await files.upload(request.headers.get("content-type", ""), request.iter_body(), run=run)
        return EMPTY

    async def download_file(self, request: Request) -> AnyResponse:
        from opensandbox_platform.execd import files
        from opensandbox_platform.execd.download import file_response

        path = request.arg("path")
        offset, limit = request.arg("offset"), request.arg("limit")
        range_header = request.headers.get("range")
        if offset is not None or limit is not None:
            if range_header:
                raise errors.bad_request("offset/limit and Range cannot be combined")
            data = await self._fs(request, files.read_lines, path or "", offset, limit)
            return Response(data, content_type="text/plain; charset=utf-8")
        fh, st, full = await self._fs(request, files.open_for_download, path, inline=True)
        return file_response(fh, st, full, range_header)

    # -- code interpreter --------------------------------------------------------------------

    @property
    def code(self) -> CodeContexts:
        """The code contexts, created (and their modules imported) on first use."""
        if self._code is None:
            from opensandbox_platform.execd.code.contexts import CodeContexts
            from opensandbox_platform.execd.code.settings import CodeSettings

            env = self.environment.compose()
            settings = CodeSettings.from_env(env, self.settings.interrupt_grace, self.settings.ping_interval)
            self._code = CodeContexts(
                self.environment, self.state_dir, lambda: self.bootstrap.cwd, settings, self._kernel_ready
            )
        return self._code

    def _bootstrap_applied(self, env: dict[str, str], cwd: str) -> None:
        if self._code is not None:  # kernels started before the claim (a pool's) take the claim's env
            self._code.adopt(env, cwd)

    def _kernel_ready(self) -> None:
        if not self.readiness.listening:
            asyncio.get_running_loop().create_task(self.readiness.open())

    def start_code(self) -> None:
        """After execd listens: open the readiness port if the image has kernels, or pre-start a
        language's default context first (then the port opens once its kernel answers)."""
        self._code_started = asyncio.get_running_loop().create_task(self._start_code())

    async def _start_code(self) -> None:
        from opensandbox_platform.execd.code import kernelspecs

        if self.settings.code_prestart:
            try:
                await self.code.prestart(self.settings.code_prestart)
            except ApiError as exc:
                log.error("could not pre-start a %s kernel: %s", self.settings.code_prestart, exc.message)
            return
        if kernelspecs.scan(self.environment.compose()):
            await self.readiness.open()

    async def run_code(self, request: Request) -> AnyResponse:
        from opensandbox_platform.execd.code.contexts import MAX_BODY

        ctx, code = await self.code.prepare_run(await request.json(MAX_BODY))
        return StreamResponse(self.code.run(ctx, code, request.disconnected), headers=dict(sse.SSE_HEADERS))

    async def interrupt_code(self, request: Request) -> AnyResponse:
        context_id = request.arg("id")
        if not context_id:
            raise errors.bad_request("query parameter 'id' (a context id) is required", errors.MISSING_QUERY)
        self.code.interrupt(context_id)
        return EMPTY

    async def create_context(self, request: Request) -> AnyResponse:
        return Response.json(await self.code.create(await request.json(allow_empty=True)))

    async def list_contexts(self, request: Request) -> AnyResponse:
        return Response.json(self.code.listing(request.arg("language")))

    async def get_context(self, request: Request) -> AnyResponse:
        return Response.json(self.code.get(request.params["id"]).wire())

    async def delete_context(self, request: Request) -> AnyResponse:
        await self.code.delete(request.params["id"])
        return EMPTY

    async def delete_contexts(self, request: Request) -> AnyResponse:
        language = request.arg("language")
        if not language:
            raise errors.bad_request("query parameter 'language' is required", errors.MISSING_QUERY)
        await self.code.delete_language(language)
        return EMPTY

    # -- metrics -----------------------------------------------------------------------------

    async def metrics(self, request: Request) -> AnyResponse:
        return Response.json(await self.sampler.sample())

    async def watch_metrics(self, request: Request) -> AnyResponse:
        return StreamResponse(self._metrics_stream(request.disconnected), headers=dict(sse.SSE_HEADERS))

    async def _metrics_stream(self, disconnected: asyncio.Future[None]) -> AsyncIterator[bytes]:
        sampler = type(self.sampler)(self.sampler.sources)  # its own CPU baseline
        while not disconnected.done():
            yield b"data: " + json.dumps(await sampler.sample(), separators=(",", ":")).encode() + b"\n\n"
            await asyncio.wait([disconnected], timeout=self.settings.metrics_interval)
