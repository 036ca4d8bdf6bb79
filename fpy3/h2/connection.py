"""HTTP/2 on one TCP connection (TLS with ALPN h2, or cleartext with prior knowledge).

The native session (``native/h2.c`` over nghttp2) owns HPACK, the frames and every
byte buffer. ``data_received`` feeds it what the transport read and gets back one
batch of events; one output round then gives the bytes to write, written with one
``transport.write``. Writes the app makes outside a round are flushed once per loop
iteration. Streams are dispatched by method: an extended CONNECT for ``websocket``
(RFC 8441) becomes a websocket stream, anything else an HTTP stream.

Timeouts run on the service's clock (``on_timeout``, about once a second): a
connection without streams closes after ``http2.idle_timeout`` (the first request
must come within ``http1.header_timeout``), and a response the client's flow-control
window holds back for ``http2.send_timeout`` is reset. A draining connection sends a
GOAWAY notice, the final GOAWAY after a grace period, and closes once its streams
are done.
"""

from __future__ import annotations

import asyncio
import logging

from ..core.flow import SEND_HIGH_WATER
from ..core.http import APP_DATE, APP_SERVER, HTTPCycle
from ..core.scope import build_scope, decode_path
from ..tls import tls_extension
from . import websocket
from .native import (
    CLOSED,
    END,
    NO_ERROR,
    OUT_MAX,
    REFUSED_STREAM,
    REQUEST,
    ffi,
    lib,
)
from .stream import HTTPStream, Stream

logger = logging.getLogger("fpy3.error")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class H2Listener:
    """What the HTTP/2 connections of one listening socket share: the service, the
    scheme, the native session settings, and the default response fields (Date,
    Server, Alt-Svc), which the service's clock refreshes once a second."""

    def __init__(self, service, scheme: str):
        self.svc = service
        self.loop = service.loop
        self.scheme = scheme
        settings = service.settings
        h2 = settings.http2
        limits = settings.limits
        cfg = self.cfg = ffi.new("fpy3_h2_config *")
        cfg.max_concurrent_streams = h2.max_concurrent_streams
        cfg.initial_window_size = h2.initial_window_size
        cfg.connection_window_size = h2.connection_window_size
        cfg.max_frame_size = h2.max_frame_size
        cfg.max_header_size = h2.max_header_list_size or limits.max_header_size
        cfg.max_header_count = limits.max_header_count
        cfg.max_body_size = limits.max_body_size
        cfg.send_high_water = SEND_HIGH_WATER
        cfg.enable_connect_protocol = settings.websocket.enabled
        cfg.reset_burst = h2.reset_burst
        cfg.reset_rate = h2.reset_rate
        cfg.control_burst = h2.control_frame_burst
        cfg.control_rate = h2.control_frame_rate
        cfg.max_continuations = h2.max_continuations
        self.max_streams = h2.max_concurrent_streams
        self.idle_timeout = h2.idle_timeout
        self.send_timeout_ms = int(h2.send_timeout * 1000)
        self._fields: list[bytes] = [b""] * 16
        self.refresh(service.clock)

    def take_over(
        self, transport: asyncio.Transport, data: bytes = b"", origin: tuple | None = None
    ) -> H2Connection:
        """Serve HTTP/2 on ``transport`` from now on; ``data`` is what was read already;
        ``origin`` is (client, server, scheme) when a PROXY header named them."""
        conn = H2Connection(self)
        if origin is not None:
            conn.client, conn.server, conn.scheme = origin
        transport.set_protocol(conn)
        conn.connection_made(transport)
        if data and not conn.closed:
            conn.data_received(data)
        return conn

    def header_block(self, headers, flags: int) -> bytes:
        """Response fields as "name\\0value\\0...", the defaults first (Date and Server,
        unless the app set them; Alt-Svc). The core has checked the names and values."""
        parts = [self._fields[flags & (APP_SERVER | APP_DATE)]]
        for name, value in headers:
            parts += (name, b"\0", value, b"\0")
        return b"".join(parts)

    def refresh(self, clock) -> None:
        svc = self.svc
        date = b"date\0" + clock.date + b"\0"
        server = b"server\0" + svc.server_header + b"\0" if svc.server_header else b""
        alt_svc = b"alt-svc\0" + svc.alt_svc + b"\0" if svc.alt_svc else b""
        for flags in (0, APP_SERVER, APP_DATE, APP_SERVER | APP_DATE):
            self._fields[flags] = (
                (b"" if flags & APP_DATE else date)
                + (b"" if flags & APP_SERVER else server)
                + alt_svc
            )


class H2Connection(asyncio.Protocol):
    """One HTTP/2 connection: a native session and the streams Python knows."""

    transport: asyncio.Transport  # from connection_made on
    # Stalled sends time out in the native session (its expire call), not on this.
    send_deadline = 0.0

    def __init__(self, listener: H2Listener):
        self.listener = listener
        self.svc = svc = listener.svc
        self.loop = svc.loop
        c = lib.fpy3_h2_new(listener.cfg)
        if c == ffi.NULL:
            raise MemoryError("no memory for an HTTP/2 session")
        # Freed with this object (after the transport is gone).
        self.c = ffi.gc(c, lib.fpy3_h2_free)
        self.streams: dict[int, Stream] = {}
        self.client: list | None = None
        self.server: list | None = None
        self.scheme = listener.scheme  # "https" also when TLS ended at a PROXY-ing proxy
        self.tls: dict | None = None  # the scope's ASGI TLS extension, on TLS connections
        self.closed = False
        self.write_paused = False
        self.in_round = False  # inside data_received: the round flushes at its end
        self.flush_scheduled = False
        self.running = 0  # app tasks of this connection still running
        self.requests = 0
        self.deadline = 0.0  # when the service clock calls on_timeout next
        self.idle_at = 0.0  # when the last stream ended; 0 while streams are open
        self.draining = False
        self._len = ffi.new("size_t *")
        self._nev = ffi.new("size_t *")

    # -- transport events ---------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        svc = self.svc
        if self.client is None:  # else a PROXY header named it
            self.client = _addr(transport.get_extra_info("peername"))
            self.server = _addr(transport.get_extra_info("sockname"))
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is not None:
            self.tls = tls_extension(sslobj)
        if svc.max_connections and len(svc.connections) >= svc.max_connections:
            # Our SETTINGS and a GOAWAY that took no stream: the client may retry.
            lib.fpy3_h2_terminate(self.c, NO_ERROR)
            self._flush()
            self._close()
            return
        now = self.loop.time()
        self.idle_at = now
        self.deadline = now + 1.0
        svc.admit(self)
        if svc.draining:
            # Accepted as the drain began (its handshake was under way): the client
            # may have requests on the wire, so the final GOAWAY waits the grace too.
            self.drain(svc.drain_grace)
        self._flush()  # the server's SETTINGS go first

    def connection_lost(self, exc) -> None:
        self._lost()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._flush()

    def eof_received(self):
        return False

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.in_round = True
        try:
            n = lib.fpy3_h2_recv(self.c, data, len(data))
            if n > 0:
                self._handle_batch(n)
        finally:
            self.in_round = False
        self._flush()

    # -- rounds -------------------------------------------------------------------------

    def _handle_batch(self, count: int) -> None:
        """The events of the last recv/output/expire call (valid until the next one)."""
        events = lib.fpy3_h2_events(self.c, self._nev)
        streams = self.streams
        i = 0
        while i < count:
            ev = events[i]
            kind = ev.type
            if kind == REQUEST:
                # A request without a body ends in the same batch: start it complete.
                fin = False
                if i + 1 < count:
                    nxt = events[i + 1]
                    fin = nxt.type == END and nxt.stream == ev.stream
                self._start_request(ev, fin)
                i += 2 if fin else 1
                continue
            stream = streams.get(ev.stream)
            if stream is not None:
                stream.handle(kind, ev)
                if stream.closed:
                    del streams[ev.stream]
                    if not streams:
                        self.idle_at = self.loop.time()
            i += 1

    def schedule_flush(self) -> None:
        """The app wrote outside a round: flush once, at the end of this loop iteration."""
        if not self.flush_scheduled and not self.in_round:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """One output round: write what the session has, handle its events, close the
        connection when the session is done."""
        self.flush_scheduled = False
        if self.closed:
            return
        c = self.c
        size = self._len
        while not self.write_paused:
            out = lib.fpy3_h2_output(c, size)
            n = size[0]
            if n:
                self.transport.write(ffi.buffer(out, n)[:])
            lib.fpy3_h2_events(c, self._nev)
            count = self._nev[0]
            if count:
                self._handle_batch(count)
            if n < OUT_MAX or self.closed:
                break
        if not self.closed and not lib.fpy3_h2_alive(c):
            self._close()

    def forget(self, stream: Stream) -> None:
        """The stream is done on both sides (C sends no more events for it)."""
        stream.closed = True
        streams = self.streams
        if streams.pop(stream.sid, None) is not None and not streams:
            self.idle_at = self.loop.time()

    def _task_done(self, task: asyncio.Task) -> None:
        self.running -= 1

    # -- requests -----------------------------------------------------------------------

    def _start_request(self, ev, fin: bool) -> None:
        svc = self.svc
        sid = ev.stream
        self.idle_at = 0.0
        self.requests += 1
        if self.running >= self.listener.max_streams:
            # Streams the client reset while their app tasks still run count as open
            # (rapid reset, CVE-2023-44487): no new app task until some finish.
            lib.fpy3_h2_reset(self.c, sid, REFUSED_STREAM)
            return
        # C gives the pseudo-header values in a fixed order, then the regular fields.
        fields = ffi.buffer(ev.data, ev.len)[:].split(b"\0")
        method, target, authority, protocol = fields[:4]
        headers = [*zip(fields[4:-1:2], fields[5:-1:2])]  # noqa: B905 (pairs by construction)
        if authority and not ev.code:
            headers.insert(0, (b"host", authority))
        raw_path, _, query = target.partition(b"?")
        websocket_request = method == b"CONNECT" and protocol == b"websocket" and svc.ws.enabled
        scope = build_scope(
            svc,
            "websocket" if websocket_request else "http",
            "2",
            self.scheme,
            method.decode("latin-1"),
            decode_path(raw_path),
            raw_path,
            query,
            headers,
            self.client,
            self.server,
        )
        if self.tls is not None:
            scope.setdefault("extensions", {})["tls"] = self.tls
        if websocket_request:
            task = websocket.start(self, sid, scope)
        else:
            stream = HTTPStream(self, sid, fin)
            self.streams[sid] = stream
            cycle = stream.cycle = HTTPCycle(scope, stream, svc, not fin)
            task = svc.spawn(cycle.run())
        if task is not None and not task.done():
            self.running += 1
            task.add_done_callback(self._task_done)

    # -- timeouts, drain and close ------------------------------------------------------

    @property
    def idle_since(self) -> float:
        """Loop time since which no stream is open; 0 while one is."""
        return 0.0 if self.streams else self.idle_at

    def close_idle(self) -> None:
        """Too many idle connections (limits.max_idle_connections): GOAWAY and close."""
        if not self.closed and not self.streams:
            lib.fpy3_h2_terminate(self.c, NO_ERROR)
            self._flush()
            self._close()

    def on_timeout(self) -> None:
        """Called by the service clock when ``deadline`` has passed."""
        if self.closed:
            return
        now = self.loop.time()
        self.deadline = now + 1.0
        if self.idle_at and not self.streams:
            limit = self.listener.idle_timeout if self.requests else self.svc.header_timeout
            if now >= self.idle_at + limit:
                lib.fpy3_h2_terminate(self.c, NO_ERROR)
                self._flush()
                self._close()
            return
        n = lib.fpy3_h2_expire(self.c, self.listener.send_timeout_ms)
        if n > 0:
            self._handle_batch(n)
        if n:
            self._flush()

    def drain(self, grace: float) -> None:
        """GOAWAY in two steps: a notice now, the final one after ``grace`` seconds, so
        requests the client sent meanwhile are still answered; the connection closes
        once its streams are done."""
        if self.closed or self.draining:
            return
        self.draining = True
        websocket.drain(self)
        lib.fpy3_h2_shutdown(self.c, 1)
        self._flush()
        if grace > 0:
            self.loop.call_later(grace, self._final_goaway)
        else:
            self._final_goaway()

    def _final_goaway(self) -> None:
        if not self.closed:
            lib.fpy3_h2_shutdown(self.c, 2)
            self._flush()

    def _close(self) -> None:
        """Close after the bytes already written."""
        if not self.closed:
            self.transport.close()
            self._lost()

    def kill(self) -> None:
        """Now: a GOAWAY if it can still go out, then close."""
        if not self.closed:
            lib.fpy3_h2_terminate(self.c, NO_ERROR)
            self._flush()
            self._close()

    def _lost(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.svc.forget(self)
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            stream.closed = True
            stream.handle(CLOSED, None)


def _addr(addr):
    if isinstance(addr, tuple):
        return [addr[0], addr[1]]
    return None
