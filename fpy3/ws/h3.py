"""WebSocket over HTTP/3 extended CONNECT (RFC 9220): the transport adapter.

The server's SETTINGS carry SETTINGS_ENABLE_CONNECT_PROTOCOL=1, so a client may open
a request stream with ``:method CONNECT``, ``:protocol websocket``, ``:scheme``,
``:path`` and ``:authority``. Accepting answers 200 (there is no 101 and no
Sec-WebSocket-Key); after it, the stream's DATA carries WebSocket frames both ways.
A denial is an ordinary response on the stream.
"""

from __future__ import annotations

import asyncio

from fpy3._native import ffi, lib

from ..asgi.websocket import WebSocketCycle
from ..h3.protocol import DATA, END, RESET, SEND_HIGH_WATER, WRITABLE, H3Stream
from .protocol import parse_subprotocols

_RESERVED = frozenset({b"sec-websocket-protocol", b"sec-websocket-extensions"})


def start(server, conn: int, stream_id: int, http_scope: dict) -> None:
    """Turn an extended CONNECT into a websocket cycle on its stream."""
    svc = server.svc
    headers = http_scope["headers"]
    scope = {k: v for k, v in http_scope.items() if k not in ("method", "type", "scheme")}
    scope["type"] = "websocket"
    scope["scheme"] = "wss"
    scope["subprotocols"] = parse_subprotocols(headers)
    scope["extensions"] = {"websocket.http.response": {}}
    ws = H3WebSocket(server, conn, stream_id)
    server.streams[(conn, stream_id)] = ws
    limit = svc.ws.max_connections
    if limit and svc.websockets >= limit:
        body = b"too many websockets (websocket.max_connections)\n"
        ws.http.write_head(503, [(b"content-length", b"%d" % len(body))])
        ws.http.write_body(body, False)
        return
    svc.websockets += 1
    ws.counted = True
    cycle = ws.cycle = WebSocketCycle(scope, ws, server.loop, svc.ws, svc.debug)
    cycle.task = asyncio.Task(cycle.run(svc.app), loop=server.loop, eager_start=True)


def drain(server) -> None:
    """The server goes away: close every websocket with 1001."""
    for stream in list(server.streams.values()):
        if stream.is_ws and stream.cycle is not None:
            stream.cycle.server_close(1001)


class H3WebSocket:
    """The websocket cycle's view of one HTTP/3 request stream."""

    is_ws = True

    __slots__ = (
        "server",
        "conn",
        "stream",
        "cycle",
        "http",
        "credit",
        "paused",
        "waiter",
        "closed",
        "counted",
        "started_at",
    )

    def __init__(self, server, conn: int, stream: int):
        self.server = server
        self.conn = conn
        self.stream = stream
        self.cycle: WebSocketCycle | None = None
        # The denial response goes out as an ordinary HTTP/3 response.
        self.http = H3Stream(server, conn, stream, False)
        self.credit = 0  # received bytes not yet given back as flow-control credit
        self.paused = False
        self.waiter: asyncio.Future | None = None
        self.closed = False
        self.counted = False
        self.started_at = server.loop.time()

    # -- events from H3Server ------------------------------------------------------------

    def handle(self, kind: int, ev) -> None:
        if kind == DATA:
            n = ev.len
            self.credit += n
            cycle = self.cycle
            if cycle is not None:
                cycle.feed_data(ev.data, n)  # C copies it into the parser's buffer
                if cycle.proto is None:
                    return  # not accepted yet: the stream window bounds what waits
            if not self.paused:
                self._give_credit()
        elif kind == END:
            # The client ended its side: no more frames can come.
            self._lost()
        elif kind == WRITABLE:
            self.wake()
            self.http.wake()
        else:  # RESET or CLOSED
            if kind != RESET:
                self.closed = True
                self.http.closed = True
            self._lost()
            self.wake()
            self.http.wake()

    def _lost(self) -> None:
        if self.counted:
            self.counted = False
            self.server.svc.websockets -= 1
        if self.cycle is not None:
            self.cycle.feed_disconnect()

    def _give_credit(self) -> None:
        if self.credit and not self.closed:
            lib.fpy3_h3_consume(self.server.srv, self.conn, self.stream, self.credit)
            self.credit = 0
            self.server.schedule_flush()

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- what the cycle calls ---------------------------------------------------------------

    def accept(self, subprotocol, headers, extensions: bytes) -> None:
        server = self.server
        fields = []
        if subprotocol:
            fields.append((b"sec-websocket-protocol", subprotocol.encode("latin-1")))
        if extensions:
            fields.append((b"sec-websocket-extensions", extensions))
        fields += [(n, v) for n, v in headers if n.lower() not in _RESERVED]
        block, _ = server.header_block(fields)
        if not self.closed:
            lib.fpy3_h3_respond(server.srv, self.conn, self.stream, 200, block, len(block), 0)
            self._give_credit()  # for bytes that came before the accept
            server.schedule_flush()
        svc = server.svc
        svc.requests_served += 1
        if server.access_log is not None:
            server.access_log.log_request(
                {**self.cycle.scope, "method": "CONNECT"},
                200,
                0,
                server.loop.time() - self.started_at,
            )

    def respond(self, status: int, headers) -> None:
        self.http.write_head(status, headers)

    def respond_body(self, body: bytes, more: bool):
        return self.http.write_body(body, more)

    def write(self, frames: list[bytes]):
        if self.closed:
            return None
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        server = self.server
        pending = lib.fpy3_h3_send(server.srv, self.conn, self.stream, data, len(data), 0)
        server.schedule_flush()
        if pending <= SEND_HIGH_WATER:
            return None  # C sends WRITABLE once it falls to a quarter of the mark
        waiter = self.waiter
        if waiter is None:
            waiter = self.waiter = server.loop.create_future()
        return waiter

    def pause_reading(self) -> None:
        self.paused = True  # credit is held back: the client's window closes

    def resume_reading(self) -> None:
        self.paused = False
        self._give_credit()

    def finish(self) -> None:
        if not self.closed:
            lib.fpy3_h3_send(self.server.srv, self.conn, self.stream, ffi.NULL, 0, 1)
            self.server.schedule_flush()

    def abort(self) -> None:
        if not self.closed:
            lib.fpy3_h3_reset(
                self.server.srv, self.conn, self.stream, lib.FPY3_H3_REQUEST_CANCELLED
            )
            self.server.schedule_flush()
        self._lost()

    def cycle_done(self, cycle: WebSocketCycle) -> None:
        pass
