"""The readiness contract of `opensandbox-code-interpreter`: `CodeInterpreter.create` probes
`127.0.0.1:${JUPYTER_PORT:-44771}` inside the sandbox (`bash -c 'exec 3<>/dev/tcp/...'`) and only
returns once something accepts a connection there. Upstream has its Jupyter server listen there; we
have no server, so execd listens on that port itself once code can run, and closes every connection
it accepts at once.

The socket is bound when execd starts (port 0 picks a free port, for runtimes where sandboxes
share the host's network, and `JUPYTER_PORT` then tells commands which one) but only listens from
`open()` on: until then a probe is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Mapping

log = logging.getLogger("execd.code")

JUPYTER_PORT = "JUPYTER_PORT"
DEFAULT_JUPYTER_PORT = 44771


def jupyter_port(env: Mapping[str, str]) -> int:
    text = env.get(JUPYTER_PORT, "").strip()
    if text.isdigit() and 0 <= int(text) < 65536:
        return int(text)
    return DEFAULT_JUPYTER_PORT


class _CloseAtOnce(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class Readiness:
    def __init__(self, port: int) -> None:
        self.port = port
        self._sock: socket.socket | None = None
        self._server: asyncio.Server | None = None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
        except OSError as exc:  # e.g. the image runs its own Jupyter server there
            sock.close()
            log.warning("code interpreter readiness port 127.0.0.1:%d unavailable: %s", port, exc)
            return
        self._sock = sock
        self.port = sock.getsockname()[1]

    @property
    def listening(self) -> bool:
        return self._server is not None

    async def open(self) -> None:
        if self._sock is None or self._server is not None:
            return
        loop = asyncio.get_running_loop()
        self._sock.listen(16)
        self._server = await loop.create_server(_CloseAtOnce, sock=self._sock)
        log.info("code interpreter ready: listening on 127.0.0.1:%d", self.port)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        elif self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
