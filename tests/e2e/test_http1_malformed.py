"""Malformed and request-smuggling input: rejected with 400 (or 501/505), then closed."""

import pytest
from harness import RawConn

H = b"Host: x\r\n"

BAD_REQUESTS = {
    "cl-and-te": b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-and-cl": b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
    b"Content-Length: 5\r\n\r\n0\r\n\r\n",
    "duplicate-cl-different": b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n"
    b"Content-Length: 6\r\n\r\nhello!",
    "duplicate-cl-same": b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n"
    b"Content-Length: 5\r\n\r\nhello",
    "cl-abc": b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: abc\r\n\r\n",
    "cl-negative": b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n",
    "cl-list": b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 1,1\r\n\r\nx",
    "cl-plus": b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nhello",
    "cl-hex": b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 0x5\r\n\r\nhello",
    "chunk-size-zz": b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"zz\r\nhello\r\n0\r\n\r\n",
    "chunk-size-too-long": b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"1" * 40 + b"\r\nhello\r\n0\r\n\r\n",
    "chunk-size-overflow": b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"ffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
    "chunk-size-negative": b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"-5\r\nhello\r\n0\r\n\r\n",
    "chunk-data-no-crlf": b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhelloXX0\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\n" + H + b"X-Folded: a\r\n b\r\n\r\n",
    "obs-fold-tab": b"GET / HTTP/1.1\r\n" + H + b"X-Folded: a\r\n\tb\r\n\r\n",
    "bare-cr-in-value": b"GET / HTTP/1.1\r\n" + H + b"X-Bad: a\rb\r\n\r\n",
    "bare-lf-line-end": b"GET / HTTP/1.1\r\n" + H + b"X-Bad: a\nX-Other: b\r\n\r\n",
    "bare-cr-line-end": b"GET / HTTP/1.1\r\n" + H + b"X-Bad: a\rX-Other: b\r\n\r\n",
    "space-before-colon": b"GET / HTTP/1.1\r\n" + H + b"X-Bad : a\r\n\r\n",
    "tab-before-colon": b"GET / HTTP/1.1\r\n" + H + b"X-Bad\t: a\r\n\r\n",
    "missing-host-http11": b"GET / HTTP/1.1\r\nX-Other: a\r\n\r\n",
    "duplicate-host": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "nul-in-value": b"GET / HTTP/1.1\r\n" + H + b"X-Bad: a\x00b\r\n\r\n",
    "nul-in-name": b"GET / HTTP/1.1\r\n" + H + b"X-B\x00ad: a\r\n\r\n",
    "no-colon": b"GET / HTTP/1.1\r\n" + H + b"NoColonHere\r\n\r\n",
    "empty-name": b"GET / HTTP/1.1\r\n" + H + b": value\r\n\r\n",
    "bad-request-line": b"GARBAGE\r\n" + H + b"\r\n",
    "space-in-target": b"GET /a b HTTP/1.1\r\n" + H + b"\r\n",
    "bad-version": b"GET / HTTP/1.x\r\n" + H + b"\r\n",
    "te-obfuscated": b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n"
    b"0\r\n\r\n",
}

# Unusable framing where 400 and 501 are both fair answers; either way: closed.
BAD_FRAMING = {
    "te-chunked-not-last": b"POST /echo HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "te-chunked-twice": b"POST /echo HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
}

# Requests that carry a second request in what the server must not treat as a body.
SMUGGLE = {
    "cl-te": b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 6\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n" + H + b"\r\n",
    "te-cl": b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
    b"Content-Length: 4\r\n\r\n5c\r\nGET /smuggled HTTP/1.1\r\n" + H + b"\r\n0\r\n\r\n",
    "double-cl": b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 0\r\n"
    b"Content-Length: 40\r\n\r\nGET /smuggled HTTP/1.1\r\n" + H + b"\r\n",
}


def read_single_response_then_close(conn):
    resp = conn.read_response()
    rest = conn.read_until_close()
    return resp, rest


@pytest.mark.parametrize("raw", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_malformed_gets_400_and_close(server, raw):
    with server.connect() as conn:
        conn.try_send(raw)
        resp, rest = read_single_response_then_close(conn)
    assert resp.status == 400, resp
    assert b"HTTP/" not in rest, f"a second response followed: {rest[:200]!r}"


@pytest.mark.parametrize("raw", list(BAD_REQUESTS.values())[:6], ids=list(BAD_REQUESTS)[:6])
def test_malformed_cleartext_gets_400_and_close(server, raw):
    with server.connect(tls=False) as conn:
        conn.try_send(raw)
        resp, rest = read_single_response_then_close(conn)
    assert resp.status == 400
    assert b"HTTP/" not in rest


@pytest.mark.parametrize("raw", BAD_FRAMING.values(), ids=BAD_FRAMING.keys())
def test_bad_framing_rejected_and_closed(server, raw):
    with server.connect() as conn:
        conn.try_send(raw)
        resp, rest = read_single_response_then_close(conn)
    assert resp.status in (400, 501)
    assert b"HTTP/" not in rest


@pytest.mark.parametrize("raw", SMUGGLE.values(), ids=SMUGGLE.keys())
def test_smuggled_request_is_never_served(server, raw):
    with server.connect() as conn:
        conn.try_send(raw)
        resp, rest = read_single_response_then_close(conn)
    assert resp.status == 400
    assert b"HTTP/" not in rest
    assert b"/smuggled" not in resp.body


def test_malformed_after_good_request_on_same_connection(server):
    with server.connect() as conn:
        conn.send(
            b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\n" + H + b"Bad : x\r\n\r\n"
        )
        first = conn.read_response()
        assert first.status == 200
        assert first.body == b"Hello, world!"
        resp, rest = read_single_response_then_close(conn)
    assert resp.status == 400
    assert rest == b""


@pytest.mark.parametrize("te, status", [(b"bogus", 400), (b"gzip", 400), (b"bogus, chunked", 501)])
def test_unknown_transfer_coding(server, te, status):
    # RFC 9112 6.1/6.3: chunked not final is 400; a coding we lack before chunked, 501
    with server.connect() as conn:
        conn.try_send(
            b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: " + te + b"\r\n\r\n0\r\n\r\n"
        )
        resp, rest = read_single_response_then_close(conn)
    assert resp.status == status
    # the body framing is unknown, so the connection cannot continue
    assert b"HTTP/" not in rest


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/3.0"])
def test_unsupported_http_version_gets_505(server, version):
    with server.connect() as conn:
        conn.try_send(b"GET / " + version + b"\r\n" + H + b"\r\n")
        resp = conn.read_response()
    assert resp.status == 505


def test_server_keeps_serving_after_garbage(server):
    for raw in list(BAD_REQUESTS.values())[:10]:
        with server.connect() as conn:
            conn.try_send(raw)
            conn.read_response()
    with server.connect() as conn:
        conn.send(b"\x16\x03\x01garbage that is not http at all\r\n\r\n")
        conn.read_response(allow_incomplete=True)
    server.assert_serving()
    server.assert_serving(tls=False)


def test_http_on_tls_port_does_not_serve_cleartext(server):
    with RawConn(server.host, server.port) as conn:
        conn.send(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            data = conn.read_until_close(10)
        except AssertionError:
            data = bytes(conn.buf)
    assert b"Hello, world!" not in data
    server.assert_serving()
