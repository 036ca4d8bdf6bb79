"""Per-worker HTTP service: what every connection and request of a worker shares.

It holds the app and the options the protocols read on the hot path; the clock (one
tick refreshes the Date header, flushes the access log and fires connection
timeouts: no timer per request); the registry of open connections and of running app
tasks; the end of every response (access log and counters, ``response_done``); and
the drain, whose deadline cancels what is left. The worker and the embedding API
(``fpy3.embed``) both serve through it.
"""

from __future__ import annotations

import asyncio
import contextvars
import email.utils
import logging
import socket
import ssl
import time
from collections.abc import Coroutine
from typing import Any

from .config import Settings
from .core.flow import Waiter
from .h1.connection import H1Connection, H1Listener
from .h3.server import H3Server
from .logs import AccessLog
from .memory import HeapTrimmer

logger = logging.getLogger("fpy3.error")

# Seconds a draining connection stays open between requests, about a round trip and
# more: a keep-alive client may have a request on the wire when the drain begins.
DRAIN_GRACE = 1.0
# Seconds a closing TLS connection waits for the peer's close_notify. asyncio's default
# is 30: a drain would wait that long for every idle client that is not reading.
TLS_SHUTDOWN_TIMEOUT = 3.0
# Seconds cancelled app tasks get to unwind at the drain deadline.
CANCEL_GRACE = 2.0


class Clock:
    """The current second and its IMF-fixdate, refreshed by the service's tick."""

    __slots__ = ("second", "date")

    def __init__(self) -> None:
        self.second = 0
        self.date = b""

    def set(self, second: int) -> None:
        self.second = second
        self.date = email.utils.formatdate(second, usegmt=True).encode("ascii")


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
        self.root_path = settings.server.root_path
        limits = settings.limits
        self.max_header_size = limits.max_header_size
        self.max_header_count = limits.max_header_count
        self.max_body_size = limits.max_body_size
        self.max_connections = limits.max_connections
        self.header_timeout = settings.http1.header_timeout
        self.keepalive_timeout = settings.http1.keepalive_timeout
        self.ws = settings.websocket
        self.server_header = settings.server.server_header.encode("latin-1")
        self.alt_svc = b'h3=":%d"; ma=86400' % settings.udp_port if settings.http3.enabled else b""
        self.clock = Clock()
        self.clock.set(int(time.time()))
        self.websockets = 0  # open websockets (all protocols), for websocket.max_connections
        self.connections: set[H1Connection] = set()
        self.tasks: set[asyncio.Task] = set()  # app cycles still running
        self.servers: list[asyncio.AbstractServer] = []
        self.listeners: list[H1Listener] = []
        self.h3_servers: list[H3Server] = []
        self.draining = False
        self.requests_served = 0
        # Every request's task starts from this context, not from whatever task or
        # callback happened to start it.
        self._context = contextvars.copy_context()
        self._idle = Waiter(loop)  # woken when the last connection or task is gone
        self._tick_interval = max(
            0.1, min(1.0, self.header_timeout / 4, self.keepalive_timeout / 4)
        )
        self._ticker: asyncio.TimerHandle | None = None
        self._trimmer = HeapTrimmer()  # freed memory back to the OS after large releases

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self.clock.set(int(time.time()))
        self._ticker = self.loop.call_later(self._tick_interval, self._tick)

    async def listen(self, sock: socket.socket, ssl_context: ssl.SSLContext | None) -> None:
        scheme = "https" if ssl_context is not None else "http"
        listener = H1Listener(self, scheme)
        self.listeners.append(listener)
        server = await self.loop.create_server(
            listener,
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
        self.h3_servers.append(H3Server(self, sock, cert, key, worker_id, secret, addr, steer_prog))

    # -- what the protocols and the core call ------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task:
        """Run an app cycle; the drain waits for it and cancels it at the deadline."""
        task = asyncio.Task(coro, loop=self.loop, context=self._context.copy(), eager_start=True)
        if not task.done():
            self.tasks.add(task)
            task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not self.tasks and self.draining:
            self._idle.wake()

    def response_done(self, scope: dict, status: int, sent: int, started_at: float) -> None:
        self.requests_served += 1
        if self.access_log is not None:
            self.access_log.log_request(scope, status, sent, self.loop.time() - started_at)

    def forget(self, conn: H1Connection) -> None:
        """A connection closed."""
        self.connections.discard(conn)
        if not self.connections and self.draining:
            self._idle.wake()

    # -- drain ------------------------------------------------------------------------------

    async def drain(self, timeout: float) -> None:
        """Stop accepting and let in-flight requests (and the tasks they left running)
        finish; at the deadline, cancel and await the tasks left, close every
        connection (QUIC ones with CONNECTION_CLOSE), then free everything."""
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
        waits = [asyncio.ensure_future(h3.drain(grace)) for h3 in self.h3_servers]
        waits += accepted
        waits.append(asyncio.ensure_future(self._idle_wait()))
        _, late = await asyncio.wait(waits, timeout=max(0.0, deadline - self.loop.time()))
        for waiter in late:
            waiter.cancel()
        if late:
            self._log_left()
        await self._cancel_tasks()
        self.close()

    async def _idle_wait(self) -> None:
        while self.connections or self.tasks:
            await self._idle.wait()

    def _log_left(self) -> None:
        quic = sum(h3.connection_count() for h3 in self.h3_servers)
        logger.warning(
            "drain timeout: closing %d connection(s) and %d QUIC connection(s), "
            "cancelling %d request task(s)",
            len(self.connections),
            quic,
            len(self.tasks),
        )

    async def _cancel_tasks(self) -> None:
        if not self.tasks:
            return
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        _, stuck = await asyncio.wait(tasks, timeout=CANCEL_GRACE)
        if stuck:
            logger.error("%d request task(s) ignored cancellation", len(stuck))

    def close(self) -> None:
        """Close everything now: listeners, connections (QUIC ones with
        CONNECTION_CLOSE), the clock; flush the access log."""
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        for server in self.servers:
            server.close()
        for h3 in self.h3_servers:
            h3.close()
        self.h3_servers.clear()
        for conn in list(self.connections):
            conn.kill()
        if self.access_log is not None:
            self.access_log.flush()

    # -- the clock ------------------------------------------------------------------------

    def _tick(self) -> None:
        second = int(time.time())
        if second != self.clock.second:
            self.clock.set(second)
            for listener in self.listeners:
                listener.refresh(self.clock)
            for h3 in self.h3_servers:
                h3.refresh(self.clock)
            self._trimmer.tick()
        if self.access_log is not None:
            self.access_log.flush()
        mono = self.loop.time()
        for conn in [c for c in self.connections if c.deadline and c.deadline <= mono]:
            conn.on_timeout()
        self._ticker = self.loop.call_later(self._tick_interval, self._tick)
