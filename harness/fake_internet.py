"""A small fake internet for the egress tests: a network namespace of the test's own with a DNS
server answering test domains and HTTP servers on their addresses. No packet leaves the machine.

`FakeInternet.start()` makes the namespace `osbinet-<pid>-<n>`, links it (a veth pair) either to the
host (`203.0.113.0/24`, TEST-NET-3, which the internet never routes: local jails reach it through
slirp4netns' host sockets, containers through the engine's bridge and the host's routes) or to
the real node's bridge osb0 (addresses in the pods' 10.77.0.0/16 below the pods' own range: pods
reach it on their bridge, and only there), and runs `python -m harness.fake_internet serve` in it:

- DNS (UDP and TCP) on `.53:53` answering the zone (A records, TTL 300), NXDOMAIN otherwise; a
  second resolver on `.54:5353` (the one a sandbox must not get around the filter with);
- HTTP on port 80 of every address, answering `host=<the name of that address>`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import itertools
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Self

_counter = itertools.count()
NAMES = ("a.good.test", "b.good.test", "bad.test", "other.test")


@dataclass
class FakeInternet:
    """`prefix`: the first three octets of its addresses; `bridge`: a bridge to attach it to
    (else a veth to the host with `prefix.1` on the host's side)."""

    prefix: str = "203.0.113"
    bridge: str | None = None
    host_octet: int = 1
    netns: str = field(default_factory=lambda: f"osbinet-{os.getpid()}-{next(_counter)}")
    proc: subprocess.Popen[bytes] | None = None

    @property
    def dns(self) -> str:
        return f"{self.prefix}.53"

    @property
    def rogue_dns(self) -> str:
        return f"{self.prefix}.54"

    @property
    def zone(self) -> dict[str, str]:
        """Name -> address."""
        return {name: f"{self.prefix}.{octet}" for name, octet in zip(NAMES, (10, 11, 20, 30), strict=True)}

    def address(self, name: str) -> str:
        return self.zone[name]

    @property
    def network(self) -> str:
        return str(ipaddress.ip_network(f"{self.prefix}.0/24"))

    @property
    def _link(self) -> str:
        return f"osbi{os.getpid() % 100000}{self.netns.rsplit('-', 1)[-1]}"  # <= 15 characters

    def start(self) -> Self:
        ns, link = self.netns, self._link
        self._run("ip", "netns", "add", ns)
        try:
            self._run("ip", "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns)
            addresses = [self.dns, self.rogue_dns, *self.zone.values()]
            mask = "/24"
            if self.bridge:
                mask = "/16"  # the pods' subnet: they reach these addresses on their bridge
                self._run("ip", "link", "set", link, "master", self.bridge)
            else:
                self._run("ip", "addr", "add", f"{self.prefix}.{self.host_octet}/24", "dev", link)
            self._run("ip", "link", "set", link, "up")
            inside = ["ip", "netns", "exec", ns]
            self._run(*inside, "ip", "link", "set", "lo", "up")
            for address in addresses:
                self._run(*inside, "ip", "addr", "add", f"{address}{mask}", "dev", "eth0")
            self._run(*inside, "ip", "link", "set", "eth0", "up")
            gateway = "10.77.0.1" if self.bridge else f"{self.prefix}.{self.host_octet}"
            self._run(*inside, "ip", "route", "add", "default", "via", gateway)
            self._serve()
        except BaseException:
            self.stop()
            raise
        return self

    def _serve(self) -> None:
        spec = json.dumps({"zone": self.zone, "dns": self.dns, "rogue_dns": self.rogue_dns})
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, sys.executable, "-m", "harness.fake_internet", "serve", spec],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "ready" once every listener is bound
        if b"ready" not in line:
            raise RuntimeError(f"the fake internet did not start: {line!r}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        subprocess.run(["ip", "link", "del", self._link], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, check=False)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @staticmethod
    def _run(*argv: str) -> None:
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")


# --- the servers (run inside the namespace) -------------------------------------------------------------
async def _serve(spec: dict[str, object]) -> None:
    import dns.message
    import dns.rcode
    import dns.rrset

    zone: dict[str, str] = dict(spec["zone"])  # type: ignore[call-overload]
    by_address = {address: name for name, address in zone.items()}

    def answer(wire: bytes) -> bytes:
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        if name not in zone:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif dns.rdatatype.to_text(question.rdtype) == "A":
            response.answer.append(dns.rrset.from_text(question.name, 300, "IN", "A", zone[name]))
        return response.to_wire()

    class Udp(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            self.transport.sendto(answer(data), addr)  # type: ignore[attr-defined]

    async def tcp_dns(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            length = int.from_bytes(await reader.readexactly(2), "big")
            reply = answer(await reader.readexactly(length))
            writer.write(len(reply).to_bytes(2, "big") + reply)
            await writer.drain()
        writer.close()

    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.readuntil(b"\r\n\r\n")
            local = writer.get_extra_info("sockname")[0]
            body = f"host={by_address.get(local, local)}\n".encode()
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            writer.write(head + body)
            await writer.drain()
        writer.close()

    import dns.rdatatype

    loop = asyncio.get_running_loop()
    servers = []
    for host, port in ((str(spec["dns"]), 53), (str(spec["rogue_dns"]), 5353)):
        await loop.create_datagram_endpoint(Udp, local_addr=(host, port))
        servers.append(await asyncio.start_server(tcp_dns, host, port))
    for address in zone.values():
        servers.append(await asyncio.start_server(http, address, 80))
    print("ready", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("spec")
    args = parser.parse_args()
    asyncio.run(_serve(json.loads(args.spec)))


if __name__ == "__main__":
    main()
