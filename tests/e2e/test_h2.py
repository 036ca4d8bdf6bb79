"""HTTP/2 over TLS (ALPN h2) and cleartext (prior knowledge), with independent clients:
curl, nghttp, httpx (the h2 stack), headless Chromium, and a raw frame-level client.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import threading

import h3clients as kit
import httpx
import pytest
from apps import CHUNK, stream_chunk
from h2clients import (
    CANCEL,
    INTERNAL_ERROR,
    NO_ERROR,
    SETTINGS_ENABLE_CONNECT_PROTOCOL,
    SETTINGS_MAX_CONCURRENT_STREAMS,
    ClientMissing,
    H2Raw,
    curl,
    nghttp,
)
from harness import call, client_missing, wait_until
from wsraw import close_payload, frame

from fpy3.devcert import spki_sha256_b64


@pytest.fixture(scope="module")
def srv(module_server_factory):
    return module_server_factory(app="ws_apps:app", http=True)


def raw(srv, tls: bool = True, **kwargs) -> H2Raw:
    if tls:
        return H2Raw(srv.host, srv.port, str(srv.cafile), **kwargs)
    return H2Raw(srv.host, srv.http_port, tls=False, **kwargs)


def run_curl(*args, **kwargs):
    try:
        return curl(*args, **kwargs)
    except ClientMissing as exc:
        client_missing(exc)


def h2_client(srv, tls: bool = True) -> httpx.Client:
    if tls:
        return srv.client(http2=True)
    # http1=False: HTTP/2 with prior knowledge on http://
    return httpx.Client(
        base_url=srv.url("", tls=False), http1=False, http2=True, trust_env=False, timeout=15
    )


# --- independent clients ------------------------------------------------------------------


def test_curl_get_and_post_over_tls(srv):
    r = run_curl(srv.url("/hello"), "--http2", cafile=str(srv.cafile))
    assert (r.version, r.status, r.body) == ("2", 200, b"Hello, world!")
    names = [n for n, _ in r.headers]
    assert names.count("date") == 1 and dict(r.headers)["server"] == "fpy3"
    assert dict(r.headers)["content-length"] == "13"
    r = run_curl(srv.url("/echo"), "--http2", "--data-binary", "curl body", cafile=str(srv.cafile))
    assert (r.version, r.status, r.body) == ("2", 200, b"curl body")
    assert dict(r.headers)["x-body-sha256"] == hashlib.sha256(b"curl body").hexdigest()


def test_curl_h2c_prior_knowledge_on_the_cleartext_port(srv):
    r = run_curl(srv.url("/hello", tls=False), "--http2-prior-knowledge")
    assert (r.version, r.status, r.body) == ("2", 200, b"Hello, world!")
    # The same port still serves HTTP/1.1.
    r = run_curl(srv.url("/hello", tls=False), "--http1.1")
    assert (r.version, r.status, r.body) == ("1.1", 200, b"Hello, world!")


def test_nghttp_get_and_settings(srv):
    try:
        p = nghttp(srv.url("/hello"))
    except ClientMissing as exc:
        client_missing(exc)
    assert p.returncode == 0, p.stderr
    assert "Hello, world!" in p.stdout
    assert ":status: 200" in p.stdout
    # The server's SETTINGS: no push, extended CONNECT on, its stream limit.
    assert "SETTINGS_ENABLE_PUSH(0x02):0" in p.stdout
    assert "SETTINGS_MAX_CONCURRENT_STREAMS(0x03):100" in p.stdout
    assert "ENABLE_CONNECT_PROTOCOL" in p.stdout or "(0x08):1" in p.stdout


def test_httpx_get_post_and_every_scope_field(srv):
    with h2_client(srv) as c:
        r = c.get("/scope?a=1&b=%20x", headers={"x-test": "yes"})
        assert r.http_version == "HTTP/2" and r.status_code == 200
        scope = r.json()
        r2 = c.post("/echo", content=b"posted")
        assert (r2.http_version, r2.status_code, r2.content) == ("HTTP/2", 200, b"posted")
    assert scope["type"] == "http"
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.4"}
    assert scope["http_version"] == "2"
    assert scope["scheme"] == "https"
    assert scope["method"] == "GET"
    assert scope["path"] == "/scope" and scope["raw_path"] == "/scope"
    assert scope["query_string"] == "a=1&b=%20x"
    assert scope["root_path"] == ""
    assert scope["server"] == [srv.host, srv.port]
    assert scope["client"][0] == "127.0.0.1" and isinstance(scope["client"][1], int)
    headers = dict(scope["headers"])
    assert headers["host"] == f"{srv.host}:{srv.port}"  # from :authority
    assert headers["x-test"] == "yes"
    assert not any(name.startswith(":") for name, _ in scope["headers"])
    assert scope["state"] == {"started": True}
    assert scope["extensions"]["http.response.trailers"] == {}
    tls = scope["extensions"]["tls"]  # the ASGI TLS extension, no client certificate here
    assert tls["tls_version"] == 0x0304 and tls["client_cert_chain"] == []


def test_httpx_h2c_scope_scheme_is_http(srv):
    with h2_client(srv, tls=False) as c:
        r = c.get("/scope")
    assert r.http_version == "HTTP/2"
    scope = r.json()
    assert (scope["http_version"], scope["scheme"]) == ("2", "http")
    assert scope["server"] == [srv.host, srv.http_port]


def test_chromium_uses_h2_over_tcp(srv):
    spki = spki_sha256_b64(str(srv.cafile))
    out = call(kit.chromium_fetch, srv.url("/hello"), spki, quic=False)
    assert out["protocol"] == "h2"
    assert (out["status"], out["text"]) == (200, "Hello, world!")
    body = bytes(range(256)) * 64
    out = call(kit.chromium_fetch, srv.url("/echo"), spki, method="POST", body=body, quic=False)
    assert (out["status"], out["protocol"], out["body"]) == (200, "h2", body)


# --- bodies and streams ----------------------------------------------------------------------


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "h2c"])
def test_10mb_upload_and_download_by_checksum(srv, tls):
    body = os.urandom(10 * 1024 * 1024)
    with h2_client(srv, tls) as c:
        r = c.post("/echo-info", content=body)
        assert r.http_version == "HTTP/2"
        assert r.json()["sha256"] == hashlib.sha256(body).hexdigest()
        n = 10 * 1024 * 1024 // CHUNK
        r = c.get(f"/h3-download?n={n}")
        expected = b"".join(stream_chunk(i) for i in range(n))
        assert r.status_code == 200 and len(r.content) == len(expected)
        assert hashlib.sha256(r.content).digest() == hashlib.sha256(expected).digest()


def test_100_concurrent_streams_on_one_connection(srv):
    with raw(srv) as h2:
        h2.wait(lambda: h2.server_settings, message="server SETTINGS")
        assert h2.server_settings[SETTINGS_MAX_CONCURRENT_STREAMS] == 100
        sids = [h2.request("POST", f"/id?id={i}", b"b%d" % i) for i in range(100)]
        h2.wait(lambda: all(h2.streams[s].done for s in sids), 30, "100 responses")
        for i, sid in enumerate(sids):
            st = h2.streams[sid]
            assert (st.status, bytes(st.data)) == (200, b"id:%d:b%d" % (i, i)), st


def test_httpx_async_many_requests_share_one_connection(srv):
    async def go():
        async with httpx.AsyncClient(
            base_url=srv.url(""), http2=True, verify=srv.ssl_context(), trust_env=False
        ) as c:
            rs = await asyncio.gather(*(c.get(f"/delay?ms=50&id={i}") for i in range(50)))
            return rs

    rs = asyncio.run(go())
    assert [r.text for r in rs] == [f"delay:{i}" for i in range(50)]
    assert {r.http_version for r in rs} == {"HTTP/2"}


def test_server_streaming(srv):
    with raw(srv) as h2:
        st = h2.get("/stream?n=5&size=10")
        assert st.status == 200 and st.header("content-length") is None
        assert bytes(st.data) == b"".join((b"%d:" % i).ljust(10, b".") for i in range(5))
        st = h2.get("/h3-download?n=40")
        assert bytes(st.data) == b"".join(stream_chunk(i) for i in range(40))


def test_client_reset_mid_body_disconnects_the_app(srv):
    name = "h2-reset-mid-body"
    with raw(srv) as h2:
        sid = h2.open_stream(
            h2.request_headers("POST", f"/h3-record-receive?name={name}"), end_stream=False
        )
        h2.data(sid, b"x" * 1000)
        srv.wait_record(name, "http.request 1000 True")
        h2.reset(sid, CANCEL)
        srv.wait_record(name, "http.disconnect")
        # The connection goes on.
        st = h2.get("/hello")
        assert (st.status, bytes(st.data)) == (200, b"Hello, world!")


def test_app_exceptions(srv):
    offset = srv.stderr_size()
    with raw(srv) as h2:
        st = h2.get("/raise-before")
        assert (st.status, bytes(st.data)) == (500, b"Internal Server Error\n")
        # After the response started: partial data, then RST_STREAM INTERNAL_ERROR.
        st = h2.get("/raise-after")
        assert st.status == 200 and bytes(st.data) == b"partial"
        assert st.reset == INTERNAL_ERROR and not st.ended
        st = h2.get("/hello")
        assert st.status == 200
    log = srv.wait_stderr("boom-after-start", offset)
    assert "boom-before-start" in log


def test_trailers_over_h2(srv):
    with raw(srv) as h2:
        for path in ("/trailers", "/trailers?whole=1", "/trailers?cl=1"):
            st = h2.get(path)
            payload = b"body with trailers"
            assert (st.status, bytes(st.data), st.ended) == (200, payload, True), path
            assert st.trailers == [
                ("x-checksum", hashlib.sha256(payload).hexdigest()),
                ("x-count", str(len(payload))),
            ], path


def test_trailers_over_http1_chunked(srv):
    with srv.connect(tls=False) as conn:
        conn.send(b"GET /trailers HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n")
        r = conn.read_response()
        assert r.status == 200 and r.chunked and r.body == b"body with trailers"
        digest = hashlib.sha256(b"body with trailers").hexdigest()
        assert r.trailers == [("x-checksum", digest), ("x-count", "18")]
        # A declared Content-Length leaves no room for trailers: the body alone, and the
        # connection goes on.
        conn.send(b"GET /trailers?cl=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        r = conn.read_response()
        assert (r.status, r.body, r.trailers) == (200, b"body with trailers", [])
        conn.send(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.read_response().body == b"Hello, world!"


def test_request_limits(srv):
    with raw(srv) as h2:
        big = [("x-big", "v" * 40000)]
        sid = h2.open_stream(h2.request_headers("GET", "/hello", big))
        st = h2.response(sid)
        assert st.status == 431
        sid = h2.open_stream(
            h2.request_headers("POST", "/echo", [("content-length", str(200 * 1024 * 1024))]),
            end_stream=False,
        )
        assert h2.response(sid).status == 413
        # A malformed request (an uppercase name) is reset with PROTOCOL_ERROR.
        sid = h2.open_stream(h2.request_headers("GET", "/hello", [("X-Upper", "1")]))
        assert h2.response(sid).reset == 1
        assert h2.get("/hello").status == 200


def test_head_and_bodyless(srv):
    with raw(srv) as h2:
        st = h2.response(h2.request("HEAD", "/hello"))
        assert (st.status, bytes(st.data), st.header("content-length")) == (200, b"", "13")
        st = h2.get("/status?code=204")
        assert (st.status, bytes(st.data), st.ended) == (204, b"", True)


# --- websockets (RFC 8441) --------------------------------------------------------------------


def ws_frames(buf: bytearray) -> list[tuple[int, bytes]]:
    out = []
    while len(buf) >= 2:
        n = buf[1] & 0x7F
        hl = 2 + (2 if n == 126 else 8 if n == 127 else 0)
        if len(buf) < hl:
            break
        if n == 126:
            n = int.from_bytes(buf[2:4])
        elif n == 127:
            n = int.from_bytes(buf[2:10])
        if len(buf) < hl + n:
            break
        out.append((buf[0] & 0x0F, bytes(buf[hl : hl + n])))
        del buf[: hl + n]
    return out


def ws_connect(h2: H2Raw, path: str, extra=()) -> int:
    h2.wait(lambda: h2.server_settings, message="server SETTINGS")
    assert h2.server_settings.get(SETTINGS_ENABLE_CONNECT_PROTOCOL) == 1
    headers = [
        (":method", "CONNECT"),
        (":protocol", "websocket"),
        (":scheme", h2.scheme),
        (":path", path),
        (":authority", h2.authority),
        ("sec-websocket-version", "13"),
        *extra,
    ]
    return h2.open_stream(headers, end_stream=False)


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "h2c"])
def test_websocket_over_h2_echo_and_close(srv, tls):
    with raw(srv, tls) as h2:
        sid = ws_connect(h2, "/echo", [("sec-websocket-protocol", "chat")])
        st = h2.streams[sid]
        h2.wait(lambda: st.headers, message="handshake response")
        assert st.status == 200 and st.header("sec-websocket-protocol") == "chat"
        assert st.header("x-accepted-by") == "fpy3-test"
        h2.data(sid, frame(0x1, b"hello h2"))
        h2.data(sid, frame(0x2, b"\x00\x01" * 40000))
        got: list = []
        h2.wait(lambda: got.extend(ws_frames(st.data)) or len(got) >= 2, message="echoes")
        assert got == [(0x1, b"hello h2"), (0x2, b"\x00\x01" * 40000)]
        h2.data(sid, frame(0x1, b"close-me"))
        h2.wait(lambda: got.extend(ws_frames(st.data)) or len(got) >= 3, message="close")
        assert got[2] == (0x8, close_payload(4001, b"bye now"))
        h2.data(sid, frame(0x8, close_payload(4001)))
        h2.wait(lambda: st.done, message="end of the websocket stream")
        assert st.reset is None
    srv.wait_record("ws-echo", "disconnect 4001 ")  # the client's close: no reason


def test_websocket_over_h2_scope_and_denial(srv):
    with raw(srv) as h2:
        sid = ws_connect(h2, "/scope")
        st = h2.streams[sid]
        got: list = []
        h2.wait(lambda: got.extend(ws_frames(st.data)) or got, message="scope message")
        scope = json.loads(got[0][1])
        assert scope["type"] == "websocket" and scope["http_version"] == "2"
        assert scope["scheme"] == "wss" and scope["path"] == "/scope"
        assert "websocket.http.response" in scope["extensions"]
        h2.reset(sid, CANCEL)
        sid = ws_connect(h2, "/deny")
        st = h2.response(sid)
        assert (st.status, bytes(st.data)) == (401, b"go away")


# --- drain ---------------------------------------------------------------------------------


def test_term_drains_h2_with_goaway_in_two_steps(start_server):
    srv = start_server(config={"workers": {"drain_timeout": 20}})
    with raw(srv) as h2:
        sid = h2.request("GET", "/wait-flag?flag=h2-drain")
        srv.wait_record("h2-drain-started", "started")
        srv.proc.send_signal(signal.SIGTERM)
        # The notice first: nothing is cut.
        h2.wait(lambda: h2.goaway, message="GOAWAY notice")
        assert h2.goaway[0] == (2**31 - 1, NO_ERROR)
        # Then the final GOAWAY with the last stream processed.
        h2.wait(lambda: len(h2.goaway) >= 2, message="final GOAWAY")
        assert h2.goaway[1] == (sid, NO_ERROR)
        srv.flag("h2-drain")
        st = h2.response(sid)
        assert (st.status, bytes(st.data)) == (200, b"finished")
        h2.wait_closed()
    assert srv.wait_exit(20) == 0


def test_http2_off_offers_http11_only(start_server):
    srv = start_server(config={"http2": {"enabled": False}}, http=True)
    r = run_curl(srv.url("/hello"), "--http2", cafile=str(srv.cafile))
    assert (r.version, r.status) == ("1.1", 200)
    # No prior knowledge either: the preface is a bad HTTP/1.1 request.
    with srv.connect(tls=False) as conn:
        conn.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        assert conn.read_response().status in (400, 505)


def test_alt_svc_on_h2_responses(start_server):
    srv = start_server(config={"http3": {"enabled": True}})
    r = run_curl(srv.url("/hello"), "--http2", cafile=str(srv.cafile))
    assert r.version == "2"
    assert dict(r.headers)["alt-svc"] == f'h3=":{srv.port}"; ma=86400'


def test_h2_under_threads_share_nothing(srv):
    # Several connections at once, each with several streams.
    errors: list = []

    def worker(i: int) -> None:
        try:
            with raw(srv) as h2:
                sids = [h2.request("GET", f"/id?id={i}-{j}") for j in range(20)]
                h2.wait(lambda: all(h2.streams[s].done for s in sids), 20)
                for j, s in enumerate(sids):
                    assert bytes(h2.streams[s].data) == f"id:{i}-{j}:".encode()
        except Exception as exc:  # reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    wait_until(lambda: srv.alive())


def test_idle_and_first_request_timeouts(start_server):
    srv = start_server(config={"http2": {"idle_timeout": 1.0}, "http1": {"header_timeout": 1.0}})
    # No request at all: closed after http1.header_timeout, with a GOAWAY.
    with raw(srv) as h2:
        h2.wait_closed(timeout=10)
        assert h2.goaway == [(0, NO_ERROR)]
    # After a request: open while streams run, closed once idle for http2.idle_timeout.
    with raw(srv) as h2:
        assert h2.get("/delay?ms=1500").status == 200  # longer than the idle timeout
        h2.wait_closed(timeout=10)
        assert h2.goaway[-1][1] == NO_ERROR
