"""fpy3-master: SIGHUP while HTTP/3 clients keep long-lived connections busy fails nothing.

A background thread runs a few aioquic connections, each sending requests back to back.
The client behaves as RFC 9114 asks: after the server's GOAWAY it sends nothing new on
that connection and opens another one. A request the server refused without processing
(stream reset with H3_REQUEST_REJECTED, or a stream at or above the GOAWAY id that the
connection close cut off) may be retried (RFC 9114 sections 4.1.1 and 5.2); it is counted
apart, and every other error is a failed request.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import h3clients
import pytest
from harness import client_missing, wait_until
from masters import wait_workers, workers

from fpy3.supervisor.steering.msquic_group import udp_fds

# Every test runs once per QUIC engine (msquic cases skip without libmsquic).
pytestmark = pytest.mark.usefixtures("quic_engine")

APP = "apps:app"
H3_REQUEST_REJECTED = 0x10B
GOAWAY_FRAME = 0x7
REQUEST_TIMEOUT = 10.0


class H3Load:
    """``connections`` long-lived HTTP/3 connections, ``in_flight`` GET /pid at a time each."""

    def __init__(self, srv, connections: int = 4, in_flight: int = 2):
        self.srv = srv
        self.connections = connections
        self.in_flight = in_flight
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.answers: list[tuple[float, int]] = []  # (monotonic time, worker pid)
        self.failures: list[str] = []
        self.retried: list[str] = []  # refused unprocessed, as RFC 9114 allows
        self.connects = 0
        self.goaways = 0
        self.thread = threading.Thread(target=self._thread, name="h3-load", daemon=True)

    def __enter__(self) -> H3Load:
        try:
            h3clients._aioquic()
        except h3clients.ClientUnavailable as exc:
            client_missing(exc)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        # Bounded: every await below has a timeout of REQUEST_TIMEOUT at most.
        self.thread.join(3 * REQUEST_TIMEOUT)
        assert not self.thread.is_alive(), "HTTP/3 load thread did not stop"

    def count(self) -> int:
        with self.lock:
            return len(self.answers)

    def pids_since(self, t: float) -> set[int]:
        with self.lock:
            return {pid for when, pid in self.answers if when >= t}

    def _fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)

    def _thread(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self._fail(f"load thread crashed: {exc!r}")

    async def _main(self) -> None:
        await asyncio.gather(*(self._connection_loop() for _ in range(self.connections)))

    async def _connection_loop(self) -> None:
        srv = self.srv
        authority = f"{srv.host}:{srv.port}"
        while not self.stop.is_set():
            goaway: list[int] = []
            try:
                conn = h3clients._h3_connection(
                    srv.host, srv.port, str(srv.cafile), idle_timeout=REQUEST_TIMEOUT
                )
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    proto = await conn.__aenter__()
                try:
                    with self.lock:
                        self.connects += 1
                    self._watch_goaway(proto, goaway)
                    while not self.stop.is_set() and not goaway and proto.terminated is None:
                        await self._batch(proto, authority, goaway)
                finally:
                    await conn.__aexit__(None, None, None)
            except h3clients.H3ClientError as exc:
                self._fail(f"connection: {exc}")
            except TimeoutError:
                self._fail("QUIC handshake not finished within the timeout")

    def _watch_goaway(self, proto, goaway: list[int]) -> None:
        """Record the GOAWAY stream id: aioquic skips that frame without telling us."""
        from aioquic.buffer import Buffer, BufferReadError
        from aioquic.quic.events import StreamDataReceived

        # Installed after the handshake: the stream type and SETTINGS are already read,
        # so what arrives from here on starts at a frame boundary.
        control = bytearray()
        original = proto.quic_event_received

        def received(event) -> None:
            if (
                isinstance(event, StreamDataReceived)
                and event.stream_id == proto.h3._peer_control_stream_id
            ):
                control.extend(event.data)
                buf = Buffer(data=bytes(control))
                try:
                    while not goaway:
                        frame_type, length = buf.pull_uint_var(), buf.pull_uint_var()
                        payload = buf.pull_bytes(length)
                        if frame_type == GOAWAY_FRAME:
                            goaway.append(Buffer(data=payload).pull_uint_var())
                            with self.lock:
                                self.goaways += 1
                except BufferReadError:
                    pass
            original(event)

        proto.quic_event_received = received

    async def _batch(self, proto, authority: str, goaway: list[int]) -> None:
        sent = [
            await h3clients._send_request(proto, "GET", "/pid", authority, (), b"")
            for _ in range(self.in_flight)
        ]
        for ex in sent:
            try:
                resp = await asyncio.wait_for(h3clients._finish(proto, ex), REQUEST_TIMEOUT)
            except TimeoutError:
                self._fail(f"stream {ex.stream_id}: no answer within {REQUEST_TIMEOUT}s")
                continue
            except h3clients.StreamReset as exc:
                if exc.error_code == H3_REQUEST_REJECTED:
                    with self.lock:
                        self.retried.append(str(exc))
                else:
                    self._fail(str(exc))
                continue
            except h3clients.ConnectionClosed as exc:
                if goaway and ex.stream_id >= goaway[0]:
                    with self.lock:
                        self.retried.append(f"stream {ex.stream_id} >= GOAWAY id: {exc}")
                else:
                    self._fail(f"stream {ex.stream_id} (GOAWAY {goaway or 'none'}): {exc}")
                continue
            except h3clients.H3ClientError as exc:
                self._fail(str(exc))
                continue
            if resp.status != 200 or not resp.body.isdigit():
                self._fail(f"stream {ex.stream_id}: {resp.status} {resp.body[:80]!r}")
                continue
            with self.lock:
                self.answers.append((time.monotonic(), int(resp.body)))


def test_h3_requests_survive_two_reloads(start_server):
    srv = start_server(
        app=APP, command="master", config={"workers": {"count": 2}, "http3": {"enabled": True}}
    )
    generation = set(wait_workers(srv, 2))
    with H3Load(srv) as load:
        wait_until(
            lambda: load.count() > 50 or load.failures,
            timeout=10,
            message=lambda: f"no HTTP/3 answers: {load.failures[:3]}",
        )
        assert load.pids_since(0) <= generation
        for n in (2, 3):
            old = generation
            offset = srv.stderr_size()
            os.kill(srv.pid, signal.SIGHUP)
            srv.wait_stderr(f"generation {n} ready", offset, timeout=15)
            # Old workers exit once their HTTP/3 connections have moved away.
            generation = wait_until(
                lambda old=old: len(w := set(workers(srv))) == 2 and not (w & old) and w,
                timeout=15,
                message=lambda offset=offset: f"{workers(srv)}\n{srv.stderr_since(offset)[-2000:]}",
            )
            since = time.monotonic()
            wait_until(
                lambda since=since, gen=generation: bool(p := load.pids_since(since)) and p <= gen,
                timeout=10,
                message=lambda since=since, n=n, gen=generation: (
                    f"generation {n} workers {gen} not answering:"
                    f" {load.pids_since(since)}; failures {load.failures[:3]}"
                ),
            )
    assert load.failures == [], (
        f"{len(load.failures)} failed of {load.count() + len(load.failures)}:"
        f" {load.failures[:5]}\n{srv.stderr()[-2000:]}"
    )
    # At the end only the newest generation answers.
    assert load.pids_since(since) <= generation and load.pids_since(since)
    assert load.goaways >= 1 and load.connects > load.connections
    # The master holds each UDP socket of the port once, however many reloads passed
    # (with MsQuic, the copies of the workers' sockets it keeps).
    links = [os.readlink(f"/proc/{srv.pid}/fd/{fd}") for fd in udp_fds(srv.pid, srv.port)]
    assert links and len(links) == len(set(links)), links
    print(
        f"HTTP/3 over 2 reloads: {load.count()} answered, 0 failed,"
        f" {len(load.retried)} refused unprocessed and retried, {load.connects} connections,"
        f" {load.goaways} GOAWAYs"
    )
    assert srv.stop() == 0, srv.stderr()
