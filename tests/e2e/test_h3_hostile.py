"""HTTP/3 and QUIC against hostile clients: strict parsing, floods, deadlines.

Each probe here is a row of ``probes_h3.md`` (beside this file): what is sent, what
RFC 9114 / 9000 / 9368 / 9369 expects, and the test that checks it. Clients are
aioquic (raw header lists, flow control left alone or held back), ngtcp2's gtlsclient
(version negotiation), and Initial packets made by hand (``quicraw.InitialMaker``) for
handshakes that never finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import time

import h3clients as kit
import pytest
from harness import call, client_missing, wait_until
from quicraw import DelayRelay, InitialMaker

# Every test runs once per QUIC engine (msquic cases skip without libmsquic).
pytestmark = pytest.mark.usefixtures("quic_engine")

APP = "h3_hostile_apps:app"
KiB, MiB = 1024, 1024 * 1024
H3_REQUEST_CANCELLED = 0x10C
H3_MESSAGE_ERROR = 0x10E
CONNECTION_REFUSED = 0x2
QUIC_V1, QUIC_V2 = 0x00000001, 0x6B3343CF
GOAWAY = 0x7  # HTTP/3 frame type


def h3_config(**http3) -> dict:
    return {"http3": {"enabled": True, **http3}}


def authority(srv) -> str:
    return f"{srv.host}:{srv.port}"


def session(srv, script, timeout: float = 20.0, port: int | None = None):
    """Run ``await script(proto)`` on a new aioquic connection; returns its result."""
    progress: list = []

    async def go():
        async with kit._h3_connection(
            srv.host, port or srv.port, str(srv.cafile), timeout, progress
        ) as proto:
            return await script(proto)

    return call(kit._run, go, timeout + 5, "aioquic session", progress)


async def get(proto, srv, path: str) -> kit.Response:
    ex = await kit._send_request(proto, "GET", path, authority(srv), (), b"")
    return await kit._finish(proto, ex)


def open_upload(proto, srv, path: str, length: int, first: bytes = b""):
    """A POST declaring ``length`` body bytes, of which ``first`` are sent now."""
    ex = proto.new_request()
    headers = kit._request_headers("POST", path, authority(srv), [("content-length", length)])
    proto.h3.send_headers(ex.stream_id, headers, end_stream=False)
    if first:
        proto.h3.send_data(ex.stream_id, first, end_stream=False)
    proto.transmit()
    return ex


def assert_serving(srv) -> None:
    assert srv.alive(), f"server exited with {srv.proc.returncode}:\n{srv.stderr()}"
    r = call(kit.aioquic_request, srv.host, srv.port, "GET", "/hello", cafile=str(srv.cafile))
    assert (r.status, r.body) == (200, b"Hello, world!")


def ngtcp2_only(engine: str, why: str) -> None:
    if engine != "ngtcp2":
        pytest.skip(f"{engine}: {why}")


@pytest.fixture(scope="module")
def h3(module_server_factory, quic_engine):
    return module_server_factory(app=APP, http=True, config=h3_config(engine=quic_engine))


# --- strict parsing (RFC 9114 4.1.2, 4.2, 4.3.1, 10.3) -------------------------------------


def head(srv, path: bytes = b"/scope", extra=()) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", authority(srv).encode()),
        (b":path", path),
        *extra,
    ]


MALFORMED = {
    # nghttp3 drops these fields and serves the rest; RFC 9114 4.1.2 makes them malformed.
    "cr-in-value": {"extra": [(b"x-a", b"a\rb")]},
    "lf-in-value": {"extra": [(b"x-a", b"a\nb")]},
    "nul-in-value": {"extra": [(b"x-a", b"a\x00b")]},
    "space-in-name": {"extra": [(b"x a", b"1")]},
    "colon-in-name": {"extra": [(b"x:a", b"1")]},
    "leading-space-in-value": {"extra": [(b"x-a", b" a")]},
    "trailing-tab-in-value": {"extra": [(b"x-a", b"a\t")]},
    "host-not-an-authority": {"extra": [(b"host", b"a b")]},
    # What nghttp3 leaves to the server.
    "path-with-fragment": {"path": b"/scope#frag"},
    "host-differs-from-authority": {"extra": [(b"host", b"other.example")]},
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request_is_reset_with_message_error(h3, case):
    headers = head(h3, **MALFORMED[case])
    kind, got = call(kit.aioquic_raw_headers, h3.host, h3.port, headers, str(h3.cafile))
    detail = got if kind == "response" else kit.h3_error_name(got)
    assert (kind, got) == ("reset", H3_MESSAGE_ERROR), f"{kind}: {detail}"
    assert_serving(h3)


def test_host_equal_to_authority_is_served(h3):
    # The same authority in other letter case is the same value (host names are
    # case-insensitive); many fields, some of them QPACK dynamic-table entries.
    extra = [(b"host", authority(h3).upper().encode())] + [
        (b"x-%d" % i, b"v" * i) for i in range(40)
    ]
    kind, r = call(kit.aioquic_raw_headers, h3.host, h3.port, head(h3, extra=extra), str(h3.cafile))
    assert kind == "response" and r.status == 200, (kind, r)
    scope = json.loads(r.body)
    assert ["x-39", "v" * 39] in scope["headers"]


@pytest.mark.parametrize(
    "raw", [b"/scope/\xc3\xa9t\xc3\xa9?q=\xc3\xa9", b"/scope/%C3%A9t%C3%A9?q=%C3%A9"]
)
def test_path_decodes_as_on_http1(h3, raw):
    kind, r = call(kit.aioquic_raw_headers, h3.host, h3.port, head(h3, raw), str(h3.cafile))
    assert kind == "response" and r.status == 200, (kind, r)
    over_h3 = json.loads(r.body)
    with h3.connect(tls=False) as conn:
        conn.send(b"GET " + raw + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        over_h1 = json.loads(conn.read_response().body)
    assert over_h3["path"] == over_h1["path"] == "/scope/été"
    for key in ("raw_path", "query_string"):
        assert over_h3[key] == over_h1[key], key


# --- handshake pressure: Retry on and off (RFC 9000 8.1) ----------------------------------


def half_open(srv, n: int) -> None:
    """n handshakes that never go past the client's first flight (new ids, no answers
    from us); returns once the server answers one of them with a Retry: it is under
    handshake pressure."""
    maker = InitialMaker(srv.port, srv.host)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _ in range(n):
            s.sendto(maker.packet(), (srv.host, srv.port))
        s.settimeout(10)
        while s.recv(2048)[0] & 0xF0 != 0xF0:  # long header, type 3 (v1): Retry
            pass


async def retried_get(proto, srv):
    r = await get(proto, srv, "/hello")
    return r.status, proto._quic._retry_count


def test_handshake_pressure_turns_retry_on_and_off(start_server, quic_engine):
    ngtcp2_only(quic_engine, "MsQuic bounds handshakes by memory only (RetryMemoryLimit)")
    srv = start_server(app=APP, config=h3_config(max_handshakes=4, handshake_timeout=2))
    assert session(srv, lambda p: retried_get(p, srv)) == (200, 0)  # no pressure: no Retry
    offset = srv.stderr_size()
    started = time.monotonic()
    half_open(srv, 6)
    srv.wait_stderr("handshake pressure (", offset)
    # A real client passes the Retry and is served.
    assert session(srv, lambda p: retried_get(p, srv)) == (200, 1)
    # The half-open handshakes time out (http3.handshake_timeout), and Retry is off again.
    srv.wait_stderr("handshake pressure gone: Retry off", offset, timeout=10)
    assert time.monotonic() - started >= 2.0
    assert session(srv, lambda p: retried_get(p, srv)) == (200, 0)


def test_handshake_memory_budget_turns_retry_on(start_server, quic_engine):
    # The smallest budget: a handful of half-open handshakes exceeds it on either engine
    # (MsQuic: the smallest share of the machine's memory, RetryMemoryLimit).
    srv = start_server(app=APP, config=h3_config(handshake_memory=1, handshake_timeout=5))
    half_open(srv, 200)

    async def retried(proto):
        return proto._quic._retry_count

    assert session(srv, retried) == 1
    assert_serving(srv)


def test_retry_true_always_retries(start_server):
    srv = start_server(app=APP, config=h3_config(retry=True))
    for _ in range(2):
        assert session(srv, lambda p: retried_get(p, srv)) == (200, 1)


# --- connection limit (RFC 9000 10.2.3: CONNECTION_REFUSED before any state) --------------


def test_max_connections_refuses_with_connection_refused(start_server, quic_engine):
    srv = start_server(app=APP, config=h3_config(max_connections=2))
    offset = srv.stderr_size()

    async def hold_two(proto):
        async def second(p2):
            assert (await get(p2, srv, "/hello")).status == 200
            with pytest.raises(kit.ConnectionClosed) as refused:
                await asyncio.to_thread(
                    kit.aioquic_request, srv.host, srv.port, "GET", "/hello", cafile=None, timeout=5
                )
            return refused.value.error_code

        assert (await get(proto, srv, "/hello")).status == 200
        return await asyncio.to_thread(session, srv, second)

    assert session(srv, hold_two) == CONNECTION_REFUSED
    if quic_engine == "ngtcp2":
        srv.wait_stderr("refused 1 new connection(s): http3.max_connections (2)", offset)
    # The held connections are gone: a new one is served.
    wait_until(lambda: _served(srv), 10, message="no connection served after the others left")


def test_idle_connections_past_the_limit_are_closed_longest_idle_first(start_server, quic_engine):
    srv = start_server(app=APP, config=h3_config(max_idle_connections=2))
    offset = srv.stderr_size()

    async def go():
        async with contextlib.AsyncExitStack() as stack:
            protos = []
            for _ in range(3):  # each makes a request, then stays open and idle
                proto = await stack.enter_async_context(
                    kit._h3_connection(srv.host, srv.port, str(srv.cafile), 15)
                )
                # The frame types on the server's control stream (aioquic checks each).
                proto.control_frames = frames = []
                check = proto.h3._check_control_frame_type

                def record(frame_type, frames=frames, check=check):
                    frames.append(frame_type)
                    return check(frame_type)

                proto.h3._check_control_frame_type = record
                assert (await get(proto, srv, "/hello")).status == 200
                protos.append(proto)
            deadline = time.monotonic() + 10
            while protos[0].terminated is None:
                assert time.monotonic() < deadline, "the longest idle connection is still open"
                await asyncio.sleep(0.01)
            # The others still serve.
            assert (await get(protos[2], srv, "/hello")).status == 200
            goaway = [GOAWAY in p.control_frames for p in protos]
            return [p.terminated for p in protos], goaway

    (first, second, third), goaway = call(kit._run, go, 30, "three idle connections")
    if quic_engine == "ngtcp2":  # MsQuic's close may overtake the GOAWAY it was sending
        assert goaway == [True, False, False]  # the final GOAWAY came before the close
    code, _reason, by_peer, transport = first
    assert (code, by_peer, transport) == (kit.H3_NO_ERROR, True, False)
    assert second is None and third is None
    srv.wait_stderr("closed 1 idle connection(s): http3.max_idle_connections (2)", offset)


def _served(srv) -> bool:
    try:
        r = kit.aioquic_request(srv.host, srv.port, "GET", "/hello", cafile=None, timeout=3)
    except kit.H3ClientError:
        return False
    return r.status == 200


# --- request bodies wait in QUIC (flow control), not in the server -------------------------


def test_windows_start_small(h3, quic_engine):
    async def params(proto):
        q = proto._quic
        return q._remote_max_data, q._remote_max_stream_data_bidi_remote

    # MsQuic cannot grow the connection window, so it opens it to http3.max_window.
    conn_window = 1 * MiB if quic_engine == "ngtcp2" else 16 * MiB
    assert session(h3, params) == (conn_window, 256 * KiB)


def test_unread_bodies_stop_at_the_initial_windows(h3, quic_engine):
    # Six uploads the app never reads, on one connection: each stream stops at its
    # window (256 KiB), and (ngtcp2) all of them at the connection's (1 MiB).
    async def script(proto):
        q = proto._quic
        exs = [open_upload(proto, h3, "/noread?hold=20", 4 * MiB) for _ in range(6)]
        for ex in exs:
            proto.h3.send_data(ex.stream_id, b"x" * 4 * MiB, end_stream=True)
        proto.transmit()
        streams = [q._streams[ex.stream_id] for ex in exs]

        def blocked() -> bool:
            return q._remote_max_data_used >= q._remote_max_data or all(
                s.sender.highest_offset >= s.max_stream_data_remote for s in streams
            )

        deadline = time.monotonic() + 10
        while not blocked():
            assert time.monotonic() < deadline, (q._remote_max_data_used, q._remote_max_data)
            await asyncio.sleep(0.01)
        # A round trip later nothing more was let in.
        await asyncio.wait_for(proto.ping(), 5)
        sent = [q._streams[ex.stream_id].sender.highest_offset for ex in exs]
        return q._remote_max_data, sent

    max_data, sent = session(h3, script)
    if quic_engine == "ngtcp2":  # the body window, plus the framing credited at once
        assert max_data < 1 * MiB + 4 * KiB
        assert sum(sent) <= max_data
    assert all(s <= 256 * KiB + 1 * KiB for s in sent), sent


def upload_window_peak(srv, size: int, delay: float = 0.02) -> tuple[int, int]:
    """Upload ``size`` bytes to /drain over a path with ``delay`` each way; the largest
    stream and connection windows the client saw open (bytes it was allowed ahead)."""
    with DelayRelay(srv.host, srv.port, delay) as relay:

        async def script(proto):
            q = proto._quic
            ex = open_upload(proto, srv, "/drain", size)
            proto.h3.send_data(ex.stream_id, b"u" * size, end_stream=True)
            proto.transmit()
            stream = q._streams[ex.stream_id]
            peak_s = peak_c = 0
            while not ex.done.is_set():
                peak_s = max(peak_s, stream.max_stream_data_remote - stream.sender.highest_offset)
                peak_c = max(peak_c, q._remote_max_data - q._remote_max_data_used)
                await asyncio.sleep(0.002)
            r = await kit._finish(proto, ex)
            assert (r.status, r.body) == (200, b"%d" % size)
            return peak_s, peak_c

        return session(srv, script, timeout=60, port=relay.port)


def test_windows_grow_while_the_app_reads(start_server, quic_engine):
    # fpy3 grows ngtcp2's windows; MsQuic grows its stream windows itself (and opens
    # the connection's to http3.max_window from the start): either way they grow.
    srv = start_server(app=APP, config=h3_config())
    peak_stream, peak_conn = upload_window_peak(srv, 24 * MiB)
    assert peak_stream > 512 * KiB, peak_stream
    assert peak_conn > 1 * MiB + 4 * KiB, peak_conn


def test_windows_stop_growing_past_the_unread_budget(start_server, quic_engine):
    ngtcp2_only(quic_engine, "MsQuic tunes its windows itself (no fpy3 budget on growth)")
    srv = start_server(app=APP, config=h3_config(unread_body_budget=1 * MiB))

    def fill(then):
        # Four unread uploads on a connection fill its window (1 MiB) for the app.
        async def script(proto):
            q = proto._quic
            exs = [open_upload(proto, srv, "/noread?hold=60", MiB) for _ in range(4)]
            for ex in exs:
                proto.h3.send_data(ex.stream_id, b"x" * MiB, end_stream=True)
            proto.transmit()
            deadline = time.monotonic() + 10
            while q._remote_max_data_used < 1 * MiB:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            await asyncio.wait_for(proto.ping(), 5)  # the server has it all
            return await asyncio.to_thread(then)

        return session(srv, script, timeout=60)

    # Two such connections: 2 MiB waits for the app, past the 1 MiB budget.
    peak_stream, peak_conn = fill(lambda: fill(lambda: upload_window_peak(srv, 8 * MiB)))
    assert peak_stream <= 256 * KiB + 1 * KiB, peak_stream
    assert peak_conn <= 1 * MiB + 4 * KiB, peak_conn


# --- deadlines: body_timeout and send_timeout (RFC 9114 4.1.1: H3_REQUEST_CANCELLED) --------


async def ping_until(proto, done, timeout: float) -> float:
    """PING every 0.2 s (the connection stays busy) until ``done()``; the time it took."""
    start = time.monotonic()
    while not done():
        assert time.monotonic() - start < timeout, "not done while pinging"
        await asyncio.wait_for(proto.ping(), 5)
        await asyncio.sleep(0.2)
    return time.monotonic() - start


def test_stalled_request_body_is_reset(start_server):
    srv = start_server(app=APP, config=h3_config(body_timeout=1))
    offset = srv.stderr_size()

    async def script(proto):
        ex = open_upload(proto, srv, "/wait-body?name=stall", 1000, b"0123456789")
        took = await ping_until(proto, lambda: ex.reset_code is not None, 10)
        assert proto.terminated is None  # the connection goes on
        after = await get(proto, srv, "/hello")
        return ex.reset_code, took, after.status

    code, took, status = session(srv, script)
    assert code == H3_REQUEST_CANCELLED, kit.h3_error_name(code)
    assert 0.9 <= took < 5, took
    assert status == 200
    srv.wait_record("stall", "http.disconnect")
    srv.wait_stderr("reset 1 stream(s) whose request made no progress for 1 s", offset)


def test_slow_request_body_that_progresses_is_served(start_server):
    srv = start_server(app=APP, config=h3_config(body_timeout=1))

    async def script(proto):
        ex = open_upload(proto, srv, "/wait-body?name=slow", 12)
        start = time.monotonic()
        for i in range(12):  # a byte every 0.3 s: 3.6 s in all, no gap of 1 s
            proto.h3.send_data(ex.stream_id, b"%d" % (i % 10), end_stream=i == 11)
            proto.transmit()
            await asyncio.sleep(0.3)
        r = await kit._finish(proto, ex)
        return r.status, r.body, time.monotonic() - start

    status, body, took = session(srv, script)
    assert (status, body) == (200, b"12") and took > 1.5


def test_client_that_stops_reading_the_response_is_reset(start_server):
    srv = start_server(app=APP, config=h3_config(send_timeout=1))
    offset = srv.stderr_size()

    async def script(proto):
        q = proto._quic
        # The client stops giving flow-control credit: the response cannot progress.
        q._write_connection_limits = lambda *a, **k: None
        q._write_stream_limits = lambda *a, **k: None
        ex = await kit._send_request(proto, "GET", "/big?name=big", authority(srv), (), b"")
        took = await ping_until(proto, lambda: ex.reset_code is not None, 10)
        assert proto.terminated is None
        return ex.reset_code, took, len(ex.body)

    code, took, got = session(srv, script)
    assert code == H3_REQUEST_CANCELLED, kit.h3_error_name(code)
    assert 0.9 <= took < 6 and got <= 1 * MiB, (took, got)
    srv.wait_record("big", "send failed: ClientDisconnected")
    srv.wait_stderr("reset 1 stream(s) whose response made no progress for 1 s", offset)


# --- QUIC versions (RFC 9000 6, RFC 9368, RFC 9369) -----------------------------------------


def test_version_negotiation_lists_v1_and_v2(h3):
    maker = InitialMaker(h3.port, h3.host)
    pkt = bytearray(maker.packet())
    pkt[1:5] = bytes.fromhex("1a2a3a4a")  # a version nobody speaks
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(bytes(pkt), (h3.host, h3.port))
        data, _ = s.recvfrom(2048)
    assert data[1:5] == b"\0\0\0\0"  # Version Negotiation
    dcil = data[5]
    at = 6 + dcil + 1 + data[6 + dcil]
    versions = {int.from_bytes(data[i : i + 4]) for i in range(at, len(data), 4)}
    assert {QUIC_V1, QUIC_V2} <= versions, [hex(v) for v in versions]


def gtlsclient(srv, *args: str) -> str:
    cmd = ["gtlsclient", "--exit-on-all-streams-close", "--timeout=10s", *args]
    cmd += [srv.host, str(srv.port), f"https://{authority(srv)}/hello"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except FileNotFoundError as e:
        client_missing(e)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr + proc.stdout


def test_v1_client_offering_v2_is_switched_to_v2(h3, quic_engine):
    ngtcp2_only(quic_engine, "MsQuic offers compatible version negotiation only as a preview")
    out = gtlsclient(h3, "--version=v1", "--available-versions=v2,v1")
    assert "the negotiated version is 0x6b3343cf" in out
    assert "Hello, world!" in out
    # A v1 client that offers nothing else stays on v1.
    assert "the negotiated version is 0x00000001" in gtlsclient(h3, "--version=v1")


def test_client_reacting_to_version_negotiation_gets_v2(h3, quic_engine):
    ngtcp2_only(quic_engine, "MsQuic offers compatible version negotiation only as a preview")
    out = gtlsclient(h3, "--version=0x1a2a3a4a", "--preferred-versions=v2,v1")
    assert "the negotiated version is 0x6b3343cf" in out and "Hello, world!" in out
