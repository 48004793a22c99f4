"""What a client may ask of an isolated session, validated: the create request, a run request, a
commit request. Pure (no I/O beyond the `exists` probe the caller hands in), so every rule is
unit-tested; anything a client got wrong is a 400 `{code, message}` naming the field.

Wire names are the official SDK's (opensandbox 1.1.1, `CreateIsolatedSessionRequest`,
`IsolatedRunRequest`). Unknown fields are ignored, as the SDK's own models allow them.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from opensandbox_platform.daemon import errors

MAX_OVERLAYS = 16  # the SDK documents "at most 16 mounts per session (including workspace)"
MAX_BINDS = 32
MAX_ENV_KEYS = 256
MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged" to the kernel
MODES = ("overlay", "rw", "ro")
PROFILES = ("balanced", "strict")
UID_MODES = ("setpriv", "userns")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# Paths a session may not mount or bind: the kernel's own trees (bwrap gives the session its own
# /proc and /dev; /sys is shared read-only).
RESERVED = ("/proc", "/sys", "/dev")


@dataclass(frozen=True)
class Overlay:
    path: str
    mode: str = "overlay"  # overlay | rw | ro
    persist: bool | None = None  # overlay only; None = default (True)

    @property
    def persistent(self) -> bool:
        return self.mode == "overlay" and self.persist is not False

    def wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "mode": self.mode}
        if self.mode == "overlay":
            out["persist"] = self.persistent
        return out


@dataclass(frozen=True)
class Bind:
    source: str
    dest: str
    readonly: bool = False

    def wire(self) -> dict[str, Any]:
        return {"source": self.source, "dest": self.dest, "readonly": self.readonly}


@dataclass(frozen=True)
class EnvPassthrough:
    mode: str = "deny"  # deny: everything but `keys`; allow: only `keys`
    keys: tuple[str, ...] = ()

    def apply(self, env: dict[str, str]) -> dict[str, str]:
        if self.mode == "allow":
            return {k: v for k, v in env.items() if k in self.keys}
        return {k: v for k, v in env.items() if k not in self.keys}

    def wire(self) -> dict[str, Any]:
        return {"mode": self.mode, "keys": list(self.keys)}


@dataclass(frozen=True)
class SessionSpec:
    overlays: tuple[Overlay, ...]
    profile: str = "balanced"
    extra_writable: tuple[str, ...] = ()
    binds: tuple[Bind, ...] = ()
    share_net: bool = True
    env_passthrough: EnvPassthrough = field(default_factory=EnvPassthrough)
    uid: int | None = None
    gid: int | None = None
    uid_mode: str = "setpriv"
    idle_timeout_seconds: int = 0
    from_workspace: bool = False  # the request used the legacy `workspace` field

    def wire(self) -> dict[str, Any]:
        """The creation parameters, echoed by GET (the SDK's `attach` rebuilds its handle from them)."""
        out: dict[str, Any] = {
            "profile": self.profile,
            "overlays": [o.wire() for o in self.overlays],
            "extra_writable": list(self.extra_writable),
            "binds": [b.wire() for b in self.binds],
            "share_net": self.share_net,
            "env_passthrough": self.env_passthrough.wire(),
            "uid_mode": self.uid_mode,
            "idle_timeout_seconds": self.idle_timeout_seconds,
        }
        if self.from_workspace or len(self.overlays) == 1:
            first = self.overlays[0]
            out["workspace"] = {"path": first.path, "mode": first.mode}
        if self.uid is not None:
            out["uid"] = self.uid
        if self.gid is not None:
            out["gid"] = self.gid
        return out


def clean_path(value: Any, what: str) -> str:
    """An absolute, clean path (no `.`/`..` segments, no `//`, no trailing slash), else a 400."""
    if not isinstance(value, str) or not value:
        raise errors.bad_request(f"{what} must be a non-empty string")
    if "\0" in value or "\n" in value:
        raise errors.bad_request(f"{what} must not contain NUL or newline characters")
    if not value.startswith("/"):
        raise errors.bad_request(f"{what} must be an absolute path: {value!r}")
    if value != "/" and (value.endswith("/") or "//" in value):
        raise errors.bad_request(f"{what} must be a clean path (no trailing or double slash): {value!r}")
    if any(part in (".", "..") for part in value.split("/")):
        raise errors.bad_request(f"{what} must not contain '.' or '..' segments: {value!r}")
    if len(value) > 4096:
        raise errors.bad_request(f"{what} is too long")
    return value


def under(path: str, parent: str) -> bool:
    """`path` is `parent` or inside it (both clean and absolute)."""
    return parent == "/" or path == parent or path.startswith(parent + "/")


def _check_not_reserved(path: str, what: str, forbidden: tuple[str, ...]) -> None:
    for top in RESERVED:
        if under(path, top):
            raise errors.bad_request(f"{what} cannot be under {top}: {path}")
    for hidden in forbidden:
        if hidden != "/" and under(path, hidden):
            raise errors.bad_request(f"{what} cannot be under execd's own state ({hidden}): {path}")


def _bool(value: Any, what: str) -> bool | None:
    if value is None:
        return None
    if not isinstance(value, bool):
        raise errors.bad_request(f"{what} must be a boolean")
    return value


def _int(value: Any, what: str, minimum: int, maximum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise errors.bad_request(f"{what} must be an integer from {minimum} to {maximum}")
    return value


def _choice(value: Any, what: str, choices: tuple[str, ...], default: str) -> str:
    if value is None:
        return default
    if value not in choices:
        raise errors.bad_request(f"{what} must be one of {', '.join(choices)}; got {value!r}")
    return str(value)


def _overlay(raw: Any, what: str) -> Overlay:
    if not isinstance(raw, dict):
        raise errors.bad_request(f"{what} must be an object with a 'path'")
    path = clean_path(raw.get("path"), f"{what}.path")
    mode = _choice(raw.get("mode"), f"{what}.mode", MODES, "overlay")
    persist = _bool(raw.get("persist"), f"{what}.persist")
    if persist is not None and mode != "overlay":
        raise errors.bad_request(f"{what}.persist applies to mode 'overlay' only (mode is {mode!r})")
    return Overlay(path, mode, persist)


def parse_create(
    body: Any,
    *,
    default_idle: int,
    forbidden: tuple[str, ...] = (),
    is_dir: Callable[[str], bool] | None = None,
    exists: Callable[[str], bool] | None = None,
) -> SessionSpec:
    """A create request as a SessionSpec. `forbidden` are paths no mount may touch (execd's state
    directory); `is_dir`/`exists` probe the sandbox's filesystem (None skips the checks)."""
    if not isinstance(body, dict):
        raise errors.bad_request("request body must be a JSON object")
    overlays: list[Overlay] = []
    from_workspace = False
    workspace = body.get("workspace")
    if workspace is not None:
        if not isinstance(workspace, dict):
            raise errors.bad_request("workspace must be an object with a 'path'")
        if "persist" in workspace and workspace["persist"] is not None:
            raise errors.bad_request("workspace has no 'persist'; use overlays[] for that")
        overlays.append(_overlay(workspace, "workspace"))
        from_workspace = True
    raw_overlays = body.get("overlays")
    if raw_overlays is not None:
        if not isinstance(raw_overlays, list):
            raise errors.bad_request("overlays must be a list")
        overlays += [_overlay(item, f"overlays[{i}]") for i, item in enumerate(raw_overlays)]
    if not overlays:
        raise errors.bad_request("at least one of 'workspace' or 'overlays' is required")
    if len(overlays) > MAX_OVERLAYS:
        raise errors.bad_request(f"at most {MAX_OVERLAYS} overlays per session (workspace included)")
    seen: set[str] = set()
    for item in overlays:
        if item.path in seen:
            raise errors.bad_request(f"overlay paths must be unique: {item.path} appears twice")
        seen.add(item.path)
        _check_not_reserved(item.path, "an overlay path", forbidden)
        if is_dir is not None and not is_dir(item.path):
            raise errors.bad_request(f"overlay path is not a directory in this sandbox: {item.path}")

    profile = _choice(body.get("profile"), "profile", PROFILES, "balanced")
    share_net = _bool(body.get("share_net"), "share_net")

    extra: list[str] = []
    raw_extra = body.get("extra_writable")
    if raw_extra is not None:
        if not isinstance(raw_extra, list):
            raise errors.bad_request("extra_writable must be a list of paths")
        for i, item in enumerate(raw_extra):
            path = clean_path(item, f"extra_writable[{i}]")
            _check_not_reserved(path, "an extra_writable path", forbidden)
            if exists is not None and not exists(path):
                raise errors.bad_request(f"extra_writable path does not exist: {path}")
            extra.append(path)

    binds: list[Bind] = []
    raw_binds = body.get("binds")
    if raw_binds is not None:
        if not isinstance(raw_binds, list):
            raise errors.bad_request("binds must be a list of {source, dest?, readonly?}")
        if len(raw_binds) > MAX_BINDS:
            raise errors.bad_request(f"at most {MAX_BINDS} binds per session")
        for i, item in enumerate(raw_binds):
            if not isinstance(item, dict):
                raise errors.bad_request(f"binds[{i}] must be an object with a 'source'")
            source = clean_path(item.get("source"), f"binds[{i}].source")
            dest = clean_path(item["dest"], f"binds[{i}].dest") if item.get("dest") is not None else source
            readonly = bool(_bool(item.get("readonly"), f"binds[{i}].readonly"))
            _check_not_reserved(source, f"binds[{i}].source", forbidden)
            _check_not_reserved(dest, f"binds[{i}].dest", forbidden)
            if dest == "/":
                raise errors.bad_request(f"binds[{i}].dest cannot be /")
            if exists is not None and not exists(source):
                raise errors.bad_request(f"binds[{i}].source does not exist: {source}")
            # The session's root is read-only: a mount point can only be made in its private /tmp.
            if exists is not None and not exists(dest) and not under(dest, "/tmp"):
                raise errors.bad_request(f"binds[{i}].dest must exist in the sandbox (or be under /tmp): {dest}")
            binds.append(Bind(source, dest, readonly))
    targets = [o.path for o in overlays] + extra + [b.dest for b in binds]
    if len(set(targets)) != len(targets):
        raise errors.bad_request("overlays, extra_writable and bind destinations must not name the same path twice")

    passthrough = EnvPassthrough()
    raw_env = body.get("env_passthrough")
    if raw_env is not None:
        if not isinstance(raw_env, dict):
            raise errors.bad_request("env_passthrough must be an object {mode, keys}")
        mode = _choice(raw_env.get("mode"), "env_passthrough.mode", ("allow", "deny"), "deny")
        keys = raw_env.get("keys") or []
        if not isinstance(keys, list) or len(keys) > MAX_ENV_KEYS:
            raise errors.bad_request(f"env_passthrough.keys must be a list of at most {MAX_ENV_KEYS} names")
        for key in keys:
            if not isinstance(key, str) or not _KEY.match(key):
                raise errors.bad_request(f"env_passthrough.keys: invalid variable name {key!r}")
        passthrough = EnvPassthrough(mode, tuple(keys))

    uid = _int(body.get("uid"), "uid", 0, MAX_ID)
    gid = _int(body.get("gid"), "gid", 0, MAX_ID)
    uid_mode = _choice(body.get("uid_mode"), "uid_mode", UID_MODES, "setpriv")
    idle = _int(body.get("idle_timeout_seconds"), "idle_timeout_seconds", 0, 7 * 24 * 3600)

    return SessionSpec(
        overlays=tuple(overlays),
        profile=profile,
        extra_writable=tuple(extra),
        binds=tuple(binds),
        share_net=share_net if share_net is not None else profile == "balanced",
        env_passthrough=passthrough,
        uid=uid,
        gid=gid,
        uid_mode=uid_mode,
        idle_timeout_seconds=default_idle if idle is None else idle,
        from_workspace=from_workspace,
    )


@dataclass(frozen=True)
class RunSpec:
    code: str
    envs: tuple[tuple[str, str], ...] = ()
    timeout_seconds: int | None = None
    background: bool = False


MAX_CODE = 1024 * 1024


def parse_run(body: Any) -> RunSpec:
    if not isinstance(body, dict):
        raise errors.bad_request("request body must be a JSON object")
    code = body.get("code")
    if not isinstance(code, str) or not code.strip():
        raise errors.bad_request("'code' must be a non-empty string")
    if len(code) > MAX_CODE:
        raise errors.bad_request(f"'code' is larger than {MAX_CODE} characters")
    if "\0" in code:
        raise errors.bad_request("'code' must not contain NUL characters")
    envs: list[tuple[str, str]] = []
    raw_envs = body.get("envs")
    if raw_envs is not None:
        if not isinstance(raw_envs, dict):
            raise errors.bad_request("'envs' must map variable names to strings")
        for key, value in raw_envs.items():
            if not _KEY.match(key):
                raise errors.bad_request(f"envs: invalid variable name {key!r}")
            if not isinstance(value, str) or "\0" in value:
                raise errors.bad_request(f"envs[{key}] must be a string without NUL characters")
            envs.append((key, value))
    timeout = _int(body.get("timeout_seconds"), "timeout_seconds", 0, 7 * 24 * 3600)
    background = bool(_bool(body.get("background"), "background"))
    return RunSpec(code, tuple(envs), timeout or None, background)


@dataclass(frozen=True)
class CommitSpec:
    discard: bool = False
    paths: tuple[str, ...] = ()  # empty: everything


def parse_commit(body: Any, discard_arg: str | None) -> CommitSpec:
    """The SDK's commit sends no body: everything is applied. Ours may narrow it to `paths`, or ask
    for `discard` (also `?discard=true`)."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise errors.bad_request("request body must be a JSON object (or empty)")
    discard = bool(_bool(body.get("discard"), "discard"))
    if discard_arg is not None:
        if discard_arg.lower() not in ("true", "1", "false", "0"):
            raise errors.bad_request(f"invalid discard {discard_arg!r}: true or false")
        discard = discard or discard_arg.lower() in ("true", "1")
    raw = body.get("paths")
    paths: list[str] = []
    if raw is not None:
        if not isinstance(raw, list) or not raw:
            raise errors.bad_request("'paths' must be a non-empty list of absolute paths")
        paths = [posixpath.normpath(clean_path(p, f"paths[{i}]")) for i, p in enumerate(raw)]
    return CommitSpec(discard, tuple(paths))
