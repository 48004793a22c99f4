"""A container engine's NAT rules for published ports, imitated: every connection to 127.0.0.1 on
the kernel's ephemeral ports goes to a decoy of the test's own, which accepts and never answers
(as a rule left behind for a removed container takes a port whoever listens on it)."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from harness.ports import free_port


def ephemeral_ports() -> tuple[int, int]:
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(low), int(high)


@contextmanager
def ephemeral_ports_taken() -> Iterator[None]:
    low, high = ephemeral_ports()
    decoy = socket.create_server(("127.0.0.1", free_port()))
    table = f"osb_stale_nat_{os.getpid()}"
    rules = (
        f"table ip {table} {{\n chain out {{\n  type nat hook output priority -100;\n"
        f"  ip daddr 127.0.0.1 tcp dport {low}-{high} dnat to 127.0.0.1:{decoy.getsockname()[1]}\n }}\n}}\n"
    )
    subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True)
    try:
        yield
    finally:
        subprocess.run(["nft", "delete", "table", "ip", table], check=False)
        decoy.close()
