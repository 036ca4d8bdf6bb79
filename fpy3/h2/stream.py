"""HTTP/2 request streams: the base every stream shares, and the HTTP adapter.

A stream is addressed by its id on its connection's native session; a stream C no
longer knows is a no-op there. Response bytes are copied into C buffers that live
until they are framed into the connection's output.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from ..core.flow import SEND_HIGH_WATER, Waiter
from ..core.http import HTTPCycle
from .native import CLOSED, DATA, END, FIN, FORGET, INTERNAL_ERROR, RESET, WRITABLE, ffi, lib


class Owner(Protocol):
    """What a stream needs of the HTTP/2 connection that owns it (``fpy3.h2.connection``)."""

    c: Any  # the native session
    loop: asyncio.AbstractEventLoop
    listener: Any  # its listener: header_block()
    svc: Any  # the worker's service
    streams: dict[int, Stream]

    def schedule_flush(self) -> None: ...

    def forget(self, stream: Stream) -> None: ...


class Stream:
    """What every request stream shares: its id, credit and the write path."""

    __slots__ = ("conn", "sid", "closed", "credit", "writable")

    def __init__(self, conn: Owner, sid: int):
        self.conn = conn
        self.sid = sid
        self.closed = False  # CLOSED seen (or the connection is gone)
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
            lib.fpy3_h2_consume(self.conn.c, self.sid, self.credit)
            self.credit = 0
            self.conn.schedule_flush()

    def send(self, data, flags: int):
        """Body bytes (any bytes-like object) to C, with FIN (and FORGET); an awaitable
        while more than SEND_HIGH_WATER of this stream is unsent (C reports WRITABLE
        below a quarter). The last bytes never wait: the response is complete. The
        caller checks ``closed``."""
        conn = self.conn
        n = len(data)
        if data.__class__ is not bytes and n:
            data = ffi.from_buffer(data)
        pending = lib.fpy3_h2_send(conn.c, self.sid, data, n, flags)
        conn.schedule_flush()
        return None if flags or pending <= SEND_HIGH_WATER else self.wait_writable()

    def wait_writable(self):
        if self.writable is None:
            self.writable = Waiter(self.conn.loop)
        return self.writable.wait()

    def reset(self, code: int) -> None:
        if not self.closed:
            lib.fpy3_h2_reset(self.conn.c, self.sid, code)
            self.conn.schedule_flush()


class HTTPStream(Stream):
    """One request stream: the adapter the HTTP core sees.

    Once its response is whole and its request has ended, Python is done with it: the
    last write says FORGET, C sends no more events for it, and it leaves the
    connection's table at once (no CLOSED event per request)."""

    __slots__ = ("cycle", "finished", "ended")

    def __init__(self, conn: Owner, sid: int, ended: bool = False):
        # Stream.__init__, inline: one of these per request.
        self.conn = conn
        self.sid = sid
        self.closed = False
        self.credit = 0
        self.writable = None
        self.cycle: HTTPCycle | None = None  # until the response is complete
        self.finished = False  # the whole response was handed to C
        self.ended = ended  # the request body ended (END seen)

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
            self.ended = True
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
        conn = self.conn
        block = conn.listener.header_block(headers, flags)
        n = len(data)
        if n and data.__class__ is not bytes:
            data = ffi.from_buffer(data)
        mode = self._finished() if end else 0
        pending = lib.fpy3_h2_respond(conn.c, self.sid, status, block, len(block), data, n, mode)
        conn.schedule_flush()
        return None if end or pending <= SEND_HIGH_WATER else self.wait_writable()

    def write_body(self, data, end: bool):
        if self.closed:
            return None
        if end:
            mode = self._finished()  # may close it: C is told with this call
            return self.send(data, mode)
        if not data:
            return None
        return self.send(data, 0)

    def write_trailers(self, headers):
        if self.closed:
            return None
        mode = self._finished()  # may close it: C is told with this call
        block = b"".join([b"%s\0%s\0" % pair for pair in headers])
        lib.fpy3_h2_trailers(self.conn.c, self.sid, block, len(block), mode)
        self.conn.schedule_flush()
        return None

    def abort(self) -> None:
        self.cycle = None
        # A finished response stays intact whatever the app does afterwards.
        if not self.finished:
            self.reset(INTERNAL_ERROR)

    def _finished(self) -> int:
        """The response is whole: the flags of its last write (FIN, and FORGET when the
        request ended too, as the stream then leaves the table)."""
        self.finished = True
        self.cycle = None  # the stream goes on (credit, CLOSED) while the app's task may not
        if not self.ended:
            return FIN
        self.conn.forget(self)
        return FIN | FORGET
