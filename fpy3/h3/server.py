"""HTTP/3 on one worker: native event batches to request streams, and back.

The native side (``native/h3.c`` over a QUIC engine) owns the UDP socket, QUIC,
QPACK and every byte buffer. Python is called once per readiness or timer round with
a batch of events, and answers through a few native calls. Writes made by the app
outside a round are flushed once per loop iteration. Streams are dispatched by
method: an extended CONNECT for ``websocket`` becomes a websocket stream, anything
else an HTTP stream.

With ``http3.early_data`` a resumed client may send requests in 0-RTT, before the
handshake completes (such data can be replayed by an attacker). Those with a safe
method (GET, HEAD, OPTIONS) reach the app with ``Early-Data: 1`` (RFC 8470) and
``scope["extensions"]["early_data"]``; any other gets 425 Too Early from the core
without reaching the app, and the client retries it after the handshake.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl

from ..core.flow import SEND_HIGH_WATER
from ..core.http import APP_DATE, APP_SERVER, HTTPCycle, early_data_refused
from ..core.scope import build_scope, decode_path
from . import engine, websocket
from .native import END, H3_NO_ERROR, REQUEST, ffi, lib
from .stream import HTTPStream, Stream

logger = logging.getLogger("fpy3.error")

SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS"})
_CLIENT_AUTH = {"none": 0, "optional": 1, "required": 2}
_TLS_CACHE_MAX = 4096


class H3Server:
    """The HTTP/3 listener of one worker, on a UDP socket it was handed."""

    def __init__(
        self,
        service,
        sock: socket.socket | None,
        cert: str,
        key: str,
        worker_id: int = 0,
        keys=None,
        addr: tuple | None = None,
    ):
        """``keys``: the master's SessionKeys (fpy3.keys); None = random per worker."""
        self.svc = service
        self.loop = service.loop
        self.sock = sock
        settings = service.settings
        h3 = settings.http3
        limits = settings.limits
        err = ffi.new("char[]", 256)
        cfg = ffi.new("fpy3_h3_config *")
        # cfg points into these; they live as long as this object.
        tls = settings.tls
        from ..tls import key_password

        self.cert, self.key = cert, key
        self._strings = [
            ffi.new("char[]", cert.encode()),
            ffi.new("char[]", key.encode()),
            ffi.new("char[]", h3.qlog_dir.encode()),
            ffi.new("char[]", (key_password(tls) or "").encode()),
            ffi.new("char[]", tls.client_ca.encode()),
        ]
        cfg.cert_file, cfg.key_file, cfg.qlog_dir, cfg.key_password, cfg.client_ca = self._strings
        cfg.client_auth = _CLIENT_AUTH[tls.client_auth]
        cfg.worker_id = worker_id
        # Shared by all workers of a master (and its restarts and replicas, through the
        # key file), so any of them can reset, validate and resume another's clients.
        ffi.memmove(cfg.static_secret, keys.quic_secret if keys else os.urandom(32), 32)
        ffi.memmove(cfg.ticket_key, keys.quic_ticket_key if keys else os.urandom(64), 64)
        cfg.session_tickets = tls.session_tickets
        cfg.ticket_lifetime = tls.ticket_lifetime
        cfg.early_data = h3.early_data
        cfg.retry = h3.retry
        cfg.max_handshakes = h3.max_handshakes
        cfg.handshake_memory = h3.handshake_memory
        cfg.handshake_timeout_ms = int(h3.handshake_timeout * 1000)
        cfg.max_connections = h3.max_connections
        cfg.max_idle_connections = h3.max_idle_connections
        cfg.idle_timeout_ms = int(h3.idle_timeout * 1000)
        cfg.max_streams_bidi = h3.max_concurrent_streams
        cfg.max_udp_payload = h3.max_udp_payload
        cfg.initial_max_data = h3.initial_max_data
        cfg.initial_max_stream_data = h3.initial_max_stream_data
        cfg.max_window = h3.max_window
        cfg.max_stream_window = h3.max_stream_window
        cfg.unread_budget = h3.unread_body_budget
        cfg.body_timeout_ms = int(h3.body_timeout * 1000)
        cfg.send_timeout_ms = int(h3.send_timeout * 1000)
        cfg.max_header_size = limits.max_header_size
        cfg.max_header_count = limits.max_header_count
        cfg.send_high_water = SEND_HIGH_WATER
        cfg.enable_connect_protocol = settings.websocket.enabled
        addr = sock.getsockname() if sock is not None else addr
        if addr is None:
            raise ValueError("HTTP/3 needs a socket or an address")
        self.server_addr = _addr(addr)
        cfg.engine = engine.choose(h3.engine)
        self.engine_name = "msquic" if cfg.engine == lib.FPY3_ENGINE_MSQUIC else "ngtcp2"
        fd = sock.fileno() if sock is not None else -1
        if cfg.engine == lib.FPY3_ENGINE_MSQUIC:
            # MsQuic binds its own socket: hand it the address and free the port.
            self._strings.append(ffi.new("char[]", addr[0].encode()))
            cfg.listen_host = self._strings[-1]
            cfg.listen_port = addr[1]
            if sock is not None:
                sock.close()
            fd = -1
        elif sock is None:
            raise OSError("HTTP/3: libmsquic loaded in the master but not in this worker")
        srv = lib.fpy3_h3_server_new(fd, cfg, err, 256)
        if srv == ffi.NULL:
            raise OSError(f"HTTP/3: {ffi.string(err).decode()}")
        # Freed by close() (which first closes every connection), or with this object.
        self.srv = ffi.gc(srv, lib.fpy3_h3_server_free)
        self._count = ffi.new("size_t *")
        self._stats = ffi.new("fpy3_h3_stats *")
        self._final_stats: list[int] = []  # stats() once the native server is freed
        self.streams: dict[tuple[int, int], Stream] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = -1.0
        self._flush_scheduled = False
        self._writer = False
        self._closed = False
        self._drained: asyncio.Future | None = None
        self._fields: list[bytes] = [b""] * 16
        self._tls: dict[int, dict] = {}  # connection handle -> the scope's TLS extension
        self._tls_info = ffi.new("fpy3_h3_tls_info *")
        self._guard = ffi.new("fpy3_h3_guard *")
        self._seen = _Seen()
        self.refresh(service.clock)
        self.fd = lib.fpy3_h3_fd(self.srv)  # the UDP socket, or MsQuic's epoll set
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
        if self._closed:
            return
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
                    fin = nxt.type == END and nxt.stream == ev.stream and nxt.conn == ev.conn
                self._start_request(ev, fin)
                i += 2 if fin else 1
                continue
            key = (ev.conn, ev.stream)
            stream = streams.get(key)
            if stream is not None:
                stream.handle(kind, ev)
                if stream.closed:
                    del streams[key]
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

    # -- requests ---------------------------------------------------------------------------

    def _start_request(self, ev, fin: bool) -> None:
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
        raw_path, _, query = pseudo.get(b":path", b"").partition(b"?")
        early = ev.early
        if early:
            headers.append((b"early-data", b"1"))
        client = ffi.string(ev.peer).decode() if ev.peer != ffi.NULL else ""
        websocket_request = (
            method == b"CONNECT" and pseudo.get(b":protocol") == b"websocket" and svc.ws.enabled
        )
        scope = build_scope(
            svc,
            "websocket" if websocket_request else "http",
            "3",
            pseudo.get(b":scheme", b"https").decode("latin-1") or "https",
            method.decode("latin-1"),
            decode_path(raw_path),
            raw_path,
            query,
            headers,
            [client, ev.peer_port] if client else None,
            self.server_addr,
        )
        extensions = scope.setdefault("extensions", {})
        extensions["tls"] = self._tls_extension(ev.conn, early)
        if early:
            extensions["early_data"] = {}
        if websocket_request:
            websocket.start(self, ev.conn, ev.stream, scope)
            return
        stream = HTTPStream(self, ev.conn, ev.stream)
        self.streams[(ev.conn, ev.stream)] = stream
        cycle = stream.cycle = HTTPCycle(scope, stream, svc, not fin)
        if early and method not in SAFE_METHODS:
            # It may be a replay: the client sends it again once the handshake is done.
            early_data_refused(cycle)
            return
        svc.spawn(cycle.run())

    def _tls_extension(self, conn: int, early: bool) -> dict:
        """The ASGI TLS extension of a connection, read once it is complete (a request
        in 0-RTT comes before the client's certificate)."""
        ext = self._tls.get(conn)
        if ext is not None:
            return ext
        info = self._tls_info
        chain: list[str] = []
        name = None
        suite = None
        if lib.fpy3_h3_conn_tls(self.srv, conn, info) == 0:
            suite = info.cipher_suite or None
            raw = ffi.buffer(info.certs, info.certs_len)[:] if info.certs != ffi.NULL else b""
            while len(raw) >= 4:
                n = int.from_bytes(raw[:4], "big")
                chain.append(ssl.DER_cert_to_PEM_cert(raw[4 : 4 + n]))
                raw = raw[4 + n :]
            if info.cert_name != ffi.NULL:
                name = ffi.string(info.cert_name).decode("utf-8", "replace")
        ext = {
            "server_cert": None,
            "client_cert_chain": chain,
            "client_cert_name": name,
            "client_cert_error": None,
            "tls_version": 0x0304,
            "cipher_suite": suite,
        }
        if not early:
            if len(self._tls) >= _TLS_CACHE_MAX:
                self._tls.clear()
            self._tls[conn] = ext
        return ext

    def reload_credentials(self) -> bool:
        """The certificate files changed: new handshakes use them (TLSContexts.reload's
        HTTP/3 half). On failure the old certificate stays."""
        if self._closed:
            return False
        from ..tls import key_password

        err = ffi.new("char[]", 512)
        password = (key_password(self.svc.settings.tls) or "").encode()
        rc = lib.fpy3_h3_reload_credentials(
            self.srv, self.cert.encode(), self.key.encode(), password, err, 512
        )
        if rc < 0:
            logger.error("HTTP/3: keeping the current certificate: %s", ffi.string(err).decode())
            return False
        logger.info("HTTP/3: now serving the certificate in %s", self.cert)
        return True

    def header_block(self, headers, flags: int) -> bytes:
        """Response fields as "name\\0value\\0...", the defaults first (Date and Server,
        unless the app set them). The core has checked the names and values."""
        parts = [self._fields[flags & (APP_SERVER | APP_DATE)]]
        for name, value in headers:
            parts += (name, b"\0", value, b"\0")
        return b"".join(parts)

    def guard(self):
        """The native server's defence counters (fpy3_h3_guard: connections, handshakes,
        Retry, refused, unread body bytes, streams reset at their deadlines)."""
        lib.fpy3_h3_guard_get(self.srv, self._guard)
        return self._guard

    def _report(self) -> None:
        """Once a second: say when handshake pressure turns Retry on or off, and what
        was refused or reset since the last report."""
        st = self.guard()
        seen = self._seen
        h3 = self.svc.settings.http3
        if st.pressure != seen.pressure:
            seen.pressure = st.pressure
            if st.pressure:
                logger.warning(
                    "HTTP/3: handshake pressure (%d connections in their handshake, %.1f MiB;"
                    " http3.max_handshakes %d, http3.handshake_memory %.1f MiB):"
                    " new clients must pass a Retry",
                    st.handshakes,
                    st.handshake_bytes / 1048576,
                    h3.max_handshakes,
                    h3.handshake_memory / 1048576,
                )
            else:
                logger.info("HTTP/3: handshake pressure gone: Retry off")
        if st.refused != seen.refused:
            logger.warning(
                "HTTP/3: refused %d new connection(s): http3.max_connections (%d) reached",
                st.refused - seen.refused,
                h3.max_connections,
            )
            seen.refused = st.refused
        if st.idle_closed != seen.idle_closed:
            logger.info(
                "HTTP/3: closed %d idle connection(s): http3.max_idle_connections (%d) reached",
                st.idle_closed - seen.idle_closed,
                h3.max_idle_connections,
            )
            seen.idle_closed = st.idle_closed
        for what, count, last, key, limit in (
            ("request", st.body_timeouts, seen.body_timeouts, "body_timeout", h3.body_timeout),
            ("response", st.send_timeouts, seen.send_timeouts, "send_timeout", h3.send_timeout),
        ):
            if count != last:
                logger.info(
                    "HTTP/3: reset %d stream(s) whose %s made no progress for %g s (http3.%s)",
                    count - last,
                    what,
                    limit,
                    key,
                )
        seen.body_timeouts, seen.send_timeouts = st.body_timeouts, st.send_timeouts

    def refresh(self, clock) -> None:
        """The default fields (Date, Server), from the service's clock each second."""
        if not self._closed:
            self._report()
        date = b"date\0" + clock.date + b"\0"
        server_header = self.svc.server_header
        server = b"server\0" + server_header + b"\0" if server_header else b""
        for flags in (0, APP_SERVER, APP_DATE, APP_SERVER | APP_DATE):
            self._fields[flags] = (b"" if flags & APP_DATE else date) + (
                b"" if flags & APP_SERVER else server
            )

    # -- drain and close ----------------------------------------------------------------------

    def stats(self) -> list[int]:
        """The engine's counters, in fpy3.metrics order: handshakes, lost packets, RTT
        count, RTT sum (us), RTT buckets."""
        if self.srv is None:
            return self._final_stats
        st = self._stats
        lib.fpy3_h3_get_stats(self.srv, st)
        return [st.handshakes, st.lost_packets, st.rtt_count, st.rtt_sum_us, *st.rtt_buckets]

    def connection_count(self) -> int:
        return 0 if self._closed else lib.fpy3_h3_connection_count(self.srv)

    async def drain(self, grace: float) -> None:
        """GOAWAY on every connection, then wait until they are gone (the service
        cancels this wait at its deadline).

        The notice goes first; the final GOAWAY follows after a grace period so that
        requests the client sent before it saw the notice are still answered.
        """
        self._drained = self.loop.create_future()
        websocket.drain(self)
        lib.fpy3_h3_shutdown(self.srv, 1)
        self._round()
        if self.connection_count():
            await asyncio.sleep(grace)
        if self._closed:
            return
        lib.fpy3_h3_shutdown(self.srv, 2)
        self._round()
        await asyncio.shield(self._drained)

    def close(self) -> None:
        """Close every connection at once (CONNECTION_CLOSE, so clients learn now, not
        at their idle timeout) and free the native server."""
        if self._closed:
            return
        left = lib.fpy3_h3_connection_count(self.srv)
        if left:
            logger.info("HTTP/3: closing %d connection(s)", left)
        self._closed = True
        self.loop.remove_reader(self.fd)
        if self._writer:
            self.loop.remove_writer(self.fd)
        if self._timer is not None:
            self._timer.cancel()
        lib.fpy3_h3_close_all(self.srv, H3_NO_ERROR)
        for stream in list(self.streams.values()):
            stream.closed = True
            stream.handle(lib.FPY3_H3_CLOSED, None)
        self.streams.clear()
        self._final_stats = self.stats()  # the connections just closed included
        srv, self.srv = self.srv, None
        left_open = lib.fpy3_msquic_left_open()
        ffi.release(srv)  # fpy3_h3_server_free, now rather than at garbage collection
        if lib.fpy3_msquic_left_open() != left_open:
            logger.error(
                "HTTP/3: MsQuic did not finish closing its connections in time; "
                "its state stays allocated until the process exits"
            )
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)


class _Seen:
    """The counters as last reported."""

    __slots__ = ("pressure", "refused", "idle_closed", "body_timeouts", "send_timeouts")

    def __init__(self) -> None:
        self.pressure = 0
        self.refused = 0
        self.idle_closed = 0
        self.body_timeouts = 0
        self.send_timeouts = 0


def _addr(addr):
    return [addr[0], addr[1]] if isinstance(addr, tuple) else None
