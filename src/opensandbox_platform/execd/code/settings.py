"""The code interpreter's settings, read from the sandbox's environment when `/code` is first used
(so `Sandbox.create(env={...})` sets them on every runtime, pooled or not)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

# The readiness port's settings live with it (readiness.py: execd imports that one at start, this
# one when /code is first used).
from opensandbox_platform.execd.code.readiness import DEFAULT_JUPYTER_PORT, JUPYTER_PORT, jupyter_port

__all__ = ["DEFAULT_JUPYTER_PORT", "JUPYTER_PORT", "CodeSettings", "jupyter_port"]

log = logging.getLogger("execd.code")

MAX_CONTEXTS = "EXECD_CODE_MAX_CONTEXTS"
IDLE_TIMEOUT = "EXECD_CODE_IDLE_TIMEOUT"
START_TIMEOUT = "EXECD_CODE_START_TIMEOUT"
PRESTART = "EXECD_CODE_PRESTART"
PYTHON = "EXECD_CODE_PYTHON"


@dataclass(frozen=True)
class CodeSettings:
    max_contexts: int = 10  # kernels per sandbox (each Python kernel is ~40-60 MiB)
    idle_timeout: float = 1800.0  # seconds without a run before a context is deleted; 0: never
    start_timeout: float = 60.0  # seconds a kernel may take to answer its first kernel_info
    interrupt_grace: float = 3.0  # seconds a run may take to end after an interrupt before its kernel is killed
    ping_interval: float = 3.0

    @classmethod
    def from_env(cls, env: Mapping[str, str], interrupt_grace: float, ping_interval: float) -> CodeSettings:
        return cls(
            max_contexts=int(_number(env, MAX_CONTEXTS, cls.max_contexts, minimum=1)),
            idle_timeout=_number(env, IDLE_TIMEOUT, cls.idle_timeout, minimum=0),
            start_timeout=_number(env, START_TIMEOUT, cls.start_timeout, minimum=1),
            interrupt_grace=interrupt_grace,
            ping_interval=ping_interval,
        )


def _number(env: Mapping[str, str], name: str, default: float, minimum: float) -> float:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        log.warning("ignoring %s=%r: a number >= %g is required; using %g", name, text, minimum, default)
        return default
    return value
