"""The environment a command sees, and the `EXECD_ENVS` file behind `commands.set_env`.

Precedence, lowest first (as the SDK documents it): execd's own environment (minus execd's
configuration, e.g. its access token), the bootstrap env, the `EXECD_ENVS` file, the request's
`envs`. The SDK's `set_env` appends `KEY='value'` or `KEY="escaped"` lines to the file named by
`$EXECD_ENVS`, so every command gets `EXECD_ENVS` in its environment.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping

DEFAULT_ENVS_FILE = "/opt/opensandbox/.env"
# execd's own settings never leak into user commands.
PRIVATE_VARS = frozenset({"EXECD_ACCESS_TOKEN", "EXECD_START_GATE"})

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
# Marks a `$` that came from `\$`, so expansion leaves it alone.
_LITERAL_DOLLAR = "\x00"
_DOUBLE_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "$": _LITERAL_DOLLAR, "`": "`"}


def valid_key(key: str) -> bool:
    return bool(_KEY.match(key))


def parse_env_file(text: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Parse `KEY=VALUE` lines (optionally `export KEY=VALUE`); later lines win.

    Single-quoted values are literal and may span lines (set_env writes a value with a newline
    that way). Double-quoted values take backslash escapes and expand `$NAME`/`${NAME}` from
    `base` and earlier lines; bare values expand too. A malformed line is skipped: one bad line
    must not take the whole environment away from every command.
    """
    result: dict[str, str] = {}
    scope: dict[str, str] = dict(base or {})
    pos = 0
    while pos < len(text):
        eol = text.find("\n", pos)
        eol = len(text) if eol < 0 else eol
        line = text[pos:eol].strip()
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, _ = line.partition("=")
        key = key.strip()
        if not line or line.startswith("#") or not sep or not valid_key(key):
            pos = eol + 1
            continue
        rest_start = text.index("=", pos) + 1
        while rest_start < len(text) and text[rest_start] in " \t":
            rest_start += 1
        value, pos = _parse_value(text, rest_start, eol, scope)
        if value is not None:
            result[key] = value
            scope[key] = value
    return result


def _parse_value(text: str, start: int, eol: int, scope: Mapping[str, str]) -> tuple[str | None, int]:
    """The value starting at `start` and the position after its line."""
    quote = text[start : start + 1]
    if quote == "'":
        end = text.find("'", start + 1)
        if end < 0:
            return None, eol + 1
        return text[start + 1 : end], _next_line(text, end)
    if quote == '"':
        out: list[str] = []
        i = start + 1
        while i < len(text):
            ch = text[i]
            if ch == "\\" and i + 1 < len(text):
                nxt = text[i + 1]
                out.append(_DOUBLE_ESCAPES.get(nxt, "\\" + nxt))
                i += 2
                continue
            if ch == '"':
                return expand_vars("".join(out), scope, keep_escaped_dollar=True), _next_line(text, i)
            out.append(ch)
            i += 1
        return None, eol + 1
    value = text[start:eol].split(" #", 1)[0].strip()  # bare: up to an inline comment
    return expand_vars(value, scope), eol + 1


def _next_line(text: str, index: int) -> int:
    eol = text.find("\n", index)
    return len(text) if eol < 0 else eol + 1


def expand_vars(value: str, scope: Mapping[str, str], *, keep_escaped_dollar: bool = False) -> str:
    """Expand `$NAME` and `${NAME}`; unknown names expand to "" as in a shell."""
    expanded = _VAR.sub(lambda m: scope.get(m.group(1) or m.group(2), ""), value)
    return expanded.replace(_LITERAL_DOLLAR, "$") if keep_escaped_dollar else expanded


class EnvFile:
    """Reads the env file when it changed since the last read (keyed by mtime and size)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._values: dict[str, str] = {}

    def values(self, base: Mapping[str, str]) -> dict[str, str]:
        try:
            st = os.stat(self.path)
        except OSError:
            self._stamp, self._values = None, {}
            return {}
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                with open(self.path, encoding="utf-8", errors="replace") as fh:
                    text = fh.read()
            except OSError:
                return {}
            self._values = parse_env_file(text, base)
            self._stamp = stamp
        return dict(self._values)


def without_bundle(env: Mapping[str, str]) -> dict[str, str]:
    """execd's environment as the sandbox set it: a one-file build's bootloader points
    LD_LIBRARY_PATH at its unpacked libraries (keeping the original in LD_LIBRARY_PATH_ORIG) and adds
    _PYI_* variables; a command (the image's python3, say) must not load the bundle's libraries."""
    bundle = getattr(sys, "_MEIPASS", None)
    if not bundle:
        return dict(env)
    clean = {k: v for k, v in env.items() if not k.startswith("_PYI_") and k != "_MEIPASS2"}
    original = clean.pop("LD_LIBRARY_PATH_ORIG", None)
    paths = [p for p in clean.pop("LD_LIBRARY_PATH", "").split(":") if p and p != bundle]
    if original is not None:
        clean["LD_LIBRARY_PATH"] = original
    elif paths:
        clean["LD_LIBRARY_PATH"] = ":".join(paths)
    return clean


class Environment:
    """Composes the environment of every command, session and the bootstrap process."""

    def __init__(self, envs_file: str, daemon_env: Mapping[str, str] | None = None) -> None:
        source = without_bundle(os.environ if daemon_env is None else daemon_env)
        self.daemon = {k: v for k, v in source.items() if k not in PRIVATE_VARS}
        self.bootstrap: dict[str, str] = {}
        self.file = EnvFile(envs_file)

    def compose(self, request_envs: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(self.daemon)
        env.update(self.bootstrap)
        env.update(self.file.values(env))
        if request_envs:
            env.update(request_envs)
        env["EXECD_ENVS"] = self.file.path
        return env


def expand_path(path: str, env: Mapping[str, str]) -> str:
    """Expand `~` and `$NAME`/`${NAME}` in a working directory; an undefined name is an error."""
    missing = [m.group(1) or m.group(2) for m in _VAR.finditer(path) if (m.group(1) or m.group(2)) not in env]
    if missing:
        raise KeyError(missing[0])
    expanded = _VAR.sub(lambda m: env[m.group(1) or m.group(2)], path)
    if expanded == "~" or expanded.startswith("~/"):
        home = env.get("HOME") or os.path.expanduser("~")
        expanded = home + expanded[1:]
    return expanded
