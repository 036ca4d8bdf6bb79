"""The ASGI ``websocket`` cycle, shared by every transport (HTTP/1.1 Upgrade, HTTP/3
and HTTP/2 extended CONNECT).

A transport adapter hands the cycle a scope and the peer's bytes; the cycle drives a
sans-I/O websocket protocol (``fpy3.wsproto``, given as a factory so the core does not
depend on it) and owns the ASGI message rules: connect, accept, the
``websocket.http.response`` denial (an ordinary response through ``HTTPCycle``, so the
response rules are the same), receive, send, close, disconnect, the keep-alive pings,
the idle limit and the close handshake's deadline.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from .errors import ClientDisconnected, ProtocolError
from .flow import RECV_HIGH_WATER, Waiter
from .host import Host
from .http import AppError, HTTPAdapter, HTTPCycle, response_headers

logger = logging.getLogger("fpy3.error")

CONNECTING, ACCEPTED, RESPONSE, DONE = range(4)

_CONNECT = {"type": "websocket.connect"}
# Fields of the handshake response the server sets itself.
_RESERVED = frozenset(
    {b"sec-websocket-accept", b"sec-websocket-extensions", b"sec-websocket-protocol"}
)
_QUEUED_OVERHEAD = 64  # counted per queued message besides its payload


def app_close_code_ok(code: int) -> bool:
    """Codes an app may send (1005, 1006 and 1015 are never put on the wire)."""
    return code == 1000 or 1001 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class WSProtocol(Protocol):
    """The websocket protocol the cycle drives (``fpy3.wsproto.WSProtocol``)."""

    outgoing: list[bytes]  # bytes to send that the protocol produced (pongs, close)
    close_sent: bool

    @property
    def closed(self) -> bool: ...

    @property
    def open(self) -> bool: ...

    def receive_data(self, data) -> list: ...

    def message(self, data, text: bool) -> list[bytes]: ...

    def ping(self, payload: bytes = b"") -> bytes: ...

    def close(self, code: int = 1000, reason: str = "") -> bytes: ...


# (request headers, [websocket] settings) -> (protocol, Sec-WebSocket-Extensions value)
ProtocolFactory = Callable[[list, Any], tuple[WSProtocol, bytes]]


class WebSocketAdapter(Protocol):
    """What a transport gives the cycle."""

    method: str  # the request's method, for a denial's access-log line

    def accept(self, headers: list, flags: int) -> None:
        """Complete the handshake (101 on HTTP/1.1, 200 on HTTP/2 and HTTP/3) with these
        checked, lowercase fields besides the transport's own; ``flags`` as for
        ``HTTPAdapter.write_head`` (APP_SERVER, APP_DATE)."""

    def http(self) -> HTTPAdapter:
        """The adapter a denial response goes through."""

    def write(self, frames: list[bytes]) -> Awaitable[None] | None:
        """Frame bytes; returns an awaitable while the peer is not keeping up."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def finish(self) -> None:
        """The close handshake is over: end the transport after the pending bytes."""

    def abort(self) -> None:
        """Drop the transport now."""

    def cycle_done(self, cycle: WebSocketCycle) -> None:
        """The app returned."""


class WebSocketCycle:
    """One websocket session between a transport adapter and the app."""

    def __init__(
        self,
        scope: dict,
        adapter: WebSocketAdapter,
        host: Host,
        settings,
        open_protocol: ProtocolFactory,
    ):
        self.scope = scope
        self.adapter = adapter
        self.host = host
        self.loop = host.loop
        self.settings = settings  # the [websocket] section
        self.open_protocol = open_protocol
        self.state = CONNECTING
        self.proto: WSProtocol | None = None
        self.denial: HTTPCycle | None = None  # the HTTP response instead of the handshake
        self.queue: deque = deque()
        self.queued = 0
        self.paused = False
        self.early: list[bytes] = []  # bytes received before the handshake completed
        self.connect_sent = False
        self.gone = False  # the transport is closed
        self.finished = False  # the close handshake completed
        self.app_done = False
        self.draining = False
        self.code = 1006
        self.reason = ""
        self.waiter = Waiter(self.loop)
        self.timer: asyncio.TimerHandle | None = None
        self.started_at = self.loop.time()
        self.last_rx = 0.0
        self.last_msg = 0.0
        self.ping_at = 0.0  # when the outstanding keep-alive ping was sent; 0 = none
        self.close_at = 0.0  # when our close frame was sent; 0 = not yet

    @property
    def accepted(self) -> bool:
        return self.state == ACCEPTED

    # -- adapter -> cycle --------------------------------------------------------------

    def feed_data(self, data) -> None:
        """Bytes from the peer (any bytes-like object, read before this returns)."""
        proto = self.proto
        if proto is None:
            if self.state == CONNECTING:
                self.early.append(bytes(data))
            return
        self.last_rx = self.loop.time()
        try:
            events = proto.receive_data(data)
        except ProtocolError as exc:
            logger.debug("websocket from %s: %s (%d)", self.scope["client"], exc.reason, exc.code)
            self._flush()
            self._cancel_timer()
            self._end(exc.code, exc.reason)
            self.adapter.finish()
            return
        if events:
            self._events(events)
        self._flush()
        if proto.closed:
            self.finished = True
            self._cancel_timer()
            self.adapter.finish()
        elif self.queued > RECV_HIGH_WATER and not self.paused:
            self.paused = True
            self.adapter.pause_reading()

    def _events(self, events: list) -> None:
        assert self.proto is not None
        closing = self.proto.close_sent
        for ev in events:
            kind = ev[0]
            if kind == "text" or kind == "bytes":
                if closing:
                    continue  # the app closed: messages after that are dropped
                self.last_msg = self.last_rx
                if kind == "text":
                    msg = {"type": "websocket.receive", "text": ev[1]}
                else:
                    msg = {"type": "websocket.receive", "bytes": ev[1]}
                self.queue.append((msg, len(ev[1]) + _QUEUED_OVERHEAD))
                self.queued += len(ev[1]) + _QUEUED_OVERHEAD
            elif kind == "pong":
                self.ping_at = 0.0
            elif kind == "close":
                self._end(ev[1], ev[2])
        self.waiter.wake()

    def feed_disconnect(self) -> None:
        """The transport is gone."""
        if not self.gone:
            self.gone = True
            self._cancel_timer()
            if self.denial is not None:
                self.denial.feed_disconnect()
            if not self.finished:
                self._end(1006, "")
            self.waiter.wake()

    def server_close(self, code: int = 1001, reason: str = "") -> None:
        """The server goes away (drain): close the websocket with ``code``."""
        self.draining = True
        if self.state == ACCEPTED and not self.gone:
            self._send_close(code, reason)

    def _end(self, code: int, reason: str) -> None:
        # The app's receive() reports the first ending seen.
        if not self.finished:
            self.finished = True
            self.code, self.reason = code, reason
        self.waiter.wake()

    def _flush(self) -> None:
        assert self.proto is not None
        out = self.proto.outgoing
        if out and not self.gone:
            self.adapter.write(out[:])
        out.clear()

    # -- the app's receive and send ---------------------------------------------------------

    async def receive(self) -> dict:
        if not self.connect_sent:
            self.connect_sent = True
            return _CONNECT.copy()
        while not self.queue and not self.finished and not self.gone:
            await self.waiter.wait()
        if self.queue:
            msg, size = self.queue.popleft()
            self.queued -= size
            if self.paused and self.queued < RECV_HIGH_WATER // 2:
                self.paused = False
                self.adapter.resume_reading()
            return msg
        return {"type": "websocket.disconnect", "code": self.code, "reason": self.reason}

    async def send(self, message: dict) -> None:
        kind = message["type"]
        state = self.state
        if state == ACCEPTED:
            proto = self.proto
            assert proto is not None  # set with the state
            if self.gone or (proto.close_sent and kind != "websocket.close"):
                raise ClientDisconnected(f"websocket closed ({self.code}); cannot send {kind!r}")
            if kind == "websocket.send":
                text, data = message.get("text"), message.get("bytes")
                if (text is None) == (data is None):
                    raise RuntimeError("websocket.send needs exactly one of 'bytes' and 'text'")
                self.last_msg = self.loop.time()
                if text is not None:
                    frames = proto.message(text, True)
                else:
                    frames = proto.message(data, False)
                pending = self.adapter.write(frames)
                if pending is not None:
                    await pending
                return
            if kind == "websocket.close":
                code = message.get("code") or 1000
                if not app_close_code_ok(code):
                    raise RuntimeError(f"invalid websocket close code {code}")
                self._send_close(code, message.get("reason") or "")
                return
            raise RuntimeError(f"unexpected ASGI message {kind!r} on an accepted websocket")
        if state == CONNECTING:
            if kind == "websocket.accept":
                self._accept(message)
            elif kind == "websocket.close":
                # Closing before accepting denies the handshake (ASGI: 403).
                self.state = DONE
                self._end(1006, "")
                if not self.gone:
                    self._denial().reply(403, [(b"content-length", b"0")], b"")
            elif kind == "websocket.http.response.start":
                if self.gone:
                    raise ClientDisconnected("the client went away before the response")
                await self._denial().send(
                    {
                        "type": "http.response.start",
                        "status": message["status"],
                        "headers": message.get("headers") or [],
                    }
                )
                self.state = RESPONSE
            else:
                raise RuntimeError(
                    f"expected 'websocket.accept' or 'websocket.close', got {kind!r}"
                )
            return
        if state == RESPONSE:
            if kind != "websocket.http.response.body":
                raise RuntimeError(f"expected 'websocket.http.response.body', got {kind!r}")
            more = message.get("more_body", False)
            if not more:
                self.state = DONE
                self._end(1000, "")
            await self._denial().send(
                {"type": "http.response.body", "body": message.get("body", b""), "more_body": more}
            )
            return
        raise RuntimeError(f"ASGI message {kind!r} sent after the websocket closed")

    def _denial(self) -> HTTPCycle:
        if self.denial is None:
            scope = {**self.scope, "type": "http", "method": self.adapter.method}
            self.denial = HTTPCycle(scope, self.adapter.http(), self.host, False)
            self.denial.body_done = True
        return self.denial

    def _accept(self, message: dict) -> None:
        subprotocol = message.get("subprotocol")
        if subprotocol is not None and subprotocol not in self.scope["subprotocols"]:
            raise AppError(f"subprotocol {subprotocol!r} was not offered by the client")
        headers, flags, _ = response_headers(message.get("headers") or ())
        fields = [h for h in headers if h[0] not in _RESERVED]
        if subprotocol is not None:
            fields.append((b"sec-websocket-protocol", subprotocol.encode("latin-1")))
        proto, extensions = self.open_protocol(self.scope["headers"], self.settings)
        if extensions:
            fields.append((b"sec-websocket-extensions", extensions))
        self.state = ACCEPTED
        if self.gone:
            return
        self.proto = proto
        self.adapter.accept(fields, flags)
        status = 101 if self.scope["http_version"] == "1.1" else 200
        log_scope = {**self.scope, "method": self.adapter.method}
        self.host.response_done(log_scope, status, 0, self.started_at)
        now = self.loop.time()
        self.last_rx = self.last_msg = now
        self._arm_timer()
        early, self.early = self.early, []
        for data in early:
            self.feed_data(data)
        if self.draining:
            self._send_close(1001, "")

    def _send_close(self, code: int, reason: str) -> None:
        proto = self.proto
        if proto is None or proto.close_sent or self.gone:
            return
        frame = proto.close(code, reason)
        if proto.closed:  # the peer's close came first: this completes it
            self.adapter.write([frame])
            self.adapter.finish()
            return
        self.close_at = self.loop.time()
        self.adapter.write([frame])
        self._arm_timer()

    # -- timers -------------------------------------------------------------------------------

    def _arm_timer(self) -> None:
        when = self._next_deadline()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if when:
            self.timer = self.loop.call_at(when, self._on_timer)

    def _next_deadline(self) -> float:
        if self.gone or self.proto is None:
            return 0.0
        s = self.settings
        if self.close_at:
            return self.close_at + s.close_timeout
        times = []
        if s.ping_interval:
            if self.ping_at:
                times.append(self.ping_at + s.ping_timeout)
            else:
                times.append(self.last_rx + s.ping_interval)
        if s.idle_timeout:
            times.append(self.last_msg + s.idle_timeout)
        return min(times) if times else 0.0

    def _on_timer(self) -> None:
        self.timer = None
        if self.gone or self.proto is None:
            return
        now = self.loop.time()
        s = self.settings
        if self.close_at:
            if now >= self.close_at + s.close_timeout:
                self.adapter.abort()
                return
        elif s.idle_timeout and now >= self.last_msg + s.idle_timeout:
            self._send_close(1001, "idle timeout")
        elif self.ping_at and now >= self.ping_at + s.ping_timeout:
            if self.last_rx > self.ping_at:
                self.ping_at = 0.0  # traffic came in: the peer is alive
            else:
                self._send_close(1011, "keepalive ping timeout")
                self.adapter.abort()
                self._end(1006, "")
                return
        elif s.ping_interval and not self.ping_at and now >= self.last_rx + s.ping_interval:
            if self.proto.open:
                self.ping_at = now
                self.adapter.write([self.proto.ping(b"fpy3")])
        self._arm_timer()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # -- running the app ------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self.host.app(self.scope, self.receive, self.send)
        except BaseException as exc:
            self._app_failed(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            if self.state == CONNECTING:
                logger.error("ASGI app returned without accepting the websocket")
                self._app_failed(None)
            elif self.state == ACCEPTED:
                self._send_close(1000, "")
            elif self.state == RESPONSE:
                logger.error("ASGI app returned without completing the response")
                self._denial().fail(None)
        finally:
            self.app_done = True
            self._cancel_timer()
            self.adapter.cycle_done(self)

    def _app_failed(self, exc: BaseException | None) -> None:
        if isinstance(exc, Exception) and not isinstance(exc, ClientDisconnected):
            logger.error("Exception in ASGI application", exc_info=exc)
        if self.gone:
            return
        if self.state == ACCEPTED:
            self._send_close(1011, "")
            return
        if self.state == RESPONSE:
            self._denial().fail(exc)
            return
        if self.state == DONE:
            return
        self.state = DONE
        self._end(1006, "")
        self._denial().fail(exc)


_TOO_MANY = b"too many websockets (websocket.max_connections)\n"


class StreamWebSocket:
    """The websocket adapter on one stream of a multiplexed connection (HTTP/2 and
    HTTP/3 extended CONNECT, RFC 8441 and RFC 9220): what both protocols share. A
    protocol's class puts its own stream first in its bases (``give_credit``,
    ``wake_writer``), holds the slots below, routes its stream events to ``on_data``,
    ``on_end``, ``on_writable`` and ``on_gone``, and supplies ``accept``,
    ``send_frames``, ``send_end`` and ``cancel``."""

    if not TYPE_CHECKING:  # no slots of its own (the bases' layouts must not clash)
        __slots__ = ()

    method = "CONNECT"

    # Slots of the protocol's class.
    svc: Any  # the worker's service: websocket settings and the open count
    cycle: WebSocketCycle | None
    http_stream: Any  # a denial goes out as an ordinary response on the same stream
    paused: bool  # reading paused: credit is held back, the client's window closes
    counted: bool  # in svc.websockets
    credit: int
    closed: bool

    def accept(self, headers: list, flags: int) -> None:
        raise NotImplementedError

    def give_credit(self) -> None:
        raise NotImplementedError

    def wake_writer(self) -> None:
        raise NotImplementedError

    def send_frames(self, data: bytes) -> Awaitable[None] | None:
        raise NotImplementedError

    def send_end(self) -> None:
        raise NotImplementedError

    def cancel(self) -> None:
        """Reset the stream (the websocket failed)."""
        raise NotImplementedError

    def start(self, scope: dict, open_protocol: ProtocolFactory) -> asyncio.Task | None:
        """Run the app's websocket cycle on this stream, or answer 503 past
        ``websocket.max_connections``."""
        svc = self.svc
        limit = svc.ws.max_connections
        if limit and svc.websockets >= limit:
            self.http_stream.write_head(
                503, [(b"content-length", b"%d" % len(_TOO_MANY))], 0, _TOO_MANY, True
            )
            return None
        svc.websockets += 1
        self.counted = True
        cycle = self.cycle = WebSocketCycle(scope, self, svc, svc.ws, open_protocol)
        return svc.spawn(cycle.run())

    # -- stream events ------------------------------------------------------------------

    def on_data(self, data, n: int) -> None:
        """``n`` bytes of frames from the client (a view valid until this returns)."""
        self.credit += n
        cycle = self.cycle
        if cycle is not None:
            cycle.feed_data(data)
            if cycle.proto is None:
                return  # not accepted yet: the stream window bounds what waits
        if not self.paused:
            self.give_credit()

    def on_end(self) -> None:
        """The client ended its side: no more frames can come."""
        self._lost()

    def on_writable(self) -> None:
        self.wake_writer()
        self.http_stream.wake_writer()

    def on_gone(self, closed: bool) -> None:
        """The stream was reset, or (``closed``) is gone in C."""
        if closed:
            self.closed = True
            self.http_stream.closed = True
        self._lost()
        self.wake_writer()
        self.http_stream.wake_writer()

    def _lost(self) -> None:
        if self.counted:
            self.counted = False
            self.svc.websockets -= 1
        if self.cycle is not None:
            self.cycle.feed_disconnect()

    # -- what the cycle calls -----------------------------------------------------------

    def http(self) -> HTTPAdapter:
        return self.http_stream

    def write(self, frames: list[bytes]) -> Awaitable[None] | None:
        if self.closed:
            return None
        return self.send_frames(frames[0] if len(frames) == 1 else b"".join(frames))

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False
        self.give_credit()

    def finish(self) -> None:
        if not self.closed:
            self.send_end()

    def abort(self) -> None:
        self.cancel()
        self._lost()

    def cycle_done(self, cycle: WebSocketCycle) -> None:
        pass


def close_stream_websockets(streams) -> None:
    """The server goes away: close every websocket among ``streams`` with 1001."""
    for stream in list(streams):
        if isinstance(stream, StreamWebSocket) and stream.cycle is not None:
            stream.cycle.server_close(1001)
