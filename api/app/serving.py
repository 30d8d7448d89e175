"""How `lmq serve` runs the API under uvicorn, with limits that slow or idle clients cannot outlast.

uvicorn closes an idle keep-alive connection (timeout_keep_alive), bounds a
request's head (h11_max_incomplete_event_size) and answers 503 past
limit_concurrency connections; but it waits forever for a request whose head
or body trickles in, so a few hundred such connections (a slow-loris client)
would sit at the concurrency limit and lock everyone else out. ReadDeadline
gives every request a deadline to arrive by, head and body together, and
closes a connection that misses it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeLimits:
    request_timeout_s: float = 10.0  # to read one request, head and body
    keep_alive_s: int = 5  # idle time between requests on one connection
    max_connections: int = 1000  # open connections and running requests; more get 503
    max_head_bytes: int = 16 * 1024  # request line and headers
    backlog: int = 2048  # connections waiting to be accepted


def serve(app, host: str, port: int, log_level: str, limits: ServeLimits) -> None:
    import uvicorn

    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=read_deadline_protocol(limits.request_timeout_s),
        timeout_keep_alive=limits.keep_alive_s,
        limit_concurrency=limits.max_connections,
        h11_max_incomplete_event_size=limits.max_head_bytes,
        backlog=limits.backlog,
    )


def read_deadline_protocol(request_timeout_s: float):
    """uvicorn's HTTP/1.1 protocol, plus a deadline by which each request must have been read
    (made here, not at import, so that the CLI loads uvicorn only to serve)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class ReadDeadline(H11Protocol):
        deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.deadline is None and self.conn.their_state is h11.IDLE:
                self._arm()  # the next request on a kept-alive connection starts its own clock
            super().data_received(data)
            if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
                self._disarm()  # read in full (or the connection is ending): the app has it now

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self.deadline = self.loop.call_later(request_timeout_s, self._missed)

        def _disarm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def _missed(self) -> None:
            self.deadline = None
            if not self.transport.is_closing():
                self.logger.info("closing a connection whose request did not arrive in %ss", request_timeout_s)
                self.transport.close()

    return ReadDeadline
