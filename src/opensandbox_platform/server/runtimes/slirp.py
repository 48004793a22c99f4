"""slirp4netns: a sandbox's way out to the internet (user-mode networking, Debian's slirp4netns).

It creates `tap0` in the sandbox's network namespace (10.0.2.100/24, default route via 10.0.2.2,
DNS forwarder 10.0.2.3) and turns the sandbox's packets into ordinary sockets of its own on the
host. Hardened as it can be: the host's loopback is not reachable through the gateway
(--disable-host-loopback), it runs in a mount namespace of its own with no capability left but
NET_BIND_SERVICE (--enable-sandbox) under a seccomp filter (--enable-seccomp). What the sandbox may
reach through it is runtimes/netpolicy.py's ruleset, loaded in the sandbox's namespace beforehand.

Started from a thread in a private mount namespace of its own: slirp4netns' sandbox (1.2.0) makes
only `/` private before it pivots away from the old root and detaches it, so started from the
host's mount namespace, the unmounts would propagate to every shared mount of the host (podman's
network namespaces under /run/netns, a kubelet's volumes).

It ends with the jail, also while the server is down: `--exit-fd` is the read end of a pipe whose
write end only the jail's first process (jail_init) keeps. The server also kills it on delete.
"""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from opensandbox_platform.server.runtimes import linux, staging
from opensandbox_platform.server.runtimes.netpolicy import MTU, TAP

SLIRP4NETNS = "slirp4netns"


def argv(netns_fd: int, ready_fd: int, exit_fd: int) -> list[str]:
    return [
        SLIRP4NETNS,
        "--configure",
        f"--mtu={MTU}",
        "--disable-host-loopback",
        "--enable-sandbox",
        "--enable-seccomp",
        f"--ready-fd={ready_fd}",
        f"--exit-fd={exit_fd}",
        "--netns-type=path",
        f"/proc/self/fd/{netns_fd}",
        TAP,
    ]


async def start(netns_fd: int, exit_fd: int, log_path: Path, timeout: float) -> subprocess.Popen[bytes]:
    """Start slirp4netns for the namespace `netns_fd`; returns once tap0 is configured."""
    ready_r, ready_w = os.pipe()
    try:
        spawn = functools.partial(_spawn, netns_fd, ready_w, exit_fd, log_path)
        popen = await asyncio.wrap_future(staging.in_thread(functools.partial(_in_private_mounts, spawn)))
    finally:
        os.close(ready_w)
    try:
        ready = await asyncio.wait_for(_read_byte(ready_r), timeout)
    except BaseException:
        popen.kill()
        popen.wait()
        raise
    if not ready:
        popen.wait()
        raise RuntimeError(f"slirp4netns exited with code {popen.returncode} before the network was up")
    return popen


def _in_private_mounts(spawn: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    linux.unshare(linux.CLONE_NEWNS | linux.CLONE_FS)
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    return spawn()


def _spawn(netns_fd: int, ready_fd: int, exit_fd: int, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv(netns_fd, ready_fd, exit_fd),
            pass_fds=(netns_fd, ready_fd, exit_fd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )


async def _read_byte(fd: int) -> bytes:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[bytes] = loop.create_future()

    def readable() -> None:
        if not future.done():
            future.set_result(os.read(fd, 1))

    loop.add_reader(fd, readable)
    try:
        return await future
    finally:
        loop.remove_reader(fd)
        os.close(fd)
