"""Which connections a listener holds, and which to close when it holds too many (pure logic).

Every listener (the server's uvicorn, execd, the task executor, the jail init, the controller's
probe and metrics server) caps its connections. A connection is *busy* while a request is being
served on it, *idle* otherwise: waiting for its first request, between keep-alive requests, or
still receiving a request's head. When a new connection arrives at the cap, the connection idle
the longest is closed to make room; if every connection is busy, the new one is refused. So idle
sockets opened without any credentials (or a slow head trickled byte by byte) can never starve
the clients that are actually being served, and the newest client always gets in while anyone
is merely idle.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

C = TypeVar("C")


class ConnectionTable(Generic[C]):
    """The connections of one listener, idle ones ordered by how long they have been idle."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the connection limit must be at least 1")
        self.limit = limit
        self._idle: OrderedDict[C, None] = OrderedDict()  # oldest first
        self._busy: set[C] = set()

    def __len__(self) -> int:
        return len(self._idle) + len(self._busy)

    def __contains__(self, conn: object) -> bool:
        return conn in self._idle or conn in self._busy

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def admit(self, conn: C) -> tuple[bool, list[C]]:
        """Register a new (idle) connection: (admitted, the connections to close to make room).

        Not admitted when the listener is full of busy connections: the caller refuses the new one.
        """
        victims: list[C] = []
        while len(self) >= self.limit and self._idle:
            oldest, _ = self._idle.popitem(last=False)
            victims.append(oldest)
        if len(self) >= self.limit:
            return False, victims
        self._idle[conn] = None
        return True, victims

    def busy(self, conn: C) -> None:
        """A request is being served on `conn`: it is not closed to make room."""
        if conn in self._idle:
            del self._idle[conn]
            self._busy.add(conn)

    def idle(self, conn: C) -> None:
        """`conn` finished a request: idle from now on (the newest idle)."""
        if conn in self._busy or conn in self._idle:
            self._busy.discard(conn)
            self._idle.pop(conn, None)
            self._idle[conn] = None

    def remove(self, conn: C) -> None:
        self._busy.discard(conn)
        self._idle.pop(conn, None)
