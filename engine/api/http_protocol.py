"""uvicorn's HTTP protocol with a deadline for reading each request.

uvicorn closes an idle keep-alive connection (`timeout_keep_alive`) but has no deadline for a
request that arrives slowly: a client that connects and sends nothing, or dribbles its headers
or body a byte at a time ("slowloris"), holds the connection and its buffers for as long as it
likes.  This adds one: from the moment a connection opens, and again from the moment a response
ends on a keep-alive connection, the client has `read_timeout_s` to deliver a whole request
(headers and body); otherwise the connection is closed (an app still waiting for the body sees
`http.disconnect`).  Writing the response is not limited here: generation time is bounded by
`--request-timeout`.

Invariant: the deadline is armed whenever the connection waits for a request that has not been
read to its end, and cancelled once it has been.  A request counts as read when uvicorn has started
a new request cycle (its headers are parsed) whose `more_body` is False (its body is complete).
h11 and httptools both keep that state under the same names.
"""

from __future__ import annotations

import asyncio
import logging

import uvicorn.config
from uvicorn.importer import import_from_string

logger = logging.getLogger(__name__)


def protocol_with_read_deadline(read_timeout_s: float, http: str = "auto") -> type[asyncio.Protocol]:
    """The `http` protocol class uvicorn would pick, closing connections that take longer than
    `read_timeout_s` to send a request."""
    base: type = import_from_string(uvicorn.config.HTTP_PROTOCOLS[http])

    class ReadDeadlineProtocol(base):  # type: ignore[misc, valid-type]
        _read_deadline: asyncio.TimerHandle | None = None
        _cycle_when_armed: object = None

        def connection_made(self, transport) -> None:  # noqa: ANN001
            super().connection_made(transport)
            self._arm_read_deadline()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._disarm_if_request_read()

        def on_response_complete(self) -> None:
            # Arm before uvicorn resumes reading: it may parse a pipelined request at once.
            self._arm_read_deadline()
            super().on_response_complete()
            if self.transport.is_closing():
                self._cancel_read_deadline()
            else:
                self._disarm_if_request_read()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_read_deadline()
            super().connection_lost(exc)

        def _arm_read_deadline(self) -> None:
            self._cancel_read_deadline()
            self._cycle_when_armed = self.cycle
            self._read_deadline = self.loop.call_later(read_timeout_s, self._on_read_deadline)

        def _disarm_if_request_read(self) -> None:
            cycle = self.cycle
            if cycle is not None and cycle is not self._cycle_when_armed and not cycle.more_body:
                self._cancel_read_deadline()

        def _cancel_read_deadline(self) -> None:
            if self._read_deadline is not None:
                self._read_deadline.cancel()
                self._read_deadline = None

        def _on_read_deadline(self) -> None:
            self._read_deadline = None
            if not self.transport.is_closing():
                logger.info("Closing a connection that sent no whole request within %g s", read_timeout_s)
                self.transport.close()

    ReadDeadlineProtocol.__name__ = f"ReadDeadline{base.__name__}"
    return ReadDeadlineProtocol
