"""Limits and timeouts: 431, 413, 408, keep-alive idle close, max_connections 503."""

import time

import pytest
from harness import RawConn, wait_until

LIMITS = {
    "limits": {
        "max_header_size": 4096,
        "max_header_count": 20,
        "max_body_size": 1000,
        "max_connections": 0,
    },
    "http1": {"header_timeout": 1.5, "keepalive_timeout": 1.0},
}


@pytest.fixture(scope="module")
def limited(module_server_factory):
    return module_server_factory(config=LIMITS, http=True)


def head_with(headers: list[bytes], target=b"/hello") -> bytes:
    return (
        b"GET "
        + target
        + b" HTTP/1.1\r\nHost: x\r\n"
        + b"".join(h + b"\r\n" for h in headers)
        + b"\r\n"
    )


def rejected_then_closed(conn, status):
    resp = conn.read_response()
    assert resp.status == status, resp
    rest = conn.read_until_close()
    assert b"HTTP/" not in rest
    return resp


# --- 431 ----------------------------------------------------------------------------


def test_head_within_size_limit_ok(limited):
    resp, conn = limited.request(head_with([b"X-Pad: " + b"a" * 3000]))
    conn.close()
    assert resp.status == 200


@pytest.mark.parametrize("tls", [True, False], ids=["https", "http"])
def test_head_too_big_gets_431(limited, tls):
    with limited.connect(tls) as conn:
        conn.try_send(head_with([b"X-Pad: " + b"a" * 8000]))
        rejected_then_closed(conn, 431)


def test_long_request_line_gets_431_or_414(limited):
    with limited.connect() as conn:
        conn.try_send(head_with([], target=b"/hello?" + b"q" * 8000))
        resp = conn.read_response()
        assert resp.status in (414, 431)
        assert b"HTTP/" not in conn.read_until_close()


def test_head_too_big_without_end_gets_431(limited):
    # The head never ends: the server must give up at the limit, not buffer forever.
    with limited.connect() as conn:
        conn.try_send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 20000)
        rejected_then_closed(conn, 431)


def test_header_count_at_limit_ok(limited):
    headers = [b"X-H%d: v" % i for i in range(19)]  # + Host = 20
    resp, conn = limited.request(head_with(headers))
    conn.close()
    assert resp.status == 200


def test_too_many_headers_gets_431(limited):
    with limited.connect() as conn:
        conn.try_send(head_with([b"X-H%d: v" % i for i in range(25)]))
        rejected_then_closed(conn, 431)


# --- 413 ----------------------------------------------------------------------------


def test_body_within_limit_ok(limited):
    with limited.client() as c:
        r = c.post("/echo", content=b"b" * 1000)
    assert r.status_code == 200
    assert r.content == b"b" * 1000


@pytest.mark.parametrize("tls", [True, False], ids=["https", "http"])
def test_declared_content_length_too_big_gets_413_before_body(limited, tls):
    with limited.connect(tls) as conn:
        # only the head: the answer must come without reading any body
        conn.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
        rejected_then_closed(conn, 413)


def test_declared_content_length_huge_gets_413(limited):
    with limited.connect() as conn:
        conn.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999\r\n\r\n")
        rejected_then_closed(conn, 413)


def test_chunked_body_crossing_limit_gets_413(limited):
    with limited.connect() as conn:
        conn.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(4):
            if not conn.try_send(b"190\r\n" + b"c" * 400 + b"\r\n"):
                break
        conn.try_send(b"0\r\n\r\n")
        rejected_then_closed(conn, 413)


def test_chunked_body_within_limit_ok(limited):
    with limited.connect() as conn:
        conn.send(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"1f4\r\n" + b"c" * 500 + b"\r\n1f4\r\n" + b"d" * 500 + b"\r\n0\r\n\r\n"
        )
        resp = conn.read_response()
    assert resp.status == 200
    assert resp.body == b"c" * 500 + b"d" * 500


def test_413_via_httpx(limited):
    with limited.client() as c:
        r = c.post("/echo", content=b"x" * 5000)
    assert r.status_code == 413


# --- 408 and idle timeouts ----------------------------------------------------------


@pytest.mark.parametrize("tls", [True, False], ids=["https", "http"])
def test_partial_head_gets_408(limited, tls):
    with limited.connect(tls, timeout=15) as conn:
        start = time.monotonic()
        conn.send(b"GET /hello HTTP/1.1\r\nHost: x\r\n")
        resp = conn.read_response(timeout=12)
        elapsed = time.monotonic() - start
        assert resp.status == 408
        assert conn.read_until_close() == b""
    assert elapsed >= 1.0, f"408 after {elapsed:.2f}s, before header_timeout (1.5s)"


def test_slowloris_trickle_still_gets_408(limited):
    # Bytes keep arriving, but the whole head is not there within header_timeout.
    trickle = b"GET /hello HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"s" * 200
    with limited.connect(timeout=15) as conn:
        start = time.monotonic()
        for i in range(len(trickle)):
            if not conn.try_send(trickle[i : i + 1]):
                break
            # pace the bytes by waiting for the server to answer, 0.1 s at most
            if conn.readable_within(0.1):
                break
            assert time.monotonic() - start < 12, "no 408 although the head never completed"
        resp = conn.read_response(timeout=12)
        assert resp.status == 408
        assert conn.read_until_close() == b""
    assert time.monotonic() - start < 12


def test_keepalive_idle_connection_closed_silently(limited):
    with limited.connect(timeout=15) as conn:
        conn.send(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.read_response().status == 200
        start = time.monotonic()
        rest = conn.read_until_close(timeout=10)
        elapsed = time.monotonic() - start
    assert rest == b"", f"idle close must not send a response, got {rest[:200]!r}"
    assert elapsed >= 0.6, f"closed after {elapsed:.2f}s, before keepalive_timeout (1s)"


def test_keepalive_timeout_resets_per_request(limited):
    # Requests spaced below the idle timeout keep one connection alive past it.
    with limited.connect(timeout=15) as conn:
        start = time.monotonic()
        n = 0
        while time.monotonic() - start < 2.5:
            conn.send(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            assert conn.read_response().status == 200
            n += 1
            assert not conn.readable_within(0.4), "server closed a connection in use"
        assert n >= 4


# --- max_connections ----------------------------------------------------------------


def test_max_connections_503(start_server):
    srv = start_server(config={"limits": {"max_connections": 2}}, http=True)
    held = [srv.connect(), srv.connect(tls=False)]
    try:
        for conn in held:
            conn.send(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            assert conn.read_response().status == 200
        for tls in (True, False):
            try:
                over = srv.connect(tls)
            except (ConnectionResetError, BrokenPipeError) as e:
                pytest.fail(f"connection over the limit was reset without a 503: {e!r}")
            with over:
                over.try_send(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
                resp = over.read_response()
                assert resp.status == 503
                assert b"HTTP/" not in over.read_until_close()
        # held connections are unaffected
        for conn in held:
            conn.send(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            assert conn.read_response().body == b"Hello, world!"
    finally:
        for conn in held:
            conn.close()

    # Once they are gone, new connections are served again.
    def served():
        with srv.connect() as c:
            c.send(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            return c.read_response().status == 200

    wait_until(served, timeout=10)


def test_idle_connections_dont_leak_slots(start_server):
    srv = start_server(
        config={"limits": {"max_connections": 3}, "http1": {"keepalive_timeout": 0.5}}
    )
    for _ in range(3):
        conn = srv.connect()
        conn.send(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.read_response().status == 200
        assert conn.read_until_close(timeout=10) == b""
        conn.close()
    for _ in range(5):
        with RawConn(srv.host, srv.port, srv.ssl_context()) as c:
            c.send(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert c.read_response().status == 200
            c.read_until_close()


def test_past_max_idle_connections_the_longest_idle_close(start_server):
    # A flood of idle connections (no request, or between requests) is cut back to the
    # limit, oldest first; a connection with a request in progress is left alone.
    srv = start_server(
        config={
            "limits": {"max_idle_connections": 4},
            "http1": {"header_timeout": 60, "keepalive_timeout": 60},
        },
        http=True,
    )
    busy = srv.connect(tls=False)
    busy.send(b"GET /wait-flag?flag=busy HTTP/1.1\r\nHost: x\r\n\r\n")
    srv.wait_record("busy-started", "started")
    idle = []
    for i in range(12):
        idle.append(srv.connect(tls=i % 2 == 0))
        if i == 0:
            # An idle keep-alive connection: it served one request first.
            idle[0].send(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            assert idle[0].read_response().status == 200
    try:

        def open_ones() -> list[int]:
            return [i for i, c in enumerate(idle) if not c.readable_within(0.01)]

        wait_until(lambda: len(open_ones()) == 4, message=lambda: f"open: {open_ones()}")
        assert open_ones() == [8, 9, 10, 11]  # the newest stay
        for i in range(8):
            assert idle[i].read_until_close() == b""
        srv.flag("busy")
        assert busy.read_response().body == b"finished"
        srv.assert_serving()
        srv.wait_stderr("limits.max_idle_connections (4) reached")
    finally:
        busy.close()
        for conn in idle:
            conn.close()
