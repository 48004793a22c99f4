"""Code contexts: one Jupyter kernel each, run through the kernel bridge, streamed as SSE.

The wire contract is what `opensandbox-code-interpreter` 1.1.1 sends and parses (it wins where
upstream's execd spec differs):

- `POST /code/context {"language", "cwd"?}` → `{"id", "language"}` (the kernel has started);
- `POST /code {"code", "context": {"id"?, "language"}}` → SSE: `init` (text = the context id, which
  the SDK passes to interrupt), `execution_count`, `stdout`/`stderr` (the kernel's stream text as
  it comes, newlines included), `result` (`results`: the MIME bundle with `text/plain` renamed to
  `text`, as the SDK reads it), then `execution_complete`, or `error` (`ename`, `evalue`,
  `traceback`) instead of it; `ping` after 3 s without output;
- no `context.id`: the language's default context, created on first use;
- `DELETE /code?id=<context>` interrupts the running code; a run still going `interrupt_grace`
  seconds later has its kernel killed (the run ends with an error, the next run gets a fresh kernel).

A kernel that dies (os._exit, OOM, killed) ends its run with an error `KernelDied`; the context
stays and its next run starts a fresh kernel. Contexts idle for `idle_timeout` are deleted; at
most `max_contexts` exist at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opensandbox_platform.daemon import errors
from opensandbox_platform.daemon.errors import ApiError
from opensandbox_platform.execd import sse
from opensandbox_platform.execd.code import kernelspecs
from opensandbox_platform.execd.code.channel import Bridge, BridgeError, RunQueue
from opensandbox_platform.execd.code.settings import PYTHON, CodeSettings
from opensandbox_platform.execd.commands import new_id
from opensandbox_platform.execd.envfile import Environment, expand_path

log = logging.getLogger("execd.code")

CONTEXT_NOT_FOUND = "CONTEXT_NOT_FOUND"
UNSUPPORTED_LANGUAGE = "UNSUPPORTED_LANGUAGE"
NO_KERNELS = "NO_KERNELS"
TOO_MANY_CONTEXTS = "TOO_MANY_CONTEXTS"
KERNEL_START_FAILED = "KERNEL_START_FAILED"
MAX_BODY = 4 * 1024 * 1024  # a run's JSON body (code cells are far smaller)
MAX_IPC_PATH = 96  # unix socket paths are limited to 107 bytes; the kernel appends "-<port>"


@dataclass(eq=False)
class Context:
    id: str
    language: str  # as the client named it (echoed back, as upstream does)
    spec: str  # kernelspec name
    spec_language: str  # the kernelspec's language
    ipc: bool  # the kernel is a Python program (ipykernel's base): it can listen on unix sockets
    cwd: str
    default: bool
    kernel: str | None = None  # the bridge's id of the live kernel; None: started on the next run
    generation: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_used: float = field(default_factory=time.monotonic)
    active: int = 0  # runs holding or waiting for the lock
    runs: int = 0  # runs since the kernel started (0: nothing of the user's ran in it yet)
    pending: tuple[dict[str, str], str] | None = None  # a claim's env and cwd, for the kernel's first run
    running: str | None = None  # the run under way
    exit_note: str = ""  # why the last kernel went away, told to the run it broke
    escalated: asyncio.TimerHandle | None = None

    def wire(self) -> dict[str, str]:
        return {"id": self.id, "language": self.language}


def _string(body: Mapping[str, Any], key: str, what: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise errors.bad_request(f"'{key}' must be a string ({what})")
    return value


def parse_run(body: Any) -> tuple[str, str | None, str]:
    """(code, context id or None, language) of a `POST /code` body."""
    if not isinstance(body, dict):
        raise errors.bad_request("request body must be a JSON object {code, context?}")
    code = body.get("code")
    if not isinstance(code, str) or not code.strip():
        raise errors.bad_request("'code' is required: a non-empty string")
    context = body.get("context") or {}
    if not isinstance(context, dict):
        raise errors.bad_request("'context' must be an object {id?, language?}")
    context_id = _string(context, "id", "a context id from POST /code/context") or None
    language = _string(context, "language", "e.g. python") or ""
    return code, context_id, language.strip()


def parse_create(body: Any) -> tuple[str, str | None]:
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise errors.bad_request("request body must be a JSON object {language, cwd?}")
    language = (_string(body, "language", "e.g. python") or "python").strip() or "python"
    return language, _string(body, "cwd", "a directory in the sandbox") or None


def exit_note(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}" + (" (out of memory?)" if code == -signal.SIGKILL else "")
    return f"exited with status {code}"


class CodeContexts:
    def __init__(
        self,
        environment: Environment,
        state_dir: str,
        default_cwd: Callable[[], str],
        settings: CodeSettings,
        on_kernel_ready: Callable[[], None] = lambda: None,
    ) -> None:
        self.environment = environment
        self.state_dir = state_dir
        self.default_cwd = default_cwd
        self.settings = settings
        self.on_kernel_ready = on_kernel_ready
        self.contexts: dict[str, Context] = {}
        self.defaults: dict[str, str] = {}  # canonical language -> default context id
        self.bridge: Bridge | None = None
        self._bridge_lock = asyncio.Lock()
        self._default_lock = asyncio.Lock()
        self._reaper: asyncio.TimerHandle | None = None
        self._closing = False
        self._claim: tuple[dict[str, str], str] | None = None  # the last claim's env and cwd (adopt)

    # -- the bridge ----------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = self.environment.compose()
        env.setdefault("JUPYTER_RUNTIME_DIR", os.path.join(self.state_dir, "jupyter"))
        env.setdefault("JUPYTER_PLATFORM_DIRS", "1")  # quiets jupyter_core's migration warning
        env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # quiets debugpy's frozen-modules warning
        return env

    async def _bridge(self) -> Bridge:
        async with self._bridge_lock:
            if self.bridge is not None and not self.bridge.gone:
                return self.bridge
            env = self._env()
            specs = kernelspecs.scan(env)
            python = kernelspecs.bridge_python(specs, env)
            if python is None:
                raise ApiError(400, NO_KERNELS, self._no_kernels(env, "no kernelspec and no python3 found"))
            cwd = self.default_cwd()
            try:
                bridge = await Bridge.start(python, os.path.join(self.state_dir, "jupyter"), env, cwd)
            except (BridgeError, OSError) as exc:
                detail = f"{python} cannot run the kernel bridge ({exc}); is ipykernel (jupyter_client) installed?"
                raise ApiError(400, NO_KERNELS, self._no_kernels(env, detail)) from None
            if not bridge.specs:
                await bridge.close()
                raise ApiError(400, NO_KERNELS, self._no_kernels(env, f"{python} sees no kernelspec"))
            bridge.on_died = self._kernel_died
            bridge.on_exit = lambda: self._bridge_gone(bridge)
            log.info("kernel bridge started pid=%d python=%s (%s)", bridge.child.pid, python, bridge.versions)
            self.bridge = bridge
            return bridge

    def _no_kernels(self, env: Mapping[str, str], detail: str) -> str:
        dirs = ", ".join(d + "/kernels" for d in kernelspecs.data_dirs(env))
        return (
            f"no Jupyter kernels in this image: {detail} (searched {dirs}). Use an image with a kernel, e.g. "
            f"opensandbox/code-interpreter, or install python3-ipykernel; set {PYTHON} to the Python that has it."
        )

    def _specs(self, bridge: Bridge) -> dict[str, kernelspecs.KernelSpec]:
        found = {}
        for name, spec in bridge.specs.items():
            argv = tuple(str(a) for a in spec.get("argv") or ()) or ("?",)
            language = kernelspecs.canonical_language(str(spec.get("language") or name))
            found[name] = kernelspecs.KernelSpec(name, language, argv, str(spec.get("display_name") or name))
        return found

    def _kernel_died(self, kernel: str, code: int) -> None:
        for ctx in self.contexts.values():
            if ctx.kernel == kernel:
                ctx.kernel = None
                ctx.exit_note = exit_note(code)
                log.warning("kernel of context %s (%s) %s", ctx.id, ctx.language, ctx.exit_note)

    def _bridge_gone(self, bridge: Bridge) -> None:
        if self.bridge is not bridge or self._closing:
            return  # closed on purpose
        self.bridge = None
        log.warning("kernel bridge exited; its kernels are gone, each context gets a fresh one on its next run")
        for ctx in self.contexts.values():
            if ctx.kernel is not None:
                ctx.kernel = None
                ctx.exit_note = "went away with the kernel bridge (it exited or was killed)"

    # -- kernels -------------------------------------------------------------------------------

    def _ipc_prefix(self, ctx: Context) -> str | None:
        """Unix sockets in execd's state dir for Python kernels (no TCP port of the sandbox used,
        nothing reachable from outside it); other kernels (tslab's zeromq binding) get TCP on
        127.0.0.1, the only transport every kernel implements."""
        prefix = os.path.join(self.state_dir, "jupyter", f"{ctx.id[:12]}.{ctx.generation}")
        return prefix if ctx.ipc and len(prefix) <= MAX_IPC_PATH else None

    async def _start_kernel(self, ctx: Context) -> None:
        bridge = await self._bridge()
        ctx.generation += 1
        kernel = f"{ctx.id}.{ctx.generation}"
        started = time.monotonic()
        claim_at_start = self._claim
        try:
            reply = await bridge.request(
                "start",
                kernel=kernel,
                spec=ctx.spec,
                cwd=ctx.cwd,
                env=self._env(),
                ipc=self._ipc_prefix(ctx),
                timeout=self.settings.start_timeout,
            )
        except BridgeError as exc:
            raise ApiError(500, KERNEL_START_FAILED, f"the {ctx.spec} kernel did not start: {exc}") from None
        bridge.kernel_pids[kernel] = int(reply["pid"])
        ctx.kernel = kernel
        ctx.runs = 0
        # A claim that came while the kernel started (a pool's pre-start) is not in its env yet.
        late_claim = self._claim is not claim_at_start and ctx.spec_language == "python"
        ctx.pending = self._claim if late_claim else None
        log.info(
            "kernel started context=%s spec=%s pid=%s ms=%d",
            ctx.id,
            ctx.spec,
            reply["pid"],
            (time.monotonic() - started) * 1000,
        )
        self.on_kernel_ready()

    async def _stop_kernel(self, ctx: Context) -> None:
        kernel, ctx.kernel = ctx.kernel, None
        bridge = self.bridge
        if kernel is None or bridge is None or bridge.gone:
            return
        with contextlib.suppress(BridgeError):
            await bridge.request("shutdown", kernel=kernel)
        bridge.kernel_pids.pop(kernel, None)

    # -- contexts ------------------------------------------------------------------------------

    async def _new_context(self, language: str, cwd: str | None, default: bool) -> Context:
        if len(self.contexts) >= self.settings.max_contexts:
            raise ApiError(
                429,
                TOO_MANY_CONTEXTS,
                f"this sandbox already has {len(self.contexts)} code contexts (the limit, "
                f"EXECD_CODE_MAX_CONTEXTS): delete one (DELETE /code/contexts/{{id}}) first",
            )
        bridge = await self._bridge()
        specs = self._specs(bridge)
        spec = kernelspecs.choose(specs, language)
        if spec is None:
            have = ", ".join(kernelspecs.languages(specs))
            raise errors.bad_request(
                f"no kernel for language {language!r} in this sandbox; languages with a kernel here: {have} "
                f"(kernelspecs: {', '.join(sorted(specs))})",
                UNSUPPORTED_LANGUAGE,
            )
        ipc = os.path.basename(spec.argv[0]).startswith("python")
        ctx = Context(new_id(), language, spec.name, spec.language, ipc, self._cwd(cwd), default)
        self.contexts[ctx.id] = ctx
        ctx.active += 1  # not idle while its kernel starts (the reaper must not take it)
        try:
            async with ctx.lock:
                await self._start_kernel(ctx)
        except BaseException:
            self.contexts.pop(ctx.id, None)
            raise
        finally:
            ctx.active -= 1
            ctx.last_used = time.monotonic()
        self._schedule_reaper()
        return ctx

    def _cwd(self, cwd: str | None) -> str:
        if not cwd:
            return self.default_cwd()
        try:
            path = expand_path(cwd, self.environment.compose())
        except KeyError as exc:
            raise errors.bad_request(f"cwd {cwd!r}: ${exc.args[0]} is not set") from None
        if not os.path.isdir(path):
            raise errors.bad_request(f"cwd {cwd!r} is not a directory in the sandbox")
        return path

    async def create(self, body: Any) -> dict[str, str]:
        language, cwd = parse_create(body)
        return (await self._new_context(language, cwd, default=False)).wire()

    def get(self, context_id: str) -> Context:
        ctx = self.contexts.get(context_id)
        if ctx is None:
            raise errors.not_found(f"code context {context_id} not found", CONTEXT_NOT_FOUND)
        return ctx

    def listing(self, language: str | None) -> list[dict[str, str]]:
        wanted = kernelspecs.canonical_language(language) if language else None
        return [
            ctx.wire()
            for ctx in self.contexts.values()
            if wanted is None or kernelspecs.canonical_language(ctx.language) == wanted
        ]

    async def delete(self, context_id: str) -> None:
        await self._delete(self.get(context_id))

    async def delete_language(self, language: str) -> None:
        wanted = kernelspecs.canonical_language(language)
        doomed = [c for c in self.contexts.values() if kernelspecs.canonical_language(c.language) == wanted]
        await asyncio.gather(*(self._delete(ctx) for ctx in doomed))

    async def _delete(self, ctx: Context, why: str = "was shut down: its context was deleted") -> None:
        if self.contexts.pop(ctx.id, None) is None:
            return
        ctx.exit_note = why
        for language, default_id in list(self.defaults.items()):
            if default_id == ctx.id:
                del self.defaults[language]
        await self._stop_kernel(ctx)  # a run in progress ends with KernelDied
        if not self.contexts and self.bridge is not None and not self._bridge_lock.locked():
            bridge, self.bridge = self.bridge, None
            await bridge.close()  # nobody runs code: give the bridge's memory back

    def interrupt(self, context_id: str) -> None:
        ctx = self.get(context_id)
        if ctx.running is None or ctx.kernel is None or self.bridge is None or self.bridge.gone:
            return  # nothing runs: interrupting is a no-op, as in Jupyter
        self.bridge.send("interrupt", kernel=ctx.kernel)
        if ctx.escalated is None:
            run = ctx.running
            loop = asyncio.get_running_loop()
            ctx.escalated = loop.call_later(self.settings.interrupt_grace, self._kill_if_running, ctx, run)

    def _kill_if_running(self, ctx: Context, run: str) -> None:
        ctx.escalated = None
        if ctx.running == run and ctx.kernel is not None:
            log.warning(
                "context %s: run still going %g s after an interrupt; killing its kernel",
                ctx.id,
                self.settings.interrupt_grace,
            )
            ctx.exit_note = (
                f"was killed: the code did not stop within {self.settings.interrupt_grace:g} s of the interrupt"
            )
            asyncio.get_running_loop().create_task(self._stop_kernel(ctx))

    # -- runs ----------------------------------------------------------------------------------

    async def prepare_run(self, body: Any) -> tuple[Context, str]:
        """The context a run goes to (the language's default one is created on first use), and the code."""
        code, context_id, language = parse_run(body)
        if context_id is None:
            return await self.default_context(language or "python"), code
        ctx = self.get(context_id)
        if language and kernelspecs.canonical_language(language) != kernelspecs.canonical_language(ctx.language):
            raise errors.bad_request(f"context {context_id} is a {ctx.language} context, not {language}")
        return ctx, code

    async def default_context(self, language: str) -> Context:
        canonical = kernelspecs.canonical_language(language)
        async with self._default_lock:  # two first runs at once must not make two defaults
            default_id = self.defaults.get(canonical)
            if default_id is not None and default_id in self.contexts:
                return self.contexts[default_id]
            ctx = await self._new_context(language, None, default=True)
            self.defaults[canonical] = ctx.id
            return ctx

    def run(self, ctx: Context, code: str, disconnected: asyncio.Future[None]) -> RunStream:
        ctx.active += 1
        return RunStream(self._run(ctx, code, disconnected), lambda: self._release(ctx))

    def _release(self, ctx: Context) -> None:
        ctx.active -= 1
        ctx.last_used = time.monotonic()
        self._schedule_reaper()

    async def _run(self, ctx: Context, code: str, disconnected: asyncio.Future[None]) -> AsyncIterator[bytes]:
        async with ctx.lock:
            yield sse.event("init", text=ctx.id)
            if ctx.kernel is None:
                try:
                    await self._start_kernel(ctx)
                except ApiError as exc:
                    yield _error_event(exc.code, exc.message)
                    return
            bridge = self.bridge
            kernel = ctx.kernel
            if bridge is None or bridge.gone or kernel is None:
                yield _error_event("KernelDied", self._death(ctx))
                return
            if ctx.pending is not None:
                await self._apply_pending(ctx, bridge, kernel)
            run_id = new_id()
            ctx.running = run_id
            ctx.runs += 1
            ctx.exit_note = ""
            queue = bridge.execute(kernel, run_id, code)
            try:
                async for frame in self._events(ctx, queue, disconnected):
                    yield frame
            finally:
                if run_id in bridge.runs:  # the client went away mid-run
                    await self._abandon(ctx, bridge, kernel, run_id, queue)
                ctx.running = None
                if ctx.escalated is not None:
                    ctx.escalated.cancel()
                    ctx.escalated = None

    async def _abandon(self, ctx: Context, bridge: Bridge, kernel: str, run_id: str, queue: RunQueue) -> None:
        """Interrupt the code nobody reads any more and wait (discarding its output) until it ends,
        or its kernel is killed for ignoring the interrupt: the next run then starts on an idle
        kernel, and the context stays locked meanwhile."""
        self.interrupt(ctx.id)
        try:
            await asyncio.wait_for(_drain(queue), self.settings.interrupt_grace + 10)
        except TimeoutError:
            bridge.forget(run_id, kernel)
        except asyncio.CancelledError:  # execd is stopping
            bridge.forget(run_id, kernel)
            raise

    async def _events(self, ctx: Context, queue: RunQueue, disconnected: asyncio.Future[None]) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        interrupted = False
        errored = False
        while True:
            getter = loop.create_task(queue.get())
            waiters: list[asyncio.Future[Any]] = [getter, disconnected]
            done, _ = await asyncio.wait(
                waiters, timeout=self.settings.ping_interval, return_when=asyncio.FIRST_COMPLETED
            )
            if getter not in done:
                getter.cancel()
                if disconnected.done() and not interrupted:
                    # Nobody reads the output any more: stop the code, as upstream does, and keep
                    # draining until the run ends, so the next run starts on an idle kernel.
                    interrupted = True
                    self.interrupt(ctx.id)
                elif not disconnected.done():
                    yield sse.ping()
                continue
            event = getter.result()
            kind = event.get("ev")
            if kind == "done" and event.get("status") == "error" and not errored:
                # The kernel said "error" in its reply only (e.g. tslab's compile errors, which go
                # to stderr): the run must still end with an error event.
                yield _reply_error(event.get("error"))
                return
            errored = errored or kind == "error"
            frame = self._frame(ctx, event)
            if frame:
                yield frame
            if kind == "done":
                return

    def _frame(self, ctx: Context, event: dict[str, Any]) -> bytes:
        kind = event.get("ev")
        if kind == "stream":
            return sse.event(str(event.get("name")), text=str(event.get("text", "")))
        if kind == "count":
            return _count_event(int(event["n"]))
        if kind == "result":
            return _result_event(event.get("data") or {})
        if kind == "error":
            traceback = [str(line) for line in event.get("traceback") or []]
            return sse.event("error", error=sse.error_value(str(event["ename"]), str(event["evalue"]), traceback))
        if kind == "done":
            status = event.get("status")
            if status == "ok":
                return sse.event("execution_complete", execution_time=int(event.get("ms") or 0))
            if status == "aborted":
                return _error_event("ExecutionAborted", "the kernel aborted this execution")
            if status in ("dead", "bridge"):
                return _error_event("KernelDied", self._death(ctx))
        return b""

    def _death(self, ctx: Context) -> str:
        why = ctx.exit_note or "went away"
        return (
            f"the {ctx.spec} kernel of context {ctx.id} {why} while running this code; "
            "its state is lost and the next run starts a fresh kernel"
        )

    # -- idle contexts -------------------------------------------------------------------------

    def _schedule_reaper(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        idle = self.settings.idle_timeout
        candidates = [c.last_used for c in self.contexts.values() if c.active == 0]
        if idle <= 0 or not candidates:
            return
        delay = max(0.0, min(candidates) + idle - time.monotonic())
        self._reaper = asyncio.get_running_loop().call_later(delay + 0.01, self._reap)

    def _reap(self) -> None:
        self._reaper = None
        now = time.monotonic()
        for ctx in list(self.contexts.values()):
            if ctx.active == 0 and now - ctx.last_used >= self.settings.idle_timeout:
                log.info("context %s (%s) idle for %.0f s: deleted", ctx.id, ctx.language, now - ctx.last_used)
                asyncio.get_running_loop().create_task(self._delete(ctx, "was shut down: its context was idle"))
        self._schedule_reaper()

    # -- start-up and shutdown -----------------------------------------------------------------

    async def prestart(self, language: str) -> None:
        """Creates the language's default context now (a pool's warm pods then run their first
        cell without a kernel start)."""
        ctx = await self.default_context(language)
        log.info("pre-started the default %s context %s", language, ctx.id)

    def adopt(self, env: dict[str, str], cwd: str) -> None:
        """A claim's env and working directory, for Python kernels that ran nothing yet (a pool's
        pre-started one): set in the kernel itself, silently, just before its first run (kernels
        still starting take it once started: _start_kernel)."""
        self._claim = (env, cwd)
        for ctx in self.contexts.values():
            if ctx.runs == 0 and ctx.kernel is not None and ctx.spec_language == "python":
                ctx.pending = (env, cwd)
                ctx.cwd = cwd  # a fresh kernel starts there anyway (and its env is composed anew)

    async def _apply_pending(self, ctx: Context, bridge: Bridge, kernel: str) -> None:
        env, cwd = ctx.pending or ({}, ctx.cwd)
        ctx.pending = None
        code = (
            "import os as _o, json as _j\n"
            f"_o.environ.update(_j.loads({json.dumps(json.dumps(env))}))\n"
            f"_o.chdir({json.dumps(cwd)})\n"
            "del _o, _j"
        )
        queue = bridge.execute(kernel, new_id(), code, silent=True)
        while (await queue.get()).get("ev") != "done":
            pass
        log.info("context %s took the bootstrap env (%d keys) and cwd %s", ctx.id, len(env), cwd)

    async def shutdown(self) -> None:
        self._closing = True
        if self._reaper is not None:
            self._reaper.cancel()
        if self.bridge is not None:
            await self.bridge.close()


class RunStream:
    """A run's SSE frames; `aclose` always releases the context, even if never iterated."""

    def __init__(self, frames: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        self._frames = frames
        self._on_close: Callable[[], None] | None = on_close

    def __aiter__(self) -> RunStream:
        return self

    async def __anext__(self) -> bytes:
        return await self._frames.__anext__()

    async def aclose(self) -> None:
        try:
            aclose = getattr(self._frames, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            if self._on_close is not None:
                on_close, self._on_close = self._on_close, None
                on_close()


async def _drain(queue: RunQueue) -> None:
    while (await queue.get()).get("ev") != "done":
        pass


def _error_event(ename: str, evalue: str) -> bytes:
    return sse.event("error", error=sse.error_value(ename, evalue, []))


def _reply_error(error: Any) -> bytes:
    if not isinstance(error, dict):
        return _error_event("ExecutionError", "the kernel reported an error")
    traceback = [str(line) for line in error.get("traceback") or []]
    ename = str(error.get("ename") or "ExecutionError")
    return sse.event("error", error=sse.error_value(ename, str(error.get("evalue") or ""), traceback))


def _count_event(count: int) -> bytes:
    return sse.frame({"type": "execution_count", "execution_count": count})


def _result_event(data: dict[str, Any]) -> bytes:
    results = {("text" if mime == "text/plain" else mime): value for mime, value in data.items()}
    return sse.frame({"type": "result", "results": results})
