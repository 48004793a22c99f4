"""The files API as another user: the SDK's `files_with_identity(uid, gid)`, execd's
`/v1/filesystem/{uid}/{gid}/...` routes.

Every filesystem call of such a request runs in a thread of its own that first becomes that user
for good: supplementary groups `[gid]`, then real/effective/saved gid and uid, through raw
syscalls. Linux keeps credentials per thread; glibc's wrappers (and so `os.setresuid`,
`os.setgroups`) would change every thread of execd, so they are not used. Once a thread's uids all
left 0, the kernel clears its permitted capabilities: it can never become root again, and every
check (read, write, traverse, chown, chmod, sticky directories, /proc) is the kernel's, for that
user, on every path component, including symlinks followed. Nothing in execd judges paths.

Why a thread per operation and not a long-lived worker that switches only its fsuid and back: a
thread that cannot return has no "switch back" to get wrong (a failed restore, an exception
between two calls) and leaks no rights into the next request; it costs ~0.25 ms per step
(bench/execd_identity_bench.py). Why not a helper process: a fork of execd per operation costs
milliseconds, and an upload needs its file descriptor in execd, which a thread shares for free.

uid 0 is allowed: the caller of this API already runs commands as root in the sandbox, so asking
for root grants nothing new; any other uid/gid gets only what the kernel lets it have.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, NamedTuple, TypeVar

from opensandbox_platform.daemon import errors
from opensandbox_platform.daemon.errors import ApiError

T = TypeVar("T")

# The largest id the SDK sends (4294967295 is (uid_t)-1, "unchanged", in every set*id call).
MAX_ID = 4294967294

# (setgroups, setresgid, setresuid) per architecture.
_SYSCALLS = {"x86_64": (116, 119, 117), "aarch64": (159, 149, 147)}


class Identity(NamedTuple):
    uid: int
    gid: int


def parse(uid_text: str, gid_text: str) -> Identity:
    """The route's `{uid}` and `{gid}` segments -> Identity; 400 unless each is 0..4294967294."""
    return Identity(_parse_id(uid_text, "uid"), _parse_id(gid_text, "gid"))


def _parse_id(text: str, name: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 10 or int(text) > MAX_ID:
        raise errors.bad_request(f"invalid {name} {text!r}: an integer between 0 and {MAX_ID} is required")
    return int(text)


# Threads acting as users at once (the default executor's bound, roughly): more requests wait. A
# slot is freed when its thread is done, not when its request is (a client that hangs up does not
# stop a long search, so hanging up again and again must not start threads without bound).
_slots = asyncio.Semaphore(16)


async def run_as(identity: Identity, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a new thread that has become `identity`; its result or its exception."""
    await _slots.acquire()
    loop = asyncio.get_running_loop()
    future: Future[T] = Future()
    future.add_done_callback(lambda _: _release(loop))
    thread = threading.Thread(
        target=_run, args=(identity, future, fn, args), name=f"as-{identity.uid}:{identity.gid}", daemon=True
    )
    thread.start()
    return await asyncio.wrap_future(future)


def _release(loop: asyncio.AbstractEventLoop) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: execd is stopping
        loop.call_soon_threadsafe(_slots.release)


def _run(identity: Identity, future: Future[T], fn: Callable[..., T], args: tuple[Any, ...]) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        become(identity)
        result = fn(*args)
    except BaseException as exc:  # handed to the awaiting request, which raises it
        future.set_exception(exc)
    else:
        future.set_result(result)


def become(identity: Identity) -> None:
    """Make the calling thread (only it) `identity`, with no way back. Raises ApiError when execd
    cannot: 501 if it lacks the privilege to switch, 400 if the ids do not exist in its user
    namespace."""
    uid, gid = identity
    if os.geteuid() != 0 and (uid, gid) == (os.getuid(), os.getgid()):
        return  # already that user (a sandbox running execd unprivileged): nothing to switch
    machine = os.uname().machine
    numbers = _SYSCALLS.get(machine)
    if numbers is None:
        raise ApiError(501, errors.NOT_SUPPORTED, f"filesystem identities are not supported on {machine}")
    setgroups, setresgid, setresuid = numbers
    groups = (ctypes.c_uint32 * 1)(gid)
    _syscall(identity, setgroups, 1, ctypes.addressof(groups))
    _syscall(identity, setresgid, gid, gid, gid)
    _syscall(identity, setresuid, uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise RuntimeError(f"thread credentials did not change to uid {uid}, gid {gid}")


_libc: ctypes.CDLL | None = None


def _syscall(identity: Identity, number: int, *args: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    if _libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args)) == 0:
        return
    code = ctypes.get_errno()
    if code == errno.EPERM:
        raise ApiError(
            501,
            errors.NOT_SUPPORTED,
            f"execd runs as uid {os.getuid()} without the privilege to switch users: it can act only as uid"
            f" {os.getuid()}, gid {os.getgid()} (asked: uid {identity.uid}, gid {identity.gid})",
        )
    if code == errno.EINVAL:
        raise errors.bad_request(
            f"uid {identity.uid} or gid {identity.gid} does not exist in this sandbox (its user namespace"
            " does not map it)"
        )
    raise OSError(code, os.strerror(code))
