"""The first process of a local sandbox's jail: execd, then the sandbox's entrypoint.

Started by bwrap (which stays PID 1 of the jail's PID namespace) with two pipes from the server:

- `--evt-fd`: we write one JSON line per event: `{"event": "ready", "port": P}` as soon as execd
  listens (the server awaits this line: readiness is an event, not a poll), then `{"event":
  "started", "pid": N}` or `{"event": "error", "message": ...}` after the claim, then close it.
- `--ctl-fd`: the server writes one JSON line, the claim: `{"env", "cwd", "argv", "rlimits",
  "lifecycle"}`. With a `lifecycle.preStart` hook, it runs before the entrypoint; if it fails, the
  event is `{"event": "hook-failed", "run": {...}}` and the jail ends (execd/hooks.py).
  A jail can be started before anyone asks for a sandbox (a warm jail) and claimed later.

execd listens on 127.0.0.1:44772 of the jail's own network namespace; the server forwards a port
of the host's loopback to it (runtimes/forward.py). Before anything else, every inherited file
descriptor is closed but stdio, the two pipes and `--keep-fd`, the write end of slirp4netns' exit
pipe: held for the jail's life, so slirp4netns ends with the jail even while the server is down.
Once execd listens, its output and the entrypoint's go to /run/opensandbox/jail.log in the jail.
When the entrypoint exits, execd stops and the jail ends with the entrypoint's exit code (as a
container does); the server sees the jail's PID 1 go.
"""

from __future__ import annotations

import sys

# As in execd's main: keep OpenSSL (~5 MiB RSS) out of every sandbox.
if "ssl" not in sys.modules:
    sys.modules["ssl"] = None  # type: ignore[assignment]

import argparse
import asyncio
import contextlib
import json
import logging
import os
import resource
from typing import Any

from opensandbox_platform.api.labels import EXECD_PORT
from opensandbox_platform.daemon import logs
from opensandbox_platform.daemon.errors import ApiError
from opensandbox_platform.daemon.http import HttpServer
from opensandbox_platform.daemon.process import stop_on_signals
from opensandbox_platform.execd import procs
from opensandbox_platform.execd.app import ExecdApp, Settings
from opensandbox_platform.execd.procs import WATCHER

log = logging.getLogger("jail")
LOG_NAME = "jail.log"


def _send(fd: int, event: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):  # the server went away; the jail carries on without it
        os.write(fd, json.dumps(event).encode() + b"\n")


async def _read_line(fd: int) -> bytes:
    """One line from a pipe, without blocking the loop (EOF gives b"")."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0))
    try:
        return await reader.readline()
    finally:
        transport.close()


def _lower(wanted: int, current: int) -> int:
    if current == resource.RLIM_INFINITY:
        return wanted
    return current if wanted == resource.RLIM_INFINITY else min(wanted, current)


def _apply_rlimits(limits: dict[str, list[int]]) -> None:
    """Limits only go down: the jail has no CAP_SYS_RESOURCE to raise a hard limit."""
    for name, (soft, hard) in limits.items():
        which = getattr(resource, name)
        _, current_hard = resource.getrlimit(which)
        hard = _lower(hard, current_hard)
        resource.setrlimit(which, (_lower(soft, hard), hard))


async def serve(ctl_fd: int, evt_fd: int) -> int:
    loop = asyncio.get_running_loop()
    WATCHER.install(loop)
    settings = Settings(
        access_token=os.environ.pop("EXECD_ACCESS_TOKEN", None) or None,
        envs_file=os.environ.get("EXECD_ENVS", "/run/opensandbox/.env"),
        state_dir=os.environ.get("EXECD_STATE_DIR"),
        # Jails may share the host's network: the code interpreter's readiness port is a free one,
        # which commands (the SDK's probe) find in $JUPYTER_PORT.
        code_port=0,
        code_prestart=os.environ.pop("EXECD_CODE_PRESTART", None) or None,
    )
    app = ExecdApp(settings)
    server = HttpServer(app.dispatch)
    listener = await server.start("127.0.0.1", EXECD_PORT)
    port = listener.sockets[0].getsockname()[1]
    _log_inside(os.path.dirname(settings.envs_file))
    _send(evt_fd, {"event": "ready", "port": port})
    app.start_code()

    stop = stop_on_signals()

    code = 0
    line = await _read_line(ctl_fd)
    if not line:  # nobody will claim this jail
        log.info("no claim; stopping")
        stop.set()
    else:
        try:
            event = await _start(app, json.loads(line))
        except (ApiError, OSError, ValueError) as exc:
            event = {"event": "error", "message": str(getattr(exc, "message", exc))}
        _send(evt_fd, event)
        child = app.bootstrap.child
        if event["event"] != "started":
            stop.set()
            code = 1
        elif child is not None:
            child.exited.add_done_callback(lambda _: stop.set())
    os.close(evt_fd)

    await stop.wait()
    child = app.bootstrap.child
    if child is not None and child.exited.done():
        code = procs.exit_code(child.exited.result())
    await app.shutdown()
    await server.close()
    return code


async def _start(app: ExecdApp, claim: dict[str, Any]) -> dict[str, Any]:
    """The claim applied: the preStart hook (with the sandbox's env and cwd) first, then the
    entrypoint; the event that tells the server."""
    _apply_rlimits(claim.get("rlimits") or {})
    body = {k: claim[k] for k in ("env", "cwd", "argv") if claim.get(k) is not None}
    if claim.get("lifecycle"):
        app.bootstrap.apply({k: v for k, v in body.items() if k != "argv"})
        run = await app.hooks.begin(claim["lifecycle"])
        if run is not None and not run.ok:
            return {"event": "hook-failed", "run": run.to_json()}
    return {"event": "started", "pid": app.bootstrap.apply(body)["pid"]}


def _log_inside(directory: str) -> None:
    """From now on, execd's and the entrypoint's output go to a file in the jail (its own
    storage), not to the server's pipe: the server may be gone (a restart), and a program that
    notices its output's reader is gone (`tail -f`) would end the sandbox with it."""
    os.makedirs(directory, exist_ok=True)
    fd = os.open(os.path.join(directory, LOG_NAME), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    for target in (1, 2):
        os.dup2(fd, target)
    os.close(fd)


def close_inherited_fds(keep: tuple[int, ...]) -> None:
    for fd in sorted(int(name) for name in os.listdir("/proc/self/fd")):
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="jail_init", description=__doc__)
    parser.add_argument("--ctl-fd", type=int, required=True)
    parser.add_argument("--evt-fd", type=int, required=True)
    parser.add_argument("--keep-fd", type=int, default=-1, help="an fd to hold for the jail's life, unused")
    args = parser.parse_args(argv)
    close_inherited_fds(keep=(0, 1, 2, args.ctl_fd, args.evt_fd, args.keep_fd))
    os.environ.pop("LD_LIBRARY_PATH", None)  # our interpreter's, not for the sandbox's programs
    logs.setup(os.environ.get("EXECD_LOG_LEVEL", "info"))
    sys.exit(asyncio.run(serve(args.ctl_fd, args.evt_fd)))


if __name__ == "__main__":
    main()
