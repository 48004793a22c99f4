"""Bytecode for what a local sandbox's jail imports (execd, its daemon core, the jail init), written
once by the server: the jail sees this package read-only, so a jail's Python that finds no
`__pycache__` compiles those modules again at every start (~15-20 ms of a cold create measured on a
2-core machine), and cannot keep the result. Where the package is not writable (an installed,
precompiled wheel, say) nothing is written, and nothing is lost.
"""

from __future__ import annotations

import compileall
import logging
import time
from pathlib import Path

import opensandbox_platform

log = logging.getLogger("opensandbox.local")

PACKAGE = Path(opensandbox_platform.__file__).resolve().parent
# What jail_init imports, directly or on a first request: whole subpackages, and the modules on the way.
TREES = ("daemon", "execd", "api")
FILES = ("__init__.py", "server/__init__.py", "server/runtimes/__init__.py", "server/runtimes/jail_init.py")


def precompile(package: Path = PACKAGE) -> bool:
    """Writes the `__pycache__` a jail's Python reads (only what is missing or stale; the first
    time ~0.5 s of CPU). True when every module has its bytecode."""
    started = time.monotonic()
    ok = True
    for tree in TREES:
        ok = bool(compileall.compile_dir(package / tree, quiet=2)) and ok
    for name in FILES:
        ok = bool(compileall.compile_file(package / name, quiet=2)) and ok
    log.debug("jail bytecode ok=%s ms=%.0f", ok, (time.monotonic() - started) * 1000)
    return ok
