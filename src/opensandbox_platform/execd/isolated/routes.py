"""The `/v1/isolated/...` routes, as the official SDK's `sandbox.isolation` calls them.

Light to import: the sessions machinery (and ctypes) is loaded on the first request, so an execd
whose sandbox never uses isolated sessions pays nothing for them.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from opensandbox_platform.daemon import errors
from opensandbox_platform.daemon.errors import ApiError
from opensandbox_platform.daemon.http import AnyResponse, Request, Response, Router, StreamResponse

if TYPE_CHECKING:
    from opensandbox_platform.execd.envfile import Environment
    from opensandbox_platform.execd.isolated.manager import IsolatedSessions
    from opensandbox_platform.execd.isolated.session import Session

PREFIX = "/v1/isolated"
S = PREFIX + "/session/{id}"
CURSOR_HEADER = "EXECD-ISOLATED-TAIL-CURSOR"
EMPTY = Response()


class IsolatedApi:
    def __init__(self, environment: Environment, state_dir: str, ping_interval: float, interrupt_grace: float) -> None:
        self._args = (environment, state_dir, ping_interval, interrupt_grace)
        self._manager: IsolatedSessions | None = None

    @property
    def manager(self) -> IsolatedSessions:
        if self._manager is None:
            from opensandbox_platform.execd.isolated.manager import IsolatedSessions

            self._manager = IsolatedSessions(*self._args)
        return self._manager

    def register(self, r: Router) -> None:
        r.add("GET", PREFIX + "/capabilities", self.capabilities)
        r.add("POST", PREFIX + "/session", self.create)
        r.add("GET", PREFIX + "/sessions", self.listing)
        r.add("GET", S, self.get)
        r.add("DELETE", S, self.delete)
        r.add("POST", S + "/run", self.run)
        r.add("GET", S + "/runs/{run}", self.run_status)
        r.add("GET", S + "/runs/{run}/logs", self.run_logs)
        r.add("GET", S + "/diff", self.diff)
        r.add("POST", S + "/commit", self.commit)
        r.add("GET", S + "/files/info", self.files_info)
        r.add("GET", S + "/files/download", self.download)
        r.add("POST", S + "/files/upload", self.upload)
        r.add("DELETE", S + "/files", self.delete_files)
        r.add("POST", S + "/files/mv", self.move)
        r.add("POST", S + "/files/permissions", self.permissions)
        r.add("GET", S + "/files/search", self.search)
        r.add("POST", S + "/files/replace", self.replace)
        r.add("GET", S + "/directories/list", self.list_dir)
        r.add("POST", S + "/directories", self.make_dirs)
        r.add("DELETE", S + "/directories", self.delete_dirs)

    def shutdown(self) -> None:
        if self._manager is not None:
            self._manager.shutdown()

    def _session(self, request: Request) -> Session:
        return self.manager.get(request.params["id"])

    # -- sessions ---------------------------------------------------------------------------

    async def capabilities(self, request: Request) -> AnyResponse:
        caps = await self.manager.capabilities()
        return Response.json(caps.wire(self.manager.max_sessions))

    async def create(self, request: Request) -> AnyResponse:
        session = await self.manager.create(await request.json())
        state = session.state()
        return Response.json({k: v for k, v in state.items() if k not in ("status", "last_run_at")})

    async def listing(self, request: Request) -> AnyResponse:
        return Response.json({"sessions": self.manager.listing()})

    async def get(self, request: Request) -> AnyResponse:
        return Response.json(self.manager.state(request.params["id"]))

    async def delete(self, request: Request) -> AnyResponse:
        self.manager.delete(request.params["id"])
        return EMPTY

    # -- runs -------------------------------------------------------------------------------

    async def run(self, request: Request) -> AnyResponse:
        from opensandbox_platform.execd import sse
        from opensandbox_platform.execd.isolated.spec import parse_run

        session = self._session(request)
        spec = parse_run(await request.json())
        session.check_active()
        if spec.background:
            run = await session.start_background(spec)
            status = run.status()
            return Response.json(
                {"session_id": session.id, "run_id": run.run_id, "started_at": status["started_at"]}, 202
            )
        return StreamResponse(session.run(spec, request.disconnected), headers=dict(sse.SSE_HEADERS))

    async def run_status(self, request: Request) -> AnyResponse:
        return Response.json(self._session(request).run_of(request.params["run"]).status())

    async def run_logs(self, request: Request) -> AnyResponse:
        from opensandbox_platform.execd.isolated.runs import PAGE_MAX

        run = self._session(request).run_of(request.params["run"])
        cursor = _number(request.arg("cursor"), "cursor", 0)
        limit = _number(request.arg("limit"), "limit", PAGE_MAX)
        if limit < 1:
            raise errors.bad_request("invalid limit: an integer >= 1 is required")
        data, after = await asyncio.to_thread(run.read_log, cursor, limit)
        return Response(data, headers={CURSOR_HEADER: str(after)}, content_type="text/plain; charset=utf-8")

    # -- changes ----------------------------------------------------------------------------

    async def diff(self, request: Request) -> AnyResponse:
        session = self._session(request)
        session.touch()
        try:
            return Response.json(await asyncio.to_thread(session.diff))
        except OSError as exc:
            raise ApiError(409, "SESSION_NOT_ACTIVE", f"the session's changes cannot be read: {exc}") from None

    async def commit(self, request: Request) -> AnyResponse:
        from opensandbox_platform.execd.isolated.spec import parse_commit

        session = self._session(request)
        spec = parse_commit(await request.json(allow_empty=True), request.arg("discard"))
        return Response.json(await session.commit(spec))

    # -- files ------------------------------------------------------------------------------

    async def files_info(self, request: Request) -> AnyResponse:
        fs = self._session(request).fs()
        return Response.json(await asyncio.to_thread(fs.info, request.args("path")))

    async def delete_files(self, request: Request) -> AnyResponse:
        fs = self._session(request).fs()
        await asyncio.to_thread(fs.delete_files, request.args("path"))
        return EMPTY

    async def delete_dirs(self, request: Request) -> AnyResponse:
        fs = self._session(request).fs()
        await asyncio.to_thread(fs.delete_dirs, request.args("path"))
        return EMPTY

    async def move(self, request: Request) -> AnyResponse:
        fs = self._session(request).fs()
        await asyncio.to_thread(fs.move, await request.json())
        return EMPTY

    async def permissions(self, request: Request) -> AnyResponse:
        fs = self._session(request).fs()
        await asyncio.to_thread(fs.set_permissions, await request.json())
        return EMPTY

    async def make_dirs(self, request: Request) -> AnyResponse:
        fs = self._session(request).fs()
        await asyncio.to_thread(fs.make_dirs, await request.json())
        return EMPTY

    async def search(self, request: Request) -> AnyResponse:
        fs = self._session(request).fs()
        return Response.json(await asyncio.to_thread(fs.search, request.arg("path"), request.arg("pattern")))

    async def list_dir(self, request: Request) -> AnyResponse:
        fs = self._session(request).fs()
        return Response.json(await asyncio.to_thread(fs.list_dir, request.arg("path"), request.arg("depth")))

    async def replace(self, request: Request) -> AnyResponse:
        fs = self._session(request).fs()
        results = await asyncio.to_thread(fs.replace, await request.json())
        if (request.arg("verbose") or "").lower() in ("true", "1"):
            return Response.json(results)
        return EMPTY

    async def upload(self, request: Request) -> AnyResponse:
        from opensandbox_platform.execd import files

        fs = self._session(request).fs()
        await files.upload(request.headers.get("content-type", ""), request.iter_body(), fs.open_target)
        return EMPTY

    async def download(self, request: Request) -> AnyResponse:
        from opensandbox_platform.execd.download import file_response

        fs = self._session(request).fs()
        path = request.arg("path")
        offset, limit = request.arg("offset"), request.arg("limit")
        range_header = request.headers.get("range")
        if offset is not None or limit is not None:
            if range_header:
                raise errors.bad_request("offset/limit and Range cannot be combined")
            data = await asyncio.to_thread(fs.read_lines, path, offset, limit)
            return Response(data, content_type="text/plain; charset=utf-8")
        fh, st, full = fs.open_read(path)
        return file_response(fh, st, full, range_header)


def _number(text: str | None, name: str, default: int) -> int:
    if text in (None, ""):
        return default
    assert text is not None
    if not text.isdigit():
        raise errors.bad_request(f"invalid {name} {text!r}: an integer >= 0 is required")
    return int(text)
