"""WebSocket over HTTP/3 extended CONNECT (RFC 9220): the transport adapter.

The server's SETTINGS carry SETTINGS_ENABLE_CONNECT_PROTOCOL=1, so a client may open
a request stream with ``:method CONNECT``, ``:protocol websocket``, ``:scheme``,
``:path`` and ``:authority``. Accepting answers 200 (there is no 101 and no
Sec-WebSocket-Key); after it, the stream's DATA carries WebSocket frames both ways.
A denial is an ordinary response on the stream, through the HTTP core.
"""

from __future__ import annotations

from ..core.websocket import StreamWebSocket, WebSocketCycle, close_stream_websockets
from ..wsproto import open_protocol
from .native import CLOSED, DATA, END, H3_REQUEST_CANCELLED, WRITABLE, ffi, lib
from .stream import HTTPStream, Owner, Stream


def start(server: Owner, conn: int, stream_id: int, scope: dict) -> None:
    """Turn an extended CONNECT into a websocket cycle on its stream."""
    ws = WebSocketStream(server, conn, stream_id)
    server.streams[(conn, stream_id)] = ws
    ws.start(scope, open_protocol)


class WebSocketStream(Stream, StreamWebSocket):
    """The websocket cycle's view of one HTTP/3 request stream."""

    __slots__ = ("svc", "cycle", "http_stream", "paused", "counted")

    def __init__(self, server: Owner, conn: int, stream: int):
        super().__init__(server, conn, stream)
        self.svc = server.svc
        self.cycle: WebSocketCycle | None = None
        self.http_stream = HTTPStream(server, conn, stream)
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
        server = self.server
        block = server.header_block(headers, flags)
        lib.fpy3_h3_respond(server.srv, self.conn, self.stream, 200, block, len(block), 0)
        self.give_credit()  # for bytes that came before the accept
        server.schedule_flush()

    def send_frames(self, data: bytes):
        return self.send(data, False)

    def send_end(self) -> None:
        self.send(b"", True)

    def cancel(self) -> None:
        self.reset(H3_REQUEST_CANCELLED)


def drain(server: Owner) -> None:
    """The server goes away: close every websocket with 1001."""
    close_stream_websockets(server.streams.values())
