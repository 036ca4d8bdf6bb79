"""HTTP/1.1 protocol adapter: bytes from the transport to ASGI cycles and back.

Parsing is done in C (``fpy3.h1.parser``); this module only frames messages,
keeps the connection's state (keep-alive, pipelining, timeouts, backpressure)
and serializes response heads.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus

from ..asgi.http import ASGI_VERSION, HTTPCycle
from ..ws import h1 as ws_h1
from .parser import CHUNKED, EXPECT_CONTINUE, KEEP_ALIVE, ChunkedDecoder, ParseError, parse_head

logger = logging.getLogger("fpy3.error")

# Body bytes queued for an app that does not read them before we stop reading.
RECV_HIGH_WATER = 256 * 1024

_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}


def _status_line(status: int, minor: int = 1) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return b"HTTP/1.%d %d %s\r\n" % (minor, status, phrase.encode("latin-1"))


_STATUS_LINES = {s.value: _status_line(s.value) for s in HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_NO_BODY_STATUS = frozenset({204, 304})


def _find_bad_header(headers) -> tuple:
    for name, value in headers:
        if b"\n" in value or b"\r" in value or b"\n" in name or b"\r" in name:
            return name, value
    return b"", b""


class H1Connection(asyncio.Protocol):
    """One HTTP/1.1 connection (cleartext or TLS: the transport hides which)."""

    def __init__(self, service, scheme: str):
        self.svc = service
        self.loop = service.loop
        self.scheme = scheme
        self.transport = None
        self.client = None
        self.server = None
        self.buf = b""  # received bytes not yet consumed
        self.in_process = False
        self.reading_paused = False
        self.closed = False
        self.deadline = 0.0  # loop time when the idle or header timer fires; 0 = none
        self.header_phase = True  # waiting for a request head (its timer is running)
        self.requests = 0
        # Request in progress.
        self.cycle: HTTPCycle | None = None
        self.body_left = 0  # Content-Length bytes still to read
        self.chunked: ChunkedDecoder | None = None
        self.body_size = 0
        self.discard_body = False  # the app finished; read and drop the rest of the body
        self.keep_alive = True
        self.expect_continue = False
        self.head_request = False
        self.minor = 1
        self.started_at = 0.0
        # Response in progress.
        self.resp_head = None  # (status, headers) held until the first body
        self.resp_chunked = False
        self.resp_left = -1  # declared Content-Length still to send; -1 = not declared
        self.resp_bytes = 0
        self.resp_status = 0
        self.drain_waiter = None
        self.write_paused = False
        self.ws = None  # the websocket adapter once a request asked to upgrade

    # -- transport events ---------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        svc = self.svc
        self.client = _addr(transport.get_extra_info("peername"))
        self.server = _addr(transport.get_extra_info("sockname"))
        if svc.max_connections and len(svc.connections) >= svc.max_connections:
            self.closed = True
            transport.write(svc.error_response(503, "too many connections"))
            transport.close()
            return
        svc.connections.add(self)
        self.deadline = self.loop.time() + svc.header_timeout

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.svc.forget(self)
        if self.ws is not None:
            self.ws.lost()
        if self.cycle is not None:
            self.cycle.feed_disconnect()
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiter = self.drain_waiter
        if waiter is not None:
            self.drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        ws = self.ws
        if ws is not None and ws.upgraded:
            ws.cycle.feed_data(data)
            return
        self.buf = self.buf + data if self.buf else data
        if not self.in_process:
            self._process()

    def eof_received(self):
        if self.cycle is not None:
            self.cycle.feed_disconnect()
        return False

    # -- parsing ----------------------------------------------------------------------

    def _process(self) -> None:
        """Consume ``self.buf``: body bytes of the current request, then new heads."""
        self.in_process = True
        try:
            svc = self.svc
            while not self.closed:
                buf = self.buf
                if self.body_left or self.chunked is not None:
                    if not buf or not self._feed_body():
                        break
                    continue
                if self.cycle is not None:
                    # Pipelined bytes wait for the response; bound what we hold.
                    if len(buf) > svc.max_header_size and not self.reading_paused:
                        self._pause_reading()
                    break
                if not buf:
                    break
                try:
                    head = parse_head(buf, 0, svc.max_header_size, svc.max_header_count)
                except ParseError as exc:
                    self._reject(exc.status, exc.reason)
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

    def _start_request(self, head) -> None:
        _, method, raw_path, query, path, minor, headers, clen, flags, upgrade = head
        svc = self.svc
        self.requests += 1
        self.deadline = 0.0
        self.minor = minor
        self.keep_alive = bool(flags & KEEP_ALIVE) and not svc.draining
        self.expect_continue = bool(flags & EXPECT_CONTINUE)
        self.head_request = method == b"HEAD"
        self.discard_body = False
        self.body_size = 0
        self.resp_head = None
        self.resp_bytes = 0
        self.resp_status = 0
        self.resp_left = -1
        self.resp_chunked = False
        if (
            upgrade is not None
            and method == b"GET"
            and svc.ws.enabled
            and upgrade.lower().strip() == b"websocket"
        ):
            ws_h1.start(self, raw_path, query, path, headers, clen, flags)
            return
        if flags & CHUNKED:
            self.chunked = ChunkedDecoder()
            self.body_left = 0
            more = True
        elif clen > 0:
            if svc.max_body_size and clen > svc.max_body_size:
                self._reject(413, "request body larger than limits.max_body_size")
                return
            self.body_left = clen
            more = True
        else:
            more = False
        root = svc.root_path
        scope = {
            "type": "http",
            "asgi": ASGI_VERSION.copy(),
            "http_version": "1.1" if minor else "1.0",
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "method": _METHODS.get(method) or method.decode("ascii"),
            "root_path": root,
            "path": root + path if root else path,
            "raw_path": raw_path,
            "query_string": query,
            "headers": headers,
            "state": svc.state.copy(),
        }
        self.started_at = self.loop.time() if svc.access_log is not None else 0.0
        cycle = self.cycle = HTTPCycle(scope, self, self.loop, more, svc.debug)
        cycle.task = asyncio.Task(cycle.run(svc.app), loop=self.loop, eager_start=True)

    def _feed_body(self) -> bool:
        """Feed buffered body bytes; False when more bytes are needed."""
        buf = self.buf
        cycle = self.cycle
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
        if self.svc.max_body_size and self.body_size > self.svc.max_body_size:
            self._body_error(413, "request body larger than limits.max_body_size")
            return False
        if self.discard_body:
            if done:
                self.discard_body = False
                self._after_response()
            return done
        if cycle is not None and (data or done):
            cycle.feed_body(data, not done)
            if cycle.queued > RECV_HIGH_WATER and not self.reading_paused:
                self._pause_reading()
        return done

    def _body_error(self, status: int, reason: str) -> None:
        cycle = self.cycle
        if cycle is not None and cycle.started:
            logger.info("closing connection from %s: %s", _fmt(self.client), reason)
            self._close()
            return
        self._reject(status, reason)

    def _pause_reading(self) -> None:
        self.reading_paused = True
        self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def _reject(self, status: int, reason: str) -> None:
        """Answer a request we cannot serve, then close."""
        logger.debug("%d for %s: %s", status, _fmt(self.client), reason)
        if not self.closed:
            self.transport.write(self.svc.error_response(status, reason))
        self._close()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.svc.forget(self)
            self.transport.close()
            if self.ws is not None:
                self.ws.lost()
            if self.cycle is not None:
                self.cycle.feed_disconnect()

    def on_timeout(self) -> None:
        """Called by the service clock when ``deadline`` has passed."""
        if self.cycle is not None or self.closed:
            return
        if self.buf:
            self._reject(408, "request head not received in time")
        else:
            self._close()  # idle keep-alive connection

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
        if self.cycle is None and not self.buf and not self.closed and self.requests:
            deadline = self.loop.time() + grace
            if not self.deadline or deadline < self.deadline:
                self.deadline = deadline

    # -- the adapter operations the ASGI core calls -------------------------------------

    def want_body(self) -> None:
        if self.expect_continue:
            self.expect_continue = False
            if self.resp_head is None and not self.resp_status and not self.closed:
                self.transport.write(_CONTINUE)
        if self.reading_paused and self.cycle is not None and self.cycle.queued < RECV_HIGH_WATER:
            self._resume_reading()

    def write_head(self, status: int, headers) -> None:
        self.resp_head = (status, headers)
        self.resp_status = status

    def write_body(self, data: bytes, more: bool):
        if self.closed:
            return None
        if self.resp_head is not None:
            head = self._serialize_head(data, more)
            self.resp_head = None
        else:
            head = None
        n = len(data)
        if self.resp_left >= 0:
            if n > self.resp_left:
                raise RuntimeError("response body longer than its Content-Length")
            self.resp_left -= n
            if not more and self.resp_left:
                logger.error("response body shorter than its Content-Length; closing")
                self.keep_alive = False
        if self.head_request or self.resp_status in _NO_BODY_STATUS:
            data = b""
        elif self.resp_chunked:
            if data:
                data = b"%x\r\n%b\r\n" % (n, data)
            if not more:
                data += b"0\r\n\r\n"
        self.resp_bytes += n
        transport = self.transport
        if head is not None:
            if len(data) < 65536:
                transport.write(head + data)
            else:
                transport.writelines((head, data))
        elif data:
            transport.write(data)
        if not more:
            self._response_done()
            return None
        return self.write_waiter()

    def write_waiter(self) -> asyncio.Future | None:
        """While the peer reads slowly: a future done when the transport drains."""
        if not self.write_paused:
            return None
        if self.drain_waiter is None:
            self.drain_waiter = self.loop.create_future()
        return self.drain_waiter

    def abort(self) -> None:
        self._close()

    def cycle_done(self, cycle: HTTPCycle) -> None:
        if cycle is not self.cycle:
            return
        if not cycle.complete and not self.closed:
            self._close()
        self.cycle = None
        if self.closed:
            return
        if self.body_left or self.chunked is not None:
            if self.expect_continue:
                self._close()  # the client never got 100 and may never send the body
                return
            # Read and drop what remains of the body, then go on.
            self.discard_body = True
            self._resume_reading()
            if self.buf and not self.in_process:
                self._process()
            return
        self._after_response()

    # -- response framing ----------------------------------------------------------------

    def _serialize_head(self, data: bytes, more: bool) -> bytes:
        status, headers = self.resp_head
        line = _STATUS_LINES.get(status) if self.minor else None
        if line is None:
            line = _status_line(status, self.minor)
        app_parts = []
        declared = -1
        chunked = False
        for name, value in headers:
            lname = name.lower()
            if lname == b"content-length":
                declared = int(value)
            elif lname == b"connection":
                if b"close" in value.lower():
                    self.keep_alive = False
                continue
            elif lname == b"transfer-encoding":
                chunked = True
                continue
            app_parts += (name, b": ", value, b"\r\n")
        app_block = b"".join(app_parts)
        # Each app header is one CRLF-terminated line; any other CR or LF would split
        # the response. Two scans of the block instead of checks per header.
        lines = len(app_parts) >> 2
        if app_block.count(b"\n") != lines or app_block.count(b"\r") != lines:
            name, value = _find_bad_header(headers)
            raise RuntimeError(f"invalid response header {name!r}: {value!r}")
        if status in _NO_BODY_STATUS or status < 200:
            framing = b""
        elif declared >= 0:
            self.resp_left = declared
            framing = b""
        elif not more and not chunked:
            # The whole body is here: give it a length instead of chunking.
            framing = b"content-length: %d\r\n" % len(data)
        elif self.minor:
            self.resp_chunked = True
            framing = b"transfer-encoding: chunked\r\n"
        else:
            self.keep_alive = False  # HTTP/1.0: the body ends at close
            framing = b""
        if not self.keep_alive:
            end = b"connection: close\r\n\r\n"
        elif not self.minor:
            end = b"connection: keep-alive\r\n\r\n"
        else:
            end = b"\r\n"
        return b"".join((line, self.svc.header_prefix, app_block, framing, end))

    def _response_done(self) -> None:
        svc = self.svc
        if svc.access_log is not None and self.cycle is not None:
            svc.access_log.log_request(
                self.cycle.scope,
                self.resp_status,
                self.resp_bytes,
                self.loop.time() - self.started_at,
            )
        svc.requests_served += 1
        if not self.keep_alive:
            self._close()

    def _after_response(self) -> None:
        """The exchange is over on both sides: wait for the next request."""
        if self.closed:
            return
        if not self.keep_alive:
            self._close()
            return
        self.deadline = self.loop.time() + self.svc.keepalive_timeout
        self.header_phase = False
        self._resume_reading()
        if self.buf and not self.in_process:
            self._process()


def _addr(addr):
    if isinstance(addr, tuple):
        return [addr[0], addr[1]]
    return None


def _fmt(addr) -> str:
    return f"{addr[0]}:{addr[1]}" if addr else "-"
