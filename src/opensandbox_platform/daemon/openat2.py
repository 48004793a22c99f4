"""openat2(2), which Python lacks: opening a path with the kernel confining its resolution
(inside a root, beneath a directory, without symlinks), so a path from untrusted hands cannot
lead out, whatever it holds and however it changes meanwhile."""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Any

SYS_OPENAT2 = 437  # the same number on every architecture (the unified system call table)
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_syscall: Any = None


def openat2(dir_fd: int, path: str, flags: int, mode: int = 0, resolve: int = RESOLVE_IN_ROOT) -> int:
    """A new file descriptor (O_CLOEXEC) for `path` resolved from `dir_fd` under `resolve`."""
    global _syscall
    if _syscall is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.syscall.restype = ctypes.c_long
        _syscall = lib.syscall
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    raw = path.encode("utf-8", "surrogateescape")
    for _ in range(16):  # EAGAIN: a rename raced the lookup (RESOLVE_IN_ROOT asks to retry)
        fd = int(_syscall(SYS_OPENAT2, dir_fd, raw, ctypes.byref(how), ctypes.sizeof(how)))
        if fd >= 0:
            return fd
        code = ctypes.get_errno()
        if code != errno.EAGAIN:
            raise OSError(code, os.strerror(code), path)
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), path)
