"""WebSocket over HTTP/1.1 Upgrade (RFC 6455, section 4): the transport adapter.

``H1Connection`` hands a GET with ``Upgrade: websocket`` to ``start``. Until the app
accepts, the connection is an HTTP exchange (a denial is an ordinary response through
the core, and the connection closes after it). After the 101, the connection's bytes go
to the websocket cycle and its frames go straight to the transport.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..core.http import HTTPAdapter
from ..core.scope import build_scope
from ..core.websocket import WebSocketCycle
from ..wsproto import open_protocol
from ..wsproto.handshake import accept_key, valid_key
from .parser import CHUNKED, RequestHead

_SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\n"
_UPGRADE = b"upgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: "


def _header(headers, name: bytes):
    for n, v in headers:
        if n == name:
            return v
    return None


class Connection(HTTPAdapter, Protocol):
    """What the upgrade needs of the HTTP/1.1 connection (``fpy3.h1.connection``): a
    denial goes out through it as an HTTP adapter."""

    svc: Any  # the worker's service
    listener: Any  # its listener: prefix()
    transport: Any
    scheme: str
    client: list | None
    server: list | None
    tls: dict | None
    ws: H1WebSocket | None
    keep_alive: bool
    head_sent: bool
    closed: bool

    def reject(self, status: int, reason: str, extra: bytes = b"") -> None: ...

    def take_buffer(self) -> bytes: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def write_waiter(self) -> Any: ...

    def close(self) -> None: ...

    def kill(self) -> None: ...


def start(conn: Connection, head: RequestHead) -> None:
    """Check the handshake and start the app's websocket cycle on ``conn``."""
    svc = conn.svc
    headers = head.headers
    if head.content_length > 0 or head.flags & CHUNKED:
        conn.reject(400, "websocket handshake with a request body")
        return
    version = _header(headers, b"sec-websocket-version")
    if version is None or version.strip() != b"13":
        conn.reject(426, "unsupported websocket version", b"sec-websocket-version: 13\r\n")
        return
    key = _header(headers, b"sec-websocket-key")
    if not valid_key(key):
        conn.reject(400, "missing or invalid Sec-WebSocket-Key")
        return
    limit = svc.ws.max_connections
    if limit and svc.websockets >= limit:
        conn.reject(503, "too many websockets (websocket.max_connections)")
        return
    scope = build_scope(
        svc,
        "websocket",
        "1.1",
        conn.scheme,
        "GET",
        head.path,
        head.raw_path,
        head.query_string,
        headers,
        conn.client,
        conn.server,
    )
    if conn.tls is not None:
        scope["extensions"]["tls"] = conn.tls
    adapter = conn.ws = H1WebSocket(conn, key.strip())
    conn.keep_alive = False  # whatever happens, this connection ends with the exchange
    svc.websockets += 1
    adapter.counted = True
    cycle = adapter.cycle = WebSocketCycle(scope, adapter, svc, svc.ws, open_protocol)
    svc.spawn(cycle.run())


class H1WebSocket:
    """The websocket cycle's view of one HTTP/1.1 connection."""

    __slots__ = ("conn", "key", "cycle", "counted", "upgraded")

    method = "GET"

    def __init__(self, conn: Connection, key: bytes):
        self.conn = conn
        self.key = key
        self.cycle: WebSocketCycle | None = None
        self.counted = False
        self.upgraded = False  # the 101 is written: the connection's bytes are frames

    def accept(self, headers: list, flags: int) -> None:
        conn = self.conn
        parts = [_SWITCHING, conn.listener.prefix(flags), _UPGRADE, accept_key(self.key), b"\r\n"]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        conn.transport.write(b"".join(parts))
        conn.head_sent = True
        self.upgraded = True
        # Frames the client sent right behind its handshake.
        buf = conn.take_buffer()
        conn.resume_reading()
        if buf:
            self.feed_data(buf)

    def feed_data(self, data: bytes) -> None:
        """Frames from the client (after the 101)."""
        if self.cycle is not None:
            self.cycle.feed_data(data)

    def http(self) -> HTTPAdapter:
        return self.conn

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
        self.conn.pause_reading()

    def resume_reading(self) -> None:
        self.conn.resume_reading()

    def finish(self) -> None:
        # transport.close() sends what is buffered first; the server closes TCP first
        # (RFC 6455 7.1.1).
        self.conn.close()

    def abort(self) -> None:
        self.conn.kill()
        self.lost()

    def lost(self) -> None:
        """The connection is gone (from H1Connection)."""
        if self.counted:
            self.counted = False
            self.conn.svc.websockets -= 1
        if self.cycle is not None:
            self.cycle.feed_disconnect()

    def cycle_done(self, cycle: WebSocketCycle) -> None:
        if not cycle.accepted and not self.conn.closed:
            self.conn.close()  # a denial (its response is written) or a failed handshake
