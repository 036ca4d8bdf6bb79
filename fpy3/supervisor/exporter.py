"""The master's Prometheus endpoint: a small non-blocking HTTP/1.1 responder run by the
arbiter's poll loop (no thread: the master forks).

``GET /metrics`` (or ``HEAD``) answers the text exposition format; other paths get
404, other methods 405. Every response closes its connection. Requests are bounded
(8 KiB of head, ``TIMEOUT`` seconds per connection, ``MAX_CLIENTS`` at once), so a
slow or hostile client cannot hold the master up.
"""

from __future__ import annotations

import logging
import select
import socket
import time
from collections.abc import Callable

logger = logging.getLogger("fpy3.error")

MAX_HEAD = 8192
MAX_CLIENTS = 32
TIMEOUT = 5.0
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class _Client:
    __slots__ = ("sock", "inbuf", "outbuf", "deadline")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = b""
        self.outbuf = b""
        self.deadline = time.monotonic() + TIMEOUT


def _response(status: bytes, body: bytes, content_type: bytes, head_only: bool) -> bytes:
    head = (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: " + content_type
        + b"\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
    )  # fmt: skip
    return head if head_only else head + body


class MetricsEndpoint:
    def __init__(self, sock: socket.socket, render: Callable[[], str]) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self.render = render
        self.clients: dict[int, _Client] = {}

    def register(self, poller: select.poll) -> dict[int, Callable[[int], None]]:
        """Add its fds to ``poller``; returns fd -> handler of the poll events."""
        handlers: dict[int, Callable[[int], None]] = {}
        now = time.monotonic()
        for fd, client in list(self.clients.items()):
            if now > client.deadline:
                self._close(fd)
                continue
            poller.register(fd, select.POLLOUT if client.outbuf else select.POLLIN)
            handlers[fd] = self._on_client
        if len(self.clients) < MAX_CLIENTS:
            poller.register(self.sock.fileno(), select.POLLIN)
            handlers[self.sock.fileno()] = self._on_accept
        return handlers

    def _on_accept(self, events: int) -> None:
        for _ in range(MAX_CLIENTS - len(self.clients)):
            try:
                conn, _ = self.sock.accept()
            except OSError:  # nothing left to accept, or the client already left
                return
            conn.setblocking(False)
            self.clients[conn.fileno()] = _Client(conn)

    def _on_client(self, fd: int) -> None:
        client = self.clients[fd]
        try:
            if client.outbuf:
                sent = client.sock.send(client.outbuf)
                client.outbuf = client.outbuf[sent:]
                if not client.outbuf:
                    self._close(fd)
                return
            data = client.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            self._close(fd)
            return
        if not data:
            self._close(fd)
            return
        client.inbuf += data
        if b"\r\n\r\n" not in client.inbuf and b"\n\n" not in client.inbuf:
            if len(client.inbuf) > MAX_HEAD:
                self._close(fd)
            return
        client.outbuf = self._answer(client.inbuf)
        self._on_client(fd)  # most answers fit the socket buffer at once

    def _answer(self, head: bytes) -> bytes:
        parts = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0].split()
        method, target = (parts[0], parts[1]) if len(parts) >= 2 else (b"", b"")
        text = b"text/plain; charset=utf-8"
        if method not in (b"GET", b"HEAD"):
            return _response(b"405 Method Not Allowed", b"method not allowed\n", text, False)
        head_only = method == b"HEAD"
        if target.split(b"?", 1)[0] != b"/metrics":
            return _response(b"404 Not Found", b"not found; try /metrics\n", text, head_only)
        try:
            body = self.render().encode()
        except Exception:  # whatever it is, the master must go on
            logger.exception("metrics: rendering failed")
            return _response(b"500 Internal Server Error", b"error\n", text, head_only)
        return _response(b"200 OK", body, CONTENT_TYPE, head_only)

    def _close(self, fd: int) -> None:
        client = self.clients.pop(fd, None)
        if client is not None:
            client.sock.close()

    def close(self) -> None:
        for fd in list(self.clients):
            self._close(fd)
        self.sock.close()

    def forget_in_child(self) -> None:
        """In a forked worker: the master's sockets are not the worker's."""
        self.close()
