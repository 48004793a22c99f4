"""The bubblewrap command line of a local sandbox, and where execd's interpreter comes from.

bwrap runs as the sandbox's host uid and makes the jail's user, mount, PID, IPC, UTS and cgroup
namespaces (the network namespace is already the one runtimes/staging.py made). Its root is the
sandbox's private tmpfs (`<stage>/rw`, see staging.py) with, on top:

- the host's /usr and its /bin, /lib*, /sbin companions and the public /etc entries of
  runtimes/rootfs.py, read-only (the root of an image instead, once images are supported);
- execd's interpreter and this package at /opt/opensandbox/{python,site,src}, read-only;
- a /proc of the jail's PID namespace (bwrap makes /proc/sys read-only; kcore, keys, timer_list,
  sched_debug, ... are masked as Docker masks them), a minimal read-only /dev with its own pts and
  a 64 MiB /dev/shm, the host's /sys read-only, an in-memory /run.

Capabilities (inside the jail's own user namespace only; it holds none of the host's): Docker's
default set minus NET_RAW and MKNOD. The seccomp filter is runtimes/seccomp.py's.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import opensandbox_platform
from opensandbox_platform.api.labels import EXECD_MOUNT, SANDBOX_CAPABILITIES
from opensandbox_platform.server.runtimes.rootfs import HostPart

BWRAP = "bwrap"
JAIL_INIT = "opensandbox_platform.server.runtimes.jail_init"
CAPABILITIES = tuple(f"CAP_{c}" for c in SANDBOX_CAPABILITIES)
HOME = "/root"
WORKSPACE = "/workspace"
EXECD_DIR = "/run/opensandbox"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SHM_BYTES = 64 << 20
# What Docker masks in /proc and /sys (files get /dev/null, directories an empty read-only tmpfs).
MASKED_FILES = (
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
)
MASKED_DIRS = ("/proc/acpi", "/proc/scsi", "/sys/firmware")


@dataclass(frozen=True)
class RuntimeLayout:
    """execd's interpreter and package: host paths staged read-only under /opt/opensandbox."""

    binds: dict[str, str]  # staged name -> host path; in the jail at EXECD_MOUNT/<name>
    python: str  # the interpreter, as the jail sees it
    path: tuple[str, ...]  # sys.path entries to add, as the jail sees them
    library_path: str = ""  # where its libpython is, as the jail sees it (its RUNPATH is a host path)

    def jail_path(self, name: str) -> str:
        return f"{EXECD_MOUNT}/{name}"


def runtime_layout() -> RuntimeLayout:
    """The server's own interpreter (sys.base_prefix), its environment's site-packages (for
    execd's optional dependencies) and this package, wherever they are on the host."""
    base = os.path.realpath(sys.base_prefix)
    executable = os.path.realpath(sys.executable)
    if not executable.startswith(base.rstrip("/") + "/"):
        raise RuntimeError(f"the interpreter {executable} is not under its prefix {base}")
    binds = {"python": base}
    path: list[str] = []
    package_root = str(Path(opensandbox_platform.__file__).resolve().parents[1])
    site = os.path.realpath(sysconfig.get_paths()["purelib"])
    if site != package_root:
        binds["src"] = package_root
        path.append(f"{EXECD_MOUNT}/src")
    if site.startswith(base.rstrip("/") + "/"):  # no virtual environment: under the prefix
        path.append(f"{EXECD_MOUNT}/python/{os.path.relpath(site, base)}")
    else:
        binds["site"] = site
        path.append(f"{EXECD_MOUNT}/site")
    python = f"{EXECD_MOUNT}/python/{os.path.relpath(executable, base)}"
    libraries = sysconfig.get_config_var("LIBDIR") or ""
    library_path = ""
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and os.path.realpath(libraries).startswith(base.rstrip("/") + "/"):
        library_path = f"{EXECD_MOUNT}/python/{os.path.relpath(os.path.realpath(libraries), base)}"
    return RuntimeLayout(binds=binds, python=python, path=tuple(path), library_path=library_path)


def masks(exists: Callable[[str], bool] = os.path.exists) -> list[str]:
    """bwrap arguments that mask what exists of MASKED_FILES and MASKED_DIRS."""
    args: list[str] = []
    for path in MASKED_FILES:
        if exists(path):
            args += ["--ro-bind", "/dev/null", path]
    for path in MASKED_DIRS:
        if exists(path):
            args += ["--tmpfs", path, "--remount-ro", path]
    return args


def root_args(stage_dir: str, parts: Iterable[HostPart], layout: RuntimeLayout) -> list[str]:
    """The root: the private tmpfs, the host's /usr and public /etc entries, execd's runtime."""
    args = ["--bind", f"{stage_dir}/rw", "/"]
    for part in parts:
        if part.link is not None:
            args += ["--symlink", part.link, part.path]
        else:
            args += ["--ro-bind", part.path, part.path]
    for name in layout.binds:
        args += ["--ro-bind", f"{stage_dir}/rt/{name}", layout.jail_path(name)]
    return args


def image_root_args(stage_dir: str, layout: RuntimeLayout) -> list[str]:
    """The root of an image: its overlay (staging.py mounts it), then execd's runtime."""
    args = ["--bind", f"{stage_dir}/root", "/"]
    for name in layout.binds:
        args += ["--ro-bind", f"{stage_dir}/rt/{name}", layout.jail_path(name)]
    return args


def mountpoints(parts: Iterable[HostPart], layout: RuntimeLayout) -> list[tuple[str, bool]]:
    """Mount points staging.py creates in the root beforehand (with the right owner and mode)."""
    points = [(p.path, os.path.isdir(p.path)) for p in parts if p.link is None]
    return points + [(layout.jail_path(name), True) for name in layout.binds]


@dataclass(frozen=True)
class Fds:
    info: int
    userns_block: int
    seccomp: int
    ctl: int
    evt: int
    keep: int  # held by jail_init for the jail's life (slirp4netns' exit pipe)


def bwrap_args(
    sandbox_id: str,
    *,
    root: list[str],
    layout: RuntimeLayout,
    run_size_bytes: int,
    fds: Fds,
    proc_masks: list[str],
    volumes: list[tuple[str, str, bool]] | None = None,
) -> list[str]:
    """`volumes`: (staged source, mount path in the jail, read-only), bound after the root."""
    args = [BWRAP, "--unshare-user", "--uid", "0", "--gid", "0", "--userns-block-fd", str(fds.userns_block)]
    args += ["--info-fd", str(fds.info)]
    args += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    args += ["--hostname", sandbox_id, "--new-session"]
    args += root
    args += ["--proc", "/proc", "--dev", "/dev", "--size", str(SHM_BYTES), "--tmpfs", "/dev/shm"]
    args += ["--remount-ro", "/dev", "--ro-bind", "/sys", "/sys"]
    args += proc_masks
    args += ["--size", str(run_size_bytes), "--tmpfs", "/run", "--chdir", WORKSPACE]
    for source, path, readonly in volumes or []:
        args += ["--ro-bind" if readonly else "--bind", source, path]
    for cap in CAPABILITIES:
        args += ["--cap-add", cap]
    if layout.library_path:  # jail_init drops it before it starts anything
        args += ["--setenv", "LD_LIBRARY_PATH", layout.library_path]
    args += ["--seccomp", str(fds.seccomp), "--"]
    return args + jail_init_argv(layout, fds.ctl, fds.evt, fds.keep)


def jail_init_argv(layout: RuntimeLayout, ctl_fd: int, evt_fd: int, keep_fd: int) -> list[str]:
    """The jail's first process: isolated mode (no user site, no PYTHON* variables, no site
    hooks), with only our package and its environment's site-packages on the path."""
    boot = f"import sys; sys.path[:0] = {list(layout.path)!r}; from {JAIL_INIT} import main; main()"
    fds = ["--ctl-fd", str(ctl_fd), "--evt-fd", str(evt_fd), "--keep-fd", str(keep_fd)]
    return [layout.python, "-I", "-S", "-c", boot, *fds]


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
