"""Per-worker HTTP service: what every connection of a worker shares.

It holds the app and the options the protocols read on the hot path, the set of
open connections, and one clock tick that refreshes the Date header, flushes the
access log and fires connection timeouts (no timer per request).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import socket
import ssl
import time

from .config import Settings
from .h1.protocol import H1Connection, _status_line
from .logs import AccessLog

logger = logging.getLogger("fpy3.error")

# Seconds a draining connection stays open between requests, about a round trip and
# more: a keep-alive client may have a request on the wire when the drain begins.
DRAIN_GRACE = 1.0
# Seconds a closing TLS connection waits for the peer's close_notify. asyncio's default
# is 30: a drain would wait that long for every idle client that is not reading.
TLS_SHUTDOWN_TIMEOUT = 3.0


class HTTPService:
    def __init__(
        self,
        app,
        loop: asyncio.AbstractEventLoop,
        settings: Settings,
        *,
        state: dict | None = None,
        access_log: AccessLog | None = None,
        debug: bool | None = None,
    ):
        self.app = app
        self.loop = loop
        self.settings = settings
        self.state = state if state is not None else {}
        self.access_log = access_log
        self.debug = settings.server.debug if debug is None else debug
        limits = settings.limits
        self.max_header_size = limits.max_header_size
        self.max_header_count = limits.max_header_count
        self.max_body_size = limits.max_body_size
        self.max_connections = limits.max_connections
        self.header_timeout = settings.http1.header_timeout
        self.keepalive_timeout = settings.http1.keepalive_timeout
        self.root_path = settings.server.root_path
        self.ws = settings.websocket
        self.websockets = 0  # open websockets (both protocols), for websocket.max_connections
        self.connections: set[H1Connection] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self.h3_servers: list = []
        self.draining = False
        self.requests_served = 0
        static = b""
        if settings.server.server_header:
            static += b"server: %b\r\n" % settings.server.server_header.encode("latin-1")
        if settings.http3.enabled:
            static += b'alt-svc: h3=":%d"; ma=86400\r\n' % settings.udp_port
        self._static_headers = static
        self.header_prefix = b""  # date + static headers, refreshed every tick
        self._tick_interval = max(
            0.1, min(1.0, self.header_timeout / 4, self.keepalive_timeout / 4)
        )
        self._ticker: asyncio.TimerHandle | None = None
        self._second = 0
        self._drained: asyncio.Future | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._refresh_date(int(time.time()))
        self._ticker = self.loop.call_later(self._tick_interval, self._tick)

    async def listen(self, sock: socket.socket, ssl_context: ssl.SSLContext | None) -> None:
        scheme = "https" if ssl_context is not None else "http"
        server = await self.loop.create_server(
            lambda: H1Connection(self, scheme),
            sock=sock,
            ssl=ssl_context,
            backlog=self.settings.http1.backlog,
            ssl_handshake_timeout=self.header_timeout if ssl_context is not None else None,
            ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT if ssl_context is not None else None,
        )
        self.servers.append(server)

    def serve_h3(
        self,
        sock: socket.socket | None,
        cert: str,
        key: str,
        worker_id: int = 0,
        secret=None,
        addr: tuple | None = None,
        steer_prog: bytes | None = None,
    ) -> None:
        """HTTP/3 on ``sock``, or (MsQuic under fpy3-master) on ``addr`` MsQuic binds."""
        from .h3.protocol import H3Server

        self.h3_servers.append(H3Server(self, sock, cert, key, worker_id, secret, addr, steer_prog))

    async def drain(self, timeout: float) -> None:
        """Stop accepting, let in-flight requests finish, then close what is left."""
        self.draining = True
        # Asked while the servers are open, wait_closed() also covers connections still
        # in their TLS handshake, not yet in self.connections: on a reload or a recycle
        # they must get an answer, not an EOF.
        accepted = [asyncio.ensure_future(server.wait_closed()) for server in self.servers]
        await asyncio.sleep(0)
        deadline = self.loop.time() + timeout
        for server in self.servers:
            server.close()
        # Clients get a grace period to see the notice (Connection: close, GOAWAY)
        # before idle connections close, so a request they sent meanwhile is answered.
        grace = min(DRAIN_GRACE, timeout / 2)
        for conn in list(self.connections):
            conn.drain(grace)
        await asyncio.gather(
            self._drain_h1(timeout), *(h3.drain(timeout, grace) for h3 in self.h3_servers)
        )
        if accepted:
            left = max(0.0, deadline - self.loop.time())
            _, late = await asyncio.wait(accepted, timeout=left)
            for task in late:
                task.cancel()
        for conn in list(self.connections):
            conn.abort()
        self.close()

    async def _drain_h1(self, timeout: float) -> None:
        if self.connections:
            self._drained = self.loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._drained), timeout)
            except TimeoutError:
                logger.warning("drain timeout: closing %d connection(s)", len(self.connections))

    def forget(self, conn: H1Connection) -> None:
        """A connection closed."""
        self.connections.discard(conn)
        if not self.connections and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        for server in self.servers:
            server.close()
        for h3 in self.h3_servers:
            h3.close()
        self.h3_servers.clear()
        if self.access_log is not None:
            self.access_log.flush()

    # -- the clock ------------------------------------------------------------------------

    def _tick(self) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._refresh_date(second)
        if self.access_log is not None:
            self.access_log.flush()
        mono = self.loop.time()
        for conn in [c for c in self.connections if c.deadline and c.deadline <= mono]:
            conn.on_timeout()
        self._ticker = self.loop.call_later(self._tick_interval, self._tick)

    def _refresh_date(self, second: int) -> None:
        self._second = second
        date = email.utils.formatdate(second, usegmt=True).encode("ascii")
        self.header_prefix = b"date: " + date + b"\r\n" + self._static_headers
        # The same fields for HTTP/3 header blocks ("name\0value\0"), without Alt-Svc.
        fields = b"date\0" + date + b"\0"
        if self.settings.server.server_header:
            fields += b"server\0" + self.settings.server.server_header.encode("latin-1") + b"\0"
        self.h3_static_fields = fields
        self.h3_static_count = fields.count(b"\0")

    # -- canned responses ---------------------------------------------------------------------

    def error_response(self, status: int, reason: str) -> bytes:
        """A complete response for a request we refuse; the connection closes after it."""
        body = f"{reason}\n".encode("latin-1", "replace")
        return b"".join(
            (
                _status_line(status),
                self.header_prefix,
                b"content-type: text/plain; charset=utf-8\r\n",
                b"content-length: %d\r\n" % len(body),
                b"connection: close\r\n\r\n",
                body,
            )
        )
