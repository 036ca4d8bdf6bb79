"""HTTP/3 server behaviour that needs its own ``fpy3 run`` process: [http3] settings,
idle timeout, drain on SIGTERM, Alt-Svc discovery, Chromium, IPv6.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import socket
import time

import h3clients as kit
import pytest
from harness import call, free_port, ipv6_available

from fpy3.devcert import spki_sha256_b64

# Every test runs once per QUIC engine (msquic cases skip without libmsquic).
pytestmark = pytest.mark.usefixtures("quic_engine")

H3_ON = {"http3": {"enabled": True}}


def authority(srv, port: int | None = None) -> str:
    port = port or srv.port
    return f"[{srv.host}]:{port}" if ":" in srv.host else f"{srv.host}:{port}"


def aq(srv, method, path, port: int | None = None, **kw):
    kw.setdefault("cafile", str(srv.cafile))
    return call(kit.aioquic_request, srv.host, port or srv.port, method, path, **kw)


def h3_config(**http3) -> dict:
    return {"http3": {"enabled": True, **http3}}


# --- [http3] settings ----------------------------------------------------------------


def test_transport_parameters_follow_config(start_server, quic_engine):
    srv = start_server(
        config=h3_config(
            max_concurrent_streams=7,
            idle_timeout=12.5,
            initial_max_data=3_000_000,
            max_window=5_000_000,
            initial_max_stream_data=200_000,
        )
    )

    async def go():
        async with kit._h3_connection(srv.host, srv.port, str(srv.cafile), 10, progress) as p:
            q = p._quic
            return (
                q._remote_max_streams_bidi,
                q._remote_max_idle_timeout,
                q._remote_max_data,
                q._remote_max_stream_data_bidi_remote,
            )

    progress: list = []
    got = call(kit._run, go, 15, "aioquic handshake", progress)
    # MsQuic takes stream windows in powers of two only: 200 000 becomes 2**18; it cannot
    # grow the connection window, so it opens it to max_window at once.
    stream_window = 200_000 if quic_engine == "ngtcp2" else 1 << 18
    conn_window = 3_000_000 if quic_engine == "ngtcp2" else 5_000_000
    assert got == (7, 12.5, conn_window, stream_window)
    # 7 streams at a time still serve 40 requests on one connection.
    reqs = [("GET", f"/id?id={i}", b"") for i in range(40)]
    rs = call(kit.aioquic_many, srv.host, srv.port, reqs, str(srv.cafile), connections=1)
    assert [r.body for r in rs] == [b"id:%d:" % i for i in range(40)]


def test_separate_udp_port_and_alt_svc(start_server):
    udp = free_port("127.0.0.1", udp=True)
    srv = start_server(config=h3_config(port=udp))
    r = srv.get("/hello")
    assert r.headers["alt-svc"] == f'h3=":{udp}"; ma=86400'
    h = aq(srv, "GET", "/scope", port=udp)
    scope = json.loads(h.body)
    assert scope["server"] == ["127.0.0.1", udp]
    assert ["host", authority(srv, udp)] in scope["headers"]


def test_http3_disabled_no_alt_svc(start_server):
    srv = start_server()  # base_config turns HTTP/3 off
    assert "alt-svc" not in srv.get("/hello").headers
    # Nothing listens on the UDP port: loopback answers with ICMP port unreachable.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.connect((srv.host, srv.port))
        s.send(bytes([0xC0]) + os.urandom(1199))
        with pytest.raises(ConnectionRefusedError):
            s.recv(2048)


def test_retry_address_validation(start_server):
    srv = start_server(config=h3_config(retry=True))
    r = aq(srv, "POST", "/echo", body=b"r" * 50_000)
    assert (r.status, r.body) == (200, b"r" * 50_000)


def test_root_path(start_server):
    srv = start_server(config={**H3_ON, "server": {"root_path": "/api"}})
    scope = json.loads(aq(srv, "GET", "/scope?q=1").body)
    assert scope["root_path"] == "/api"
    assert scope["path"] == "/api/scope"
    assert scope["raw_path"] == "/scope"
    assert scope["query_string"] == "q=1"


# --- idle timeout -------------------------------------------------------------------------


def _stateless_reset_to(probe: socket.socket, token: bytes) -> bool:
    """Drain ``probe``; True if a stateless reset carrying ``token`` arrived."""
    found = False
    while True:
        try:
            data = probe.recv(2048)
        except BlockingIOError:
            return found
        found = found or (data[0] & 0xC0 == 0x40 and data[-16:] == token)


def test_idle_timeout_closes_connection(start_server):
    srv = start_server(config=h3_config(idle_timeout=1))

    async def go():
        async with kit._h3_connection(srv.host, srv.port, str(srv.cafile), 30, progress) as p:
            ex = await kit._send_request(p, "GET", "/hello", authority(srv), (), b"")
            r = await kit._finish(p, ex)
            quiet_since = time.monotonic()
            q = p._quic
            cid, token = q._peer_cid.cid, q._peer_cid.stateless_reset_token
            # Undecryptable packets for the connection's id, from another socket: dropped
            # while the server keeps the connection, answered by a stateless reset after.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.setblocking(False)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    probe.sendto(bytes([0x40]) + cid + os.urandom(60), (srv.host, srv.port))
                    await asyncio.sleep(0.05)
                    if _stateless_reset_to(probe, token):
                        return r, q._remote_max_idle_timeout, time.monotonic() - quiet_since
            raise AssertionError("the server kept the idle connection for 10 s")

    progress: list = []
    r, advertised, idle_for = call(kit._run, go, 20, "aioquic idle connection", progress)
    assert r.status == 200
    assert advertised == 1.0
    # Closed by the timer, not at once: the connection lived about its idle timeout.
    assert idle_for >= 0.9, idle_for
    r = aq(srv, "GET", "/hello")
    assert (r.status, r.body) == (200, b"Hello, world!")


# --- drain ----------------------------------------------------------------------------------


def test_sigterm_finishes_in_flight_request_and_exits_0(start_server):
    srv = start_server(config=H3_ON)
    offset = srv.stderr_size()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(aq, srv, "GET", "/wait-flag?flag=drain-go", timeout=20)
        srv.wait_record("drain-go-started", "started")
        srv.proc.send_signal(signal.SIGTERM)
        srv.wait_stderr("draining", offset)
        assert not fut.done()
        srv.flag("drain-go")
        r = fut.result(timeout=25)
    assert (r.status, r.body) == (200, b"finished")
    assert srv.wait_exit() == 0, srv.stderr()


def test_sigterm_idle_server_exits_0(start_server):
    srv = start_server(config=H3_ON)
    assert aq(srv, "GET", "/hello").status == 200
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.wait_exit() == 0, srv.stderr()


# --- Alt-Svc discovery ---------------------------------------------------------------------


def test_altsvc_discovery_with_libcurl(start_server, tmp_path):
    srv = start_server(config=H3_ON)
    altsvc = tmp_path / "altsvc.txt"
    rs = call(kit.curl_altsvc_sequence, srv.url("/hello"), str(srv.cafile), str(altsvc))
    # The first request goes over TCP (HTTP/2, which ALPN offers first), its Alt-Svc
    # moves the second to HTTP/3.
    assert [r.http_version for r in rs] == ["2", "3"]
    assert [(r.status, r.body) for r in rs] == [(200, b"Hello, world!")] * 2
    assert rs[0].header("alt-svc") == f'h3=":{srv.port}"; ma=86400'
    assert rs[1].header("alt-svc") is None
    assert f"h3 127.0.0.1 {srv.port}" in altsvc.read_text()


# --- Chromium -------------------------------------------------------------------------------


def test_chromium_over_quic(start_server):
    srv = start_server(config=H3_ON)
    spki = spki_sha256_b64(str(srv.cafile))
    out = call(kit.chromium_fetch, srv.url("/hello"), spki)
    assert out["protocol"] == "h3"
    assert (out["status"], out["text"]) == (200, "Hello, world!")
    assert ("content-type", "text/plain") in out["headers"]
    body = bytes(range(256)) * 40
    out = call(
        kit.chromium_fetch,
        srv.url("/echo"),
        spki,
        method="POST",
        body=body,
        headers=[("x-test", "1")],
    )
    assert (out["status"], out["protocol"], out["body"]) == (200, "h3", body)


# --- IPv6 -----------------------------------------------------------------------------------

needs_ipv6 = pytest.mark.skipif(not ipv6_available(), reason="no IPv6 loopback")


@needs_ipv6
def test_ipv6_loopback(start_server, tmp_path):
    srv = start_server(host="::1", config=H3_ON)
    scope = json.loads(aq(srv, "GET", "/scope").body)
    assert scope["http_version"] == "3"
    assert scope["server"] == ["::1", srv.port]
    assert scope["client"][0] == "::1" and scope["client"][1] not in (0, srv.port)
    assert ["host", f"[::1]:{srv.port}"] in scope["headers"]
    body = os.urandom(100_000)
    r = call(kit.curl_request, srv.url("/echo"), "POST", body, cafile=str(srv.cafile))
    assert (r.status, r.http_version, r.body) == (200, "3", body)
    r = call(kit.gtlsclient_request, "::1", srv.port, "/hello")
    assert (r.status, r.body) == (200, b"Hello, world!")
    # Alt-Svc on the IPv6 TCP listener leads to HTTP/3 on ::1 too.
    altsvc = tmp_path / "altsvc6.txt"
    rs = call(kit.curl_altsvc_sequence, srv.url("/hello"), str(srv.cafile), str(altsvc))
    assert [r.http_version for r in rs] == ["2", "3"]


@needs_ipv6
def test_chromium_ipv6(start_server):
    srv = start_server(host="::1", config=H3_ON)
    out = call(kit.chromium_fetch, srv.url("/scope"), spki_sha256_b64(str(srv.cafile)))
    assert (out["status"], out["protocol"]) == (200, "h3")
    scope = json.loads(out["text"])
    assert scope["http_version"] == "3" and scope["client"][0] == "::1"


def test_finished_streams_free_their_slots(start_server):
    # Four times the stream limit over one connection: each finished request (body
    # read to its end, response sent) must give its stream slot back to the client.
    srv = start_server(config=h3_config(max_concurrent_streams=10))
    reqs = [("POST", "/delay?ms=1", b"x" * 5000), ("POST", "/hello", b"y" * 5000)] * 20
    rs = call(
        kit.aioquic_many, srv.host, srv.port, reqs, str(srv.cafile), connections=1, timeout=20
    )
    assert sorted(r.body for r in rs) == sorted([b"delay:", b"Hello, world!"] * 20)
