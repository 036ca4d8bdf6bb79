"""Per-worker HTTP service: what every connection and request of a worker shares.

It holds the app and the options the protocols read on the hot path; the clock (one
tick refreshes the Date header, flushes the access log, fires connection timeouts (no
timer per request) and gives memory back to the OS after a flood, ``fpy3.memory``);
the registry of open connections (HTTP/1.1 and HTTP/2 on the TCP ports, which share
one listener: ALPN or the HTTP/2 preface picks) and of running app tasks; the end of every response
(access log and counters, ``response_done``); and the drain, whose deadline cancels
what is left. It also holds what every protocol applies the same way: the trusted
proxies (``proxy.forwarded_allow_ips``, for proxy headers in the scope builder and for
the PROXY protocol on its listeners), the health paths, and the Alt-Svc value. The
worker and the embedding API (``fpy3.embed``) both serve through it, with
``serve(listeners)``: one path from bound sockets to every protocol.
"""

from __future__ import annotations

import asyncio
import contextvars
import email.utils
import logging
import os
import socket
import ssl
import time
from array import array
from bisect import bisect_left
from collections.abc import Coroutine
from typing import Any, Protocol

from . import metrics as m
from . import sockets
from .config import Settings
from .core.flow import Waiter
from .core.forwarded import ProxyHeaders, TrustedPeers
from .core.health import Health
from .h1.connection import H1Connection, H1Listener
from .h2.connection import H2Connection, H2Listener
from .h3.server import H3Server
from .logs import AccessLog
from .memory import HeapTrimmer
from .proxyproto import ProxyProtocolServer
from .sockets import Listeners
from .tls import server_context, tls_protocols

logger = logging.getLogger("fpy3.error")

# Seconds a draining connection stays open between requests, about a round trip and
# more: a keep-alive client may have a request on the wire when the drain begins.
DRAIN_GRACE = 1.0
# Seconds a closing TLS connection waits for the peer's close_notify. asyncio's default
# is 30: a drain would wait that long for every idle client that is not reading.
TLS_SHUTDOWN_TIMEOUT = 3.0
# Seconds cancelled app tasks get to unwind at the drain deadline.
CANCEL_GRACE = 2.0

# The metrics layout, as module globals for response_done.
_PROTO_BASE = m.PROTO_BASE
_HIST, _HIST_SUM, _WS_SESSIONS = m.HIST, m.HIST_SUM, m.WS_SESSIONS
_LATENCY_BOUNDS = m.LATENCY_BOUNDS


class Connection(Protocol):
    """A TCP connection the service tracks (HTTP/1.1 or HTTP/2)."""

    deadline: float  # loop time of the next on_timeout; 0 = none
    send_deadline: float  # loop time a stalled send times out; 0 = none

    def on_timeout(self) -> None: ...

    @property
    def idle_since(self) -> float: ...  # loop time since no request is in progress; 0 = busy

    def close_idle(self) -> None: ...

    def drain(self, grace: float) -> None: ...

    def kill(self) -> None: ...


class Clock:
    """The current second and its IMF-fixdate, refreshed by the service's tick."""

    __slots__ = ("second", "date")

    def __init__(self) -> None:
        self.second = 0
        self.date = b""

    def set(self, second: int) -> None:
        self.second = second
        self.date = email.utils.formatdate(second, usegmt=True).encode("ascii")


def alt_svc(settings: Settings, quic_port: int | None = None) -> bytes:
    """The Alt-Svc value announcing HTTP/3 (RFC 7838), or b"" for none. ``quic_port``:
    the port HTTP/3 is really served on, when inherited sockets decided it."""
    h3 = settings.http3
    port = h3.alt_svc_port or (settings.udp_port if quic_port is None else quic_port)
    if not (h3.enabled and h3.alt_svc and port):
        return b""
    host = h3.alt_svc_host
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address
    return f'h3="{host}:{port}"; ma={h3.alt_svc_max_age}'.encode("ascii")


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
        metrics: m.Block | None = None,
        quic_port: int | None = None,
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
        self.max_idle = limits.max_idle_connections
        # Past max_idle, every idle_batch-th new connection closes the longest idle ones
        # at once (a flood can open thousands between two ticks); counted, logged per tick.
        self._idle_batch = max(1, self.max_idle // 32)
        self._admitted_over = 0
        self._idle_closed = 0
        self.header_timeout = settings.http1.header_timeout
        self.keepalive_timeout = settings.http1.keepalive_timeout
        self.body_timeout = settings.http1.body_timeout
        self.send_timeout = settings.http1.send_timeout
        self.ws = settings.websocket
        self.state_dir = settings.state_path
        # ACME http-01 answers on the cleartext port (fpy3.certs), without the app.
        self.acme_http01 = settings.acme.enabled and settings.acme.challenge == "http-01"
        self.server_header = settings.server.server_header.encode("latin-1")
        # The worker's metrics block (fpy3.metrics), or None when metrics are off. The
        # per-response counters live in a list (the cheapest to add to) that the tick
        # copies into the block; latency sums are float seconds until then.
        self.metrics = metrics
        self.counts: list | None = [0] * m.QUIC if metrics is not None else None
        # Whether response_done needs the request's start time (core/http.py).
        self.timed = access_log is not None or metrics is not None
        # The port HTTP/3 is served on, which inherited sockets may decide.
        self.alt_svc = alt_svc(settings, quic_port)
        proxy = settings.proxy
        # The allow-list, for proxy headers and the PROXY protocol alike.
        self.trusted_peers = TrustedPeers(proxy.forwarded_allow_ips)
        self.proxy_headers = (
            ProxyHeaders(self.trusted_peers, proxy.header_style) if proxy.headers else None
        )
        health = settings.health
        self.health = (
            Health(health.ready_path, health.live_path)
            if health.ready_path or health.live_path
            else None
        )
        self.clock = Clock()
        self.clock.set(int(time.time()))
        self.websockets = 0  # open websockets (all protocols), for websocket.max_connections
        self.connections: set[Connection] = set()
        self.tasks: set[asyncio.Task] = set()  # app cycles still running
        self.servers: list[asyncio.AbstractServer | ProxyProtocolServer] = []
        self.listeners: list[H1Listener | H2Listener] = []
        self.h3_servers: list[H3Server] = []
        self.endpoints: list[str] = []  # what is served where, for the logs
        self._h3_closed_stats: list[list[int]] = []  # QUIC counters of closed servers
        self.draining = False
        self.drain_grace = DRAIN_GRACE  # set by drain(); connections made while draining use it
        self.requests_served = 0
        # Every request's task starts from this context, not from whatever task or
        # callback happened to start it.
        self._context = contextvars.copy_context()
        self._idle = Waiter(loop)  # woken when the last connection or task is gone
        self._hurried: asyncio.Future | None = None  # set to end a drain at once
        self._tick_interval = max(
            0.1,
            min(
                1.0,
                self.header_timeout / 4,
                self.keepalive_timeout / 4,
                self.body_timeout / 4,
                self.send_timeout / 4,
            ),
        )
        self._ticker: asyncio.TimerHandle | None = None
        self._trimmer = HeapTrimmer()  # freed memory back to the OS after large releases

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self.clock.set(int(time.time()))
        self._ticker = self.loop.call_later(self._tick_interval, self._tick)

    async def serve(
        self,
        listeners: Listeners,
        *,
        worker_id: int = 0,
        keys=None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        """Serve every protocol on ``listeners`` (starting the clock): TLS, with
        ``tls_context`` or one made from the settings' certificate, on ``listeners.tls``; cleartext HTTP/1.1 on
        ``listeners.http``; HTTP/3 on ``listeners.udp`` (or, MsQuic under fpy3-master,
        on the address ``listeners.udp_addr``). ``worker_id`` and ``keys`` (SessionKeys)
        go into HTTP/3 (see ``serve_h3``). Raises OSError when a listener
        cannot be served; the caller then closes the service."""
        self.start()
        settings = self.settings
        if listeners.tls:
            context = tls_context or server_context(settings)
            for sock in listeners.tls:
                await self.listen(sock, context)
        for sock in listeners.http:
            await self.listen(sock, None)
        udp: list[socket.socket | None] = list(listeners.udp)
        if listeners.udp_addr is not None:
            udp.append(None)  # MsQuic binds the address itself
        for quic_sock in udp:
            self.serve_h3(
                quic_sock,
                settings.tls.cert,
                settings.tls.key,
                worker_id,
                keys,
                listeners.udp_addr,
            )

    async def listen(self, sock: socket.socket, ssl_context: ssl.SSLContext | None) -> None:
        """Serve HTTP/1.1 on a listening socket (TLS with ``ssl_context``); with
        ``proxy.protocol`` on for it, every connection starts with a PROXY header."""
        scheme = "https" if ssl_context is not None else "http"
        listener = H1Listener(self, scheme)
        self.listeners.append(listener)
        if self.settings.http2.enabled:
            # HTTP/2 on the same port: chosen by ALPN on TLS, by its preface in cleartext.
            h2 = H2Listener(self, scheme)
            self.listeners.append(h2)
            listener.h2 = h2.take_over
            listener.alpn_h2 = ssl_context is not None
        tls = ssl_context is not None
        handshake_timeout = self.settings.tls.handshake_timeout if tls else None
        if self.settings.proxy.protocol in ("all", "tls" if tls else "cleartext"):
            self.servers.append(
                ProxyProtocolServer(
                    self.loop,
                    sock,
                    listener.proxied,
                    ssl_context=ssl_context,
                    trusted=self.trusted_peers.trusts,
                    timeout=self.settings.proxy.protocol_timeout,
                    handshake_timeout=self.settings.tls.handshake_timeout,
                    shutdown_timeout=TLS_SHUTDOWN_TIMEOUT,
                    max_pending=self.max_connections,
                )
            )
        else:
            self.servers.append(
                await self.loop.create_server(
                    listener,
                    sock=sock,
                    ssl=ssl_context,
                    backlog=self.settings.http1.backlog,
                    ssl_handshake_timeout=handshake_timeout,
                    ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT if tls else None,
                )
            )
        where = sockets.where(sock)
        if ssl_context is None:
            self.endpoints.append(f"http://{where} (HTTP/1.1)")
        else:
            alt_svc = f", Alt-Svc {self.alt_svc.decode()}" if self.alt_svc else ""
            self.endpoints.append(f"https://{where} ({tls_protocols(self.settings)}{alt_svc})")

    def serve_h3(
        self,
        sock: socket.socket | None,
        cert: str,
        key: str,
        worker_id: int = 0,
        keys=None,
        addr: tuple | None = None,
    ) -> None:
        """HTTP/3 on ``sock``, or (MsQuic) on ``addr``, where MsQuic binds its own.
        ``keys``: the master's SessionKeys (reset, token and ticket keys)."""
        h3 = H3Server(self, sock, cert, key, worker_id, keys, addr)
        self.h3_servers.append(h3)
        self.endpoints.append(f"HTTP/3 on UDP {_where(h3.server_addr)} ({h3.engine_name})")

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
        if not self.timed:
            return
        duration = self.loop.time() - started_at
        counts = self.counts
        if counts is not None:
            base = _PROTO_BASE[scope["http_version"]]
            counts[base + status] += 1
            counts[base + _HIST + bisect_left(_LATENCY_BOUNDS, duration)] += 1
            counts[base + _HIST_SUM] += duration
            if scope["type"] != "http":
                counts[base + _WS_SESSIONS] += 1
        if self.access_log is not None:
            self.access_log.log_request(scope, status, sent, duration)

    def sample_metrics(self) -> None:
        """Gauges and QUIC counters into the metrics block (the worker's tick, ~1/s)."""
        if self.counts is None or self.metrics is None:
            return
        values = self.counts.copy()
        for base in range(0, m.QUIC, m.PROTO_SIZE):
            values[base + m.HIST_SUM] = int(values[base + m.HIST_SUM] * 1e6)
        counts = self.metrics.counts
        counts[: m.QUIC] = array("q", values)
        h1 = m.PROTOCOL_INDEX["1.1"]
        h2 = m.PROTOCOL_INDEX["2"]
        h3 = m.PROTOCOL_INDEX["3"]
        h1_conns = [c for c in self.connections if isinstance(c, H1Connection)]
        h2_conns = [c for c in self.connections if isinstance(c, H2Connection)]
        counts[m.CONNECTIONS + h1] = len(h1_conns)
        counts[m.STREAMS + h1] = sum(1 for c in h1_conns if c.responding or c.ws is not None)
        counts[m.CONNECTIONS + h2] = len(h2_conns)
        counts[m.STREAMS + h2] = sum(len(c.streams) for c in h2_conns)
        counts[m.CONNECTIONS + h3] = sum(h3s.connection_count() for h3s in self.h3_servers)
        counts[m.STREAMS + h3] = sum(len(h3s.streams) for h3s in self.h3_servers)
        counts[m.WEBSOCKETS] = self.websockets
        quic = [0] * (m.COUNTERS - m.QUIC)
        for stats in [*self._h3_closed_stats, *(h3s.stats() for h3s in self.h3_servers)]:
            for i, value in enumerate(stats):
                quic[i] += value
        for i, value in enumerate(quic, m.QUIC):
            counts[i] = value

    def not_ready(self) -> None:
        """The readiness path answers 503 from now on (a stop is coming)."""
        if self.health is not None and self.health.ready:
            self.health.ready = False
            logger.info("worker %d: not ready (the readiness path answers 503)", os.getpid())

    def forget(self, conn: Connection) -> None:
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
        if self.health is not None:
            self.health.ready = False
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
        grace = self.drain_grace = min(DRAIN_GRACE, timeout / 2)
        for conn in list(self.connections):
            conn.drain(grace)
        waits = [asyncio.ensure_future(h3.drain(grace)) for h3 in self.h3_servers]
        waits += accepted
        waits.append(asyncio.ensure_future(self._idle_wait()))
        everything = asyncio.ensure_future(asyncio.wait(waits))
        self._hurried = self.loop.create_future()
        await asyncio.wait(
            (everything, self._hurried),
            timeout=max(0.0, deadline - self.loop.time()),
            return_when=asyncio.FIRST_COMPLETED,
        )
        everything.cancel()
        late = [waiter for waiter in waits if not waiter.done()]
        for waiter in late:
            waiter.cancel()
        if late:
            self._log_left()
        await self._cancel_tasks()
        self.close()

    def hurry(self) -> None:
        """End a drain in progress now, as if its deadline had come (a second Ctrl-C)."""
        if self._hurried is not None and not self._hurried.done():
            self._hurried.set_result(None)

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

    def close_h3(self) -> None:
        """Stop serving HTTP/3: every QUIC connection closed (CONNECTION_CLOSE), every
        socket given back."""
        for h3 in self.h3_servers:
            h3.close()
            if self.counts is not None:
                self._h3_closed_stats.append(h3.stats())
        self.h3_servers.clear()

    def close(self) -> None:
        """Close everything now: listeners, connections (QUIC ones with
        CONNECTION_CLOSE), the clock; flush the access log."""
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        for server in self.servers:
            if isinstance(server, ProxyProtocolServer):
                server.kill()
            else:
                server.close()
        self.close_h3()
        self.sample_metrics()
        for conn in list(self.connections):
            conn.kill()
        if self.access_log is not None:
            self.access_log.flush()

    # -- the clock ------------------------------------------------------------------------

    def admit(self, conn: Connection) -> None:
        """A TCP connection is ready for requests (after its TLS handshake)."""
        self.connections.add(conn)
        if self.max_idle and len(self.connections) > self.max_idle:
            self._admitted_over += 1
            if self._admitted_over >= self._idle_batch:
                self._close_idle()

    def _close_idle(self) -> None:
        """Past limits.max_idle_connections, the connections idle longest are closed: an
        idle TLS connection costs some 25 KiB, so a flood of them would otherwise hold
        that much each until its timeout (QUIC has http3.max_idle_connections)."""
        self._admitted_over = 0
        idle = [c for c in self.connections if c.idle_since]
        extra = len(idle) - self.max_idle
        if extra <= 0:
            return
        idle.sort(key=lambda c: c.idle_since)
        for conn in idle[:extra]:
            conn.close_idle()
        self._idle_closed += extra

    def _tick(self) -> None:
        second = int(time.time())
        if second != self.clock.second:
            self.clock.set(second)
            for listener in self.listeners:
                listener.refresh(self.clock)
            for h3 in self.h3_servers:
                h3.refresh(self.clock)
            self._trimmer.tick()  # once a second: after a flood, its memory goes back
        if self.access_log is not None:
            self.access_log.flush()
        mono = self.loop.time()
        late = [
            c
            for c in self.connections
            if (c.deadline and c.deadline <= mono) or (c.send_deadline and c.send_deadline <= mono)
        ]
        for conn in late:
            conn.on_timeout()
        if self.max_idle and len(self.connections) > self.max_idle:
            self._close_idle()
        if self._idle_closed:
            logger.info(
                "closed %d idle connection(s): limits.max_idle_connections (%d) reached",
                self._idle_closed,
                self.max_idle,
            )
            self._idle_closed = 0
        self._ticker = self.loop.call_later(self._tick_interval, self._tick)


def _where(addr) -> str:
    """host:port of a socket address, [host]:port for IPv6."""
    if not addr:
        return "?"
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
