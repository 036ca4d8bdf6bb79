"""HTTP/1.1 protocol adapter: bytes from the transport to ASGI cycles and back.

Parsing is done in C (``fpy3.h1.parser``); the response rules are the core's
(``fpy3.core.http``). This module frames messages and keeps the connection's state:
keep-alive, pipelining, timeouts, backpressure.

Every phase that waits on the client has a deadline, checked by the service's clock
(no timer per request): the request head (``http1.header_timeout``), the idle time
between requests (``keepalive_timeout``), a request body that stops arriving
(``body_timeout`` without progress, progress being ``BODY_PROGRESS`` bytes, so that a
trickle of a byte now and then does not hold a connection forever: 408), and a client
that stops reading the response
(``send_timeout`` while the transport stays above its high-water mark, or while a
closing connection still holds unsent bytes: the connection is dropped). A connection goes on to its next
request as soon as a response is complete, while the finished cycle's task runs on
(background work after the response does not hold up the connection).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable
from http import HTTPStatus

from ..certs import HTTP01_PREFIX, http01_answer
from ..core.flow import RECV_HIGH_WATER, Waiter
from ..core.http import APP_DATE, APP_SERVER, CLOSE, STREAM, HTTPCycle
from ..core.scope import build_scope
from ..proxyproto import ProxyInfo
from ..tls import tls_extension
from . import websocket
from .parser import (
    CHUNKED,
    EXPECT_CONTINUE,
    KEEP_ALIVE,
    ChunkedDecoder,
    ParseError,
    RequestHead,
    parse_head,
)

logger = logging.getLogger("fpy3.error")

_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}


def status_line(status: int, minor: int = 1) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return b"HTTP/1.%d %d %s\r\n" % (minor, status, phrase.encode("latin-1"))


_STATUS_LINES = {s.value: status_line(s.value) for s in HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# A 405 must list what is allowed (RFC 9110 15.5.6): every method goes to the app but
# CONNECT, which asks for a tunnel.
_ALLOW = b"allow: GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
# Request body bytes that count as progress and move the body deadline: a client must
# send this much per http1.body_timeout (or finish). 1 KiB per 30 s by default is far
# below any real upload and far above a slow-POST trickle (RUDY: a byte every second).
BODY_PROGRESS = 1024
# SO_LINGER on, 0 s: closing then resets the connection and frees the kernel's buffers
# for it at once, instead of leaving them to a peer that does not read (as nginx's
# reset_timedout_connection).
_LINGER0 = struct.pack("ii", 1, 0)


class H1Listener:
    """What the connections of one listening socket share: the service, the scheme,
    and the default header lines (Date, Server, Alt-Svc), which the service's clock
    refreshes once a second (``refresh``)."""

    def __init__(self, service, scheme: str):
        self.svc = service
        self.scheme = scheme
        # Hands a connection over to HTTP/2 (transport, bytes read so far): after ALPN
        # chose h2 on TLS, or on the connection preface (prior knowledge). None = off.
        self.h2: Callable[[asyncio.Transport, bytes, tuple | None], object] | None = None
        self.alpn_h2 = False  # TLS with h2 offered: look at what ALPN chose
        # Indexed by a response's flags & (APP_SERVER | APP_DATE).
        self.prefixes: list[bytes] = [b""] * 16
        self.refresh(service.clock)

    def __call__(self) -> H1Connection:
        return H1Connection(self)

    def proxied(self, info: ProxyInfo) -> H1Connection:
        """A connection whose PROXY header named the client (and the address it
        reached); a LOCAL or UNKNOWN header keeps the socket's addresses."""
        conn = H1Connection(self)
        if info.client is not None:
            conn.client = list(info.client)
            conn.server = list(info.server) if info.server is not None else None
        if info.tls:
            conn.scheme = "https"  # TLS ended at the proxy
        return conn

    def prefix(self, flags: int) -> bytes:
        """The default header lines, without those the app set (APP_SERVER, APP_DATE)."""
        return self.prefixes[flags & (APP_SERVER | APP_DATE)]

    def refresh(self, clock) -> None:
        svc = self.svc
        date = b"date: " + clock.date + b"\r\n"
        server = b"server: " + svc.server_header + b"\r\n" if svc.server_header else b""
        alt_svc = b"alt-svc: " + svc.alt_svc + b"\r\n" if svc.alt_svc else b""
        for flags in (0, APP_SERVER, APP_DATE, APP_SERVER | APP_DATE):
            self.prefixes[flags] = (
                (b"" if flags & APP_DATE else date)
                + (b"" if flags & APP_SERVER else server)
                + alt_svc
            )

    def error_response(self, status: int, reason: str, extra: bytes = b"") -> bytes:
        """A complete response for a request we refuse; the connection closes after it."""
        body = f"{reason}\n".encode("latin-1", "replace")
        return b"".join(
            (
                status_line(status),
                self.prefix(0),
                extra,
                b"content-type: text/plain; charset=utf-8\r\n",
                b"content-length: %d\r\n" % len(body),
                b"connection: close\r\n\r\n",
                body,
            )
        )


class H1Connection(asyncio.Protocol):
    """One HTTP/1.1 connection (cleartext or TLS: the transport hides which)."""

    transport: asyncio.Transport  # from connection_made on

    def __init__(self, listener: H1Listener):
        self.listener = listener
        self.svc = svc = listener.svc
        self.loop = svc.loop
        self.scheme = listener.scheme
        self.client: list | None = None  # [host, port]; None for a Unix socket
        self.server: list | None = None
        self.buf = b""  # received bytes not yet consumed
        self.in_process = False
        self.reading_paused = False
        self.closed = False
        self.deadline = 0.0  # loop time when the idle, header or body timer fires; 0 = none
        self.send_deadline = 0.0  # when a client not reading the response is dropped
        self.flushing = False  # closed, with bytes the client has not taken yet
        self.header_phase = True  # waiting for a request head (its timer is running)
        self.requests = 0
        # The request whose response is in progress (None once the response is complete).
        self.cycle: HTTPCycle | None = None
        self.body_left = 0  # Content-Length bytes of the request still to read
        self.chunked: ChunkedDecoder | None = None
        self.body_size = 0
        self.body_mark = 0  # body_size when the body deadline was last moved
        self.keep_alive = True
        self.expect_continue = False
        self.minor = 1
        self.resp_chunked = False
        self.responding = False  # a request is being answered
        self.head_sent = False  # its response head is on the wire
        # Loop time since which no request is in progress (0 while one is): the longest
        # idle go first past limits.max_idle_connections.
        self.idle_since = 0.0
        self.writable = Waiter(self.loop)  # the transport drained
        self.write_paused = False
        self.ws: websocket.H1WebSocket | None = None  # once a request asked to upgrade
        self.tls: dict | None = None  # the scope's ASGI TLS extension, on TLS connections

    # -- transport events ---------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.listener.alpn_h2:
            ssl_object = transport.get_extra_info("ssl_object")
            h2 = self.listener.h2
            if h2 is not None and ssl_object and ssl_object.selected_alpn_protocol() == "h2":
                self.closed = True
                h2(transport, b"", self._origin())
                return
        svc = self.svc
        if self.client is None:  # else a PROXY header named it
            self.client = _addr(transport.get_extra_info("peername"))
            self.server = _addr(transport.get_extra_info("sockname"))
        if svc.max_connections and len(svc.connections) >= svc.max_connections:
            self.closed = True
            transport.write(self.listener.error_response(503, "too many connections"))
            transport.close()
            return
        self.deadline = self.idle_since = self.loop.time()
        self.deadline += svc.header_timeout
        svc.admit(self)
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is not None:
            self.tls = tls_extension(sslobj)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.flushing = False
        self._lost()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.send_deadline = self.loop.time() + self.svc.send_timeout

    def resume_writing(self) -> None:
        self.write_paused = False
        # Progress: a closing connection gets another period for what is left.
        self.send_deadline = self.loop.time() + self.svc.send_timeout if self.flushing else 0.0
        self.writable.wake()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        ws = self.ws
        if ws is not None and ws.upgraded:
            ws.feed_data(data)
            return
        self.buf = self.buf + data if self.buf else data
        if not self.in_process:
            self._process()

    def eof_received(self):
        if self.cycle is not None:
            self.cycle.feed_disconnect()
        return False

    # -- what the websocket adapter and the service use -----------------------------------

    def pause_reading(self) -> None:
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()
            # Not reading is our choice (the app is behind): no body timer meanwhile.
            self.deadline = 0.0

    def resume_reading(self) -> None:
        if self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()
            if (self.body_left or self.chunked is not None) and not self.expect_continue:
                self.body_mark = self.body_size
                self.deadline = self.loop.time() + self.svc.body_timeout

    def take_buffer(self) -> bytes:
        """The bytes received and not yet consumed (after an upgrade: frames)."""
        buf, self.buf = self.buf, b""
        return buf

    def _switch_to_h2(self) -> None:
        """The client speaks HTTP/2 with prior knowledge: the transport goes to it."""
        h2 = self.listener.h2
        assert h2 is not None
        buf = self.take_buffer()
        self.closed = True
        self.svc.forget(self)
        h2(self.transport, buf, self._origin())

    def _origin(self) -> tuple | None:
        """What a PROXY header said, for the HTTP/2 connection taking over."""
        if self.client is None:
            return None
        return self.client, self.server, self.scheme

    def reject(self, status: int, reason: str, extra: bytes = b"") -> None:
        """Answer a request we cannot serve, then close."""
        logger.debug("%d for %s: %s", status, _fmt(self.client), reason)
        if not self.closed:
            self.transport.write(self.listener.error_response(status, reason, extra))
        self.close()

    def close(self) -> None:
        """Close after the bytes already written. While the client has not taken them
        the connection stays registered, under the send timeout."""
        if not self.closed:
            self.closed = True
            self.deadline = 0.0
            transport = self.transport
            transport.close()
            if transport.get_write_buffer_size():
                self.flushing = True
                if not self.send_deadline:
                    self.send_deadline = self.loop.time() + self.svc.send_timeout
            self._lost()

    def abort(self) -> None:
        """The response cannot be completed: close after what was written, so the
        client sees it cut short."""
        self.close()

    def close_idle(self) -> None:
        """Too many idle connections (limits.max_idle_connections): close this one, which
        has no request in progress (a keep-alive client just opens another)."""
        if not self.closed and not self.responding:
            self.close()

    def kill(self) -> None:
        """Drop the connection now, discarding what is not sent yet."""
        if not self.closed or self.flushing:
            self.closed = True
            self.flushing = False
            self.transport.abort()
            self._lost()

    def _lost(self) -> None:
        if not self.flushing:
            self.svc.forget(self)
        if self.ws is not None:
            self.ws.lost()
        if self.cycle is not None:
            self.cycle.feed_disconnect()
        self.writable.wake()

    def on_timeout(self) -> None:
        """Called by the service clock when ``deadline`` or ``send_deadline`` has passed."""
        now = self.loop.time()
        if self.send_deadline and self.send_deadline <= now:
            logger.info(
                "dropping connection from %s: the response was not read for %gs",
                _fmt(self.client),
                self.svc.send_timeout,
            )
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
                except OSError:
                    pass
            self.kill()
            return
        if self.closed or not self.deadline or self.deadline > now:
            return
        self.deadline = 0.0
        if self.body_left or self.chunked is not None:
            self._body_error(408, "request body not received in time")
        elif self.responding:
            return
        elif self.buf:
            self.reject(408, "request head not received in time")
        else:
            self.close()  # idle keep-alive connection

    def drain(self, grace: float) -> None:
        """Draining: the next response says Connection: close; between requests, the
        connection closes after ``grace`` seconds unless a request arrives first.

        A connection with no request yet was opened to send one (often its bytes are
        in flight): it keeps its header timeout and is answered with Connection: close.
        """
        self.keep_alive = False
        if self.ws is not None and self.ws.cycle is not None:
            self.ws.cycle.server_close(1001)
            return
        if not self.responding and not self.buf and not self.closed and self.requests:
            deadline = self.loop.time() + grace
            if not self.deadline or deadline < self.deadline:
                self.deadline = deadline

    # -- parsing ----------------------------------------------------------------------

    def _process(self) -> None:
        """Consume ``self.buf``: body bytes of the current request, then new heads."""
        if self.in_process:
            return
        self.in_process = True
        try:
            svc = self.svc
            while not self.closed:
                buf = self.buf
                if self.body_left or self.chunked is not None:
                    if not buf or not self._feed_body():
                        break
                    continue
                if self.responding or self.ws is not None:
                    # Pipelined bytes wait for the response; bound what we hold.
                    if len(buf) > svc.max_header_size:
                        self.pause_reading()
                    break
                if not buf:
                    break
                try:
                    head = parse_head(buf, 0, svc.max_header_size, svc.max_header_count)
                except ParseError as exc:
                    if not self.requests and buf[:14] == b"PRI * HTTP/2.0" and self.listener.h2:
                        self._switch_to_h2()  # the HTTP/2 preface: prior knowledge
                    else:
                        self.reject(exc.status, exc.reason, _ALLOW if exc.status == 405 else b"")
                    break
                if head is None:
                    if not self.header_phase:
                        # A partial head starts the header timer (slowloris -> 408).
                        self.header_phase = True
                        self.deadline = self.loop.time() + svc.header_timeout
                    break
                self.header_phase = False
                end = head[0]
                self.buf = buf[end:] if end < len(buf) else b""
                self._start_request(head)
        finally:
            self.in_process = False

    def _start_request(self, head: RequestHead) -> None:
        svc = self.svc
        # Unpacked rather than read by name: this runs for every request.
        _, method, raw_path, query, path, minor, headers, clen, flags, upgrade = head
        self.requests += 1
        self.deadline = 0.0
        self.minor = minor
        self.keep_alive = bool(flags & KEEP_ALIVE) and not svc.draining
        self.expect_continue = bool(flags & EXPECT_CONTINUE)
        self.body_size = 0
        self.body_mark = 0
        self.resp_chunked = False
        self.responding = True
        self.head_sent = False
        self.idle_since = 0.0
        if (
            upgrade is not None
            and method == b"GET"
            and svc.ws.enabled
            and upgrade.lower().strip() == b"websocket"
        ):
            websocket.start(self, head)
            return
        if svc.acme_http01 and self.scheme == "http" and raw_path.startswith(HTTP01_PREFIX):
            if self._acme_http01(method, raw_path):
                return
        if flags & CHUNKED:
            self.chunked = ChunkedDecoder()
            self.body_left = 0
            more = True
        elif clen > 0:
            if svc.max_body_size and clen > svc.max_body_size:
                self.reject(413, "request body larger than limits.max_body_size")
                return
            self.body_left = clen
            more = True
        else:
            more = False
        scope = build_scope(
            svc,
            "http",
            "1.1" if minor else "1.0",
            self.scheme,
            _METHODS.get(method) or method.decode("ascii"),
            path,
            raw_path,
            query,
            headers,
            self.client,
            self.server,
        )
        if more and not self.expect_continue:
            self.deadline = self.loop.time() + svc.body_timeout
        if self.tls is not None:
            scope.setdefault("extensions", {})["tls"] = self.tls
        cycle = self.cycle = HTTPCycle(scope, self, svc, more)
        svc.spawn(cycle.run())

    def _acme_http01(self, method: bytes, raw_path: bytes) -> bool:
        """An ACME http-01 validation request (RFC 8555 8.3), answered here without the
        app when a challenge for its token is pending; False otherwise."""
        answer = http01_answer(self.svc.state_dir, raw_path)
        if answer is None or method not in (b"GET", b"HEAD"):
            return False
        head = b"".join(
            (
                _STATUS_LINES[200],
                self.listener.prefix(0),
                b"content-type: application/octet-stream\r\n",
                b"content-length: %d\r\n" % len(answer),
                b"connection: close\r\n\r\n",
            )
        )
        self.transport.write(head if method == b"HEAD" else head + answer)
        self.close()
        return True

    def _feed_body(self) -> bool:
        """Feed buffered body bytes; False when more bytes are needed."""
        buf = self.buf
        if self.chunked is not None:
            try:
                consumed, chunks, done = self.chunked.feed(buf, 0)
            except ParseError as exc:
                self._body_error(exc.status, exc.reason)
                return False
            self.buf = buf[consumed:] if consumed < len(buf) else b""
            data = b"".join(chunks) if chunks else b""
            if done:
                self.chunked = None
        else:
            left = self.body_left
            if len(buf) <= left:
                data = buf
                self.buf = b""
            else:
                data = buf[:left]
                self.buf = buf[left:]
            self.body_left = left - len(data)
            done = self.body_left == 0
        self.body_size += len(data)
        if done:
            self.deadline = 0.0
        elif self.body_size - self.body_mark >= BODY_PROGRESS and not self.reading_paused:
            self.body_mark = self.body_size
            self.deadline = self.loop.time() + self.svc.body_timeout
        if self.svc.max_body_size and self.body_size > self.svc.max_body_size:
            self._body_error(413, "request body larger than limits.max_body_size")
            return False
        cycle = self.cycle
        if cycle is None:
            # The response is complete: what is left of the body is read and dropped.
            if done and not self.responding:
                self._next_request()
            return done
        if data or done:
            cycle.feed_body(data, not done)
            if cycle.queued > RECV_HIGH_WATER:
                self.pause_reading()
        return done

    def _body_error(self, status: int, reason: str) -> None:
        if self.head_sent:
            logger.info("closing connection from %s: %s", _fmt(self.client), reason)
            self.close()
            return
        self.reject(status, reason)

    # -- the adapter operations the ASGI core calls -------------------------------------

    def want_body(self) -> None:
        if self.expect_continue:
            self.expect_continue = False
            if not self.closed and not self.head_sent:
                self.transport.write(_CONTINUE)
                if not self.reading_paused and (self.body_left or self.chunked is not None):
                    self.deadline = self.loop.time() + self.svc.body_timeout
        cycle = self.cycle
        if self.reading_paused and cycle is not None and cycle.queued < RECV_HIGH_WATER:
            self.resume_reading()

    def write_head(self, status: int, headers, flags: int, data, end: bool):
        if self.closed:
            return None
        minor = self.minor
        line = _STATUS_LINES.get(status) if minor else None
        if line is None:
            line = status_line(status, minor)
        parts = [line, self.listener.prefixes[flags & (APP_SERVER | APP_DATE)]]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if flags & CLOSE:
            self.keep_alive = False
        if self.expect_continue and (self.body_left or self.chunked is not None):
            # The client never got 100 and may never send the body: this response
            # ends the connection, and says so (RFC 9110 10.1.1).
            self.keep_alive = False
        if flags & STREAM:
            if minor:
                self.resp_chunked = True
                parts.append(b"transfer-encoding: chunked\r\n")
            else:
                self.keep_alive = False  # HTTP/1.0: the body ends at close
        if not self.keep_alive:
            parts.append(b"connection: close\r\n\r\n")
        elif not minor:
            parts.append(b"connection: keep-alive\r\n\r\n")
        else:
            parts.append(b"\r\n")
        head = b"".join(parts)
        self.head_sent = True
        if self.resp_chunked:
            data = self._chunk(data, end)
        if len(data) < 65536:
            self.transport.write(head + data if data else head)
        else:
            self.transport.writelines((head, data))
        if end:
            self._response_done()
            return None
        return self.writable.wait() if self.write_paused else None

    def write_body(self, data, end: bool):
        if self.closed:
            return None
        if self.resp_chunked:
            data = self._chunk(data, end)
        if data:
            self.transport.write(data)
        if end:
            self._response_done()
            return None
        return self.writable.wait() if self.write_paused else None

    def write_trailers(self, headers):
        if self.closed:
            return None
        if self.resp_chunked:
            parts = [b"0\r\n"]
            for name, value in headers:
                parts += (name, b": ", value, b"\r\n")
            parts.append(b"\r\n")
            self.transport.write(b"".join(parts))
        # Else (a declared Content-Length, HTTP/1.0): no way to send them.
        self._response_done()
        return None

    def write_waiter(self):
        """While the peer reads slowly: an awaitable done when the transport drains."""
        return self.writable.wait() if self.write_paused else None

    @staticmethod
    def _chunk(data, end: bool):
        if data:
            data = b"%x\r\n%b\r\n" % (len(data), data)
            return data + _LAST_CHUNK if end else data
        return _LAST_CHUNK if end else b""

    # -- between requests ------------------------------------------------------------------

    def _response_done(self) -> None:
        """The response is complete: the connection goes on while the app's task may
        still run (background work after the response)."""
        self.cycle = None
        if not self.keep_alive:
            self.close()
            return
        self.responding = False
        if self.body_left or self.chunked is not None:
            # Read and drop what remains of the body, then the next request.
            self.resume_reading()
            if self.buf:
                self._schedule_process()
            return
        self._next_request()

    def _next_request(self) -> None:
        """The exchange is over on both sides: wait for the next request."""
        if self.closed:
            return
        if not self.keep_alive:
            self.close()
            return
        self.idle_since = self.loop.time()
        self.deadline = self.idle_since + self.svc.keepalive_timeout
        self.header_phase = False
        if self.reading_paused:
            self.resume_reading()
        if self.buf:
            self._schedule_process()

    def _schedule_process(self) -> None:
        # Inside _process (the response was written as the request started), its loop
        # goes on; from the app's task, the next request starts from the loop rather
        # than inside that task.
        if not self.in_process:
            self.loop.call_soon(self._process)


def _addr(addr):
    if isinstance(addr, tuple):
        host = addr[0]
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]  # IPv4 on a dual-stack socket: shown as IPv4
        return [host, addr[1]]
    if isinstance(addr, str) and addr:
        return [addr, None]  # a Unix socket's path (ASGI: [path, None])
    return None


def _fmt(addr) -> str:
    return f"{addr[0]}:{addr[1]}" if addr else "-"
