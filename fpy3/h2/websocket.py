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

from ..core.websocket import StreamWebSocket, WebSocketCycle, close_stream_websockets
from ..wsproto import open_protocol
from .native import CANCEL, CLOSED, DATA, END, FIN, WRITABLE, ffi, lib
from .stream import HTTPStream, Owner, Stream


def start(conn: Owner, sid: int, scope: dict) -> asyncio.Task | None:
    """Turn an extended CONNECT into a websocket cycle on its stream."""
    ws = WebSocketStream(conn, sid)
    conn.streams[sid] = ws
    return ws.start(scope, open_protocol)


class WebSocketStream(Stream, StreamWebSocket):
    """The websocket cycle's view of one HTTP/2 stream."""

    __slots__ = ("svc", "cycle", "http_stream", "paused", "counted")

    def __init__(self, conn: Owner, sid: int):
        super().__init__(conn, sid)
        self.svc = conn.svc
        self.cycle: WebSocketCycle | None = None
        self.http_stream = HTTPStream(conn, sid)
        self.paused = False
        self.counted = False

    def handle(self, kind: int, ev) -> None:
        if kind == DATA:
            self.on_data(ffi.buffer(ev.data, ev.len), ev.len)  # read before this returns
        elif kind == END:
            self.on_end()
        elif kind == WRITABLE:
            self.on_writable()
        else:  # RESET or CLOSED
            self.on_gone(kind == CLOSED)

    def accept(self, headers: list, flags: int) -> None:
        if self.closed:
            return
        conn = self.conn
        block = conn.listener.header_block(headers, flags)
        lib.fpy3_h2_respond(conn.c, self.sid, 200, block, len(block), ffi.NULL, 0, 0)
        self.give_credit()  # for bytes that came before the accept
        conn.schedule_flush()

    def send_frames(self, data: bytes):
        return self.send(data, 0)

    def send_end(self) -> None:
        self.send(b"", FIN)

    def cancel(self) -> None:
        self.reset(CANCEL)


def drain(conn: Owner) -> None:
    """The server goes away: close every websocket with 1001."""
    close_stream_websockets(conn.streams.values())
