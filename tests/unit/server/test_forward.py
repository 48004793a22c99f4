"""Forwarded ports: relaying through a socket made in a network namespace (here: our own)."""

import asyncio
import os
import socket

import pytest

from opensandbox_platform.server.runtimes.forward import PortRange, SandboxPorts


async def echo_server() -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.skipif(os.geteuid() != 0, reason="entering a network namespace needs CAP_SYS_ADMIN")
async def test_a_forwarded_port_relays_both_ways_and_refuses_when_nothing_listens() -> None:
    server, port = await echo_server()
    ports = SandboxPorts()
    ports.start()
    ports.attach("sb", os.open("/proc/thread-self/ns/net", os.O_RDONLY))
    try:
        host_port = await ports.open("sb", port)
        assert ports.host_port("sb", port) == host_port != port
        reader, writer = await asyncio.open_connection("127.0.0.1", host_port)
        payload = os.urandom(1 << 20)
        writer.write(payload)
        writer.write_eof()
        assert await reader.readexactly(len(payload)) == payload
        assert await reader.read() == b""  # the end reaches the client too
        writer.close()

        server.close()
        await server.wait_closed()
        reader, writer = await asyncio.open_connection("127.0.0.1", host_port)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 5)  # refused, not left hanging
        writer.close()
    finally:
        await ports.close_all()
    assert not ports.attached("sb")


def test_a_port_range_is_parsed_and_offered_whole_from_a_random_start() -> None:
    assert PortRange.parse("") is None
    assert PortRange.parse("61000-61009") == PortRange(61000, 61009)
    assert PortRange.parse("62000") == PortRange(62000, 62000)
    for bad in ("a-b", "70000-70001", "61009-61000", "80-90"):
        with pytest.raises(ValueError, match="forwardPorts"):
            PortRange.parse(bad)
    offered = PortRange(61000, 61009).candidates()
    assert sorted(offered) == list(range(61000, 61010))
    start = offered[0]
    assert offered == [*range(start, 61010), *range(61000, start)]


@pytest.mark.skipif(os.geteuid() != 0, reason="entering a network namespace needs CAP_SYS_ADMIN")
async def test_forwarders_listen_within_the_range_and_past_its_taken_ports() -> None:
    server, port = await echo_server()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    low = taken.getsockname()[1]
    ports = SandboxPorts(PortRange(low, low + 1))  # one taken, one free
    ports.start()
    ports.attach("sb", os.open("/proc/thread-self/ns/net", os.O_RDONLY))
    try:
        assert await ports.open("sb", port) == low + 1
        assert await ports.open("sb", port + 1) not in (low, low + 1)  # the range is full: any port
    finally:
        taken.close()
        await ports.close_all()
        server.close()
