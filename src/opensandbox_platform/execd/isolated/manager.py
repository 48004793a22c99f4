"""The isolated sessions of one execd: create, find, list, reap; and what this sandbox can do.

`capabilities` is measured, not assumed: the first time it is asked (or a session is created),
execd starts a real session (a user namespace, an overlay over a scratch directory, a file written
and found by the diff) and reports each step that failed with the kernel's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

from opensandbox_platform.daemon import errors
from opensandbox_platform.daemon.errors import ApiError
from opensandbox_platform.execd import procs
from opensandbox_platform.execd.envfile import Environment
from opensandbox_platform.execd.isolated import nsetup
from opensandbox_platform.execd.isolated.session import Session, Settings, _mounts
from opensandbox_platform.execd.isolated.spec import Overlay, RunSpec, SessionSpec, parse_create

log = logging.getLogger("execd.isolated")

TOO_MANY_SESSIONS = "TOO_MANY_SESSIONS"
TOMBSTONES = 64
USERNS_HINT = (
    ". The sandbox may not create user namespaces: Docker's default seccomp profile and Kubernetes' "
    "RuntimeDefault refuse unshare(CLONE_NEWUSER) and mount to a container without CAP_SYS_ADMIN (podman's "
    "default profile allows them); a host may also forbid them (user.max_user_namespaces = 0, "
    "kernel.apparmor_restrict_unprivileged_userns = 1). Create the sandbox with extensions "
    '{"bootstrap.execd.isolation": "enable"} (the local and docker runtimes then allow them to it), or run it '
    "with a seccomp profile that allows them (Kubernetes: Localhost or Unconfined)"
)


def _env_int(env: dict[str, str], name: str, default: int) -> int:
    try:
        return int(env.get(name, "") or default)
    except ValueError:
        log.warning("ignoring %s=%r: not an integer", name, env.get(name))
        return default


@dataclass
class Capabilities:
    available: bool = False
    overlay: bool = False  # copy-on-write layers (overlayfs, or the copy fallback)
    method: str = ""  # overlayfs | copy
    message: str = ""
    overlay_message: str = ""
    version: str = ""
    private_proc: bool = True
    upper: str = ""  # disk | tmpfs
    probe_ms: float = 0.0
    steps: dict[str, str] = field(default_factory=dict)

    def wire(self, max_sessions: int) -> dict[str, Any]:
        message = self.message if not self.available else (self.overlay_message or "")
        out: dict[str, Any] = {
            "available": self.available,
            "isolator": "bubblewrap",
            "version": self.version or None,
            "setpriv_available": self.available,
            "userns_available": self.available,
            "commit_supported": self.overlay,
            "diff_supported": self.overlay,
            "hardening": {
                "init_mode": "pid1" if os.getpid() == 1 else "subreaper",
                "signal_shield": os.getpid() == 1,
                "cap_drop": {
                    "state": "active",
                    "message": "sessions hold no capability of the sandbox's; a balanced session's root keeps "
                    "Docker's default set inside its own user namespace only, a strict one none",
                }
                if self.available
                else {"state": "unsupported", "message": self.message},
                "seccomp": {"state": "disabled", "message": "execd installs no seccomp filter of its own"},
                "landlock": {"state": "disabled", "message": "not used by this execd"},
                "ebpf": {"state": "disabled", "message": "not used by this execd"},
            },
            # Ours, beyond the SDK's model (its parser keeps them as additional properties):
            "overlay": {
                "supported": self.overlay,
                "method": {"overlayfs": "overlayfs in a user namespace (userxattr)", "copy": "copies of the trees"}.get(
                    self.method
                ),
                "upper": self.upper or None,
                "message": self.overlay_message or None,
            },
            "proc": ("private" if self.private_proc else "shared") if self.available else None,
            "max_sessions": max_sessions,
            "kernel": os.uname().release,
            "probe_ms": round(self.probe_ms, 1),
            "steps": self.steps,
        }
        if message:
            out["message"] = message
        elif not self.private_proc and self.available:
            out["message"] = (
                "a new /proc cannot be mounted here (the sandbox's own is not fully visible: parts of it are "
                "masked or bound read-only, as containers and bubblewrap do): sessions see the sandbox's /proc "
                "read-only, so its process list, and cannot reach other processes' files"
            )
        return out


class IsolatedSessions:
    def __init__(self, environment: Environment, state_dir: str, ping_interval: float, interrupt_grace: float) -> None:
        env = environment.compose()
        self.environment = environment
        self.state_dir = os.path.realpath(state_dir)
        self.root = os.path.join(self.state_dir, "isolated")
        self.max_sessions = _env_int(env, "EXECD_ISOLATED_MAX_SESSIONS", 16)
        self.default_idle = _env_int(env, "EXECD_ISOLATED_IDLE_TIMEOUT", 1800)
        self.method = env.get("EXECD_ISOLATED_METHOD", "auto")  # auto | overlay | copy
        if self.method not in ("auto", "overlay", "copy"):
            log.warning("ignoring EXECD_ISOLATED_METHOD=%r: auto, overlay or copy", self.method)
            self.method = "auto"
        envs_file = environment.file.path
        self.settings = Settings(
            state_dir=self.state_dir,
            root=self.root,
            bwrap=env.get("EXECD_BWRAP") or shutil.which("bwrap", path=env.get("PATH")) or "",
            bash=shutil.which("bash", path=env.get("PATH")) or "",
            tmpfs_bytes=_env_int(env, "EXECD_ISOLATED_TMPFS_MIB", 1024) << 20,
            tmp_bytes=_env_int(env, "EXECD_ISOLATED_TMP_MIB", 512) << 20,
            copy_max_bytes=_env_int(env, "EXECD_ISOLATED_COPY_MAX_MIB", 1024) << 20,
            hide=(self.state_dir,),
            mask_files=(envs_file,) if envs_file and os.path.isfile(envs_file) else (),
            ping_interval=ping_interval,
            interrupt_grace=interrupt_grace,
        )
        self._sessions: dict[str, Session] = {}
        self._gone: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._caps: Capabilities | None = None
        self._probing: asyncio.Lock | None = None

    # -- capabilities --------------------------------------------------------------------------

    async def capabilities(self) -> Capabilities:
        if self._probing is None:
            self._probing = asyncio.Lock()
        async with self._probing:
            if self._caps is None:
                self._caps = await self._probe()
                log.info(
                    "isolated sessions: available=%s overlay=%s proc=%s upper=%s (%s)",
                    self._caps.available,
                    self._caps.overlay,
                    "private" if self._caps.private_proc else "shared",
                    self._caps.upper,
                    self._caps.message or self._caps.overlay_message or "ok",
                )
            return self._caps

    async def _probe(self) -> Capabilities:
        started = time.monotonic()
        caps = Capabilities()
        try:
            if not self.settings.bwrap:
                caps.message = "bubblewrap (bwrap) is not installed in this sandbox's image"
                return caps
            if not self.settings.bash:
                caps.message = "bash is not installed in this sandbox's image"
                return caps
            caps.version = await _version(self.settings.bwrap)
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            disk = nsetup.upper_capable(self.root)
            fs = nsetup.FS_NAMES.get(nsetup.fs_magic(self.root), "unknown")
            caps.upper = (
                f"the state directory ({fs})" if disk else f"a tmpfs of each session's (the state directory is {fs})"
            )
            self.settings = replace(self.settings, disk_upper=disk)
            scratch = os.path.join(self.root, "probe-lower")
            os.makedirs(scratch, exist_ok=True)
            try:
                # 1. namespaces without an overlay; a private /proc if the kernel lets us mount one.
                for private in (True, False):
                    self.settings = replace(self.settings, private_proc=private)
                    error = await self._try(SessionSpec(overlays=(Overlay(scratch, "rw"),), share_net=True))
                    caps.steps[f"namespaces (private /proc: {private})"] = error or "ok"
                    if error is None:
                        caps.available, caps.private_proc = True, private
                        break
                    caps.message = error
                    if "(unshare)" in error:
                        caps.message += USERNS_HINT
                        break  # without a user namespace, no /proc choice helps
                if not caps.available:
                    return caps
                caps.message = ""
                # 2. an overlay: write through it, find it in the diff, the real directory untouched;
                # without overlayfs (or when asked), the fallback: copies of the trees.
                spec = SessionSpec(overlays=(Overlay(scratch),), share_net=True)
                error = "not tried (EXECD_ISOLATED_METHOD=copy)"
                if self.method != "copy":
                    error = await self._try(spec, overlay=True)
                    caps.steps["overlay"] = error or "ok"
                if error is None:
                    caps.overlay, caps.method = True, "overlayfs"
                elif self.method != "overlay":
                    self.settings = replace(self.settings, copy=True)
                    copy_error = await self._try(spec, overlay=True)
                    caps.steps["copy"] = copy_error or "ok"
                    if copy_error is None:
                        caps.overlay, caps.method = True, "copy"
                        caps.overlay_message = (
                            f"no overlayfs in a user namespace here ({error}): a session's copy-on-write "
                            f"layers are copies of their trees, made when it starts (at most "
                            f"{self.settings.copy_max_bytes >> 20} MiB per session)"
                        )
                    else:
                        error = copy_error
                if not caps.overlay:
                    caps.overlay_message = f"copy-on-write overlays are not available here: {error}"
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            return caps
        finally:
            caps.probe_ms = (time.monotonic() - started) * 1000

    async def _try(self, spec: SessionSpec, *, overlay: bool = False) -> str | None:
        session = Session(f"probe-{uuid.uuid4()}", spec, {"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                          self.settings, lambda s: None)  # fmt: skip
        try:
            await session.start(_mounts())
            never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            mark = uuid.uuid4().hex
            frames = [f async for f in session.run(RunSpec(f"echo {mark} > probe-file"), never)]
            if b"execution_complete" not in frames[-1]:
                return f"a command in the session failed: {frames[-1][:300]!r}"
            if overlay:
                diff = await asyncio.to_thread(session.diff)
                found = [c["path"] for o in diff["overlays"] for c in o.get("changes", [])]
                if not any(p.endswith("/probe-file") for p in found):
                    return f"the overlay's upper layer did not show the session's write ({found})"
                if _exists(os.path.join(spec.overlays[0].path, "probe-file"), mark):
                    return "a write in the session reached the real directory"
            return None
        except ApiError as exc:
            return exc.message
        except Exception as exc:  # a bug or an unexpected kernel answer: reported, not raised
            log.exception("isolated sessions probe failed")
            return f"{type(exc).__name__}: {exc}"
        finally:
            session.close("probe")

    # -- sessions --------------------------------------------------------------------------------

    async def create(self, body: Any) -> Session:
        caps = await self.capabilities()
        if not caps.available:
            raise ApiError(503, errors.NOT_SUPPORTED, f"isolated sessions are not available here: {caps.message}")
        spec = parse_create(
            body,
            default_idle=self.default_idle,
            forbidden=(self.state_dir,),
            is_dir=os.path.isdir,
            exists=os.path.lexists,
        )
        if not caps.overlay and any(o.mode == "overlay" for o in spec.overlays):
            raise ApiError(503, errors.NOT_SUPPORTED, caps.overlay_message)
        live = [s for s in self._sessions.values() if s.status in ("starting", "active")]
        if len(live) >= self.max_sessions:
            raise ApiError(
                429, TOO_MANY_SESSIONS, f"at most {self.max_sessions} isolated sessions at once (delete one first)"
            )
        env = spec.env_passthrough.apply(self.environment.compose())
        session = Session(str(uuid.uuid4()), spec, env, self.settings, self._idle)
        self._sessions[session.id] = session
        try:
            await session.start(_mounts())
        except BaseException:
            self._sessions.pop(session.id, None)
            session.close("failed to start")
            raise
        log.info("isolated session created id=%s overlays=%s", session.id, [o.path for o in spec.overlays])
        return session

    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            gone = self._gone.get(session_id)
            if gone is not None:
                raise errors.not_found(f"isolated session {session_id} was destroyed: {gone.get('reason', '')}")
            raise errors.not_found(f"isolated session not found: {session_id}")
        return session

    def state(self, session_id: str) -> dict[str, Any]:
        gone = self._gone.get(session_id)
        if gone is not None:
            return gone
        return self.get(session_id).state()

    def listing(self) -> list[dict[str, Any]]:
        return [s.summary() for s in self._sessions.values()] + [
            {k: v for k, v in g.items() if k in ("session_id", "status", "created_at", "last_run_at")}
            | {"idle_remaining_seconds": None}
            for g in self._gone.values()
        ]

    def delete(self, session_id: str) -> None:
        session = self.get(session_id)
        self._sessions.pop(session_id, None)
        session.close("deleted")
        log.info("isolated session deleted id=%s", session_id)

    def _idle(self, session: Session) -> None:
        if self._sessions.get(session.id) is not session or session.busy:
            return
        reason = f"idle for {session.spec.idle_timeout_seconds} s"
        self._sessions.pop(session.id, None)
        session.close(reason)
        state = session.state()
        state.update(status="destroyed", reason=reason, idle_remaining_seconds=None)
        self._gone[session.id] = state
        while len(self._gone) > TOMBSTONES:
            self._gone.popitem(last=False)
        log.info("isolated session %s reaped: %s", session.id, reason)

    def shutdown(self) -> None:
        for session in list(self._sessions.values()):
            with contextlib.suppress(Exception):
                session.close("execd stopping")
        self._sessions.clear()
        shutil.rmtree(self.root, ignore_errors=True)


def _exists(path: str, content: str) -> bool:
    try:
        with open(path) as fh:
            return content in fh.read()
    except OSError:
        return False


async def _version(bwrap: str) -> str:
    r, w = procs.nonblocking_pipe()
    try:
        child = procs.spawn([bwrap, "--version"], env={"PATH": os.environ.get("PATH", "")}, cwd="/", stdout=w, stderr=w)
    except OSError as exc:
        os.close(r)
        return f"unknown ({exc.strerror})"
    finally:
        os.close(w)
    try:
        await asyncio.wait_for(child.exited, 5)
        with contextlib.suppress(OSError):
            return os.read(r, 256).decode("utf-8", "replace").strip().removeprefix("bubblewrap ").strip()
        return ""
    except TimeoutError:
        child.signal_group(9)
        return "unknown"
    finally:
        os.close(r)
