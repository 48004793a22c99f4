"""The bubblewrap command line of a local sandbox.

The jail's root is bwrap's own tmpfs, made read-only at the end: every top-level entry of the
host's `/` is bind-mounted read-only into it (symlinks such as /bin -> usr/bin are recreated), so
the host's programs and libraries are there, and new mount points (/workspace) can be made. On top:

- a new /proc (PID namespace) and a minimal /dev (null, zero, random, tty, pts, shm);
- private, writable /tmp, /root (home) and /workspace, bound from the sandbox's directory on the
  host's disk, and an in-memory /run (execd's env file and state);
- the paths execd needs to run (the Python installation, this package) bound back read-only when
  they sit under one of those private directories;
- the server's state directory and config file hidden.

Namespaces: PID, IPC and UTS (hostname = sandbox id). The network namespace is the host's (see
docs/local-runtime.md). Capabilities: Docker's default set minus NET_RAW (the network is the
host's) and MKNOD (no devices cgroup keeps a device node from reaching the host's disks).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import opensandbox_platform

BWRAP = "bwrap"
JAIL_INIT = "opensandbox_platform.server.runtimes.jail_init"
CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_SETFCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_AUDIT_WRITE",
)
# Top-level host entries the jail gets its own version of.
PRIVATE = {"/proc", "/dev", "/tmp", "/root", "/run", "/workspace", "/lost+found"}
HOME = "/root"
WORKSPACE = "/workspace"
EXECD_DIR = "/run/opensandbox"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class JailDirs:
    """A sandbox's directory on the host and the private directories inside it."""

    root: Path

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def workspace(self) -> Path:
        return self.root / "workspace"

    @property
    def log(self) -> Path:
        return self.root / "jail.log"

    def make(self) -> None:
        for path in (self.tmp, self.home, self.workspace):
            path.mkdir(parents=True, exist_ok=True)
        self.tmp.chmod(0o1777)


def runtime_paths() -> list[str]:
    """What the jail's Python needs to import execd: the interpreter's prefixes and our package."""
    package_root = Path(opensandbox_platform.__file__).resolve().parents[1]
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, str(package_root)}
    return sorted({os.path.realpath(p) for p in paths})


def _under(path: str, parents: Iterable[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in parents)


def host_root_args() -> list[str]:
    args: list[str] = []
    for name in sorted(os.listdir("/")):
        path = "/" + name
        if path in PRIVATE or path == "/sys":
            continue
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args


def bwrap_args(
    sandbox_id: str,
    dirs: JailDirs,
    *,
    root_args: list[str],
    hidden: Iterable[Path],
    run_size_bytes: int,
    info_fd: int,
    block_fd: int,
    ctl_fd: int,
    evt_fd: int,
) -> list[str]:
    args = [BWRAP, "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--hostname", sandbox_id, "--new-session"]
    args += root_args
    args += ["--ro-bind", "/sys", "/sys", "--proc", "/proc", "--dev", "/dev"]
    args += ["--size", str(run_size_bytes), "--tmpfs", "/run"]
    args += ["--bind", str(dirs.tmp), "/tmp", "--bind", str(dirs.home), HOME, "--bind", str(dirs.workspace), WORKSPACE]
    private = ("/tmp", HOME, "/run")
    for path in runtime_paths():
        if _under(path, private):
            args += ["--ro-bind", path, path]
    for hidden_path in hidden:
        resolved = os.path.realpath(hidden_path)
        if not os.path.exists(resolved) or _under(resolved, private):
            continue
        if os.path.isdir(resolved):
            args += ["--tmpfs", resolved]
        else:
            args += ["--ro-bind", "/dev/null", resolved]
    args += ["--remount-ro", "/", "--chdir", WORKSPACE]
    if os.geteuid() == 0:  # bwrap keeps every capability of a root caller unless told otherwise
        args += ["--cap-drop", "ALL"]
        for cap in CAPABILITIES:
            args += ["--cap-add", cap]
    args += ["--info-fd", str(info_fd), "--block-fd", str(block_fd), "--"]
    args += [sys.executable, "-m", JAIL_INIT, "--ctl-fd", str(ctl_fd), "--evt-fd", str(evt_fd)]
    return args


def jail_env(sandbox_id: str, token: str, code_prestart: str = "") -> dict[str, str]:
    """The environment execd (and so every command) starts from; the request's env comes on top."""
    prestart = {"EXECD_CODE_PRESTART": code_prestart} if code_prestart else {}
    return {
        **prestart,
        "PATH": PATH,
        "HOME": HOME,
        "HOSTNAME": sandbox_id,
        "LANG": "C.UTF-8",
        "EXECD_ACCESS_TOKEN": token,
        "EXECD_ENVS": f"{EXECD_DIR}/.env",
        "EXECD_STATE_DIR": f"{EXECD_DIR}/execd",
    }
