"""WebSocket over HTTP/2 extended CONNECT (RFC 8441): the transport adapter.

The server's SETTINGS carry SETTINGS_ENABLE_CONNECT_PROTOCOL=1, so a client may open
a stream with ``:method CONNECT``, ``:protocol websocket``, ``:scheme``, ``:path`` and
``:authority`` (nghttp2 checks the pseudo-header fields). Accepting answers 200
(there is no 101 and no Sec-WebSocket-Key); after it, the stream's DATA carries
WebSocket frames both ways. A denial is an ordinary response on the stream, through
the HTTP core.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ..core.websocket import WebSocketCycle
from ..wsproto import open_protocol
from .native import CANCEL, CLOSED, DATA, END, FIN, WRITABLE, ffi, lib
from .stream import HTTPStream, Stream

if TYPE_CHECKING:
    from .connection import H2Connection

_TOO_MANY = b"too many websockets (websocket.max_connections)\n"


def start(conn: H2Connection, sid: int, scope: dict) -> asyncio.Task | None:
    """Turn an extended CONNECT into a websocket cycle on its stream."""
    svc = conn.svc
    ws = WebSocketStream(conn, sid)
    conn.streams[sid] = ws
    limit = svc.ws.max_connections
    if limit and svc.websockets >= limit:
        ws.http_stream.write_head(
            503, [(b"content-length", b"%d" % len(_TOO_MANY))], 0, _TOO_MANY, True
        )
        return None
    svc.websockets += 1
    ws.counted = True
    cycle = ws.cycle = WebSocketCycle(scope, ws, svc, svc.ws, open_protocol)
    return svc.spawn(cycle.run())


class WebSocketStream(Stream):
    """The websocket cycle's view of one HTTP/2 stream."""

    __slots__ = ("cycle", "http_stream", "paused", "counted")

    method = "CONNECT"

    def __init__(self, conn: H2Connection, sid: int):
        super().__init__(conn, sid)
        self.cycle: WebSocketCycle | None = None
        # A denial goes out as an ordinary HTTP/2 response on the same stream.
        self.http_stream = HTTPStream(conn, sid)
        self.paused = False
        self.counted = False

    def handle(self, kind: int, ev) -> None:
        if kind == DATA:
            n = ev.len
            self.credit += n
            cycle = self.cycle
            if cycle is not None:
                cycle.feed_data(ffi.buffer(ev.data, n))  # read before this returns
                if cycle.proto is None:
                    return  # not accepted yet: the stream window bounds what waits
            if not self.paused:
                self.give_credit()
        elif kind == END:
            # The client ended its side: no more frames can come.
            self._lost()
        elif kind == WRITABLE:
            self.wake_writer()
            self.http_stream.wake_writer()
        else:  # RESET or CLOSED
            if kind == CLOSED:
                self.closed = True
                self.http_stream.closed = True
            self._lost()
            self.wake_writer()
            self.http_stream.wake_writer()

    def _lost(self) -> None:
        if self.counted:
            self.counted = False
            self.conn.svc.websockets -= 1
        if self.cycle is not None:
            self.cycle.feed_disconnect()

    # -- what the cycle calls ---------------------------------------------------------------

    def accept(self, headers: list, flags: int) -> None:
        if self.closed:
            return
        conn = self.conn
        block = conn.listener.header_block(headers, flags)
        lib.fpy3_h2_respond(conn.c, self.sid, 200, block, len(block), ffi.NULL, 0, 0)
        self.give_credit()  # for bytes that came before the accept
        conn.schedule_flush()

    def http(self) -> HTTPStream:
        return self.http_stream

    def write(self, frames: list[bytes]):
        if self.closed:
            return None
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        return self.send(data, 0)

    def pause_reading(self) -> None:
        self.paused = True  # credit is held back: the client's window closes

    def resume_reading(self) -> None:
        self.paused = False
        self.give_credit()

    def finish(self) -> None:
        if not self.closed:
            self.send(b"", FIN)

    def abort(self) -> None:
        self.reset(CANCEL)
        self._lost()

    def cycle_done(self, cycle: WebSocketCycle) -> None:
        pass


def drain(conn: H2Connection) -> None:
    """The server goes away: close every websocket with 1001."""
    for stream in list(conn.streams.values()):
        if isinstance(stream, WebSocketStream) and stream.cycle is not None:
            stream.cycle.server_close(1001)
