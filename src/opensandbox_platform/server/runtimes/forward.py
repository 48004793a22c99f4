"""Ports of a sandbox on the host's loopback: `127.0.0.1:<forwardPorts>` -> `127.0.0.1:<port>` inside.

A sandbox's network namespace is its own, so execd (44772) and whatever else listens in it is out
of the host's reach. For each port a client asks about, the server listens on a free port of the
host's loopback (`local.forwardPorts`: PortRange) and relays every connection to the port in the
sandbox: the socket to the sandbox is made in its namespace (a thread enters the namespace,
creates the socket, and leaves; a socket stays in the namespace it was made in) and connects to
the sandbox's own 127.0.0.1, so servers listening on loopback or on all addresses are both
reached, and two sandboxes can listen on the same port. Relaying is asyncio's transports with
flow control in both directions.

The listeners live in the server process: a restarted server opens them again, on the same host
ports where it can (runtimes/local.py keeps them in the sandbox's record).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import cast

from opensandbox_platform.server.runtimes import linux

log = logging.getLogger("opensandbox.local.forward")

LOOPBACK = "127.0.0.1"
HIGH_WATER = 256 * 1024
BACKLOG = 1024
CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class PortRange:
    """Host ports forwarders listen on (local.forwardPorts). Outside the kernel's ephemeral range by
    default: a container engine publishes ports from that range and its NAT rules for them (a live
    container's, or one an engine left behind) take every connection to such a port, whoever
    listens on it, so a forwarder on one would relay to a stranger's container or to nowhere."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> PortRange | None:
        """`low-high` (None for ""); ValueError with what is wrong."""
        if not text.strip():
            return None
        low, sep, high = text.partition("-")
        try:
            chosen = cls(int(low), int(high if sep else low))
        except ValueError:
            raise ValueError(f"forwardPorts {text!r} is not a range such as 61000-65535") from None
        if not 1024 <= chosen.low <= chosen.high <= 65535:
            raise ValueError(f"forwardPorts {text!r} must lie within 1024-65535, low first")
        return chosen

    def candidates(self) -> list[int]:
        """Every port of the range, from a random one on (forwarders of many sandboxes spread out)."""
        ports = list(range(self.low, self.high + 1))
        start = random.randrange(len(ports))
        return ports[start:] + ports[:start]


class NamespaceSockets:
    """Makes TCP sockets in other network namespaces, from one thread of its own."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netns")
        self._home = linux.thread_namespace("net")

    def _make(self, netns_fd: int) -> socket.socket:
        linux.setns(netns_fd, linux.CLONE_NEWNET)
        try:
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            linux.setns(self._home, linux.CLONE_NEWNET)

    async def connect(self, netns_fd: int, port: int) -> socket.socket:
        loop = asyncio.get_running_loop()
        sock = await loop.run_in_executor(self._executor, self._make, netns_fd)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, (LOOPBACK, port))
        except BaseException:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        self._executor.shutdown(wait=False)
        os.close(self._home)


class _Half(asyncio.Protocol):
    """One side of a relayed connection; writes what it reads to its peer's transport."""

    def __init__(self, hold: bool = False) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.pending: list[bytes] = []
        self.eof = False
        self.hold = hold  # read nothing until joined (the client's side, while we connect inside)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        self.transport.set_write_buffer_limits(high=HIGH_WATER)
        if self.hold:
            self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.pending.append(data)
            return
        peer.transport.write(data)

    def eof_received(self) -> bool:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.eof = True
        elif peer.transport.can_write_eof():
            peer.transport.write_eof()
        return True  # keep the other direction open until it ends too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def join(self, peer: _Half) -> None:
        """Pair with `peer` and hand it what arrived before it existed."""
        self.peer, peer.peer = peer, self
        assert peer.transport is not None
        for chunk in self.pending:
            peer.transport.write(chunk)
        self.pending.clear()
        if self.eof and peer.transport.can_write_eof():
            peer.transport.write_eof()
        if self.hold and self.transport is not None and not self.transport.is_closing():
            self.hold = False
            self.transport.resume_reading()


class Forward:
    """Host `127.0.0.1:host_port` relayed to `port` in the network namespace `netns_fd`."""

    def __init__(self, sockets: NamespaceSockets, netns_fd: int, port: int) -> None:
        self.sockets = sockets
        self.netns_fd = netns_fd
        self.port = port
        self.host_port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host_port: int = 0, ports: PortRange | None = None) -> int:
        """Listen on `host_port` (0, or when it is taken: a free one of `ports`, or with no range an
        ephemeral one); the port listened on."""
        if host_port:
            with contextlib.suppress(OSError):
                return await self._listen(host_port)
            log.warning("host port %d is taken; forwarding port %d from a new one", host_port, self.port)
        for candidate in ports.candidates() if ports is not None else []:
            with contextlib.suppress(OSError):
                return await self._listen(candidate)
        if ports is not None:
            log.warning("every port of forwardPorts %d-%d is taken: an ephemeral one", ports.low, ports.high)
        return await self._listen(0)

    async def _listen(self, host_port: int) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._accepted, LOOPBACK, host_port, reuse_address=True, backlog=BACKLOG
        )
        self.host_port = self._server.sockets[0].getsockname()[1]
        return self.host_port

    def _accepted(self) -> asyncio.Protocol:
        inbound = _Half(hold=True)
        task = asyncio.ensure_future(self._connect_inside(inbound))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return inbound

    async def _connect_inside(self, inbound: _Half) -> None:
        loop = asyncio.get_running_loop()
        try:
            sock = await asyncio.wait_for(self.sockets.connect(self.netns_fd, self.port), CONNECT_TIMEOUT)
            _, outbound = await loop.create_connection(_Half, sock=sock)
            if _closes_fd_itself(loop):
                # uvloop closes the fd, then the socket object again "expecting EBADF": by then
                # another thread (a jail's staging) may have that number for a file of its own.
                sock.detach()
        except BaseException as exc:
            # Nothing listens there (or the sandbox is gone): refuse, never leave the client waiting.
            _reset(inbound)
            if not isinstance(exc, OSError | asyncio.CancelledError):
                log.exception("forwarding a connection failed port=%d", self.port)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        if inbound.transport is None or inbound.transport.is_closing():
            if outbound.transport is not None:
                outbound.transport.close()
            return
        inbound.join(outbound)
        outbound.join(inbound)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            task.cancel()


def _closes_fd_itself(loop: asyncio.AbstractEventLoop) -> bool:
    return type(loop).__module__.startswith("uvloop")


def _reset(half: _Half) -> None:
    """Close with a RST, so the client sees a refused connection rather than a clean end."""
    transport = half.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class SandboxPorts:
    """Every sandbox's forwarded ports: its network namespace (an fd this object owns) and a
    `Forward` per port asked for."""

    def __init__(self, ports: PortRange | None = None) -> None:
        self.ports = ports
        self._sockets: NamespaceSockets | None = None
        self._netns: dict[str, int] = {}
        self._forwards: dict[str, dict[int, Forward]] = {}

    def start(self) -> None:
        self._sockets = NamespaceSockets()

    def attach(self, sandbox_id: str, netns_fd: int) -> None:
        """Take `netns_fd` (the sandbox's network namespace) over."""
        self._netns[sandbox_id] = netns_fd

    def attach_process(self, sandbox_id: str, pid: int) -> bool:
        """After a restart: the namespace of the sandbox's process `pid` (False if it is gone)."""
        try:
            self._netns[sandbox_id] = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        return True

    def attached(self, sandbox_id: str) -> bool:
        return sandbox_id in self._netns

    def netns(self, sandbox_id: str) -> int | None:
        """The sandbox's network namespace (an fd this object owns), if attached."""
        return self._netns.get(sandbox_id)

    def host_port(self, sandbox_id: str, port: int) -> int | None:
        forward = self._forwards.get(sandbox_id, {}).get(port)
        return forward.host_port if forward is not None else None

    async def open(self, sandbox_id: str, port: int, host_port: int = 0) -> int:
        """Forward `port` of the sandbox from `host_port` of the host's loopback (0, or taken:
        an ephemeral one); the host port."""
        assert self._sockets is not None, "start() first"
        forward = Forward(self._sockets, self._netns[sandbox_id], port)
        bound = await forward.start(host_port, self.ports)
        self._forwards.setdefault(sandbox_id, {})[port] = forward
        return bound

    async def close(self, sandbox_id: str) -> None:
        for forward in self._forwards.pop(sandbox_id, {}).values():
            await forward.close()
        fd = self._netns.pop(sandbox_id, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    async def close_all(self) -> None:
        for sandbox_id in list(self._netns):
            await self.close(sandbox_id)
        if self._sockets is not None:
            self._sockets.close()
            self._sockets = None
