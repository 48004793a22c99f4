"""The kernel bridge: starts and drives Jupyter kernels for execd, with jupyter_client and pyzmq.

execd runs this file with the *image's* Python (the one whose ipykernel the kernelspecs start), so
execd itself, possibly a self-contained executable with its own Python, never loads jupyter_client
or pyzmq: that is what keeps execd small when nobody runs code. It must therefore import nothing of
opensandbox_platform and stay compatible with Python >= 3.8 and jupyter_client 6.1 to 8.

Protocol with execd: one JSON object per line, execd -> bridge on stdin, bridge -> execd on stdout
(fd 1 is re-pointed at stderr at start, so nothing else can ever write into the protocol).

  execd -> bridge                                        bridge -> execd
  {"op": "start", "id", "kernel", "spec", "cwd", "env"}  {"id", "ok": true, "pid"} | {"id", "ok": false, "error"}
  {"op": "shutdown", "id", "kernel"}                     {"id", "ok": true}
  {"op": "execute", "kernel", "run", "code", "silent"?}  events of that run (below), then {"ev": "done", ...}
  {"op": "interrupt" | "pause" | "resume", "kernel"}     (nothing)
                                                          {"ev": "hello", "specs", "python", "jupyter_client"}
                                                          {"ev": "died", "kernel", "code"}

Run events: {"ev": "stream", "run", "name", "text"}, {"ev": "count", "run", "n"}, {"ev": "result",
"run", "data", "count"}, {"ev": "error", "run", "ename", "evalue", "traceback"}, {"ev": "done",
"run", "status": "ok" | "error" | "aborted" | "dead", "ms", "error"? (the reply's, on "error")}.

`pause` / `resume` stop and continue the kernel's process group (SIGSTOP / SIGCONT): execd's
backpressure when a client reads a run's output more slowly than the kernel writes it. When stdin
closes (execd is gone), every kernel is killed and the bridge exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.paths import jupyter_path

try:
    from queue import Empty
except ImportError:  # pragma: no cover
    Empty = Exception  # type: ignore[misc,assignment]

MAX_TEXT = 64 * 1024  # output is forwarded in pieces of at most this many characters
MAX_RESULT = 32 * 1024 * 1024  # a result (MIME bundle) larger than this is replaced by a note
MAX_LINE = 64 * 1024 * 1024  # a request line from execd (code is bounded well below this)
NUDGE_WAIT = 0.5  # seconds to wait for IOPub to show a kernel_info's status before asking again
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


class DiskSpecs(KernelSpecManager):  # type: ignore[misc]
    """Kernelspecs as their kernel.json files say, in Jupyter's data path, without importing
    IPython (for the legacy ~/.ipython/kernels) or ipykernel (for the "native" python3 spec):
    IPython is ~20 MiB the bridge would hold for nothing."""

    def _get_kernel_spec_by_name(self, kernel_name: str, resource_dir: str) -> Any:
        return self.kernel_spec_class.from_resource_dir(resource_dir)


def spec_manager() -> KernelSpecManager:
    on_disk = DiskSpecs(ensure_native_kernel=False, kernel_dirs=jupyter_path("kernels"))
    if any(s.get("spec", {}).get("language") == "python" for s in on_disk.get_all_specs().values()):
        return on_disk
    return KernelSpecManager()  # ipykernel without a kernel.json: its built-in spec


class Run:
    def __init__(self, run_id: str, started: float) -> None:
        self.run_id = run_id
        self.started = started
        self.idle = False
        self.status: str | None = None
        self.error: dict[str, Any] | None = None  # the reply's ename/evalue/traceback on "error"


class Kernel:
    def __init__(self, kid: str, km: Any, kc: Any, pid: int) -> None:
        self.kid = kid
        self.km = km
        self.kc = kc
        self.pid = pid
        self.runs: dict[str, Run] = {}  # by the execute request's msg_id
        self.tasks: list[asyncio.Task[None]] = []
        self.closing = False


class Bridge:
    def __init__(self, out: Any) -> None:
        self.out = out
        self.loop = asyncio.get_event_loop()
        self.kernels: dict[str, Kernel] = {}
        self.specs = spec_manager()

    def emit(self, message: dict[str, Any]) -> None:
        self.out.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    # -- requests --------------------------------------------------------------------------

    async def serve(self, reader: asyncio.StreamReader) -> None:
        self.emit(hello(self.specs))
        pending: set[asyncio.Task[None]] = set()
        while True:
            line = await reader.readline()
            if not line:
                break
            request = json.loads(line)
            op = request.get("op")
            if op in ("start", "shutdown"):
                task = self.loop.create_task(self.reply(request))
                pending.add(task)
                task.add_done_callback(pending.discard)
            else:
                self.control(op, request)
        for kernel in list(self.kernels.values()):
            await self.stop(kernel)

    async def reply(self, request: dict[str, Any]) -> None:
        try:
            if request["op"] == "start":
                pid = await self.start(request)
                self.emit({"id": request["id"], "ok": True, "pid": pid})
            else:
                kernel = self.kernels.get(request["kernel"])
                if kernel is not None:
                    await self.stop(kernel)
                self.emit({"id": request["id"], "ok": True})
        except Exception as exc:  # every failure is reported to execd, which turns it into an answer
            self.emit({"id": request["id"], "ok": False, "error": describe(exc)})

    def control(self, op: str, request: dict[str, Any]) -> None:
        kernel = self.kernels.get(request.get("kernel", ""))
        if kernel is None:
            if op == "execute":  # the kernel died just before: execd hears of it from `died`
                self.emit({"ev": "done", "run": request["run"], "status": "dead", "ms": 0})
            return
        if op == "execute":
            # stop_on_error=False: execd sends one run at a time, and with True ipykernel aborts
            # whatever arrives in the moment after an error (the next run, if it is quick).
            silent = bool(request.get("silent"))  # execd's own cells: no output, no execution count
            msg_id = kernel.kc.execute(
                request["code"], silent=silent, store_history=not silent, allow_stdin=False, stop_on_error=False
            )
            kernel.runs[msg_id] = Run(request["run"], time.monotonic())
        elif op == "interrupt":
            signal_group(kernel.pid, signal.SIGCONT)  # a paused kernel must run to see the interrupt
            self.loop.create_task(kernel.km.interrupt_kernel())
        elif op == "pause":
            signal_group(kernel.pid, signal.SIGSTOP)
        elif op == "resume":
            signal_group(kernel.pid, signal.SIGCONT)

    # -- kernels ---------------------------------------------------------------------------

    async def start(self, request: dict[str, Any]) -> int:
        kid = request["kernel"]
        km = AsyncKernelManager(kernel_name=request["spec"], kernel_spec_manager=self.specs)
        ipc = request.get("ipc")
        if ipc:  # unix sockets in execd's state dir: no TCP port of the sandbox is used
            km.transport = "ipc"
            km.ip = ipc
        await km.start_kernel(env=request["env"], cwd=request["cwd"])
        process = kernel_process(km)
        kc = km.client()
        kc.start_channels()
        kernel = Kernel(kid, km, kc, process.pid)
        self.kernels[kid] = kernel
        exited = self.watch(kernel, process)
        try:
            await wait_for_ready(kc, exited, float(request.get("timeout", 60)))
        except Exception:
            await self.stop(kernel)
            raise
        kernel.tasks = [
            self.loop.create_task(self.read_iopub(kernel)),
            self.loop.create_task(self.read_shell(kernel)),
        ]
        return kernel.pid

    def watch(self, kernel: Kernel, process: Any) -> asyncio.Future[int]:
        """A future resolved with the kernel's exit status; a thread waits so no polling is needed."""
        exited: asyncio.Future[int] = self.loop.create_future()

        def on_exit(code: int) -> None:
            if not exited.done():
                exited.set_result(code)
            self.died(kernel, code)

        def wait() -> None:
            code = process.wait()
            self.loop.call_soon_threadsafe(on_exit, code)

        threading.Thread(target=wait, name=f"wait-{kernel.kid}", daemon=True).start()
        return exited

    def died(self, kernel: Kernel, code: int) -> None:
        if self.kernels.get(kernel.kid) is not kernel:
            return
        del self.kernels[kernel.kid]
        if not kernel.closing:  # first, so execd knows why when the runs end
            self.emit({"ev": "died", "kernel": kernel.kid, "code": code})
        self.loop.create_task(self.cleanup(kernel))

    async def stop(self, kernel: Kernel) -> None:
        kernel.closing = True
        signal_group(kernel.pid, signal.SIGCONT)
        try:
            await kernel.km.shutdown_kernel(now=True)
        except Exception as exc:
            print(f"kernel-bridge: shutdown of {kernel.kid} failed: {describe(exc)}", file=sys.stderr)
        signal_group(kernel.pid, signal.SIGKILL)  # whatever the kernel started in its group goes too
        await self.cleanup(kernel)

    async def cleanup(self, kernel: Kernel) -> None:
        self.kernels.pop(kernel.kid, None)
        for run in kernel.runs.values():  # a dead kernel's runs end here, whatever killed it
            self.emit({"ev": "done", "run": run.run_id, "status": "dead", "ms": elapsed(run)})
        kernel.runs.clear()
        for task in kernel.tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            kernel.kc.stop_channels()

    # -- messages --------------------------------------------------------------------------

    async def read_iopub(self, kernel: Kernel) -> None:
        while True:
            message = await kernel.kc.get_iopub_msg()
            run = kernel.runs.get(message.get("parent_header", {}).get("msg_id", ""))
            if run is not None:
                self.iopub(kernel, run, message)

    def iopub(self, kernel: Kernel, run: Run, message: dict[str, Any]) -> None:
        kind = message["header"]["msg_type"]
        content = message.get("content", {})
        if kind == "stream":
            name = "stderr" if content.get("name") == "stderr" else "stdout"
            for piece in pieces(content.get("text", "")):
                self.emit({"ev": "stream", "run": run.run_id, "name": name, "text": piece})
        elif kind == "execute_input" and isinstance(content.get("execution_count"), int):
            self.emit({"ev": "count", "run": run.run_id, "n": content["execution_count"]})
        elif kind in ("execute_result", "display_data", "update_display_data"):
            data = bounded(content.get("data", {}))
            self.emit({"ev": "result", "run": run.run_id, "data": data, "count": content.get("execution_count")})
        elif kind == "error":
            traceback = [ANSI.sub("", line) for line in content.get("traceback", [])]
            self.emit(
                {
                    "ev": "error",
                    "run": run.run_id,
                    "ename": str(content.get("ename", "")),
                    "evalue": str(content.get("evalue", "")),
                    "traceback": traceback,
                }
            )
        elif kind == "status" and content.get("execution_state") == "idle":
            run.idle = True
            self.finish(kernel, message["parent_header"]["msg_id"], run)

    async def read_shell(self, kernel: Kernel) -> None:
        while True:
            message = await kernel.kc.get_shell_msg()
            msg_id = message.get("parent_header", {}).get("msg_id", "")
            run = kernel.runs.get(msg_id)
            if run is not None and message["header"]["msg_type"] == "execute_reply":
                content = message.get("content", {})
                run.status = str(content.get("status", "ok"))
                if run.status == "error":  # not every kernel publishes an IOPub error as well
                    run.error = {
                        "ename": str(content.get("ename", "") or "Error"),
                        "evalue": str(content.get("evalue", "")),
                        "traceback": [ANSI.sub("", str(line)) for line in content.get("traceback") or []],
                    }
                self.finish(kernel, msg_id, run)

    def finish(self, kernel: Kernel, msg_id: str, run: Run) -> None:
        """A run ends when both its reply and IOPub's idle status came (they travel on different
        sockets, in no fixed order): only then has every output of the run been forwarded."""
        if run.idle and run.status is not None:
            del kernel.runs[msg_id]
            done = {"ev": "done", "run": run.run_id, "status": run.status, "ms": elapsed(run)}
            if run.error is not None:
                done["error"] = run.error
            self.emit(done)


async def wait_for_ready(kc: Any, exited: asyncio.Future[int], timeout: float) -> None:
    """Ready = a kernel_info reply on the shell channel *and* its status on IOPub: a SUB socket
    only receives once its subscription reached the kernel, and output published before that is
    lost, so we ask again until IOPub shows it is connected (as notebook servers do)."""
    deadline = time.monotonic() + timeout
    while True:
        if exited.done():
            raise RuntimeError(f"the kernel exited during start-up (status {exited.result()})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the kernel did not answer within {timeout:.0f} s")
        msg_id = kc.kernel_info()
        if await answered(kc.get_shell_msg, msg_id, exited, deadline) and await answered(
            kc.get_iopub_msg, msg_id, exited, min(deadline, time.monotonic() + NUDGE_WAIT)
        ):
            return


async def answered(get: Any, msg_id: str, exited: asyncio.Future[int], deadline: float) -> bool:
    """True once `get` returns a message whose parent is `msg_id`, False at the deadline."""
    while not exited.done():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            message = await get(timeout=min(remaining, 0.25))
        except Empty:
            continue
        if message.get("parent_header", {}).get("msg_id") == msg_id:
            return True
    return False


def kernel_process(km: Any) -> Any:
    """The kernel's Popen (jupyter_client 7+ keeps it on the provisioner, 6 on the manager)."""
    provisioner = getattr(km, "provisioner", None)
    process = getattr(provisioner, "process", None) if provisioner is not None else None
    return process if process is not None else km.kernel


def signal_group(pid: int, sig: int) -> None:
    """Kernels are started in a session of their own, so their pid is their process group."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def pieces(text: str) -> list[str]:
    return [text[i : i + MAX_TEXT] for i in range(0, len(text), MAX_TEXT)] or []


def bounded(data: dict[str, Any]) -> dict[str, Any]:
    size = len(json.dumps(data))
    if size <= MAX_RESULT:
        return data
    note = f"[a result of {size / 2**20:.1f} MiB was dropped: larger than {MAX_RESULT // 2**20} MiB]"
    return {"text/plain": note}


def elapsed(run: Run) -> int:
    return int((time.monotonic() - run.started) * 1000)


def describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def hello(manager: KernelSpecManager) -> dict[str, Any]:
    import jupyter_client

    specs = {}
    for name, found in manager.get_all_specs().items():
        spec = found.get("spec", {})
        specs[name] = {
            "language": str(spec.get("language", "")),
            "display_name": str(spec.get("display_name", name)),
            "argv": list(spec.get("argv", [])),
        }
    versions = {"python": sys.version.split()[0], "jupyter_client": jupyter_client.__version__}
    return {"ev": "hello", "specs": specs, **versions}


async def main() -> None:
    protocol = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # stray prints (ours, a library's, the kernels') can never reach the protocol
    loop = asyncio.get_event_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    transport, _ = await loop.connect_write_pipe(asyncio.Protocol, protocol)
    await Bridge(transport).serve(reader)


if __name__ == "__main__":
    asyncio.run(main())
