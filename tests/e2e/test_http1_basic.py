"""HTTP/1.1 end to end: scope, framing, keep-alive, pipelining, HEAD, 100-continue."""

import email.utils
import hashlib
import json
import os
import time
from datetime import UTC, datetime

import pytest
from harness import ipv6_available

HELLO = b"GET /hello HTTP/1.1\r\nHost: localhost\r\n\r\n"


def get_scope(server, path="/scope", tls=True, **kwargs):
    r = server.get(path, tls, **kwargs)
    assert r.status_code == 200, r.text
    return r.json()


# --- scope --------------------------------------------------------------------------


def test_scope_https(server):
    with server.connect() as conn:
        conn.send(
            b"GET /scope/a%20b/%C3%A9?x=1&y=%20 HTTP/1.1\r\n"
            b"Host: localhost\r\nX-First: 1\r\nX-Dup: a\r\nUser-Agent: raw\r\nx-dup: b\r\n\r\n"
        )
        resp = conn.read_response()
        assert resp.status == 200
        scope = json.loads(resp.body)
        client_port = conn.local_port
    assert scope["type"] == "http"
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.4"}
    assert scope["http_version"] == "1.1"
    assert scope["method"] == "GET"
    assert scope["scheme"] == "https"
    assert scope["path"] == "/scope/a b/é"
    # bytes are dumped as latin-1 strings
    assert scope["raw_path"] == "/scope/a%20b/%C3%A9"
    assert scope["query_string"] == "x=1&y=%20"
    assert scope["root_path"] == ""
    assert scope["client"] == ["127.0.0.1", client_port]
    assert scope["server"] == ["127.0.0.1", server.port]
    assert scope["headers"] == [
        ["host", "localhost"],
        ["x-first", "1"],
        ["x-dup", "a"],
        ["user-agent", "raw"],
        ["x-dup", "b"],
    ]
    assert isinstance(scope.get("state"), dict)


def test_scope_cleartext(server):
    scope = get_scope(server, "/scope?q=%41", tls=False)
    assert scope["scheme"] == "http"
    assert scope["server"] == ["127.0.0.1", server.http_port]
    assert scope["query_string"] == "q=%41"
    assert scope["http_version"] == "1.1"


def test_scope_header_values_trimmed_and_names_lowercased(server):
    resp, conn = server.request(
        b"GET /scope HTTP/1.1\r\nHost: x\r\nX-MiXeD-CaSe:   padded value \t\r\n\r\n"
    )
    conn.close()
    assert resp.status == 200
    headers = json.loads(resp.body)["headers"]
    assert ["x-mixed-case", "padded value"] in headers


def test_scope_post_method_and_empty_query(server):
    with server.client() as c:
        r = c.post("/scope", content=b"ignored")
    assert r.status_code == 200
    scope = r.json()
    assert scope["method"] == "POST"
    assert scope["query_string"] == ""
    assert ["content-length", "7"] in scope["headers"]


def test_scope_root_path(start_server):
    srv = start_server(config={"server": {"root_path": "/api"}})
    scope = get_scope(srv, "/api/scope")
    assert scope["root_path"] == "/api"


def test_scope_state_is_a_per_request_copy(server):
    first = server.get("/state").json()["state"]
    second = server.get("/state").json()["state"]
    assert "mutated_by_request" not in (first or {})
    assert "mutated_by_request" not in (second or {})


@pytest.mark.skipif(not ipv6_available(), reason="no IPv6 loopback")
def test_ipv6_loopback(start_server):
    srv = start_server(host="::1")
    with srv.connect() as conn:
        conn.send(HELLO.replace(b"/hello", b"/scope"))
        resp = conn.read_response()
        port = conn.local_port
    scope = json.loads(resp.body)
    assert scope["client"] == ["::1", port]
    assert scope["server"] == ["::1", srv.port]
    # httpx verifies the ::1 IP SAN of the dev certificate
    assert srv.get("/hello").text == "Hello, world!"


# --- standard response headers ------------------------------------------------------


def test_date_and_server_headers(server):
    r = server.get("/hello")
    assert r.status_code == 200
    assert r.text == "Hello, world!"
    assert r.headers["server"] == "fpy3"
    assert r.headers["content-length"] == "13"
    assert r.headers["content-type"] == "text/plain"
    date = email.utils.parsedate_to_datetime(r.headers["date"])
    assert abs((datetime.now(UTC) - date).total_seconds()) < 120
    assert r.headers["date"].endswith(" GMT")
    assert "alt-svc" not in r.headers  # http3.enabled = false in this config


def test_response_headers_from_app_kept_with_duplicates(server):
    resp, conn = server.request(b"GET /headers HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.close()
    assert resp.status == 201
    assert resp.header_all("set-cookie") == ["a=1", "b=2"]
    assert resp.header("x-custom") == "Mixed-Case"
    assert resp.body == b"ok"
    assert len(resp.header_all("server")) == 1
    assert len(resp.header_all("date")) == 1


def test_server_header_can_be_removed(start_server):
    srv = start_server(config={"server": {"server_header": ""}})
    r = srv.get("/hello")
    assert r.status_code == 200
    assert "server" not in r.headers
    assert "date" in r.headers


def test_server_header_custom_via_env(start_server):
    srv = start_server(env={"FPY3_SERVER__SERVER_HEADER": "custom-srv"})
    assert srv.get("/hello").headers["server"] == "custom-srv"


def test_alt_svc_uses_http3_port(start_server):
    from harness import free_port

    udp = free_port(udp=True)
    srv = start_server(config={"http3": {"enabled": True, "port": udp}})
    r = srv.get("/hello")
    assert r.headers["alt-svc"] == f'h3=":{udp}"; ma=86400'


def test_alt_svc_defaults_to_server_port(start_server):
    from harness import free_port

    port = free_port(udp=True)
    srv = start_server(config={"server": {"port": port}, "http3": {"enabled": True}})
    r = srv.get("/hello")
    assert r.headers["alt-svc"] == f'h3=":{port}"; ma=86400'


def test_alt_svc_announces_the_public_port_host_and_max_age(start_server):
    from harness import free_port

    h3 = {"alt_svc_port": 443, "alt_svc_host": "h3.example.com", "alt_svc_max_age": 600}
    config = {"server": {"port": free_port(udp=True)}, "http3": {"enabled": True, **h3}}
    srv = start_server(config=config)
    assert srv.get("/hello").headers["alt-svc"] == 'h3="h3.example.com:443"; ma=600'


def test_alt_svc_off_while_serving_http3(start_server):
    from harness import free_port

    config = {"server": {"port": free_port(udp=True)}, "http3": {"enabled": True, "alt_svc": False}}
    srv = start_server(config=config)
    assert "alt-svc" not in srv.get("/hello").headers


@pytest.mark.parametrize("code", [201, 204, 304, 404, 418, 503])
def test_status_codes(server, code):
    resp, conn = server.request(b"GET /status?code=%d HTTP/1.1\r\nHost: x\r\n\r\n" % code)
    assert resp.status == code
    if code in (204, 304):
        assert resp.body == b""
        assert resp.header("transfer-encoding") is None
    else:
        assert resp.body == b"status %d" % code
    # the connection stays usable: no stray body bytes
    conn.send(HELLO)
    assert conn.read_response().body == b"Hello, world!"
    conn.close()


# --- bodies -------------------------------------------------------------------------


@pytest.mark.parametrize("tls", [True, False], ids=["https", "http"])
def test_echo_content_length(server, tls):
    body = os.urandom(3 * 1024 * 1024 + 17)
    with server.client(tls) as c:
        r = c.post("/echo", content=body)
    assert r.status_code == 200
    assert r.headers["content-length"] == str(len(body))
    assert r.headers["x-body-sha256"] == hashlib.sha256(body).hexdigest()
    assert r.content == body


def test_request_without_body_gets_one_empty_message(server):
    r = server.get("/echo-info")
    info = r.json()
    assert info["len"] == 0
    assert info["messages"] == [{"type": "http.request", "more_body": False}]


def test_chunked_request_via_httpx(server):
    pieces = [os.urandom(100_000) for _ in range(10)]

    def gen():
        yield from pieces

    with server.client() as c:
        r = c.post("/echo-info", content=gen())
    assert r.status_code == 200
    info = r.json()
    body = b"".join(pieces)
    assert info["len"] == len(body)
    assert info["sha256"] == hashlib.sha256(body).hexdigest()
    msgs = info["messages"]
    assert all(m["type"] == "http.request" for m in msgs)
    assert [m.get("more_body", False) for m in msgs][-1] is False
    assert all(m["more_body"] for m in msgs[:-1])


@pytest.mark.parametrize("tls", [True, False], ids=["https", "http"])
def test_chunked_request_raw_with_extensions_and_trailers(server, tls):
    with server.connect(tls) as conn:
        conn.send(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n6\r\n world\r\nA\r\n0123456789\r\n"
            b"0\r\nX-Trailer: t\r\n\r\n"
        )
        resp = conn.read_response()
        assert resp.status == 200
        assert resp.body == b"hello world0123456789"
        # the trailer section was consumed: the next request parses cleanly
        conn.send(HELLO)
        assert conn.read_response().body == b"Hello, world!"


def test_chunked_request_uppercase_hex_and_split_writes(server):
    with server.connect() as conn:
        conn.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1")
        conn.send(b"A\r\n" + b"z" * 10)
        conn.send(b"z" * 16 + b"\r\n0\r")
        conn.send(b"\n\r\n")
        resp = conn.read_response()
        assert resp.status == 200
        assert resp.body == b"z" * 26


@pytest.mark.parametrize("tls", [True, False], ids=["https", "http"])
def test_streaming_response_is_chunked(server, tls):
    with server.connect(tls) as conn:
        conn.send(b"GET /stream?n=50&size=1000 HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = conn.read_response()
        assert resp.status == 200
        assert resp.chunked
        assert resp.header("content-length") is None
        expected = b"".join((b"%d:" % i).ljust(1000, b".") for i in range(50))
        assert resp.body == expected
        # keep-alive still works after a chunked response
        conn.send(HELLO)
        assert conn.read_response().body == b"Hello, world!"


def test_streaming_response_via_httpx(server):
    with server.client() as c, c.stream("GET", "/stream?n=200&size=5000") as r:
        data = b"".join(r.iter_bytes())
    assert r.status_code == 200
    assert data == b"".join((b"%d:" % i).ljust(5000, b".") for i in range(200))


def test_single_body_without_content_length(server):
    resp, conn = server.request(b"GET /nocl HTTP/1.1\r\nHost: x\r\n\r\n")
    assert resp.status == 200
    assert resp.body == b"no content-length here"
    assert resp.chunked or resp.header("content-length") == str(len(resp.body))
    conn.send(HELLO)
    assert conn.read_response().body == b"Hello, world!"
    conn.close()


# --- HEAD ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", [b"/hello", b"/stream"])
def test_head_has_headers_but_no_body(server, path):
    with server.connect() as conn:
        conn.send(b"HEAD " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = conn.read_response(method="HEAD")
        assert resp.status == 200
        if path == b"/hello":
            assert resp.header("content-length") == "13"
        # a body would corrupt the next response on this connection
        conn.send(HELLO)
        nxt = conn.read_response()
        assert nxt.status == 200
        assert nxt.body == b"Hello, world!"
        assert conn.buf == b""


# --- connection management ----------------------------------------------------------


def test_keep_alive_reuses_connection(server):
    with server.connect() as conn:
        for i in range(5):
            conn.send(b"GET /scope?i=%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
            resp = conn.read_response()
            assert resp.status == 200
            scope = json.loads(resp.body)
            assert scope["query_string"] == f"i={i}"
            assert scope["client"][1] == conn.local_port
            assert (resp.header("connection") or "").lower() != "close"


def test_keep_alive_httpx_same_client_port(server):
    with server.client() as c:
        ports = {c.get("/scope").json()["client"][1] for _ in range(3)}
    assert len(ports) == 1


@pytest.mark.parametrize("tls", [True, False], ids=["https", "http"])
def test_pipelining_responses_in_order(server, tls):
    with server.connect(tls) as conn:
        conn.send(
            b"GET /delay?ms=300&id=1 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /id?id=2 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /id?id=3 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nthree"
            b"GET /delay?ms=10&id=4 HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        bodies = [conn.read_response().body for _ in range(4)]
    assert bodies == [b"delay:1", b"id:2:", b"id:3:three", b"delay:4"]


def test_pipelining_stops_after_connection_close(server):
    with server.connect() as conn:
        conn.send(
            b"GET /id?id=1 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /id?id=2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            b"GET /id?id=3 HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        assert conn.read_response().body == b"id:1:"
        second = conn.read_response()
        assert second.body == b"id:2:"
        rest = conn.read_until_close()
    assert rest == b"", "server answered a request after Connection: close"


@pytest.mark.parametrize("tls", [True, False], ids=["https", "http"])
def test_connection_close_honoured(server, tls):
    with server.connect(tls) as conn:
        conn.send(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        resp = conn.read_response()
        assert resp.status == 200
        assert resp.body == b"Hello, world!"
        assert (resp.header("connection") or "close").lower() == "close"
        assert conn.read_until_close() == b""


def test_http10_closes_after_response(server):
    with server.connect() as conn:
        conn.send(b"GET /scope HTTP/1.0\r\n\r\n")
        resp = conn.read_response()
        assert resp.status == 200
        assert json.loads(resp.body)["http_version"] == "1.0"
        assert conn.read_until_close() == b""


def test_http10_streaming_response_not_chunked(server):
    with server.connect() as conn:
        conn.send(b"GET /stream?n=20&size=100 HTTP/1.0\r\nHost: x\r\n\r\n")
        resp = conn.read_response()
        assert resp.status == 200
        assert not resp.chunked
        assert resp.body == b"".join((b"%d:" % i).ljust(100, b".") for i in range(20))
        assert conn.eof or conn.read_until_close() == b""


def test_many_sequential_connections(server):
    for _ in range(30):
        resp, conn = server.request(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        conn.close()
        assert resp.body == b"Hello, world!"


# --- Expect: 100-continue -----------------------------------------------------------


def test_expect_100_continue(server):
    with server.connect() as conn:
        conn.send(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = conn.read_response()
        assert interim.status == 100
        assert interim.version == "HTTP/1.1"
        conn.send(b"hello world")
        resp = conn.read_response()
        assert resp.status == 200
        assert resp.body == b"hello world"


def test_expect_100_continue_only_once_app_receives(server):
    with server.connect() as conn:
        conn.send(
            b"POST /expect-delayed HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        server.wait_record("expect", "app-started")
        # The app has not called receive() yet: nothing may have been sent.
        assert not conn.readable_within(0.5), f"early bytes: {bytes(conn.buf)!r}"
        server.flag("expect-go")
        interim = conn.read_response()
        assert interim.status == 100
        conn.send(b"data")
        resp = conn.read_response()
        assert resp.status == 200
        assert resp.body == b"got:data"


def test_expect_100_continue_not_sent_if_app_never_reads(server):
    with server.connect() as conn:
        conn.send(
            b"POST /no-read HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        resp = conn.read_response()
        assert resp.status == 200, "got an interim 100 although the app never called receive()"
        assert resp.body == b"not reading your body"


# --- disconnect ---------------------------------------------------------------------


@pytest.mark.parametrize("tls", [True, False], ids=["https", "http"])
def test_http_disconnect_after_client_goes_away(server, tls):
    name = f"disc-{'tls' if tls else 'plain'}-{time.monotonic_ns()}"
    conn = server.connect(tls)
    conn.send(b"GET /wait-disconnect?name=%s HTTP/1.1\r\nHost: x\r\n\r\n" % name.encode())
    server.wait_record(name, "body-read")
    conn.close()
    server.wait_record(name, "http.disconnect")
    server.assert_serving(tls)
