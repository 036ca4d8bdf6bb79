"""The ASGI ``http`` cycle and the response rules, shared by every protocol.

A protocol adapter owns the bytes. It builds the scope, feeds the cycle body chunks
and the disconnect, and gives it four operations (``HTTPAdapter``). The cycle owns
the rules, once for all protocols:

- what the app may send when, and what ``receive()`` returns;
- the status is an int in 200..599 and header names are tokens, values carry no CR,
  LF or NUL, Content-Length is a single number; anything else is an app error (500
  when nothing was sent yet);
- 1xx, 204, 304 and HEAD responses carry no body, whatever the app sends; a declared
  Content-Length is checked against what is really sent;
- an app that sets Server or Date replaces the server's;
- the end of a response (access log, counters) is reported once, through the host;
- ``send()`` after the client went away raises ``ClientDisconnected``;
- the ``http.response.trailers`` extension: with ``trailers: True`` in the start
  message, the body's end does not end the response; the trailers message does.
"""

from __future__ import annotations

import asyncio
import logging
import re
import traceback
from collections.abc import Awaitable
from typing import Protocol

from .errors import ClientDisconnected
from .flow import Waiter
from .host import Host

logger = logging.getLogger("fpy3.error")

# write_head flags: what the adapter must know to frame the response.
STREAM = 1  # a body of unknown length follows (HTTP/1.1 chunks it)
CLOSE = 2  # the app sent "Connection: close"
APP_SERVER = 4  # the app set Server: the adapter adds none
APP_DATE = 8  # the app set Date: the adapter adds none
BODYLESS = 16  # HEAD, 204 or 304: no body goes out (the data passed is always empty)
TRAILERS = 32  # the app sends trailers: write_trailers, not the last body, ends the response

_DISCONNECT = {"type": "http.disconnect"}
_EMPTY_REQUEST = {"type": "http.request", "body": b"", "more_body": False}

# Connection-specific fields: the adapter frames the message itself (and HTTP/2 and
# HTTP/3 forbid them). "Connection: close" is kept as the CLOSE flag.
_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_TOKENS = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+\Z")  # RFC 9110 5.6.2, lowercased
_BAD_VALUE = re.compile(rb"[\r\n\x00]")


class HTTPAdapter(Protocol):
    """What a protocol gives the core. ``write_*`` return an awaitable while the peer
    is not keeping up; with ``end`` the response is complete and the adapter may go on
    to the next request while the app's task runs on."""

    def want_body(self) -> None:
        """The app waits for body bytes: resume reading, answer 100-continue."""

    def write_head(
        self, status: int, headers: list, flags: int, data, end: bool
    ) -> Awaitable[None] | None:
        """Status, headers (lowercase, checked, without connection-specific fields;
        Content-Length included when known) and the first body bytes."""

    def write_body(self, data, end: bool) -> Awaitable[None] | None: ...

    def write_trailers(self, headers: list) -> Awaitable[None] | None:
        """The trailer fields (lowercase, checked); they end the response. A transport
        that cannot carry them (HTTP/1.1 without chunking) ends the response without."""

    def abort(self) -> None:
        """The response cannot be completed: reset the stream or close the connection."""


class AppError(RuntimeError):
    """The app sent something the rules forbid."""


def check_status(status) -> int:
    """The final status as an int, or AppError."""
    if status.__class__ is not int:
        if not isinstance(status, int) or isinstance(status, bool):
            raise AppError(f"invalid response status {status!r}: not an int")
        status = int(status)
    if not 200 <= status <= 599:
        if 100 <= status <= 199:
            raise AppError(f"response status {status}: a 1xx cannot be the final status")
        raise AppError(f"invalid response status {status}: not in 100..599")
    return status


# Header names seen before: raw name -> (lowercase name, kind). Apps send the same few
# names over and over; checking each once keeps the per-response cost to a lookup.
_NAMES: dict[bytes, tuple[bytes, int]] = {}
_NAMES_MAX = 4096
# Header values seen before and found free of CR, LF and NUL (short ones only).
_VALUES: set[bytes] = set()
_VALUES_MAX = 4096
_PLAIN, _LENGTH, _SERVER, _DATE, _CONNECTION, _DROP = range(6)
_KINDS = {
    b"content-length": _LENGTH,
    b"server": _SERVER,
    b"date": _DATE,
    b"connection": _CONNECTION,
    **{name: _DROP for name in _HOP_BY_HOP - {b"connection"}},
}


def _name(name) -> tuple[bytes, int]:
    """A header name's lowercase form and kind, or AppError; remembered."""
    if name.__class__ is not bytes:
        raise AppError(f"header names must be bytes, not {type(name).__name__}: {name!r}")
    lname = name.lower()
    if not _TOKENS.match(lname):
        raise AppError(f"invalid response header name {name!r}")
    if lname == name:
        lname = name  # the same object: the app's (name, value) pair can be kept as is
    entry = (lname, _KINDS.get(lname, _PLAIN))
    if len(_NAMES) < _NAMES_MAX:
        _NAMES[name] = entry
    return entry


def response_headers(headers) -> tuple[list, int, int]:
    """Check the app's headers: (the headers to send, flags, declared Content-Length
    or -1). Names come out lowercase; connection-specific fields are dropped."""
    out = []
    flags = 0
    declared = -1
    names = _NAMES
    good = _VALUES
    try:
        for pair in headers:
            name, value = pair
            try:
                lname, kind = names[name]
            except KeyError:
                lname, kind = _name(name)
            if value not in good:
                _value(value)
            if kind:
                if kind == _LENGTH:
                    if declared >= 0:
                        raise AppError("response has more than one Content-Length")
                    if value.isdigit() and len(value) < 19:
                        declared = int(value)
                    else:
                        declared = _content_length(value)
                elif kind == _SERVER:
                    flags |= APP_SERVER
                elif kind == _DATE:
                    flags |= APP_DATE
                else:
                    if kind == _CONNECTION and b"close" in value.lower():
                        flags |= CLOSE
                    continue
            out.append(pair if lname is name else (lname, value))
    except (TypeError, ValueError, AttributeError):
        raise AppError(f"response headers must be pairs of bytes: {headers!r}") from None
    return out, flags, declared


def _value(value: bytes) -> None:
    """A header value carries no CR, LF or NUL (they would split or end the field)."""
    if value.__class__ is not bytes:
        raise AppError(f"header values must be bytes, not {type(value).__name__}: {value!r}")
    if _BAD_VALUE.search(value):
        raise AppError(f"invalid response header value {value!r}")
    if len(value) <= 128 and len(_VALUES) < _VALUES_MAX:
        _VALUES.add(value)


def _content_length(value: bytes) -> int:
    v = value.strip()
    if not v.isdigit() or len(v) > 18:
        raise AppError(f"invalid Content-Length {value!r} in the response")
    return int(v)


def _bytes_like(body) -> tuple[object, int]:
    """The body and its size in bytes; any contiguous bytes-like object, not copied."""
    if body.__class__ is bytes or body.__class__ is bytearray:
        return body, len(body)
    try:
        view = memoryview(body)
    except TypeError:
        raise AppError(f"response body must be bytes-like, not {type(body).__name__}") from None
    if view.format != "B" or view.ndim != 1:
        if not view.c_contiguous:
            view = memoryview(view.tobytes())
        view = view.cast("B")
    return view, view.nbytes


class HTTPCycle:
    """One request/response exchange between a protocol adapter and the app."""

    __slots__ = (
        "scope",
        "adapter",
        "host",
        "chunks",
        "queued",
        "more_body",
        "body_done",
        "disconnected",
        "started",
        "complete",
        "status",
        "head",
        "flags",
        "left",
        "sent",
        "waiter",
        "started_at",
        "trailing",
        "trailer_fields",
    )

    def __init__(self, scope: dict, adapter: HTTPAdapter, host: Host, more_body: bool):
        self.scope = scope
        self.adapter = adapter
        self.host = host
        self.chunks: list = []
        self.queued = 0  # body bytes received but not yet taken by the app
        self.more_body = more_body  # the adapter has more body to feed
        self.body_done = False  # the app has seen more_body=False
        self.disconnected = False
        self.started = False  # http.response.start accepted
        self.complete = False  # the response ended (sent whole, or aborted)
        self.status = 0
        self.head: list | None = None  # the checked headers, held until the first body
        self.flags = BODYLESS if scope["method"] == "HEAD" else 0
        self.left = -1  # declared Content-Length still to send; -1 = none
        self.sent = 0  # body bytes handed to the adapter
        self.waiter: Waiter | None = None  # made when the app first has to wait
        self.started_at = host.loop.time() if host.timed else 0.0
        self.trailing = False  # the body is complete; the trailers will end the response
        self.trailer_fields: list | None = None

    # -- adapter -> core ------------------------------------------------------------

    def feed_body(self, data, more: bool) -> None:
        if data:
            self.chunks.append(data)
            self.queued += len(data)
        self.more_body = more
        if self.waiter is not None:
            self.waiter.wake()

    def feed_disconnect(self) -> None:
        self.disconnected = True
        if self.waiter is not None:
            self.waiter.wake()

    def _wait(self):
        waiter = self.waiter
        if waiter is None:
            waiter = self.waiter = Waiter(self.host.loop)
        return waiter.wait()

    # -- the app's receive and send -------------------------------------------------

    async def receive(self) -> dict:
        if not self.body_done and not self.complete:
            while not self.chunks and self.more_body and not self.disconnected:
                self.adapter.want_body()
                await self._wait()
                if self.complete:
                    return _DISCONNECT.copy()
            if self.chunks:
                chunks = self.chunks
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self.queued = 0
                more = self.more_body
                if more:
                    self.adapter.want_body()
                else:
                    self.body_done = True
                return {"type": "http.request", "body": data, "more_body": more}
            if not self.disconnected:
                self.body_done = True
                return _EMPTY_REQUEST.copy()
        # After the body, the next event is the end of the exchange: the client going
        # away, or the response completing (as uvicorn and the ASGI spec have it).
        if not self.disconnected and not self.complete:
            await self._wait()
        return _DISCONNECT.copy()

    async def send(self, message: dict) -> None:
        kind = message["type"]
        if self.complete:
            raise RuntimeError(f"ASGI message {kind!r} sent after the response completed")
        if self.disconnected:
            raise ClientDisconnected(f"the client went away; cannot send {kind!r}")
        if not self.started:
            if kind != "http.response.start":
                raise RuntimeError(f"expected ASGI message 'http.response.start', got {kind!r}")
            status = message["status"]
            if status.__class__ is not int or not 200 <= status <= 599:
                status = check_status(status)
            headers, flags, declared = response_headers(message.get("headers") or ())
            if message.get("trailers"):
                flags |= TRAILERS
            if status == 204 or status == 304:
                flags |= BODYLESS
                if status == 204 and declared >= 0:  # RFC 9110 8.6: never on a 204
                    headers = [h for h in headers if h[0] != b"content-length"]
                    declared = -1
            self.started = True
            self.status = status
            self.head = headers
            self.flags |= flags
            self.left = declared
            return
        if kind != "http.response.body":
            if kind == "http.response.trailers":
                return await self._trailers(message)
            raise RuntimeError(f"expected ASGI message 'http.response.body', got {kind!r}")
        if self.trailing:
            raise RuntimeError("ASGI message 'http.response.body' after the last body part")
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if body.__class__ is bytes:
            n = len(body)
        else:
            body, n = _bytes_like(body)
        flags = self.flags
        if flags & BODYLESS:
            if self.head is not None and not more and self.left < 0 and self.status != 304:
                # HEAD: the length a GET would have had, when the app gives it whole.
                if self.status != 204 and n:
                    self.head.append((b"content-length", b"%d" % n))
            body, n = b"", 0
        elif self.left >= 0:
            if n > self.left:
                raise AppError(
                    f"response body longer than its Content-Length ({self.left} bytes left, "
                    f"{n} sent)"
                )
            self.left -= n
            if not more and self.left:
                self._short(body, n)
                return
        self.sent += n
        end = not more
        if end and flags & TRAILERS:
            end = False  # the trailers end the response
            self.trailing = True
        head = self.head
        if head is not None:
            self.head = None
            if flags & BODYLESS:
                pass
            elif self.left < 0:
                if end:
                    head.append((b"content-length", b"%d" % n))
                else:
                    flags |= STREAM
            if end:
                self.complete = True
                if self.waiter is not None:
                    self.waiter.wake()
                self.host.response_done(self.scope, self.status, self.sent, self.started_at)
            pending = self.adapter.write_head(self.status, head, flags, body, end)
        else:
            if end:
                self._done()
            pending = self.adapter.write_body(body, end)
        if pending is not None:
            await pending

    async def _trailers(self, message: dict) -> None:
        """``http.response.trailers`` (after the last body part, with ``trailers: True``
        in the start): the fields are checked like headers; the last message ends the
        response."""
        if not self.trailing:
            raise RuntimeError(
                "ASGI message 'http.response.trailers' before the body ended, or without "
                "'trailers': True in 'http.response.start'"
            )
        fields, _, _ = response_headers(message.get("headers") or ())
        if self.trailer_fields is None:
            self.trailer_fields = fields
        else:
            self.trailer_fields += fields
        if message.get("more_trailers", False):
            return
        self._done()
        if self.flags & BODYLESS:
            pending = self.adapter.write_body(b"", True)
        else:
            pending = self.adapter.write_trailers(self.trailer_fields)
        if pending is not None:
            await pending

    def _short(self, body, n: int) -> None:
        """The app ended a body shorter than its Content-Length."""
        missing = self.left
        if self.head is not None:
            # Nothing went out yet: a 500 rather than a truncated body.
            raise AppError(f"response body shorter than its Content-Length by {missing} bytes")
        logger.error("response body shorter than its Content-Length by %d bytes; aborting", missing)
        self.sent += n
        self.adapter.write_body(body, False)
        self._abort()

    def _done(self) -> None:
        """The whole response is handed to the adapter (which ends the exchange)."""
        self.complete = True
        if self.waiter is not None:
            self.waiter.wake()
        self.host.response_done(self.scope, self.status, self.sent, self.started_at)

    def _abort(self) -> None:
        """Reset the stream or close the connection; reported when part of the response
        went out."""
        self.complete = True
        if self.waiter is not None:
            self.waiter.wake()
        self.adapter.abort()
        if self.started and self.head is None:
            self.host.response_done(self.scope, self.status, self.sent, self.started_at)

    # -- running the app ------------------------------------------------------------

    async def run(self) -> None:
        health = self.host.health
        if health is not None and health.answer(self):
            return
        try:
            await self.host.app(self.scope, self.receive, self.send)
        except asyncio.CancelledError:
            # The service cancels what is left at the drain deadline.
            if not self.complete and not self.disconnected:
                self._abort()
            raise
        except BaseException as exc:
            if isinstance(exc, ClientDisconnected):
                logger.debug("ASGI app stopped: %s", exc)
            elif isinstance(exc, Exception):
                logger.error("Exception in ASGI application", exc_info=exc)
            if not self.complete and not self.disconnected:
                self._fail(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            if not self.complete and not self.disconnected:
                logger.error("ASGI app returned without completing the response")
                self._fail(None)

    def _fail(self, exc: BaseException | None) -> None:
        """The app failed before completing its response: a 500 when nothing went out
        yet, else abort."""
        if self.started and self.head is None:
            self._abort()
            return
        headers, body = internal_error(exc, self.host.debug)
        self.reply(500, headers, body)

    def reply(self, status: int, headers: list, body: bytes) -> None:
        """A whole response made by the server (a 500, a websocket denial), when nothing
        went out yet. ``headers`` are lowercase and valid."""
        self.started = True
        self.status = status
        self.flags = BODYLESS if self.scope["method"] == "HEAD" else 0
        if self.flags:
            body = b""
        self.head = None
        self.sent = len(body)
        self._done()
        self.adapter.write_head(status, headers, self.flags, body, True)

    def fail(self, exc: BaseException | None) -> None:
        """From a websocket cycle whose denial failed."""
        if not self.complete and not self.disconnected:
            self._fail(exc)


def internal_error(exc: BaseException | None, debug: bool) -> tuple[list, bytes]:
    """Headers and body of the 500 for an app that failed before responding; the
    traceback is in the body only in debug mode."""
    body = b"Internal Server Error\n"
    if debug and exc is not None:
        body += "".join(traceback.format_exception(exc)).encode("utf-8", "replace")
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", b"%d" % len(body)),
    ]
    return headers, body


def early_data_refused(cycle: HTTPCycle) -> None:
    """425 Too Early (RFC 8470) for a request that came in TLS early data with a method
    that is not safe: it may be a replay; the client sends it again after the
    handshake. The app never sees it."""
    body = b"Too Early\n"
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", b"%d" % len(body)),
    ]
    cycle.reply(425, headers, body)
