"""The native HTTP/3 server (native/h3.c over native/engine_ngtcp2.c) end to end.

Each test talks to tests/h3_native_echo.py, a subprocess serving straight from
fpy3._native, with independent clients: aioquic, ngtcp2's gtlsclient and
libcurl-gnutls (see h3clients.py). Everything is bounded; nothing sleeps blindly.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import select
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h3clients as h3c
import pytest
from harness import client_missing

from fpy3.devcert import ensure_dev_cert

ECHO = Path(__file__).resolve().parents[1] / "support" / "h3_native_echo.py"
START_TIMEOUT = float(os.environ.get("FPY3_H3_ECHO_START_TIMEOUT", "15"))
H3_MESSAGE_ERROR = 0x10E

# Every test runs once per QUIC engine (msquic cases skip without libmsquic).
pytestmark = pytest.mark.usefixtures("quic_engine")


class EchoServer:
    def __init__(
        self,
        workdir: Path,
        cert: str,
        key: str,
        host: str = "127.0.0.1",
        args=(),
        env=None,
        engine: str = "ngtcp2",
    ):
        self.host = host
        self.cafile = cert
        args = [*args, "--engine", engine]
        self.stderr_path = workdir / f"echo-{os.getpid()}-{time.monotonic_ns()}.err"
        cmd = [sys.executable, str(ECHO), "--host", host, "--cert", cert, "--key", key, *args]
        # e.g. "valgrind --leak-check=full" or "env LD_PRELOAD=... PYTHONPATH=<asan build>"
        cmd = shlex.split(os.environ.get("FPY3_H3_ECHO_WRAP", "")) + cmd
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
            )
        self.buf = b""
        self.tail = ""
        self.port = int(self.line("READY", START_TIMEOUT).split()[1])

    def line(self, prefix: str, timeout: float = 15.0) -> str:
        """The next stdout line starting with prefix (earlier lines are dropped)."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                if line.decode().startswith(prefix):
                    return line.decode()
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {prefix!r} line from the echo server: {self.stderr()}")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError(f"echo server exited {self.proc.poll()}: {self.stderr()}")
            self.buf += chunk

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (drain), wait bounded; returns the exit code."""
        if self.proc.stdout.closed:
            return self.proc.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError(f"echo server did not drain: {self.stderr()}") from None
        self.tail = (self.buf + self.proc.stdout.read()).decode(errors="replace")
        self.proc.stdout.close()
        return self.proc.returncode

    def alive(self) -> bool:
        return self.proc.poll() is None


@pytest.fixture(scope="module")
def devcert(tmp_path_factory):
    return ensure_dev_cert(str(tmp_path_factory.mktemp("cert")))


@pytest.fixture(scope="module")
def echo(devcert, tmp_path_factory, quic_engine):
    srv = EchoServer(tmp_path_factory.mktemp("echo"), *devcert, engine=quic_engine)
    yield srv
    assert srv.stop() == 0, srv.stderr()


@pytest.fixture
def start_echo(devcert, tmp_path, quic_engine):
    made = []

    def start(**kw) -> EchoServer:
        made.append(EchoServer(tmp_path, *devcert, engine=quic_engine, **kw))
        return made[-1]

    yield start
    for srv in made:
        with contextlib.suppress(AssertionError):
            srv.stop()


def aioquic(srv, method, path, body=b"", timeout=15.0):
    try:
        return h3c.aioquic_request(
            srv.host, srv.port, method, path, body=body, cafile=srv.cafile, timeout=timeout
        )
    except h3c.ClientUnavailable as e:
        client_missing(e)


# --- aioquic ---------------------------------------------------------------------------


def test_get_hello(echo):
    r = aioquic(echo, "GET", "/hello")
    assert (r.status, r.body) == (200, b"hello")
    assert r.header("content-type") == "text/plain"


def test_not_found(echo):
    r = aioquic(echo, "GET", "/nope")
    assert r.status == 404


def test_post_echo_1mb_checksum(echo):
    body = os.urandom(1 << 20)
    r = aioquic(echo, "POST", "/echo", body=body, timeout=30)
    assert r.status == 200
    assert len(r.body) == len(body)
    assert hashlib.sha256(r.body).digest() == hashlib.sha256(body).digest()


def test_big_response(echo):
    n = 5_000_000
    r = aioquic(echo, "GET", f"/big?n={n}", timeout=30)
    assert r.status == 200 and r.header("content-length") == str(n)
    assert len(r.body) == n
    assert r.body == (bytes(range(256)) * (n // 256 + 1))[:n]


def test_100_concurrent_streams_one_connection(echo):
    reqs = [("GET", "/hello", b"")] * 50 + [("POST", "/echo", os.urandom(3000))] * 50
    rs = h3c.aioquic_many(echo.host, echo.port, reqs, echo.cafile, connections=1, timeout=30)
    assert all(r.status == 200 for r in rs)
    assert [r.body for r in rs] == [b"hello"] * 50 + [b for _, _, b in reqs[50:]]


def test_20_connections(echo):
    reqs = [("GET", "/hello", b"")] * 60
    rs = h3c.aioquic_many(echo.host, echo.port, reqs, echo.cafile, connections=20, timeout=30)
    assert {(r.status, r.body) for r in rs} == {(200, b"hello")}


def test_more_streams_than_the_limit(start_echo):
    # 3 concurrent streams allowed: the rest wait for stream credit from closed ones.
    srv = start_echo(args=["--max-streams", "3"])
    reqs = [("GET", "/hello", b"")] * 30
    rs = h3c.aioquic_many(srv.host, srv.port, reqs, srv.cafile, connections=1, timeout=30)
    assert {(r.status, r.body) for r in rs} == {(200, b"hello")}


def test_upload_aborted_midway_server_keeps_serving(echo):
    r = h3c.aioquic_abort_upload(
        echo.host,
        echo.port,
        "/echo",
        echo.cafile,
        send_bytes=50_000,
        timeout=15,
        followup_path="/hello",
    )
    assert (r.status, r.body) == (200, b"hello")
    assert echo.alive()


# --- malformed input: reset by C, never reaching Python ----------------------------------


BASE = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"localhost")]


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(BASE, id="no-path"),
        pytest.param([(b":method", b"GET"), (b":path", b"/hello")], id="no-scheme"),
        pytest.param([*BASE, (b":path", b"/hello"), (b"X-Upper", b"1")], id="uppercase-name"),
        pytest.param([*BASE, (b":path", b"/hello"), (b"connection", b"close")], id="connection"),
        pytest.param([*BASE, (b":path", b"/hello"), (b"transfer-encoding", b"chunked")], id="te"),
        pytest.param([*BASE, (b":path", b"/hello"), (b":foo", b"x")], id="unknown-pseudo"),
    ],
)
def test_malformed_request_reset_with_message_error(echo, headers):
    kind, value = h3c.aioquic_raw_headers(echo.host, echo.port, headers, echo.cafile, timeout=10)
    assert (kind, value) == ("reset", H3_MESSAGE_ERROR)
    assert echo.alive()


def test_malformed_request_racing_the_peers_close(echo):
    # The C side stops reading the stream (STOP_SENDING) and the connection's end comes
    # in the same batch: nothing may touch the stream or the connection afterwards.
    bad = [*BASE, (b":path", b"/hello"), (b"X-Upper", b"1")]
    for _ in range(30):
        h3c.aioquic_headers_then_close(echo.host, echo.port, bad, echo.cafile, timeout=10)
    assert aioquic(echo, "GET", "/hello").status == 200
    assert echo.alive()


def test_header_section_too_large_gets_431(echo):
    headers = [*BASE, (b":path", b"/hello"), (b"x-big", b"a" * 20000)]
    kind, r = h3c.aioquic_raw_headers(echo.host, echo.port, headers, echo.cafile, timeout=10)
    assert kind == "response" and r.status == 431


def test_too_many_header_fields_gets_431(echo):
    headers = [*BASE, (b":path", b"/hello")] + [(f"x-h{i}".encode(), b"v") for i in range(150)]
    kind, r = h3c.aioquic_raw_headers(echo.host, echo.port, headers, echo.cafile, timeout=10)
    assert kind == "response" and r.status == 431


def test_too_large_with_body_gets_431(echo):
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":authority", b"localhost"),
        (b":path", b"/echo"),
        (b"x-big", b"a" * 20000),
    ]
    kind, r = h3c.aioquic_raw_headers(
        echo.host, echo.port, headers, echo.cafile, end_stream=True, body=b"x" * 100_000, timeout=10
    )
    assert kind == "response" and r.status == 431
    assert aioquic(echo, "GET", "/hello").status == 200


# --- other clients -----------------------------------------------------------------------


def test_gtlsclient_get(echo):
    try:
        r = h3c.gtlsclient_request(echo.host, echo.port, "/hello", timeout=10)
    except h3c.ClientUnavailable as e:
        client_missing(e)
    assert (r.status, r.body) == (200, b"hello")


def test_gtlsclient_post_echo(echo, tmp_path):
    body = os.urandom(200_000)
    path = tmp_path / "body"
    path.write_bytes(body)
    try:
        r = h3c.gtlsclient_request(echo.host, echo.port, "/echo", body_file=str(path), timeout=15)
    except h3c.ClientUnavailable as e:
        client_missing(e)
    assert r.status == 200 and r.body == body


def test_curl_get(echo):
    try:
        r = h3c.curl_request(
            f"https://{echo.host}:{echo.port}/hello", cafile=echo.cafile, timeout=10
        )
    except h3c.ClientUnavailable as e:
        client_missing(e)
    assert (r.status, r.body, r.http_version) == (200, b"hello", "3")


def test_curl_post_echo(echo):
    body = os.urandom(300_000)
    try:
        r = h3c.curl_request(
            f"https://{echo.host}:{echo.port}/echo",
            method="POST",
            body=body,
            cafile=echo.cafile,
            timeout=15,
        )
    except h3c.ClientUnavailable as e:
        client_missing(e)
    assert r.status == 200 and r.body == body


# --- engine options ----------------------------------------------------------------------


def test_retry_address_validation(start_echo):
    srv = start_echo(args=["--retry"])
    r = aioquic(srv, "GET", "/hello")
    assert (r.status, r.body) == (200, b"hello")
    r = h3c.curl_request(f"https://{srv.host}:{srv.port}/hello", cafile=srv.cafile, timeout=10)
    assert r.status == 200


def _ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_ipv6(start_echo):
    if not _ipv6():
        pytest.skip("no IPv6 loopback")
    srv = start_echo(host="::1")
    r = aioquic(srv, "GET", "/hello")
    assert (r.status, r.body) == (200, b"hello")
    r = aioquic(srv, "POST", "/echo", body=b"z" * 100_000)
    assert r.body == b"z" * 100_000


# GSO batching is ngtcp2's (MsQuic does its own sends).
@pytest.mark.parametrize("quic_engine", ["ngtcp2"], indirect=True)
def test_without_gso(start_echo, quic_engine):
    srv = start_echo(env={"FPY3_NO_GSO": "1"})
    n = 2_000_000
    r = aioquic(srv, "GET", f"/big?n={n}", timeout=30)
    assert len(r.body) == n


@pytest.mark.parametrize("quic_engine", ["ngtcp2"], indirect=True)  # qlog is ngtcp2's
def test_qlog_per_connection_and_worker_id_in_cid(start_echo, quic_engine, tmp_path):
    qdir = tmp_path / "qlog"
    qdir.mkdir()
    srv = start_echo(args=["--qlog-dir", str(qdir), "--worker-id", str(0xA1B2C3D4)])
    assert aioquic(srv, "GET", "/hello").status == 200
    files = list(qdir.glob("*.sqlog"))
    assert len(files) == 1
    deadline = time.monotonic() + 10  # written through stdio: whole once the connection is gone
    while files[0].stat().st_size == 0 and time.monotonic() < deadline:
        time.sleep(0.02)  # poll until the deadline
    assert files[0].stat().st_size > 0
    # Named after the server's first connection id: 18 bytes, worker id in bytes 1-4.
    cid = bytes.fromhex(files[0].stem)
    assert len(cid) == 18 and cid[1:5] == bytes.fromhex("a1b2c3d4")


def test_unknown_version_gets_version_negotiation(echo):
    # A long header with version 0x1a2a3a4a and a 1200-byte datagram.
    dcid, scid = os.urandom(8), os.urandom(8)
    pkt = bytes([0xC0]) + bytes.fromhex("1a2a3a4a") + bytes([8]) + dcid + bytes([8]) + scid
    pkt += b"\0" * (1200 - len(pkt))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(pkt, (echo.host, echo.port))
        data, _ = s.recvfrom(2048)
    assert data[1:5] == b"\0\0\0\0"  # version negotiation
    assert data[6:14] == scid and data[15:23] == dcid
    versions = [data[i : i + 4] for i in range(23, len(data), 4)]
    assert bytes.fromhex("00000001") in versions


def test_stateless_reset_for_unknown_connection(echo):
    # A short header packet for a connection id the server never issued.
    pkt = bytes([0x40]) + os.urandom(18) + os.urandom(60)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(pkt, (echo.host, echo.port))
        data, _ = s.recvfrom(2048)
    assert data[0] & 0xC0 == 0x40 and len(data) < len(pkt)


def test_flow_control_follows_consume(start_echo):
    # 64 KiB stream window: while the app consumes nothing, at most that much arrives.
    srv = start_echo(args=["--max-stream-data", "65536"])
    body = os.urandom(400_000)
    r = aioquic(srv, "POST", "/hold?ms=400", body=body, timeout=20)
    assert (r.status, r.body) == (200, b"400000")
    held = int(srv.line("HELD").split()[1])
    assert 0 < held <= 65536


@pytest.mark.parametrize(
    "bind,client", [("::", "127.0.0.1"), ("::", "::1"), ("0.0.0.0", "127.0.0.1")]
)
def test_wildcard_and_dual_stack_bind(start_echo, bind, client):
    if ":" in bind + client and not _ipv6():
        pytest.skip("no IPv6 loopback")
    srv = start_echo(host=bind)
    srv.host = client
    r = aioquic(srv, "POST", "/echo", body=b"w" * 150_000)
    assert (r.status, r.body) == (200, b"w" * 150_000)


def test_drain_finishes_in_flight_request(start_echo):
    srv = start_echo(args=["--log-requests"])
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(aioquic, srv, "GET", "/slow?ms=800")
        srv.line("REQUEST GET /slow")
        srv.proc.send_signal(signal.SIGTERM)  # GOAWAY; the request still completes
        r = fut.result(timeout=20)
    assert (r.status, r.body) == (200, b"slow")
    assert srv.stop(timeout=15) == 0
    assert "DRAINED" in srv.tail


def test_sigterm_drains_and_exits(start_echo):
    srv = start_echo()
    assert aioquic(srv, "GET", "/hello").status == 200
    assert srv.stop(timeout=15) == 0
    assert "DRAINED" in srv.tail


def _close_seen_by_client(srv, trigger, within: float = 2.0):
    """An aioquic client with an open connection (one request answered); trigger() is
    called and the client must see the server's CONNECTION_CLOSE within ``within``
    seconds, far below both idle timeouts (30 s). Returns (seconds, the close)."""
    pytest.importorskip("aioquic")
    import asyncio

    async def go():
        async with h3c._h3_connection(srv.host, srv.port, srv.cafile, 30) as proto:
            authority = f"{srv.host}:{srv.port}"
            ex = await h3c._send_request(proto, "GET", "/hello", authority, (), b"")
            assert (await h3c._finish(proto, ex)).status == 200
            t0 = time.monotonic()
            trigger()
            try:
                await asyncio.wait_for(h3c._until(lambda: proto.terminated is not None), within)
            except TimeoutError:
                raise AssertionError(
                    f"no CONNECTION_CLOSE within {within} s: {proto.describe()}"
                ) from None
            return time.monotonic() - t0, proto.terminated

    return asyncio.run(asyncio.wait_for(go(), 20))


def test_close_all_sends_connection_close_at_once(start_echo):
    srv = start_echo()
    took, (code, _reason, by_peer, transport) = _close_seen_by_client(
        srv, lambda: srv.proc.send_signal(signal.SIGUSR1)
    )
    assert (code, by_peer, transport) == (h3c.H3_NO_ERROR, True, False), took
    srv.line("CLOSED_ALL")
    assert srv.stop(timeout=15) == 0  # nothing left to drain
    assert "DRAINED" in srv.tail


def test_server_free_closes_connections(start_echo):
    # Exit without draining: fpy3_h3_server_free must still tell the client at once.
    srv = start_echo()
    took, (code, _reason, by_peer, transport) = _close_seen_by_client(
        srv, lambda: srv.proc.send_signal(signal.SIGUSR2)
    )
    assert (code, by_peer, transport) == (h3c.H3_NO_ERROR, True, False), took
    assert srv.proc.wait(15) == 0, srv.stderr()


@pytest.mark.parametrize("quic_engine", ["msquic"], indirect=True)
def test_msquic_server_free_gives_its_socket_back(start_echo, quic_engine):
    # A worker whose HTTP/3 side is closed while it runs on (a join the master
    # refused) must have left the port's socket group by then.
    from fpy3.supervisor.steering.msquic_group import udp_fds

    srv = start_echo(args=["--after-free-ms", "1500"])
    assert aioquic(srv, "GET", "/hello").status == 200
    assert len(udp_fds(srv.proc.pid, srv.port)) == 1
    srv.proc.send_signal(signal.SIGUSR2)
    assert srv.line("LEFT_OPEN") == "LEFT_OPEN 0", srv.stderr()
    assert srv.proc.poll() is None  # still running, without the socket
    assert udp_fds(srv.proc.pid, srv.port) == []
    assert srv.proc.wait(15) == 0, srv.stderr()


def _handshake_then_silence(host: str, port: int) -> socket.socket:
    """A QUIC connection whose handshake completes, from a client that then reads and
    sends nothing more (its socket is returned, to keep its port)."""
    pytest.importorskip("aioquic")
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection
    from aioquic.quic.events import HandshakeCompleted

    conn = QuicConnection(
        configuration=QuicConfiguration(is_client=True, alpn_protocols=["h3"], verify_mode=0)
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(5)
    conn.connect((host, port), now=time.time())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for data, _ in conn.datagrams_to_send(now=time.time()):
            sock.sendto(data, (host, port))
        conn.receive_datagram(sock.recv(65536), (host, port), now=time.time())
        while event := conn.next_event():
            if isinstance(event, HandshakeCompleted):
                for data, _ in conn.datagrams_to_send(now=time.time()):
                    sock.sendto(data, (host, port))  # its last flight: the server is done
                return sock
    raise AssertionError("no QUIC handshake")


@pytest.mark.parametrize("quic_engine", ["msquic"], indirect=True)
def test_msquic_close_past_its_deadline_leaves_the_engine_allocated(start_echo, quic_engine):
    # A connection whose client went silent is still closing when the engine's close
    # deadline (1 ms here) has passed: the engine is then left allocated, since MsQuic's
    # objects still refer to it, and the process, which runs on, must not crash when
    # the closing ends.
    srv = start_echo(args=["--close-wait-ms", "1", "--after-free-ms", "1000"])
    with _handshake_then_silence(srv.host, srv.port):
        srv.proc.send_signal(signal.SIGUSR2)
        assert srv.line("LEFT_OPEN") == "LEFT_OPEN 1", srv.stderr()
        assert srv.proc.wait(15) == 0, srv.stderr()


# --- the C API without a network -----------------------------------------------------------


def test_api_stale_handles(devcert):
    from fpy3._native import ffi, lib

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        keep = [ffi.new("char[]", p.encode()) for p in devcert]
        cfg = ffi.new("fpy3_h3_config *")
        cfg.cert_file, cfg.key_file = keep
        err = ffi.new("char[256]")
        srv = lib.fpy3_h3_server_new(sock.fileno(), cfg, err, 256)
        assert srv != ffi.NULL, ffi.string(err)
        try:
            assert lib.fpy3_h3_read(srv) == 0
            assert lib.fpy3_h3_next_timeout_ms(srv) == -1
            assert lib.fpy3_h3_respond(srv, 12345, 0, 200, b"", 0, 1) == -1
            assert lib.fpy3_h3_send(srv, 12345, 0, b"x", 1, 1) == -1
            assert lib.fpy3_h3_consume(srv, 12345, 0, 10) == -1
            assert lib.fpy3_h3_reset(srv, 12345, 0, 0x102) == -1
            assert lib.fpy3_h3_flush(srv) == 0
            assert lib.fpy3_h3_connection_count(srv) == 0
            lib.fpy3_h3_shutdown(srv, 1)
            lib.fpy3_h3_shutdown(srv, 2)
            lib.fpy3_h3_shutdown(srv, 1)  # no going back
        finally:
            lib.fpy3_h3_server_free(srv)


def test_api_bad_cert(tmp_path):
    from fpy3._native import ffi, lib

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        missing = ffi.new("char[]", str(tmp_path / "missing.pem").encode())
        cfg = ffi.new("fpy3_h3_config *")
        cfg.cert_file = cfg.key_file = missing
        err = ffi.new("char[256]")
        assert lib.fpy3_h3_server_new(sock.fileno(), cfg, err, 256) == ffi.NULL
        assert b"missing.pem" in ffi.string(err)


def test_alpn_other_than_h3_refused(echo):
    pytest.importorskip("aioquic")
    import asyncio

    from aioquic.asyncio.client import connect
    from aioquic.quic.configuration import QuicConfiguration

    async def go():
        cfg = QuicConfiguration(is_client=True, alpn_protocols=["hq-interop"])
        cfg.load_verify_locations(echo.cafile)
        cfg.server_name = echo.host
        async with connect(echo.host, echo.port, configuration=cfg, wait_connected=True):
            pass

    async def bounded():
        await asyncio.wait_for(go(), 10)

    with pytest.raises(ConnectionError):
        asyncio.run(bounded())


def test_client_stop_sending_mid_response(start_echo):
    """STOP_SENDING on a large response: the app hears RESET, the connection lives on."""
    pytest.importorskip("aioquic")
    import asyncio

    srv = start_echo(args=["--log-requests"])

    async def go():
        async with h3c._h3_connection(srv.host, srv.port, srv.cafile, 15) as proto:
            authority = f"{srv.host}:{srv.port}"
            ex = await h3c._send_request(proto, "GET", "/big?n=200000000", authority, (), b"")
            while len(ex.body) < 100_000:
                await asyncio.sleep(0.005)
            proto._quic.stop_stream(ex.stream_id, h3c.H3_REQUEST_CANCELLED)
            proto.transmit()
            ex2 = await h3c._send_request(proto, "GET", "/hello", authority, (), b"")
            return await h3c._finish(proto, ex2)

    r = asyncio.run(asyncio.wait_for(go(), 20))
    assert (r.status, r.body) == (200, b"hello")
    assert srv.line("RESET") == f"RESET {hex(h3c.H3_REQUEST_CANCELLED)}"
