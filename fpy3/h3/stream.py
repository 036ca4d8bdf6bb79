"""HTTP/3 request streams: the base every stream shares, and the HTTP adapter.

A stream is addressed by (connection handle, stream id); the handles are checked in
C, so a stream whose connection is gone is a no-op there. Response bytes are copied
into C buffers that live until the peer acknowledges them.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from ..core.flow import SEND_HIGH_WATER, Waiter
from ..core.http import HTTPCycle
from .native import CLOSED, DATA, END, H3_INTERNAL_ERROR, RESET, WRITABLE, ffi, lib


class Owner(Protocol):
    """What a stream needs of the HTTP/3 server that owns it (``fpy3.h3.server``)."""

    srv: Any  # the native server; None once freed
    loop: asyncio.AbstractEventLoop
    svc: Any  # the worker's service
    streams: dict[tuple[int, int], Stream]

    def header_block(self, headers, flags: int) -> bytes: ...

    def schedule_flush(self) -> None: ...


class Stream:
    """What every request stream shares: its address, credit and the write path."""

    __slots__ = ("server", "conn", "stream", "closed", "credit", "writable")

    def __init__(self, server: Owner, conn: int, stream: int):
        self.server = server
        self.conn = conn
        self.stream = stream
        self.closed = False  # CLOSED seen: the stream is gone in C
        self.credit = 0  # received bytes not yet given back as flow-control credit
        self.writable: Waiter | None = None  # made when send() first has to wait

    def wake_writer(self) -> None:
        if self.writable is not None:
            self.writable.wake()

    def handle(self, kind: int, ev) -> None:
        """One event of a batch for this stream."""
        raise NotImplementedError

    def give_credit(self) -> None:
        if self.credit and not self.closed:
            lib.fpy3_h3_consume(self.server.srv, self.conn, self.stream, self.credit)
            self.credit = 0
            self.server.schedule_flush()

    def send(self, data, fin: bool):
        """Body bytes (any bytes-like object) to C; an awaitable while the peer has more
        than SEND_HIGH_WATER unacknowledged (C reports WRITABLE below a quarter)."""
        if self.closed:
            return None
        server = self.server
        n = len(data)
        if data.__class__ is not bytes and n:
            data = ffi.from_buffer(data)
        pending = lib.fpy3_h3_send(server.srv, self.conn, self.stream, data, n, fin)
        server.schedule_flush()
        if pending <= SEND_HIGH_WATER:
            return None
        if self.writable is None:
            self.writable = Waiter(server.loop)
        return self.writable.wait()

    def reset(self, code: int) -> None:
        if not self.closed:
            lib.fpy3_h3_reset(self.server.srv, self.conn, self.stream, code)
            self.server.schedule_flush()


class HTTPStream(Stream):
    """One request stream: the adapter the HTTP core sees."""

    __slots__ = ("cycle", "finished")

    def __init__(self, server: Owner, conn: int, stream: int):
        # Stream.__init__, inline: one of these per request.
        self.server = server
        self.conn = conn
        self.stream = stream
        self.closed = False
        self.credit = 0
        self.writable = None
        self.cycle: HTTPCycle | None = None  # until the response is complete
        self.finished = False  # the whole response was handed to C

    def handle(self, kind: int, ev) -> None:
        cycle = self.cycle
        if kind == DATA:
            n = ev.len
            self.credit += n
            if cycle is not None:
                cycle.feed_body(ffi.unpack(ffi.cast("char *", ev.data), n), True)
            else:
                self.give_credit()  # nobody reads it any more: give the window back
        elif kind == END:
            if cycle is not None:
                cycle.feed_body(b"", False)
        elif kind == WRITABLE:
            self.wake_writer()
        elif kind == RESET or kind == CLOSED:
            if kind == CLOSED:
                self.closed = True
            if cycle is not None:
                cycle.feed_disconnect()
            if self.writable is not None:
                self.writable.wake()

    # -- the HTTP adapter -----------------------------------------------------------------

    def want_body(self) -> None:
        # The app took every queued chunk: give that much window back to the peer.
        self.give_credit()

    def write_head(self, status: int, headers, flags: int, data, end: bool):
        if self.closed:
            return None
        server = self.server
        block = server.header_block(headers, flags)
        only_head = end and not data
        rv = lib.fpy3_h3_respond(
            server.srv, self.conn, self.stream, status, block, len(block), only_head
        )
        if end:
            self.finished = True
            self.cycle = None  # the stream goes on (acks, CLOSED) while the app's task may not
        if rv < 0:
            server.schedule_flush()
            return None
        if only_head:
            server.schedule_flush()
            return None
        return self.send(data, end)

    def write_body(self, data, end: bool):
        if self.closed:
            return None
        if end:
            self._finished()
        if not data and not end:
            return None
        return self.send(data, end)

    def write_trailers(self, headers):
        if self.closed:
            return None
        self._finished()
        server = self.server
        block = b"".join([b"%s\0%s\0" % pair for pair in headers])
        lib.fpy3_h3_trailers(server.srv, self.conn, self.stream, block, len(block))
        server.schedule_flush()
        return None

    def abort(self) -> None:
        self.cycle = None
        # A finished response stays intact whatever the app does afterwards.
        if not self.finished:
            self.reset(H3_INTERNAL_ERROR)

    def _finished(self) -> None:
        self.finished = True
        self.cycle = None  # the stream goes on (acks, CLOSED) while the app's task may not
