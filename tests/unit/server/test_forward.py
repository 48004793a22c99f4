"""Forwarded ports: relaying through a socket made in a network namespace (here: our own)."""

import asyncio
import os

import pytest

from opensandbox_platform.server.runtimes.forward import SandboxPorts


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
