"""uvicorn's h11 protocol with a total deadline for reading each request (headers + body).

uvicorn bounds the idle time between requests (``timeout_keep_alive``) and the size of an
incomplete header block (``h11_max_incomplete_event_size``), but not how long a client takes
to send one: a client trickling one header line every few seconds holds its connection
forever. Here a timer starts when the connection opens (and at the first byte of each later
request on a kept-alive connection) and stops once the request's last body byte is in; when
it fires the connection is closed. It never runs while the app generates or sends.
"""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

_READING = (h11.IDLE, h11.SEND_BODY)  # the client's states before its request is complete


class DeadlineH11Protocol(H11Protocol):
    """``H11Protocol`` + ``read_deadline_s`` (set by ``protocol_with_deadline``)."""

    read_deadline_s: float = 30.0
    _read_timer = None

    def connection_made(self, transport):  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._read_timer is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the next request on a kept-alive connection begins
        super().data_received(data)
        if self.conn.their_state not in _READING:
            self._disarm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self):
        self._read_timer = self.loop.call_later(self.read_deadline_s, self._expired)

    def _disarm(self):
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _expired(self):
        self._read_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def protocol_with_deadline(read_deadline_s: float) -> type:
    """The protocol class to give ``uvicorn.Config(http=...)``."""
    return type(
        "DeadlineH11Protocol", (DeadlineH11Protocol,), {"read_deadline_s": float(read_deadline_s)}
    )
