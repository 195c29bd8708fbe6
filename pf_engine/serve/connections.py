"""pf-serve's connections: idle sockets cannot hold the server (issue 36's slowloris).

uvicorn's own connection limit (``limit_concurrency``) counts every open socket, also those that
never sent a request, and answers 503 to everyone once it is reached; a socket that sends nothing
is never closed (``timeout_keep_alive`` starts only after a response).  So 256 idle sockets
denied service indefinitely.  ``guarded(header_timeout_s, max_connections)`` is uvicorn's h11
protocol (pass it as ``uvicorn.run(..., http=...)``) with two guards:

- a header timeout: a connection whose request head is not complete ``header_timeout_s`` after
  it opened (or after its last response, when keep-alive is longer) is closed, as nginx's
  ``client_header_timeout`` (60 s by default there; 5 s here, uvicorn's keep-alive default);
- a connection limit that sheds idle sockets first: when ``max_connections`` are open, a new
  connection closes the one idle the longest (no request in flight) to make room, and is itself
  refused only when every open connection has a request in flight.  The default, 4096, is far
  above a model server's concurrent requests (the queue bound, app.Server.admit, limits those);
  nginx's ``worker_connections`` is 512 by default, uvicorn sets no limit.
"""
from __future__ import annotations

import itertools

from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 4096


class GuardedH11(H11Protocol):
    """uvicorn's H11Protocol with the header timeout and the idle-first limit (module doc)."""

    header_timeout_s = HEADER_TIMEOUT_S
    max_connections = MAX_CONNECTIONS

    _arrivals = itertools.count()            # breaks ties of idle_since: the clock can be coarse

    def connection_made(self, transport) -> None:
        self.idle_since, self.arrival = self.loop.time(), next(self._arrivals)
        self._head_timer = None
        if len(self.connections) >= self.max_connections and not self._shed_one():
            transport.close()                      # every connection is busy: refuse this one
            return
        super().connection_made(transport)
        self._arm()

    @property
    def busy(self) -> bool:
        """A request of this connection is being read or answered."""
        return self.cycle is not None and not self.cycle.response_complete

    def _shed_one(self) -> bool:
        """Close the connection idle the longest; False when none is idle."""
        idle = [c for c in self.connections if not getattr(c, "busy", True)]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: (c.idle_since, c.arrival))
        self.connections.discard(oldest)
        oldest.transport.close()
        return True

    def _arm(self) -> None:
        """Start the header timer: the next request head must be complete within it."""
        self._disarm()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if not self.busy and not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.busy:                              # a request head arrived: its cycle runs
            self._disarm()

    def on_response_complete(self) -> None:
        self.idle_since = self.loop.time()
        super().on_response_complete()
        if not self.transport.is_closing() and not self.busy:
            self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


def guarded(header_timeout_s: float = HEADER_TIMEOUT_S,
            max_connections: int = MAX_CONNECTIONS) -> type[GuardedH11]:
    """GuardedH11 with these settings, for ``uvicorn.run(app, http=guarded(...))``."""
    return type("GuardedH11", (GuardedH11,), {"header_timeout_s": header_timeout_s,
                                              "max_connections": max_connections})
