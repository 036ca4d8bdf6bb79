"""HTTP/3 protocol adapter: native event batches to ASGI cycles and back.

The native side (``native/h3.c`` over a QUIC engine) owns the UDP socket, QUIC,
QPACK and every byte buffer. Python is called once per readiness or timer round
with a batch of events, and answers through a few native calls. Writes made by
the app outside a round are flushed once per loop iteration.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from urllib.parse import unquote_to_bytes

from fpy3._native import ffi, lib

from ..asgi.http import ASGI_VERSION, HTTPCycle
from . import engine

logger = logging.getLogger("fpy3.error")

REQUEST = lib.FPY3_H3_REQUEST
DATA = lib.FPY3_H3_DATA
END = lib.FPY3_H3_END
RESET = lib.FPY3_H3_RESET
WRITABLE = lib.FPY3_H3_WRITABLE
CLOSED = lib.FPY3_H3_CLOSED

# A stream's unacknowledged response bytes above which send() waits for WRITABLE.
SEND_HIGH_WATER = 256 * 1024

# Connection-specific fields are forbidden in HTTP/3 (RFC 9114, 4.2).
_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)


class H3Stream:
    """One request stream: the adapter the ASGI core sees."""

    is_ws = False  # fpy3.ws.h3.H3WebSocket handles its own events

    __slots__ = (
        "server",
        "conn",
        "stream",
        "cycle",
        "head",
        "credit",
        "waiter",
        "closed",
        "no_body",
        "status",
        "sent",
        "started_at",
        "left",
        "finished",
    )

    def __init__(self, server: H3Server, conn: int, stream: int, no_body: bool):
        self.server = server
        self.conn = conn
        self.stream = stream
        self.cycle: HTTPCycle | None = None
        self.head = None  # (status, headers) held until the first body
        self.credit = 0  # body bytes fed but not yet given back as flow-control credit
        self.waiter: asyncio.Future | None = None
        self.closed = False
        self.no_body = no_body  # HEAD: the app's body is not sent
        self.status = 0
        self.sent = 0
        self.started_at = 0.0
        self.left = -1  # declared Content-Length still to send; -1 = none declared
        self.finished = False  # the whole response was handed to C

    def want_body(self) -> None:
        # The app took every queued chunk: give that much window back to the peer.
        if self.credit and not self.closed:
            lib.fpy3_h3_consume(self.server.srv, self.conn, self.stream, self.credit)
            self.credit = 0
            self.server.schedule_flush()

    def write_head(self, status: int, headers) -> None:
        self.head = (status, headers)

    def write_body(self, data: bytes, more: bool):
        if self.closed:
            return None
        server = self.server
        n = len(data)
        self.sent += n
        block = None
        if self.head is not None:
            status, headers = self.head
            self.head = None
            self.status = status
            block, self.left = server.header_block(headers)
        fin = not more
        if self.left >= 0 and not self.no_body:
            if n > self.left:
                raise RuntimeError("response body longer than its Content-Length")
            self.left -= n
            if fin and self.left:
                # Ending the stream here would hand the client a truncated body as complete.
                logger.error("response body shorter than its Content-Length; resetting the stream")
                fin = False
        if self.no_body:
            data = b""
        if block is not None:
            end = fin and not data
            rv = lib.fpy3_h3_respond(
                server.srv, self.conn, self.stream, self.status, block, len(block), end
            )
            if rv < 0:
                server.schedule_flush()
                return None
        else:
            end = False
        pending = 0
        if not end and (data or fin):
            pending = lib.fpy3_h3_send(server.srv, self.conn, self.stream, data, n, fin)
        server.schedule_flush()
        if not more:
            server.svc.requests_served += 1
            if server.access_log is not None and self.cycle is not None:
                server.access_log.log_request(
                    self.cycle.scope, self.status, self.sent, server.loop.time() - self.started_at
                )
            if fin:
                self.finished = True
            else:
                self.abort()
            return None
        if pending < 0 or pending <= SEND_HIGH_WATER:
            return None  # C sends WRITABLE once it falls to a quarter of the mark
        waiter = self.waiter
        if waiter is None:
            waiter = self.waiter = server.loop.create_future()
        return waiter

    def abort(self) -> None:
        # A finished response stays intact even if the app misbehaves afterwards.
        if not self.closed and not self.finished:
            lib.fpy3_h3_reset(self.server.srv, self.conn, self.stream, lib.FPY3_H3_INTERNAL_ERROR)
            self.server.schedule_flush()

    def cycle_done(self, cycle: HTTPCycle) -> None:
        self.cycle = None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)


class H3Server:
    """The HTTP/3 listener of one worker, on a UDP socket it was handed."""

    def __init__(
        self,
        service,
        sock: socket.socket | None,
        cert: str,
        key: str,
        worker_id: int = 0,
        secret: bytes | None = None,
        addr: tuple | None = None,
        steer_prog: bytes | None = None,
    ):
        self.svc = service
        self.loop = service.loop
        self.sock = sock
        self.access_log = service.access_log
        settings = service.settings
        h3 = settings.http3
        limits = settings.limits
        err = ffi.new("char[]", 256)
        cfg = ffi.new("fpy3_h3_config *")
        # cfg points into these; they live as long as this object.
        self._strings = [
            ffi.new("char[]", cert.encode()),
            ffi.new("char[]", key.encode()),
            ffi.new("char[]", h3.qlog_dir.encode()),
        ]
        cfg.cert_file, cfg.key_file, cfg.qlog_dir = self._strings
        cfg.worker_id = worker_id
        # Shared by all workers of a master, so any of them can reset another's connections.
        ffi.memmove(cfg.static_secret, secret or os.urandom(32), 32)
        cfg.retry = h3.retry
        cfg.idle_timeout_ms = int(h3.idle_timeout * 1000)
        cfg.max_streams_bidi = h3.max_concurrent_streams
        cfg.max_udp_payload = h3.max_udp_payload
        cfg.initial_max_data = h3.initial_max_data
        cfg.initial_max_stream_data = h3.initial_max_stream_data
        cfg.max_header_size = limits.max_header_size
        cfg.max_header_count = limits.max_header_count
        cfg.send_high_water = SEND_HIGH_WATER
        cfg.enable_connect_protocol = settings.websocket.enabled
        addr = sock.getsockname() if sock is not None else addr
        self.server_addr = _addr(addr)
        cfg.engine = engine.choose(h3.engine)
        fd = sock.fileno() if sock is not None else -1
        if cfg.engine == lib.FPY3_ENGINE_MSQUIC:
            # MsQuic binds its own sockets: hand it the address and free the port.
            self._strings.append(ffi.new("char[]", addr[0].encode()))
            cfg.listen_host = self._strings[-1]
            cfg.listen_port = addr[1]
            if steer_prog:  # the master's program, back on the group after MsQuic's
                self._strings.append(ffi.new("char[]", steer_prog))
                cfg.steer_prog = ffi.cast("uint8_t *", self._strings[-1])
                cfg.steer_len = len(steer_prog)
            if sock is not None:
                sock.close()
            fd = -1
        elif sock is None:
            raise OSError("HTTP/3: libmsquic loaded in the master but not in this worker")
        srv = lib.fpy3_h3_server_new(fd, cfg, err, 256)
        if srv == ffi.NULL:
            raise OSError(f"HTTP/3: {ffi.string(err).decode()}")
        self.srv = ffi.gc(srv, lib.fpy3_h3_server_free)
        self._count = ffi.new("size_t *")
        self.streams: dict[tuple[int, int], H3Stream] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = -1.0
        self._flush_scheduled = False
        self._writer = False
        self._drained: asyncio.Future | None = None
        from ..ws import h3 as ws_h3  # imports this module

        self._ws = ws_h3
        self.fd = lib.fpy3_h3_fd(self.srv)  # the UDP socket, or MsQuic's eventfd
        self.loop.add_reader(self.fd, self._on_readable)

    # -- rounds ---------------------------------------------------------------------------

    def _on_readable(self) -> None:
        if lib.fpy3_h3_read(self.srv) > 0:
            self._handle_batch()
        self._round()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = -1.0
        if lib.fpy3_h3_expire(self.srv) > 0:
            self._handle_batch()
        self._round()

    def _on_writable(self) -> None:
        self.loop.remove_writer(self.fd)
        self._writer = False
        self._round()

    def _round(self) -> None:
        """After a batch: flush what the app wrote, watch the socket, re-arm the timer."""
        self._flush_scheduled = False
        # Events a flush raises (resets, closes) come with the next read/expire round;
        # the timer is armed at 0 until then.
        lib.fpy3_h3_flush(self.srv)
        if not self._writer and lib.fpy3_h3_want_write(self.srv):
            # The socket buffer is full: resume when it drains.
            self._writer = True
            self.loop.add_writer(self.fd, self._on_writable)
        self._arm_timer()
        if self._drained is not None and not lib.fpy3_h3_connection_count(self.srv):
            if not self._drained.done():
                self._drained.set_result(None)

    def _handle_batch(self) -> None:
        """The events of the last read or expire call (valid until the next one)."""
        events = lib.fpy3_h3_events(self.srv, self._count)
        count = self._count[0]
        i = 0
        while i < count:
            ev = events[i]
            if ev.type == REQUEST:
                # A request without a body ends in the same batch: start it complete.
                fin = False
                if i + 1 < count:
                    nxt = events[i + 1]
                    fin = nxt.type == END and nxt.stream == ev.stream and nxt.conn == ev.conn
                self._start_request(ev, fin)
                i += 2 if fin else 1
                continue
            self._handle(ev)
            i += 1

    def schedule_flush(self) -> None:
        """The app wrote outside a round: flush once, at the end of this loop iteration."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        if self._flush_scheduled:
            self._round()

    def _arm_timer(self) -> None:
        ms = lib.fpy3_h3_next_timeout_ms(self.srv)
        if ms < 0:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return
        when = self.loop.time() + ms / 1000
        if self._timer is not None:
            if abs(when - self._timer_at) < 0.001:
                return
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._on_timer)

    # -- events -----------------------------------------------------------------------------

    def _handle(self, ev) -> None:
        kind = ev.type
        key = (ev.conn, ev.stream)
        stream = self.streams.get(key)
        if stream is None:
            return
        if stream.is_ws:
            stream.handle(kind, ev)
            if kind == CLOSED:
                del self.streams[key]
            return
        if kind == DATA:
            data = ffi.unpack(ffi.cast("char *", ev.data), ev.len)
            stream.credit += len(data)
            if stream.cycle is not None:
                stream.cycle.feed_body(data, True)
            else:
                stream.want_body()  # nobody reads it any more: give the window back
        elif kind == END:
            if stream.cycle is not None:
                stream.cycle.feed_body(b"", False)
        elif kind == WRITABLE:
            stream.wake()
        elif kind in (RESET, CLOSED):
            if kind == CLOSED:
                stream.closed = True
                del self.streams[key]
            if stream.cycle is not None:
                stream.cycle.feed_disconnect()
            stream.wake()

    def _start_request(self, ev, fin: bool) -> None:
        key = (ev.conn, ev.stream)
        svc = self.svc
        block = ffi.buffer(ev.data, ev.len)[:]
        fields = block.split(b"\0")
        end = len(fields) - 1  # the block ends with a NUL
        # nghttp3 has checked the block: pseudo-header fields come first, once each.
        pseudo = {}
        i = 0
        while i < end and fields[i][:1] == b":":
            pseudo[fields[i]] = fields[i + 1]
            i += 2
        it = iter(fields[i:end])
        headers = [*zip(it, it)]  # noqa: B905 (pairs by construction)
        authority = pseudo.get(b":authority")
        if authority and b"\0host\0" not in block and not block.startswith(b"host\0"):
            headers.insert(0, (b"host", authority))
        method = pseudo.get(b":method", b"")
        target = pseudo.get(b":path", b"")
        scheme = pseudo.get(b":scheme", b"")
        raw_path, _, query = target.partition(b"?")
        path = (
            unquote_to_bytes(raw_path).decode("utf-8", "replace")
            if b"%" in raw_path
            else (raw_path.decode("latin-1"))
        )
        root = svc.root_path
        client = ffi.string(ev.peer).decode() if ev.peer != ffi.NULL else ""
        scope = {
            "type": "http",
            "asgi": ASGI_VERSION.copy(),
            "http_version": "3",
            "server": self.server_addr,
            "client": [client, ev.peer_port] if client else None,
            "scheme": scheme.decode("latin-1") or "https",
            "method": method.decode("latin-1"),
            "root_path": root,
            "path": root + path if root else path,
            "raw_path": raw_path,
            "query_string": query,
            "headers": headers,
            "state": svc.state.copy(),
        }
        if method == b"CONNECT" and pseudo.get(b":protocol") == b"websocket":
            self._ws.start(self, ev.conn, ev.stream, scope)
            return
        stream = H3Stream(self, ev.conn, ev.stream, scope["method"] == "HEAD")
        if self.access_log is not None:
            stream.started_at = self.loop.time()
        self.streams[key] = stream
        more = not fin
        cycle = stream.cycle = HTTPCycle(scope, stream, self.loop, more, svc.debug)
        cycle.task = asyncio.Task(cycle.run(svc.app), loop=self.loop, eager_start=True)

    # -- helpers ----------------------------------------------------------------------------

    def header_block(self, headers) -> tuple[bytes, int]:
        """Response fields as "name\\0value\\0..." with lowercased names, and the
        declared Content-Length (-1 when none)."""
        parts = [self.svc.h3_static_fields]
        declared = -1
        for name, value in headers:
            lname = name.lower()
            if lname in _HOP_BY_HOP:
                continue
            if lname == b"content-length":
                declared = int(value)
            parts += (lname, b"\0", value, b"\0")
        block = b"".join(parts)
        if block.count(b"\0") != self.svc.h3_static_count + 2 * ((len(parts) - 1) >> 2):
            raise RuntimeError("invalid response header: NUL in a name or value")
        return block, declared

    async def drain(self, timeout: float, grace: float) -> None:
        """GOAWAY on every connection, then wait until they are gone (or the timeout).

        The notice goes first; the final GOAWAY follows after a grace period so that
        requests the client sent before it saw the notice are still answered.
        """
        self._drained = self.loop.create_future()
        self._ws.drain(self)
        lib.fpy3_h3_shutdown(self.srv, 1)
        self._round()
        if lib.fpy3_h3_connection_count(self.srv):
            await asyncio.sleep(grace)
        lib.fpy3_h3_shutdown(self.srv, 2)
        self._round()
        try:
            await asyncio.wait_for(asyncio.shield(self._drained), timeout)
        except TimeoutError:
            logger.warning(
                "HTTP/3 drain timeout: dropping %d connection(s)",
                lib.fpy3_h3_connection_count(self.srv),
            )

    def close(self) -> None:
        self.loop.remove_reader(self.fd)
        if self._writer:
            self.loop.remove_writer(self.fd)
        if self._timer is not None:
            self._timer.cancel()
        for stream in list(self.streams.values()):
            if stream.cycle is not None:
                stream.cycle.feed_disconnect()
        self.streams.clear()


def _addr(addr):
    return [addr[0], addr[1]] if isinstance(addr, tuple) else None
