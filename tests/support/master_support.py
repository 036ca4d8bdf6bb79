"""Shared by the master tests: an app with a loop-blocking route, and a load generator
that records which worker answered each request and what failed.

The workers import ``master_support:app``; keep this module light (no pytest, no harness).
"""

from __future__ import annotations

import contextlib
import threading
import time

from apps import app as main_app
from apps import query, respond

PID_REQUEST = b"GET /pid HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
PID_REQUEST_CLOSE = b"GET /pid HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


async def app(scope, receive, send):
    """The main test app, plus /block?s=N which blocks the whole event loop."""
    if scope["type"] == "http" and scope["path"] == "/block":
        time.sleep(float(query(scope).get("s", "30")))  # no heartbeats meanwhile
        await respond(send, b"unblocked")
        return
    await main_app(scope, receive, send)


def spread_connections(connect, pids: set[int], per_worker: int = 2, attempts: int = 200):
    """Keep-alive connections, ``per_worker`` on each of ``pids``, as ``(conn, pid)``."""
    kept: list = []
    for _ in range(attempts):
        if all(sum(p == pid for _, p in kept) >= per_worker for pid in pids):
            return kept
        conn = connect()
        conn.send(PID_REQUEST)
        pid = int(conn.read_response().body)
        if sum(p == pid for _, p in kept) < per_worker:
            kept.append((conn, pid))
        else:
            conn.close()
    raise AssertionError(f"connections did not reach every worker: {kept}")


class Load:
    """Threads sending ``GET /pid`` until stopped.

    ``keepalive=False``: one new connection per request (``Connection: close``).
    ``keepalive=True``: each thread keeps one connection until the server answers
    ``Connection: close``; when a request fails, it records the failure with the pid
    that connection was talking to, then reconnects.
    ``connect`` returns a harness.RawConn (``srv.connect``); ``conns`` optionally gives
    the keep-alive threads their first connections, as ``(conn, pid)`` pairs.
    """

    def __init__(
        self,
        connect,
        threads: int = 4,
        keepalive: bool = False,
        timeout: float = 10.0,
        conns: list | None = None,
    ):
        self.connect = connect
        self.keepalive = keepalive or conns is not None
        self.timeout = timeout
        self.initial = list(conns or [])
        threads = len(self.initial) or threads
        self.lock = threading.Lock()
        self.ok: list[int] = []  # pid per successful request
        self.failures: list[tuple[int | None, str]] = []  # (pid of the connection, error)
        self.headers: list[dict[str, str]] = []  # the last response's headers, per thread
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)
        ]
        self.headers = [{} for _ in self.threads]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(self.timeout + 5)
        assert not any(t.is_alive() for t in self.threads), "load threads did not stop"

    def count(self) -> int:
        with self.lock:
            return len(self.ok)

    def pids(self) -> set[int]:
        with self.lock:
            return set(self.ok)

    def _one(self, conn, request: bytes, index: int) -> int:
        conn.send(request)
        resp = conn.read_response(timeout=self.timeout)
        assert resp.status == 200, f"status {resp.status}"
        self.headers[index] = dict(resp.headers)
        return int(resp.body)

    def _run(self, index: int) -> None:
        conn, pid = self.initial[index] if self.initial else (None, None)
        while not self.stopping.is_set():
            try:
                if self.keepalive:
                    if conn is None:
                        conn, pid = self.connect(timeout=self.timeout), None
                    pid = self._one(conn, PID_REQUEST, index)
                    if self.headers[index].get("connection") == "close":
                        conn.close()  # the server said so (draining): reconnect
                        conn = None
                else:
                    with self.connect(timeout=self.timeout) as c:
                        pid = self._one(c, PID_REQUEST_CLOSE, index)
                with self.lock:
                    self.ok.append(pid)
            except Exception as exc:  # recorded; the test decides what was allowed
                with self.lock:
                    self.failures.append((pid if self.keepalive else None, repr(exc)))
                if conn is not None:
                    conn.close()
                conn, pid = None, None
                # A refused connect fails fast; do not spin.
                self.stopping.wait(0.01)
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()


class H2Load:
    """Threads sending ``GET /pid`` over HTTP/2, ``streams`` requests at a time on one
    connection, until stopped.

    A connection that got a GOAWAY takes no new stream (as clients do): its requests in
    flight finish, then the thread opens a new connection. Every request that is not
    answered with a whole 200 is a failure. ``connect`` returns an h2clients.H2Raw.
    """

    def __init__(self, connect, threads: int = 3, streams: int = 4, timeout: float = 10.0):
        self.connect = connect
        self.streams = streams
        self.timeout = timeout
        self.lock = threading.Lock()
        self.ok: list[int] = []
        self.failures: list[str] = []
        self.servers: set[str] = set()  # Server header values seen
        self.connections = 0
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> H2Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(self.timeout + 5)
        assert not any(t.is_alive() for t in self.threads), "load threads did not stop"

    def count(self) -> int:
        with self.lock:
            return len(self.ok)

    def pids(self) -> set[int]:
        with self.lock:
            return set(self.ok)

    def _run(self) -> None:
        h2 = None
        while not self.stopping.is_set():
            try:
                if h2 is None or h2.goaway or h2.closed:
                    if h2 is not None:
                        h2.close()
                    h2 = None
                    h2 = self.connect()
                    with self.lock:
                        self.connections += 1
                sids = [h2.request("GET", "/pid") for _ in range(self.streams)]
                h2.wait(lambda: all(h2.streams[s].done for s in sids), self.timeout)  # noqa: B023
                for sid in sids:
                    st = h2.streams.pop(sid)
                    assert st.status == 200 and st.ended, f"stream {sid}: {st}"
                    with self.lock:
                        self.ok.append(int(st.data))
                        self.servers.add(st.header("server") or "")
            except Exception as exc:  # recorded; the test decides what was allowed
                with self.lock:
                    self.failures.append(repr(exc))
                if h2 is not None:
                    h2.close()
                h2 = None
                self.stopping.wait(0.01)
        if h2 is not None:
            h2.close()
