"""The ASGI ``http`` state machine, shared by HTTP/1.1 and HTTP/3.

A protocol adapter owns the bytes. It hands the core a scope, feeds it body
chunks and the disconnect, and gives it four operations (see ``HTTPAdapter``).
The core owns the ASGI message rules: what may be sent when, what ``receive()``
returns, and what happens when the app fails.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Awaitable
from typing import Protocol

logger = logging.getLogger("fpy3.error")

ASGI_VERSION = {"version": "3.0", "spec_version": "2.4"}

_DISCONNECT = {"type": "http.disconnect"}
_EMPTY_REQUEST = {"type": "http.request", "body": b"", "more_body": False}


class HTTPAdapter(Protocol):
    """What a protocol gives the core."""

    def want_body(self) -> None:
        """The app waits for body bytes: resume reading, answer 100-continue."""

    def write_head(self, status: int, headers: list) -> None:
        """Response status and headers (may be held until the first body)."""

    def write_body(self, data: bytes, more: bool) -> Awaitable[None] | None:
        """Response body; returns an awaitable while the peer is not keeping up."""

    def abort(self) -> None:
        """The response cannot be completed: reset the stream or close the connection."""

    def cycle_done(self, cycle: HTTPCycle) -> None:
        """The app returned; the adapter may start on the next request."""


class HTTPCycle:
    """One request/response exchange between a protocol adapter and the app."""

    __slots__ = (
        "scope",
        "adapter",
        "loop",
        "chunks",
        "queued",
        "more_body",
        "body_done",
        "disconnected",
        "started",
        "complete",
        "status",
        "waiter",
        "task",
        "debug",
    )

    def __init__(self, scope: dict, adapter: HTTPAdapter, loop, more_body: bool, debug: bool):
        self.scope = scope
        self.adapter = adapter
        self.loop = loop
        self.chunks: list[bytes] = []
        self.queued = 0  # body bytes received but not yet taken by the app
        self.more_body = more_body  # the adapter has more body to feed
        self.body_done = False  # the app has seen more_body=False
        self.disconnected = False
        self.started = False
        self.complete = False
        self.status = 0
        self.waiter = None
        self.task = None
        self.debug = debug

    # -- adapter -> core ------------------------------------------------------------

    def feed_body(self, data: bytes, more: bool) -> None:
        if data:
            self.chunks.append(data)
            self.queued += len(data)
        self.more_body = more
        self._wake()

    def feed_disconnect(self) -> None:
        self.disconnected = True
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- the app's receive and send -------------------------------------------------------

    async def receive(self) -> dict:
        if not self.body_done:
            while not self.chunks and self.more_body and not self.disconnected:
                self.adapter.want_body()
                self.waiter = self.loop.create_future()
                await self.waiter
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
        # The body is consumed: the next event is the end of the exchange.
        if not self.disconnected and not self.complete:
            self.waiter = self.loop.create_future()
            await self.waiter
        return _DISCONNECT.copy()

    async def send(self, message: dict) -> None:
        kind = message["type"]
        if not self.started:
            if kind != "http.response.start":
                raise RuntimeError(f"expected ASGI message 'http.response.start', got {kind!r}")
            self.started = True
            self.status = status = message["status"]
            if not self.disconnected:
                self.adapter.write_head(status, message.get("headers") or [])
            return
        if self.complete:
            raise RuntimeError(f"ASGI message {kind!r} sent after the response completed")
        if kind != "http.response.body":
            raise RuntimeError(f"expected ASGI message 'http.response.body', got {kind!r}")
        more = message.get("more_body", False)
        if not more:
            self.complete = True
        if self.disconnected:
            return  # the spec makes sends on a closed connection no-ops
        pending = self.adapter.write_body(message.get("body", b""), more)
        if pending is not None:
            await pending
        if not more:
            self._wake()

    # -- running the app ------------------------------------------------------------------

    async def run(self, app) -> None:
        try:
            await app(self.scope, self.receive, self.send)
        except BaseException as exc:
            self._app_failed(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            if not self.started:
                self._app_failed(RuntimeError("ASGI app returned without starting a response"))
            elif not self.complete:
                logger.error("ASGI app returned without completing the response")
                self.adapter.abort()
        finally:
            self.adapter.cycle_done(self)

    def _app_failed(self, exc: BaseException) -> None:
        if isinstance(exc, Exception):
            logger.error("Exception in ASGI application", exc_info=exc)
        if self.disconnected:
            return
        if self.started:
            self.adapter.abort()
            return
        self.started = self.complete = True
        self.status = 500
        headers, body = internal_error(exc, self.debug)
        self.adapter.write_head(500, headers)
        self.adapter.write_body(body, False)


def internal_error(exc: BaseException, debug: bool) -> tuple[list, bytes]:
    """Headers and body of the 500 for an app that failed before responding; the
    traceback is in the body only in debug mode."""
    body = b"Internal Server Error\n"
    if debug:
        body += "".join(traceback.format_exception(exc)).encode("utf-8", "replace")
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", b"%d" % len(body)),
    ]
    return headers, body
