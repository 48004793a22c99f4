"""Starting a session's namespace: a user + mount namespace of its own with the overlays mounted,
then bubblewrap for everything else.

bubblewrap (0.8 in Debian 12) cannot mount overlayfs, so the child execd forks does it before it
executes bwrap (in `preexec_fn`, between fork and exec): it enters a new user namespace in which it
is root (mapped to execd's own uid: no privilege is needed, only permission to create user
namespaces), a new mount namespace, mounts a tmpfs for the session's stage when execd's state
directory cannot hold an overlay's upper layer (an overlayfs, e.g. a container's root), mounts one
overlayfs per layer (`userxattr`: kernel >= 5.11), hands execd a descriptor of the stage (so execd
reads upper layers even when they live in that private tmpfs), then executes bwrap. bwrap makes a
second, nested user namespace for the session's processes (the outer one holds bwrap itself, which
sees the real root), and the PID, IPC, UTS (and network) namespaces.

The child runs between fork and exec of a process that has threads, so it only makes system calls
(through ctypes, prepared before the fork) and never imports or logs.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from opensandbox_platform.execd import procs

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
OVERLAYFS_MAGIC = 0x794C7630
FS_NAMES = {
    OVERLAYFS_MAGIC: "overlayfs",
    0x01021994: "tmpfs",
    0xEF53: "ext4",
    0x58465342: "xfs",
    0x9123683E: "btrfs",
    0x6969: "nfs",
    0x65735546: "fuse",
}

_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        lib.unshare.argtypes = [ctypes.c_int]
        _libc = lib
    return _libc


class SetupError(Exception):
    """The namespace could not be made; the message says which step failed and why."""


@dataclass(frozen=True)
class MountPlan:
    stage: str  # an existing empty directory (execd's view)
    tmpfs_bytes: int | None  # mount a tmpfs of this size on the stage first (None: the stage is on disk)
    overlays: tuple[tuple[int, str], ...]  # (layer number, lower directory)
    control_dirs: tuple[str, ...] = ("ctl",)


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


class _Preexec:
    """The work done in the child; failures are written to `err_fd` before raising."""

    def __init__(self, plan: MountPlan, err_fd: int, sock_fd: int) -> None:
        self.plan = plan
        self.err_fd = err_fd
        self.sock_fd = sock_fd
        self.lib = libc()
        self.uid_map = f"0 {os.geteuid()} 1".encode()
        self.gid_map = f"0 {os.getegid()} 1".encode()
        self.stage = plan.stage.encode()
        self.tmpfs_data = f"size={plan.tmpfs_bytes},mode=0700".encode() if plan.tmpfs_bytes else b""
        self.dirs = [f"{plan.stage}/{d}" for d in ("u", "w", "m", *plan.control_dirs)]
        self.dirs += [f"{plan.stage}/{d}/{n}" for n, _ in plan.overlays for d in ("u", "w", "m")]

    def fail(self, what: str, code: int) -> None:
        os.write(self.err_fd, f"{what}: {os.strerror(code)} (errno {code})".encode())
        raise OSError(code, what)

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            self.fail(what, ctypes.get_errno())

    def __call__(self) -> None:
        lib = self.lib
        self.check(lib.unshare(CLONE_NEWUSER | CLONE_NEWNS), "creating a user and mount namespace (unshare)")
        try:
            _write("/proc/self/setgroups", b"deny")
            _write("/proc/self/uid_map", self.uid_map)
            _write("/proc/self/gid_map", self.gid_map)
        except OSError as exc:
            self.fail("mapping the user namespace", exc.errno or errno.EPERM)
        self.check(lib.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making mounts private")
        if self.tmpfs_data:
            self.check(lib.mount(b"tmpfs", self.stage, b"tmpfs", MS_NOSUID | MS_NODEV, self.tmpfs_data), "tmpfs")
        try:
            for path in self.dirs:
                os.makedirs(path, mode=0o755, exist_ok=True)
        except OSError as exc:
            self.fail(f"creating {exc.filename}", exc.errno or errno.EIO)
        for n, lower in self.plan.overlays:
            fds = []
            try:
                for path in (lower, f"{self.plan.stage}/u/{n}", f"{self.plan.stage}/w/{n}"):
                    fds.append(os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
            except OSError as exc:
                self.fail(f"opening {exc.filename}", exc.errno or errno.EIO)
            # Descriptors, not paths: a path with ',' or ':' would break the option string.
            data = (
                f"lowerdir=/proc/self/fd/{fds[0]},upperdir=/proc/self/fd/{fds[1]},"
                f"workdir=/proc/self/fd/{fds[2]},userxattr"
            ).encode()
            rc = lib.mount(b"overlay", f"{self.plan.stage}/m/{n}".encode(), b"overlay", MS_NOSUID, data)
            code = ctypes.get_errno()
            for fd in fds:
                os.close(fd)
            if rc != 0:
                self.fail(f"mounting an overlay of {lower}", code)
        stage_fd = os.open(self.plan.stage, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        socket.send_fds(socket.socket(fileno=self.sock_fd), [b"s"], [stage_fd])
        os.close(stage_fd)


def spawn(
    argv: Sequence[str],
    plan: MountPlan,
    *,
    env: Mapping[str, str],
    stdin: int,
    stdout: int,
    stderr: int,
    pass_fds: Sequence[int],
) -> tuple[procs.Child, int]:
    """Start bwrap in the new namespaces; returns it and a descriptor of the stage directory (the
    tmpfs, when there is one: execd cannot see it otherwise). Raises SetupError."""
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    preexec = _Preexec(plan, err_w, child_sock.fileno())
    try:
        try:
            popen = subprocess.Popen(
                list(argv),
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                env=dict(env),
                close_fds=True,
                pass_fds=tuple(pass_fds),
                process_group=0,
                preexec_fn=preexec,
            )
        except subprocess.SubprocessError:
            os.close(err_w)
            err_w = -1
            message = os.read(err_r, 4096).decode("utf-8", "replace") or "the namespace set-up failed"
            raise SetupError(message) from None
        except OSError as exc:  # bwrap itself could not be executed
            raise SetupError(f"cannot run {argv[0]}: {exc.strerror}") from None
        child = procs.Child(popen, procs.WATCHER.watch(popen.pid))
        parent_sock.settimeout(5)
        try:
            _, fds, _, _ = socket.recv_fds(parent_sock, 4, 1)
        except OSError as exc:
            child.signal_group(9)
            raise SetupError(f"no stage descriptor from the set-up: {exc}") from None
        if not fds:
            child.signal_group(9)
            raise SetupError("no stage descriptor from the set-up")
        return child, fds[0]
    finally:
        os.close(err_r)
        if err_w >= 0:
            os.close(err_w)
        parent_sock.close()
        child_sock.close()


def upper_capable(path: str) -> bool:
    """Whether a directory's filesystem can hold an overlay's upper layer (an overlayfs cannot)."""
    magic = fs_magic(path)
    return magic not in (0, OVERLAYFS_MAGIC)


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]


def fs_magic(path: str) -> int:
    """statfs(2)'s f_type (os.statvfs does not report it); 0 if it cannot be read."""
    buf = _Statfs()
    if libc().statfs(path.encode(), ctypes.byref(buf)) != 0:
        return 0
    return int(buf.f_type)
