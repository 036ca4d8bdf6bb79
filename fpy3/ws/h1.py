"""WebSocket over HTTP/1.1 Upgrade (RFC 6455, section 4): the transport adapter.

``H1Connection`` hands a GET with ``Upgrade: websocket`` to ``start``. Until the
app accepts, the connection is an HTTP exchange (a denial is an ordinary response
and the connection closes after it). After the 101, the connection's bytes go to
the websocket cycle and its frames go straight to the transport.
"""

from __future__ import annotations

import asyncio

from ..asgi.http import ASGI_VERSION
from ..asgi.websocket import WebSocketCycle
from .protocol import accept_key, parse_subprotocols, valid_key

_EXTENSIONS = {"websocket.http.response": {}}
_RESERVED = frozenset(
    {b"upgrade", b"connection", b"sec-websocket-accept", b"sec-websocket-extensions"}
)


def _header(headers, name: bytes):
    for n, v in headers:
        if n == name:
            return v
    return None


def start(conn, raw_path: bytes, query: bytes, path: str, headers: list, clen: int, flags: int):
    """Validate the handshake and start the app's websocket cycle on ``conn``."""
    svc = conn.svc
    if clen > 0 or flags & 2:  # CHUNKED
        conn._reject(400, "websocket handshake with a request body")
        return
    version = _header(headers, b"sec-websocket-version")
    if version is None or version.strip() != b"13":
        conn.transport.write(
            b"HTTP/1.1 426 Upgrade Required\r\n"
            + svc.header_prefix
            + b"sec-websocket-version: 13\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        )
        conn._close()
        return
    key = _header(headers, b"sec-websocket-key")
    if not valid_key(key):
        conn._reject(400, "missing or invalid Sec-WebSocket-Key")
        return
    limit = svc.ws.max_connections
    if limit and svc.websockets >= limit:
        conn._reject(503, "too many websockets (websocket.max_connections)")
        return
    root = svc.root_path
    scope = {
        "type": "websocket",
        "asgi": ASGI_VERSION.copy(),
        "http_version": "1.1",
        "scheme": "wss" if conn.scheme == "https" else "ws",
        "server": conn.server,
        "client": conn.client,
        "root_path": root,
        "path": root + path if root else path,
        "raw_path": raw_path,
        "query_string": query,
        "headers": headers,
        "subprotocols": parse_subprotocols(headers),
        "state": svc.state.copy(),
        "extensions": {k: dict(v) for k, v in _EXTENSIONS.items()},
    }
    adapter = conn.ws = H1WebSocket(conn, key.strip())
    conn.keep_alive = False  # whatever happens, this connection ends with the exchange
    svc.websockets += 1
    adapter.counted = True
    cycle = conn.cycle = WebSocketCycle(scope, adapter, conn.loop, svc.ws, svc.debug)
    adapter.cycle = cycle
    cycle.task = asyncio.Task(cycle.run(svc.app), loop=conn.loop, eager_start=True)


class H1WebSocket:
    """The websocket cycle's view of one HTTP/1.1 connection."""

    __slots__ = ("conn", "key", "cycle", "counted", "started_at", "upgraded")

    def __init__(self, conn, key: bytes):
        self.conn = conn
        self.key = key
        self.cycle: WebSocketCycle | None = None
        self.counted = False
        self.upgraded = False  # the 101 is written: the connection's bytes are frames
        self.started_at = conn.loop.time()

    def accept(self, subprotocol, headers, extensions: bytes) -> None:
        conn = self.conn
        svc = conn.svc
        parts = [
            b"HTTP/1.1 101 Switching Protocols\r\n",
            svc.header_prefix,
            b"upgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: ",
            accept_key(self.key),
            b"\r\n",
        ]
        if subprotocol:
            parts += (b"sec-websocket-protocol: ", subprotocol.encode("latin-1"), b"\r\n")
        if extensions:
            parts += (b"sec-websocket-extensions: ", extensions, b"\r\n")
        for name, value in headers:
            lname = name.lower()
            if lname in _RESERVED or (lname == b"sec-websocket-protocol" and subprotocol):
                continue
            if b"\n" in name + value or b"\r" in name + value:
                raise RuntimeError(f"invalid response header {name!r}: {value!r}")
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        conn.transport.write(b"".join(parts))
        self.upgraded = True
        svc.requests_served += 1
        if svc.access_log is not None:
            scope = self.cycle.scope
            svc.access_log.log_request(
                {**scope, "method": "GET"}, 101, 0, conn.loop.time() - self.started_at
            )
        # Frames the client sent right behind its handshake.
        buf, conn.buf = conn.buf, b""
        if conn.reading_paused:
            conn._resume_reading()
        if buf:
            self.cycle.feed_data(buf)

    def respond(self, status: int, headers) -> None:
        self.conn.write_head(status, headers)

    def respond_body(self, body: bytes, more: bool):
        conn = self.conn
        if conn.cycle is not None:
            conn.cycle.scope.setdefault("method", "GET")  # for the access log
        return conn.write_body(body, more)

    def write(self, frames: list[bytes]):
        conn = self.conn
        if conn.closed:
            return None
        if len(frames) == 1:
            conn.transport.write(frames[0])
        elif len(frames[1]) < 4096:
            conn.transport.write(b"".join(frames))
        else:
            conn.transport.writelines(frames)
        return conn.write_waiter()

    def pause_reading(self) -> None:
        if not self.conn.reading_paused and not self.conn.closed:
            self.conn._pause_reading()

    def resume_reading(self) -> None:
        self.conn._resume_reading()

    def finish(self) -> None:
        # transport.close() sends what is buffered first; the server closes TCP first
        # (RFC 6455 7.1.1).
        self.conn._close()

    def abort(self) -> None:
        conn = self.conn
        if not conn.closed:
            conn.closed = True
            conn.svc.forget(conn)
            conn.transport.abort()
        self.lost()

    def lost(self) -> None:
        """The connection is gone (from H1Connection)."""
        if self.counted:
            self.counted = False
            self.conn.svc.websockets -= 1
        if self.cycle is not None:
            self.cycle.feed_disconnect()

    def cycle_done(self, cycle: WebSocketCycle) -> None:
        conn = self.conn
        if conn.cycle is cycle:
            conn.cycle = None
        if not cycle.accepted and not conn.closed:
            conn._close()  # a denial (its response is written) or a failed handshake
