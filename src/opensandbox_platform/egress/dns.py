"""The DNS filter: every DNS query of the sandbox (the ruleset redirects port 53 here) is answered
NXDOMAIN when the policy denies its name, else forwarded to the upstream resolver; the answer's
addresses join the deciding rule's sets before the answer goes back (Enforcer.admit).

UDP and TCP, as clients use them. Upstream queries of the sidecar carry the enforcer's mark
(SO_MARK, which needs the CAP_NET_ADMIN only the sidecar has), so the ruleset neither redirects
them back here nor refuses them; the local runtime's filter sends them from the server's own
namespace instead (`mark=None`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

from opensandbox_platform.egress.enforcer import Answer, Enforcer

log = logging.getLogger("egress.dns")

Upstream = tuple[str, int]
MAX_UDP = 65535
# Queries forwarded at once; more are dropped (a client retries). A sandbox flooding its resolver
# must not grow the filter's tasks and sockets without bound: the local runtime's filter runs in
# the server's event loop.
MAX_IN_FLIGHT = 128
TCP_IDLE_SECONDS = 10.0  # a TCP client silent this long is closed


def upstreams_from_resolv_conf(path: str = "/etc/resolv.conf") -> list[Upstream]:
    found = []
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                found.append((parts[1].split("%")[0], 53))
    return found


def parse_upstream(text: str) -> Upstream:
    """`host` or `host:port` (`[v6]:port`)."""
    text = text.strip()
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
        return host, int(port or 53)
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, 53


def addresses(response: dns.message.Message) -> Answer:
    """The A and AAAA records of an answer (any owner: CNAME chains end in them), with TTLs."""
    found: Answer = []
    for rrset in response.answer:
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            found += [(str(rdata.address), int(rrset.ttl)) for rdata in rrset]
    return found


class DnsFilter:
    def __init__(
        self,
        enforcer: Enforcer,
        upstreams: Sequence[Upstream],
        mark: int | None = None,
        timeout: float = 2.0,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        if not upstreams:
            raise ValueError("the DNS filter needs an upstream resolver (none in /etc/resolv.conf?)")
        self.enforcer = enforcer
        self.upstreams = list(upstreams)
        self.mark = mark
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.dropped = 0  # queries dropped while max_in_flight were forwarded
        self._tcp_clients = 0
        self._servers: list[asyncio.AbstractServer] = []
        self._transports: list[asyncio.BaseTransport] = []

    # --- listening --------------------------------------------------------------------------------
    async def serve(self, udp: socket.socket, tcp: socket.socket) -> None:
        """Serve on bound sockets (made in the namespace the filter guards)."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self), sock=udp)
        self._transports.append(transport)
        self._servers.append(await asyncio.start_server(self._tcp_client, sock=tcp))

    async def close(self) -> None:
        for transport in self._transports:
            transport.close()
        for server in self._servers:
            server.close()
            await server.wait_closed()

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._tcp_clients >= self.max_in_flight:  # a flood of connections: each would hold an fd
            self.dropped += 1
            writer.close()
            return
        self._tcp_clients += 1
        try:
            while True:
                async with asyncio.timeout(TCP_IDLE_SECONDS):
                    (length,) = struct.unpack("!H", await reader.readexactly(2))
                    query = await reader.readexactly(length)
                reply = await self.answer(query, tcp=True)
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            self._tcp_clients -= 1
            writer.close()

    # --- answering --------------------------------------------------------------------------------
    async def answer(self, wire: bytes, tcp: bool = False) -> bytes | None:
        """The reply to one query (None: drop it, as for garbage or a query above the bound)."""
        if self.in_flight >= self.max_in_flight:
            self.dropped += 1
            return None
        self.in_flight += 1
        try:
            return await self._answer(wire, tcp)
        finally:
            self.in_flight -= 1

    async def _answer(self, wire: bytes, tcp: bool) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if len(query.question) != 1:
            return _reply(query, dns.rcode.FORMERR)
        name = query.question[0].name.to_text(omit_final_dot=True)
        _, action = self.enforcer.policy.decide(name)
        if action == "deny":
            self.enforcer.admit(name, [])  # counts it
            return _reply(query, dns.rcode.NXDOMAIN)
        try:
            raw = await self.forward(wire, tcp)
            response = dns.message.from_wire(raw)
        except (OSError, TimeoutError, dns.exception.DNSException) as exc:
            log.warning("upstream DNS failed name=%s error=%r", name, exc)
            return _reply(query, dns.rcode.SERVFAIL)
        # Decided again with the answer in hand: the policy may have changed meanwhile.
        if not self.enforcer.admit(name, addresses(response)):
            return _reply(query, dns.rcode.NXDOMAIN)
        return raw

    async def resolve(self, name: str) -> Answer:
        """A and AAAA of `name` from upstream (the enforcer resolves denied names with it)."""
        found: Answer = []
        for kind in ("A", "AAAA"):
            query = dns.message.make_query(name, kind)
            with contextlib.suppress(OSError, TimeoutError, dns.exception.DNSException):
                found += addresses(dns.message.from_wire(await self.forward(query.to_wire(), False)))
        return found

    async def forward(self, wire: bytes, tcp: bool) -> bytes:
        error: BaseException = OSError("no upstream resolver")
        for upstream in self.upstreams:
            try:
                return await asyncio.wait_for(self._ask(upstream, wire, tcp), self.timeout)
            except (OSError, TimeoutError) as exc:
                error = exc
        raise error

    def _socket(self, host: str, kind: int) -> socket.socket:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        sock = socket.socket(family, kind)
        sock.setblocking(False)
        if self.mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
        return sock

    async def _ask(self, upstream: Upstream, wire: bytes, tcp: bool) -> bytes:
        loop = asyncio.get_running_loop()
        sock = self._socket(upstream[0], socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
        try:
            await loop.sock_connect(sock, upstream)
            if not tcp:
                await loop.sock_sendall(sock, wire)
                return await loop.sock_recv(sock, MAX_UDP)
            await loop.sock_sendall(sock, struct.pack("!H", len(wire)) + wire)
            (length,) = struct.unpack("!H", await _recv_exactly(loop, sock, 2))
            return await _recv_exactly(loop, sock, length)
        finally:
            sock.close()


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = await loop.sock_recv(sock, count - len(data))
        if not chunk:
            raise ConnectionError("upstream closed the connection")
        data += chunk
    return data


def _reply(query: dns.message.Message, rcode: dns.rcode.Rcode) -> bytes:
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    response.flags |= dns.flags.RA
    return response.to_wire()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: DnsFilter) -> None:
        self.owner = owner
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        task = asyncio.ensure_future(self._reply(data, addr))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _reply(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = await self.owner.answer(data)
        if reply is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)


def bind_sockets(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    """The filter's UDP and TCP sockets (made by the caller's thread, in its namespace)."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        for sock in (udp, tcp):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.setblocking(False)
        tcp.listen(128)
    except OSError:
        udp.close()
        tcp.close()
        raise
    return udp, tcp
