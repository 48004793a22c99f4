"""A local sandbox's network policy, enforced by the server itself in the jail's network namespace.

The jail's namespace belongs to the host's user namespace, so nothing in the jail holds a
capability over it; the server (root) does. No sidecar process: the same enforcer the egress
sidecar runs (egress/), in the server's event loop, with its nftables context, its DNS filter's
sockets and its egress API's listener made inside the jail's namespace (a socket stays in the
namespace it was made in):

- the ruleset is loaded before the jail's entrypoint is started (at claim time: a warm jail has
  run nothing of the user's yet);
- the DNS filter listens on the jail's 127.0.0.1:15353 (the ruleset redirects every port-53 query
  there) and asks the upstream resolvers from the server's own namespace (`egress.upstreamDns`,
  else this host's /etc/resolv.conf);
- the egress API listens on the jail's 127.0.0.1:18080, reached from outside through the port
  forwarding every port of a jail has (its token comes with the endpoint).

The policy in force is kept in `<sandbox dir>/egress.json`, so a restarted server finds it again.
The kernel keeps enforcing the ruleset while the server is down; lookups fail then (closed).
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path
from typing import Any

from opensandbox_platform.api.labels import EGRESS_PORT
from opensandbox_platform.daemon.http import HttpServer
from opensandbox_platform.egress import policy as P
from opensandbox_platform.egress.app import EgressApp
from opensandbox_platform.egress.dns import DnsFilter, bind_sockets, parse_upstream, upstreams_from_resolv_conf
from opensandbox_platform.egress.enforcer import Enforcer, Limits
from opensandbox_platform.egress.nft import Nft, in_namespace
from opensandbox_platform.server.config import EgressSection

STATE_FILE = "egress.json"


class JailEgress:
    def __init__(self, enforcer: Enforcer, dns_filter: DnsFilter, api: HttpServer) -> None:
        self.enforcer = enforcer
        self.dns_filter = dns_filter
        self.api = api

    @classmethod
    async def start(
        cls, netns_fd: int, policy: dict[str, Any], token: str, settings: EgressSection, directory: Path
    ) -> JailEgress:
        """Enforce `policy` (or, after a restart, the one `directory` recorded) in the namespace."""
        limits = Limits(max_rules=settings.max_rules, min_ttl=settings.min_ttl_seconds)
        upstreams = [parse_upstream(u) for u in settings.upstream_dns] or upstreams_from_resolv_conf()
        enforcer = Enforcer(Nft(netns_fd), P.Layout(), limits, directory / STATE_FILE)
        try:
            dns_filter = DnsFilter(enforcer, upstreams)
            enforcer.resolve = dns_filter.resolve
            await enforcer.apply(enforcer.load_state() or P.parse_policy(policy, settings.max_rules))
            udp, tcp, listener = in_namespace(netns_fd, _sockets)
        except BaseException:
            enforcer.close()
            raise
        try:
            await dns_filter.serve(udp, tcp)
            api = HttpServer(EgressApp(enforcer, token).dispatch)
            await api.start("", 0, sock=listener)
        except BaseException:
            for sock in (udp, tcp, listener):
                sock.close()
            await dns_filter.close()
            enforcer.close()
            raise
        return cls(enforcer, dns_filter, api)

    async def close(self) -> None:
        """Stop serving (the namespace and its rules go with the jail)."""
        await self.api.close()
        await self.dns_filter.close()
        self.enforcer.close()


def _sockets() -> tuple[socket.socket, socket.socket, socket.socket]:
    udp, tcp = bind_sockets("127.0.0.1", P.Layout().dns_port)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", EGRESS_PORT))
        listener.listen(128)
        listener.setblocking(False)
    except OSError:
        for sock in (udp, tcp, listener):
            with contextlib.suppress(OSError):
                sock.close()
        raise
    return udp, tcp, listener
