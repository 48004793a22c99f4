"""The shell side of a session, as text: the session's first process and the lines each run sends
to its persistent shell. Pure.

The first process (PID 1 of the session's PID namespace) is a small bash loop that keeps the
namespace alive and (re)starts the persistent shell: `exit 7` in a run ends that shell, not the
session (its mounts and background runs stay). It reports on the control descriptor: `ready` once
the namespace is complete, `exit <code>` whenever the shell ends. Signals from execd: SIGUSR1 sends
SIGINT to the session's process group (a run's interrupt or timeout; background runs, being
asynchronous lists of a non-interactive shell, ignore it), SIGUSR2 kills every process of the
namespace but PID 1 (the escalation). As PID 1 it reaps orphans, and the kernel protects it from
signals sent from inside the session.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable

from opensandbox_platform.execd.isolated.layout import CONTROL_DIR


def init_script(ctl_fd: int, bash: str, close: Iterable[int] = ()) -> str:
    q = shlex.quote(bash)
    return (
        "".join(f"exec {fd}>&-\n" for fd in close) + "trap 'kill -INT 0 2>/dev/null' USR1\n"
        "trap 'kill -KILL -1 2>/dev/null' USR2\n"
        f"printf 'ready\\n' >&{ctl_fd}\n"
        "while :; do\n"
        f"  {q} --noprofile --norc 0<&0 &\n"
        "  p=$!\n"
        '  while kill -0 "$p" 2>/dev/null; do wait "$p"; done\n'
        '  wait "$p"; rc=$?\n'
        f"  printf 'exit %s\\n' \"$rc\" >&{ctl_fd}\n"
        "done\n"
    )


def script_path(name: str) -> str:
    """Where the session sees a file of its control directory."""
    return f"{CONTROL_DIR}/{name}"


def _exports(envs: Iterable[tuple[str, str]]) -> str:
    return "".join(f"export {key}={shlex.quote(value)}; " for key, value in envs)


def foreground_line(script: str, token: str, ctl_fd: int, envs: Iterable[tuple[str, str]], cd: str | None) -> str:
    """Source the run's code in the persistent shell (so `cd` and exports stay), then print the token
    with the exit code and the working directory on stdout, and the token on stderr."""
    q = shlex.quote(script)
    prefix = _exports(envs)
    if cd:
        prefix += f"cd -- {shlex.quote(cd)} 2>/dev/null; "
    return (
        f"{prefix}. {q} {ctl_fd}>&- </dev/null; __osb_rc=$?; rm -f {q}; "
        f"printf '%s:%s:%s\\n' {token} \"$__osb_rc\" \"$PWD\"; printf '%s\\n' {token} >&2\n"
    )


def background_line(
    run_id: str, script: str, log_pipe: str, token: str, ctl_fd: int, envs: Iterable[tuple[str, str]]
) -> str:
    """Start the code as an asynchronous list (stdin /dev/null, output to the run's pipe; in a subshell
    of its own, so `exit` ends the run only), report its exit code on the control descriptor, and
    acknowledge the start with the token."""
    q, out = shlex.quote(script), shlex.quote(log_pipe)
    return (
        f"{{ ( {_exports(envs)}. {q} ) {ctl_fd}>&- </dev/null >{out} 2>&1; "
        f"printf 'bg %s %s\\n' {run_id} \"$?\" >&{ctl_fd}; }} & "
        f"printf '%s:0:%s\\n' {token} \"$PWD\"; printf '%s\\n' {token} >&2\n"
    )
