"""What a sandbox under a network policy can reach, asked from inside it with bash only (the test
image has no Python): `getent` resolves through the sandbox's resolv.conf, /dev/tcp connects to the
fake internet's HTTP servers (harness/fake_internet.py), /dev/udp sends a DNS query to any resolver
and port of the sandbox's choosing (what a rewritten resolv.conf or a resolver of its own would do).
"""

from __future__ import annotations

from opensandbox import Sandbox


async def sh(sb: Sandbox, script: str) -> str:
    execution = await sb.commands.run(script)
    return "".join(m.text for m in execution.logs.stdout).strip()


async def resolves(sb: Sandbox, name: str) -> str:
    """The address the sandbox's resolver gives for `name`, or "" (NXDOMAIN or no answer)."""
    return await sh(sb, f"getent ahostsv4 {name} | head -n1 | cut -d' ' -f1")


async def fetch(sb: Sandbox, address: str, port: int = 80) -> str:
    """What the fake internet's HTTP server on `address` says it is (`host=NAME`), or "failed"."""
    script = (
        f'r=$(timeout 5 bash -c \'exec 3<>/dev/tcp/{address}/{port} && printf "GET / HTTP/1.0\\r\\n\\r\\n" >&3 '
        '&& cat <&3\' 2>/dev/null | tail -n1); echo "${r:-failed}"'
    )
    return await sh(sb, script)


def dns_query(name: str) -> str:
    """A DNS query for `name`'s A record, as printf escapes."""
    labels = "".join(f"\\x{len(label):02x}{label}" for label in name.split("."))
    return f"\\x12\\x34\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00{labels}\\x00\\x00\\x01\\x00\\x01"


async def ask_resolver(sb: Sandbox, resolver: str, port: int, name: str) -> str:
    """The rcode and answer count of a query the sandbox sends itself over UDP to resolver:port:
    "NOERROR 1", "NXDOMAIN 0", or "no answer"."""
    script = (
        f'timeout 4 bash -c \'exec 3<>/dev/udp/{resolver}/{port} && printf "{dns_query(name)}" >&3 '
        "&& timeout 3 dd bs=512 count=1 <&3 2>/dev/null' | od -An -v -tu1 | tr -s ' \\n' ' '"
    )
    octets = [int(x) for x in (await sh(sb, script)).split()]
    if len(octets) < 12:
        return "no answer"
    rcode = {0: "NOERROR", 3: "NXDOMAIN"}.get(octets[3] & 0xF, f"rcode{octets[3] & 0xF}")
    return f"{rcode} {octets[6] * 256 + octets[7]}"
