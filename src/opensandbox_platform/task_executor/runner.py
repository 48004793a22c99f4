"""Starting a task's process: directly, or inside the main container of the pod (sidecar mode).

Sidecar mode needs the pod's shared process namespace (`shareProcessNamespace: true`): the main
container's processes are visible in /proc, and the one carrying the marker environment variable
(`OPENSANDBOX_MAIN_CONTAINER=<name>`, set by the controller) is the target. Between fork and exec the
child then does what `nsenter --mount` does, and a little more:

1. setns(2) into the target's mount namespace: `/` is now the main container's filesystem
   (network, IPC and UTS are the pod's and already shared; the PID namespace is shared);
2. chdir to the working directory (default: the target's);
3. drops every capability the target's bounding set lacks (so the task never holds the sidecar's
   CAP_SYS_ADMIN), then takes the target's user, group and supplementary groups.

The environment is the target's plus the task's. Every task leads its own process group, so a
timeout or cancel kills the whole group.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from opensandbox_platform.api.labels import TASK_TARGET_ENV
from opensandbox_platform.task_executor.tasks import Spec

CLONE_NEWNS = 0x00020000
PR_CAPBSET_DROP = 24
CAP_LAST = 63


class StartError(Exception):
    """The task could not start (no main container, bad working directory, exec failed)."""


@dataclass(frozen=True)
class Target:
    """The main container's process we enter, and what the task takes from it."""

    pid: int
    env: dict[str, str]
    cwd: str
    uid: int
    gid: int
    groups: list[int]
    bounding: int  # capability bounding set, as a bit mask


def find_target(container: str, proc: str = "/proc") -> int | None:
    """The lowest pid in the main container: it carries the marker env and another mount namespace."""
    marker = f"{TASK_TARGET_ENV}={container}".encode()
    own_mnt = os.readlink(f"{proc}/self/ns/mnt")
    for pid in sorted(int(p) for p in os.listdir(proc) if p.isdigit()):
        try:
            with open(f"{proc}/{pid}/environ", "rb") as f:
                if marker not in f.read().split(b"\0"):
                    continue
            if os.readlink(f"{proc}/{pid}/ns/mnt") != own_mnt:
                return pid
        except OSError:
            continue  # gone, or not ours to read
    return None


def read_target(pid: int) -> Target:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item]
    env = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}
    fields: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return Target(
        pid=pid,
        env=env,
        cwd=os.readlink(f"/proc/{pid}/cwd"),
        uid=int(fields["Uid"].split()[0]),
        gid=int(fields["Gid"].split()[0]),
        groups=[int(g) for g in fields.get("Groups", "").split()],
        bounding=int(fields["CapBnd"], 16),
    )


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks): tells a pid's owner from a later reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat.rsplit(b")", 1)[1].split()[19])


class Runner:
    """Spawns task processes. `main_container` None: run them here, as this process's children."""

    def __init__(self, main_container: str | None) -> None:
        self.main_container = main_container
        self._libc = ctypes.CDLL(None, use_errno=True) if main_container else None

    @property
    def mode(self) -> str:
        return "sidecar" if self.main_container else "direct"

    def spawn(self, spec: Spec, log_path: str) -> subprocess.Popen[bytes]:
        task_env = {e["name"]: e["value"] for e in spec.env}
        with open(log_path, "ab") as log:
            if self.main_container is None:
                return self._popen(spec, log, {**os.environ, **task_env}, spec.workingDir, None)
            target = self._target()
            cwd = spec.workingDir or target.cwd
            if not os.path.isdir(f"/proc/{target.pid}/root{cwd}"):
                raise StartError(f"working directory {cwd} does not exist in container {self.main_container}")
            ns = os.open(f"/proc/{target.pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
            try:
                return self._popen(spec, log, {**target.env, **task_env}, None, self._enter(ns, cwd, target))
            finally:
                os.close(ns)

    def _target(self) -> Target:
        assert self.main_container is not None
        pid = find_target(self.main_container)
        if pid is None:
            raise StartError(
                f"no process of container {self.main_container} is visible: the pod needs "
                f"shareProcessNamespace: true and {TASK_TARGET_ENV}={self.main_container} in that container"
            )
        try:
            return read_target(pid)
        except (OSError, KeyError, ValueError) as exc:
            raise StartError(f"cannot read process {pid} of container {self.main_container}: {exc}") from exc

    def _popen(
        self,
        spec: Spec,
        log: BinaryIO,
        env: dict[str, str],
        cwd: str | None,
        preexec: Callable[[], None] | None,
    ) -> subprocess.Popen[bytes]:
        try:
            return subprocess.Popen(
                spec.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,  # its own process group: a timeout kills all of it
                preexec_fn=preexec,
                close_fds=True,
            )
        except subprocess.SubprocessError as exc:
            raise StartError(
                f"could not enter container {self.main_container} (setns needs CAP_SYS_ADMIN): {exc}"
            ) from exc
        except OSError as exc:
            raise StartError(f"{spec.argv[0]}: {exc.strerror or exc}") from exc

    def _enter(self, ns_fd: int, cwd: str, target: Target) -> Callable[[], None]:
        """The code the child runs between fork and exec (async-signal-safe enough: no allocation-heavy work)."""
        libc = self._libc
        assert libc is not None
        drop = [cap for cap in range(CAP_LAST + 1) if not target.bounding >> cap & 1]
        change_user = (target.uid, target.gid) != (os.getuid(), os.getgid())

        def enter() -> None:
            if libc.setns(ns_fd, CLONE_NEWNS) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            os.chdir(cwd)
            for cap in drop:
                libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL for caps this kernel lacks: fine
            if change_user:
                os.setgroups(target.groups)
                os.setgid(target.gid)
                os.setuid(target.uid)

        return enter


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
