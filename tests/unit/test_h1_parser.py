"""Tests for the HTTP/1.1 request parser (native/h1.c via fpy3.h1.parser)."""

import random

import pytest

from fpy3.h1.parser import (
    CHUNKED,
    EXPECT_CONTINUE,
    KEEP_ALIVE,
    UPGRADE,
    ChunkedDecoder,
    ParseError,
    parse_head,
)

MAX_SIZE = 8192
MAX_COUNT = 100


def parse(raw: bytes, start: int = 0, max_size: int = MAX_SIZE, max_count: int = MAX_COUNT):
    return parse_head(raw, start, max_size, max_count)


def status_of(raw: bytes, **kw) -> int:
    with pytest.raises(ParseError) as ei:
        parse(raw, **kw)
    assert isinstance(ei.value.reason, str) and ei.value.reason
    return ei.value.status


def req(*headers: str, line: str = "GET / HTTP/1.1", host: bool = True) -> bytes:
    hs = (["Host: example.com"] if host else []) + list(headers)
    return (line + "\r\n" + "".join(h + "\r\n" for h in hs) + "\r\n").encode("latin-1")


TYPICAL = (
    b"GET /api/items?page=2&x=%20 HTTP/1.1\r\n"
    b"Host: example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\n"
    b"Accept: */*\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\n"
    b"Accept-Language: en-US,en;q=0.9\r\n"
    b"Connection: keep-alive\r\n"
    b"\r\n"
)


# ---- valid requests ----


def test_typical_get():
    r = parse(TYPICAL)
    assert r == (
        len(TYPICAL),
        b"GET",
        b"/api/items",
        b"page=2&x=%20",
        "/api/items",
        1,
        [
            (b"host", b"example.com"),
            (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64)"),
            (b"accept", b"*/*"),
            (b"accept-encoding", b"gzip, deflate, br"),
            (b"accept-language", b"en-US,en;q=0.9"),
            (b"connection", b"keep-alive"),
        ],
        -1,
        KEEP_ALIVE,
        None,
    )
    assert all(type(x) is bytes for pair in r[6] for x in pair)


def test_post_with_content_length():
    raw = req("Content-Length: 13", "Content-Type: text/plain", line="POST /submit HTTP/1.1")
    end, method, raw_path, query, path, minor, headers, cl, flags, up = parse(raw + b"hello")
    assert (end, method, raw_path, query, path, cl, flags, up) == (
        len(raw),
        b"POST",
        b"/submit",
        b"",
        "/submit",
        13,
        KEEP_ALIVE,
        None,
    )
    assert headers[1] == (b"content-length", b"13")


def test_http10_without_host():
    r = parse(b"GET /x HTTP/1.0\r\n\r\n")
    assert r[5] == 0 and r[6] == [] and r[8] == 0


def test_header_names_lowercased_values_stripped_order_kept():
    raw = req("X-B: \t two  words \t", "x-a:1", "X-EMPTY:", "X-Tab:\tv", "X-A: again")
    headers = parse(raw)[6]
    assert headers == [
        (b"host", b"example.com"),
        (b"x-b", b"two  words"),
        (b"x-a", b"1"),
        (b"x-empty", b""),
        (b"x-tab", b"v"),
        (b"x-a", b"again"),
    ]


@pytest.mark.parametrize("count", [0, 1, 31, 32, 33, 150])
def test_many_headers(count):
    names = [f"X-H{i}" for i in range(count)]
    r = parse(req(*[f"{n}: v{i}" for i, n in enumerate(names)]), max_count=200)
    assert r[6][1:] == [(n.lower().encode(), f"v{i}".encode()) for i, n in enumerate(names)]
    assert r[4] == "/"


def test_obs_text_allowed_in_value_and_target():
    raw = b"GET /caf\xc3\xa9?q=\xff HTTP/1.1\r\nHost: h\r\nX-Name: Jos\xe9\r\n\r\n"
    r = parse(raw)
    assert r[2] == b"/caf\xc3\xa9" and r[3] == b"q=\xff" and r[4] == "/café"
    assert r[6][1] == (b"x-name", b"Jos\xe9")


def test_token_method_chars():
    r = parse(req(line="M-SEARCH! /x HTTP/1.1"))
    assert r[1] == b"M-SEARCH!"


@pytest.mark.parametrize(
    "target, raw_path, query, path",
    [
        ("/", b"/", b"", "/"),
        ("/a?", b"/a", b"", "/a"),
        ("/a?b?c", b"/a", b"b?c", "/a"),
        ("/a%20b", b"/a%20b", b"", "/a b"),
        ("/a%2Fb", b"/a%2Fb", b"", "/a/b"),
        ("/a%2fb%41", b"/a%2fb%41", b"", "/a/bA"),
        ("/a+b", b"/a+b", b"", "/a+b"),
        ("/%zz/%4/%", b"/%zz/%4/%", b"", "/%zz/%4/%"),
        ("/%C3%A9", b"/%C3%A9", b"", "/é"),
        ("/%FF", b"/%FF", b"", "/\ufffd"),
        ("/%41?%41", b"/%41", b"%41", "/A"),
        ("http://example.com/p?q=1", b"/p", b"q=1", "/p"),
        ("HTTPS://example.com:8443/a%20b", b"/a%20b", b"", "/a b"),
        ("http://example.com", b"/", b"", "/"),
        ("http://example.com?q", b"/", b"q", "/"),
    ],
)
def test_targets(target, raw_path, query, path):
    r = parse(req(line=f"GET {target} HTTP/1.1"))
    assert r[2:5] == (raw_path, query, path)


def test_percent_00_decodes_without_shifting_fields():
    r = parse(req("X-A: 1", line="GET /a%00b HTTP/1.1"))
    assert r[2] == b"/a%00b" and r[4] == "/a\x00b"
    assert r[6] == [(b"host", b"example.com"), (b"x-a", b"1")]


def test_asterisk_form_options():
    r = parse(req(line="OPTIONS * HTTP/1.1"))
    assert r[1:5] == (b"OPTIONS", b"*", b"", "*")


@pytest.mark.parametrize("target", ["example.com:443", "[::1]:8080"])
def test_connect_is_405(target):
    # RFC 9110 9.3.6: a tunnel, not an ASGI http request; the target is still checked
    with pytest.raises(ParseError) as ei:
        parse(req(line=f"CONNECT {target} HTTP/1.1"))
    assert ei.value.status == 405 and "CONNECT" in ei.value.reason


@pytest.mark.parametrize(
    "line",
    [
        "GET * HTTP/1.1",
        "CONNECT / HTTP/1.1",
        "CONNECT example.com HTTP/1.1",
        "CONNECT example.com:x HTTP/1.1",
        "CONNECT :443 HTTP/1.1",
        "CONNECT http://example.com:443 HTTP/1.1",
        "GET example.com/a HTTP/1.1",
        "GET ftp://example.com/a HTTP/1.1",
        "GET http:///a HTTP/1.1",
        "GET http:// HTTP/1.1",
        "OPTIONS ** HTTP/1.1",
        "GET /a#frag HTTP/1.1",
        "GET /a?b#frag HTTP/1.1",
        "GET http://h/#x HTTP/1.1",
    ],
)
def test_bad_target_forms(line):
    assert status_of(req(line=line)) == 400


def test_leading_empty_lines_ignored():
    raw = b"\r\n\r\n" + TYPICAL
    r = parse(raw)
    assert r[0] == len(raw) and r[1] == b"GET"
    # the head size limit counts from the request line
    assert parse(raw, max_size=len(TYPICAL))[0] == len(raw)


def test_leading_empty_lines_bounded():
    assert status_of(b"\r\n" * 5000, max_size=8192) == 400
    assert parse(b"\r\n" * 100) is None
    assert status_of(b"\n" + TYPICAL) == 400
    assert status_of(b"\r\r\n" + TYPICAL) == 400


def test_pipelined_heads():
    a = req("Content-Length: 5", line="POST /a HTTP/1.1")
    b = req(line="GET /b HTTP/1.1")
    c = req(line="GET /c HTTP/1.1")
    buf = a + b"hello" + b + c
    r1 = parse(buf)
    assert r1[0] == len(a) and r1[2] == b"/a" and r1[7] == 5
    r2 = parse(buf, start=r1[0] + 5)
    assert r2[0] == len(a) + 5 + len(b) and r2[2] == b"/b"
    r3 = parse(buf, start=r2[0])
    assert r3[0] == len(buf) and r3[2] == b"/c"
    assert parse(buf, start=len(buf)) is None


def test_bytearray_and_memoryview_input():
    expected = parse(TYPICAL)
    assert parse_head(bytearray(TYPICAL), 0, MAX_SIZE, MAX_COUNT) == expected
    assert parse_head(memoryview(TYPICAL), 0, MAX_SIZE, MAX_COUNT) == expected


def test_byte_by_byte_incomplete_until_blank_line():
    raw = b"\r\n" + TYPICAL
    for i in range(len(raw)):
        assert parse(raw[:i]) is None, i
    assert parse(raw)[0] == len(raw)


def test_changing_max_size_between_calls():
    assert parse(TYPICAL, max_size=len(TYPICAL))[0] == len(TYPICAL)
    assert parse(TYPICAL, max_size=100_000)[0] == len(TYPICAL)
    assert status_of(TYPICAL, max_size=len(TYPICAL) - 1) == 431


# ---- request line errors ----


@pytest.mark.parametrize(
    "line, status",
    [
        ("G@T / HTTP/1.1", 400),
        ("GE(T / HTTP/1.1", 400),
        (" / HTTP/1.1", 400),
        ("GET  / HTTP/1.1", 400),
        ("GET /  HTTP/1.1", 400),
        ("GET / HTTP/1.1 ", 400),
        ("GET\t/ HTTP/1.1", 400),
        ("GET /\tx HTTP/1.1", 400),
        ("GET / x HTTP/1.1", 400),
        ("GET /\x7f HTTP/1.1", 400),
        ("GET /\x01 HTTP/1.1", 400),
        ("GET / http/1.1", 400),
        ("GET / HTTP/1", 400),
        ("GET / HTTP/1.", 400),
        ("GET / HTTP/11.1", 400),
        ("GET / HTTP/1.1x", 400),
        ("GET / HTTPS/1.1", 400),
        ("GET / HTTP/a.b", 400),
        ("GET /", 400),
        ("GET / HTTP/2.0", 505),
        ("GET / HTTP/0.9", 505),
        ("GET / HTTP/3.0", 505),
    ],
)
def test_request_line_errors(line, status):
    assert status_of(req(line=line)) == status


@pytest.mark.parametrize("minor", "23456789")
def test_higher_http1_minor_read_as_http11(minor):
    # RFC 9110 6.2: served as HTTP/1.1 (keep-alive by default, Host required)
    r = parse(req(line=f"GET / HTTP/1.{minor}"))
    assert r[5] == 1 and r[8] & KEEP_ALIVE
    assert status_of(req(host=False, line=f"GET / HTTP/1.{minor}")) == 400


def test_nul_in_request_line():
    assert status_of(b"GET /\x00 HTTP/1.1\r\nHost: h\r\n\r\n") == 400
    assert status_of(b"G\x00T / HTTP/1.1\r\nHost: h\r\n\r\n") == 400


# ---- line endings ----


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\nHost: h\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\n\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nX: a\nb\r\n\r\n",
        b"GET / HTTP/1.1\rHost: h\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\n\rX",
        b"GET / HTTP/1.1\r\nHost: h\r\n\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nX:\n",
    ],
)
def test_bare_cr_lf_rejected(raw):
    assert status_of(raw) == 400


def test_errors_reported_before_head_is_complete():
    assert status_of(b"GET / HTTP/1.1\n") == 400
    assert status_of(b"GET / HTTP/1.1\r\nHost: h\r\nBad Name: x\r\n") == 400


# ---- header field errors ----


@pytest.mark.parametrize(
    "header",
    [
        ": empty-name",
        "X-A : space-before-colon",
        "X-A\t: tab-before-colon",
        "X A: space-in-name",
        "X(A): bad-char",
        "X-A",
        "X-A: nul\x00here",
        "X-A: ctl\x01here",
        "X-A: esc\x1bhere",
        "X-A: del\x7fhere",
        "X-A: vt\x0bhere",
    ],
)
def test_bad_header_fields(header):
    assert status_of(req(header)) == 400


def test_obs_fold_rejected():
    assert status_of(req("X-A: a", " folded")) == 400
    assert status_of(req("X-A: a", "\tfolded")) == 400
    # whitespace before the first header line
    assert status_of(b"GET / HTTP/1.1\r\n Host: h\r\n\r\n") == 400


def test_header_count_limit():
    assert parse(req(*[f"X-{i}: v" for i in range(9)]), max_count=10) is not None
    assert status_of(req(*[f"X-{i}: v" for i in range(10)]), max_count=10) == 431
    assert status_of(req(), max_count=0) == 431
    # reported as soon as the extra header is seen
    partial = req(*[f"X-{i}: v" for i in range(10)])[:-2]
    assert status_of(partial, max_count=10) == 431


def test_head_size_limit():
    raw = req("X-Pad: " + "a" * 100)
    assert parse(raw, max_size=len(raw))[0] == len(raw)
    assert status_of(raw, max_size=len(raw) - 1) == 431
    # incomplete heads: None until they exceed max_size
    assert parse(raw[:-1], max_size=len(raw) - 1) is None
    assert status_of(raw[:-1] + b"x", max_size=len(raw) - 1) == 431


def test_request_line_size_limit():
    long_line = b"GET /" + b"a" * 200
    assert parse(long_line, max_size=205) is None
    assert status_of(long_line + b"a", max_size=205) == 414
    # a complete request line longer than max_size
    assert status_of(long_line + b" HTTP/1.1\r\nHost: h\r\n\r\n", max_size=100) == 414
    # a request line that fits, headers that do not
    raw = req("X-Pad: " + "a" * 200, line="GET /short HTTP/1.1")
    assert status_of(raw, max_size=100) == 431
    assert status_of(raw[:150], max_size=100) == 431


# ---- Content-Length ----


@pytest.mark.parametrize(
    "value, expected",
    [
        ("0", 0),
        ("42", 42),
        ("007", 7),
        (" 5 ", 5),
        ("9223372036854775807", 2**63 - 1),
        ("0000000000000000000000000009", 9),
    ],
)
def test_content_length_valid(value, expected):
    assert parse(req(f"Content-Length: {value}"))[7] == expected


@pytest.mark.parametrize(
    "value",
    ["", "+5", "-1", "5 5", "5,5", "5, 5", "0x5", "5a", "1.0", "9223372036854775808", "1" * 40],
)
def test_content_length_invalid(value):
    assert status_of(req(f"Content-Length: {value}")) == 400


def test_content_length_duplicate():
    assert status_of(req("Content-Length: 5", "Content-Length: 5")) == 400
    assert status_of(req("Content-Length: 5", "content-length: 6")) == 400


# ---- Transfer-Encoding ----


@pytest.mark.parametrize("value", ["chunked", "Chunked", "CHUNKED", "  chunked\t"])
def test_transfer_encoding_chunked(value):
    r = parse(req(f"Transfer-Encoding: {value}", line="POST / HTTP/1.1"))
    assert r[8] & CHUNKED and r[7] == -1


@pytest.mark.parametrize("value", ["gzip, chunked", "deflate,chunked", "x , , chunked"])
def test_transfer_encoding_unsupported(value):
    # RFC 9112 6.1: a coding we do not implement, chunked last: 501
    assert status_of(req(f"Transfer-Encoding: {value}")) == 501


@pytest.mark.parametrize(
    "value",
    [
        "identity",
        "gzip",
        "chunk",
        "chunked, gzip",
        "chunked, identity",
        "chunked;a=b",
        "chunked, chunked",
        "gzip, chunked, chunked",
        ",",
        " , ",
    ],
)
def test_transfer_encoding_chunked_not_final_is_400(value):
    # RFC 9112 6.3: chunked not final (or twice): the length is unknowable, 400 and close
    assert status_of(req(f"Transfer-Encoding: {value}")) == 400


def test_transfer_encoding_empty_list_elements_ignored():
    r = parse(req("Transfer-Encoding: , chunked ,", line="POST / HTTP/1.1"))
    assert r[8] & CHUNKED


def test_transfer_encoding_errors():
    assert status_of(req("Transfer-Encoding:")) == 400
    assert status_of(req("Transfer-Encoding: chunked", "Transfer-Encoding: chunked")) == 400
    assert status_of(req("Transfer-Encoding: chunked", "Content-Length: 5")) == 400
    assert status_of(req("Content-Length: 5", "Transfer-Encoding: chunked")) == 400
    raw = b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert status_of(raw) == 400


# ---- Host ----


@pytest.mark.parametrize(
    "host",
    [
        "example.com",
        "EXAMPLE.com:8443",
        "127.0.0.1",
        "127.0.0.1:80",
        "[::1]",
        "[::1]:8443",
        "[2001:db8::a:b]",
        "[v1.x:y]",
        "a-b_c~d.e",
        "%41b",
        "!$&'()*+,;=",
        "h:",  # port = *DIGIT
        "",  # reg-name may be empty
    ],
)
def test_valid_hosts(host):
    r = parse(req(f"Host: {host}", host=False))
    assert r[6] == [(b"host", host.encode())]


@pytest.mark.parametrize(
    "host",
    [
        "a b",
        "a/b@c",
        "a@b",
        "user@example.com",
        "a/b",
        "a?b",
        "a#b",
        "a\\b",
        "exa\x80mple",
        "h:x",
        "h:80:80",
        "h:-1",
        ":80x",
        "[::1",
        "[]",
        "[::1]x",
        "[::g]",
        "%4",
        "%zz",
        "a<b",
        'a"b',
    ],
)
def test_invalid_host_is_400(host):
    # RFC 9112 3.2: a Host that is not uri-host [":" port] gets 400
    raw = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode("latin-1")
    with pytest.raises(ParseError) as ei:
        parse(raw)
    assert ei.value.status == 400 and "Host" in ei.value.reason


def test_invalid_host_in_http10_is_400():
    assert status_of(b"GET / HTTP/1.0\r\nHost: a b\r\n\r\n") == 400


@pytest.mark.parametrize(
    "target, authority",
    [
        ("http://example.org/p?q", b"example.org"),
        ("https://example.org:8443/", b"example.org:8443"),
        ("http://[::1]:80", b"[::1]:80"),
        ("http://h", b"h"),
    ],
)
def test_absolute_form_authority_replaces_host(target, authority):
    # RFC 9112 3.2.2: the server uses the target's authority, not the Host header
    r = parse(req("X-A: 1", line=f"GET {target} HTTP/1.1"))
    assert r[6] == [(b"host", authority), (b"x-a", b"1")]


def test_absolute_form_http10_without_host_adds_one():
    r = parse(b"GET http://example.org/a HTTP/1.0\r\nX-A: 1\r\n\r\n")
    assert r[6] == [(b"x-a", b"1"), (b"host", b"example.org")]
    assert r[2] == b"/a" and r[4] == "/a"


def test_absolute_form_still_needs_a_valid_host_header():
    assert status_of(req(host=False, line="GET http://example.org/ HTTP/1.1")) == 400
    raw = b"GET http://example.org/ HTTP/1.1\r\nHost: a b\r\n\r\n"
    assert status_of(raw) == 400


@pytest.mark.parametrize(
    "target",
    ["http://u@h/", "http://a b/", "http://:80/", "http://h:x/", "http://[::1/", "http://h%/"],
)
def test_absolute_form_bad_authority_is_400(target):
    assert status_of(req(line=f"GET {target} HTTP/1.1")) == 400


def test_absolute_form_long_authority_with_many_host_headers():
    # Only the first Host value is replaced: the output buffer bound holds.
    authority = "a" * 3000
    raw = (f"GET http://{authority}/ HTTP/1.1\r\n" + "Host: h\r\n" * 50 + "\r\n").encode()
    assert status_of(raw, max_size=len(raw)) == 400


def test_host_rules():
    assert status_of(req(host=False)) == 400
    assert status_of(req("Host: other")) == 400
    assert status_of(b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n") == 400
    assert parse(req(host=False, line="GET / HTTP/1.0")) is not None
    assert parse(b"GET / HTTP/1.1\r\nHost:\r\n\r\n")[6] == [(b"host", b"")]


# ---- Connection / keep-alive / Expect / Upgrade ----


@pytest.mark.parametrize(
    "version, headers, keep_alive",
    [
        ("1.1", [], True),
        ("1.1", ["Connection: close"], False),
        ("1.1", ["Connection: Close"], False),
        ("1.1", ["Connection: keep-alive, close"], False),
        ("1.1", ["Connection: foo", "Connection: CLOSE"], False),
        ("1.1", ["Connection: closed"], True),
        ("1.1", ["Connection: keep-alive"], True),
        ("1.0", [], False),
        ("1.0", ["Connection: keep-alive"], True),
        ("1.0", ["Connection: Keep-Alive"], True),
        ("1.0", ["Connection: foo ,  keep-alive  "], True),
        ("1.0", ["Connection: keep-alive", "Connection: close"], False),
        ("1.0", ["Connection: keep-alive-ish"], False),
    ],
)
def test_keep_alive(version, headers, keep_alive):
    r = parse(req(*headers, line=f"GET / HTTP/{version}"))
    assert bool(r[8] & KEEP_ALIVE) is keep_alive


def test_expect_continue():
    assert parse(req("Expect: 100-continue"))[8] & EXPECT_CONTINUE
    assert parse(req("Expect: 100-Continue"))[8] & EXPECT_CONTINUE
    assert not parse(req("Expect: 200-ok"))[8] & EXPECT_CONTINUE
    assert not parse(req())[8] & EXPECT_CONTINUE
    raw = b"POST / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n"
    assert not parse(raw)[8] & EXPECT_CONTINUE


def test_upgrade():
    r = parse(req("Connection: Upgrade", "Upgrade: websocket"))
    assert r[8] & UPGRADE and r[9] == b"websocket"
    r = parse(req("Upgrade: h2c, websocket", "Connection: keep-alive, upgrade"))
    assert r[8] & UPGRADE and r[9] == b"h2c, websocket" and r[8] & KEEP_ALIVE
    # no "upgrade" token, or no Upgrade header
    r = parse(req("Upgrade: websocket"))
    assert not r[8] & UPGRADE and r[9] is None
    r = parse(req("Connection: upgrade"))
    assert not r[8] & UPGRADE and r[9] is None
    # RFC 9110 7.8: ignored in HTTP/1.0
    r = parse(b"GET / HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert not r[8] & UPGRADE and r[9] is None


def test_parse_error_attributes():
    with pytest.raises(ParseError) as ei:
        parse(b"GET / HTTP/2.0\r\n\r\n")
    assert ei.value.status == 505
    assert "version" in ei.value.reason.lower()
    assert "505" in str(ei.value)


# ---- chunked decoder ----


def feed_all(pieces, decoder=None):
    """Feed pieces in order, carrying unconsumed bytes over like a protocol would."""
    d = decoder or ChunkedDecoder()
    data = bytearray()
    pending = b""
    done = False
    rest = b""
    for piece in pieces:
        buf = pending + piece
        if done:
            rest += buf
            pending = b""
            continue
        consumed, chunks, done = d.feed(buf, 0)
        for c in chunks:
            assert isinstance(c, memoryview) and c.obj is buf
            data += c
        pending = buf[consumed:]
        if done:
            rest += pending
            pending = b""
        else:
            assert consumed == len(buf)  # partial input is always consumed
    return bytes(data), done, rest + pending


BODY = (
    b"5\r\nhello\r\n"
    b"1A;name=value;flag\r\n" + b"x" * 26 + b"\r\n"
    b"00000a\r\n0123456789\r\n"
    b"0;last\r\n"
    b"Trailer-A: 1\r\n"
    b"trailer-b:\t two \r\n"
    b"\r\n"
)
BODY_DATA = b"hello" + b"x" * 26 + b"0123456789"


def test_chunked_simple():
    d = ChunkedDecoder()
    consumed, chunks, done = d.feed(b"5\r\nhello\r\n0\r\n\r\n", 0)
    assert consumed == 15 and [bytes(c) for c in chunks] == [b"hello"] and done
    assert d.done


def test_chunked_full_body_with_extensions_and_trailers():
    data, done, rest = feed_all([BODY + b"GET / HTTP/1.1\r\n"])
    assert data == BODY_DATA and done and rest == b"GET / HTTP/1.1\r\n"


def test_chunked_stops_exactly_at_end():
    buf = b"XX" + b"3\r\nabc\r\n0\r\n\r\nNEXT"
    d = ChunkedDecoder()
    consumed, chunks, done = d.feed(buf, 2)
    assert done and buf[2 + consumed :] == b"NEXT"
    assert [bytes(c) for c in chunks] == [b"abc"]
    assert d.feed(buf, 2 + consumed) == (0, [], True)


def test_chunked_no_copy():
    buf = b"4\r\nabcd\r\n"
    consumed, chunks, done = ChunkedDecoder().feed(buf, 0)
    assert chunks[0].obj is buf and chunks[0].readonly
    ba = bytearray(buf)
    consumed, chunks, done = ChunkedDecoder().feed(ba, 0)
    assert chunks[0].obj is ba and bytes(chunks[0]) == b"abcd" and consumed == len(ba)
    del chunks


def test_chunked_every_split_point():
    for i in range(len(BODY) + 1):
        data, done, rest = feed_all([BODY[:i], BODY[i:]])
        assert data == BODY_DATA and done and rest == b"", i


def test_chunked_byte_by_byte():
    data, done, rest = feed_all([BODY[i : i + 1] for i in range(len(BODY))] + [b"NEXT"])
    assert data == BODY_DATA and done and rest == b"NEXT"


def test_chunked_random_splits():
    rng = random.Random(1234)
    for _ in range(300):
        body = bytearray()
        expected = bytearray()
        for _ in range(rng.randint(0, 6)):
            n = rng.randint(1, 300)
            chunk = rng.randbytes(n)
            ext = rng.choice(["", ";a=b", ' ;q="x y"', ";z"])
            body += f"{n:{rng.choice(['x', 'X', '04x'])}}{ext}\r\n".encode() + chunk + b"\r\n"
            expected += chunk
        body += b"0\r\n" + rng.choice([b"", b"T: v\r\n", b"A: 1\r\nB: 2\r\n"]) + b"\r\n"
        pieces, pos = [], 0
        while pos < len(body):
            n = rng.randint(1, 40)
            pieces.append(bytes(body[pos : pos + n]))
            pos += n
        data, done, rest = feed_all(pieces)
        assert data == expected and done and rest == b""


def test_chunked_many_chunks_in_one_buffer():
    body = b"1\r\na\r\n" * 500 + b"0\r\n\r\n"
    consumed, chunks, done = ChunkedDecoder().feed(body, 0)
    assert consumed == len(body) and done and len(chunks) == 500
    assert b"".join(chunks) == b"a" * 500


def test_chunked_size_limits():
    ok = b"0" * 14 + b"1\r\nx\r\n0\r\n\r\n"
    assert feed_all([ok])[:2] == (b"x", True)
    too_long = b"0" * 15 + b"1\r\nx\r\n0\r\n\r\n"
    with pytest.raises(ParseError) as ei:
        ChunkedDecoder().feed(too_long, 0)
    assert ei.value.status == 400
    # the largest 15-digit size is accepted (body not yet complete)
    consumed, chunks, done = ChunkedDecoder().feed(b"fffffffffffffff\r\nabc", 0)
    assert consumed == 20 and bytes(chunks[0]) == b"abc" and not done


def test_chunked_extension_bound():
    ext = b";" + b"e" * 4095  # 4096 bytes of extension
    assert feed_all([b"1" + ext + b"\r\nx\r\n0\r\n\r\n"])[:2] == (b"x", True)
    pieces = [bytes([c]) for c in b"1" + ext + b"\r\nx\r\n0\r\n\r\n"]
    assert feed_all(pieces)[:2] == (b"x", True)
    with pytest.raises(ParseError):
        ChunkedDecoder().feed(b"1" + ext + b"e\r\nx\r\n0\r\n\r\n", 0)
    d = ChunkedDecoder()
    with pytest.raises(ParseError):
        for c in b"1" + ext + b"e":
            d.feed(bytes([c]), 0)


def test_chunked_trailer_bound():
    ok = b"0\r\nX: " + b"a" * 8000 + b"\r\n\r\n"
    assert feed_all([ok])[:2] == (b"", True)
    with pytest.raises(ParseError):
        ChunkedDecoder().feed(b"0\r\nX: " + b"a" * 8200 + b"\r\n\r\n", 0)
    d = ChunkedDecoder()
    with pytest.raises(ParseError):
        for i in range(10):
            d.feed(b"0\r\n" if i == 0 else b"X: " + b"a" * 1000 + b"\r\n", 0)


@pytest.mark.parametrize(
    "body",
    [
        b"\r\n",
        b"x\r\n",
        b";ext\r\n",
        b"-1\r\n",
        b"+1\r\n",
        b"0x5\r\n",
        b"5\nhello\r\n",
        b"5\r\rhello\r\n",
        b"5\r\nhello\n0\r\n\r\n",
        b"5\r\nhelloX\r\n",
        b"5\r\nhello\r0\r\n\r\n",
        b"5 \r\nhello\r\n",
        b"5 x\r\n",
        b"5;a\x01b\r\n",
        b"5;a\nb\r\n",
        b"0\r\n\n",
        b"0\r\n\r\r",
        b"0\r\n X: folded\r\n\r\n",
        b"0\r\n: empty\r\n\r\n",
        b"0\r\nX Y: v\r\n\r\n",
        b"0\r\nX: a\x00b\r\n\r\n",
        b"0\r\nX: v\n\r\n",
        b"0\r\nX: v\r\r\n",
        b"0\r\nX\r\n\r\n",
    ],
)
def test_chunked_errors(body):
    with pytest.raises(ParseError) as ei:
        ChunkedDecoder().feed(body, 0)
    assert ei.value.status == 400
    # the same error split byte by byte
    d = ChunkedDecoder()
    with pytest.raises(ParseError):
        for c in body:
            d.feed(bytes([c]), 0)


def test_chunked_bws_before_extension():
    assert feed_all([b"3 \t;x=y\r\nabc\r\n0\r\n\r\n"])[:2] == (b"abc", True)


def test_chunked_error_is_sticky():
    d = ChunkedDecoder()
    with pytest.raises(ParseError):
        d.feed(b"zz", 0)
    with pytest.raises(ParseError):
        d.feed(b"5\r\nhello\r\n", 0)


def test_chunked_empty_and_offsets():
    d = ChunkedDecoder()
    assert d.feed(b"", 0) == (0, [], False)
    assert d.feed(b"abc", 3) == (0, [], False)
    consumed, chunks, done = d.feed(b"abc2\r\nhi\r\n", 3)
    assert consumed == 7 and bytes(chunks[0]) == b"hi" and not done


# ---- fuzz-ish robustness ----


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:
            del b[min(i, len(b) - 1)]
        elif op == 1:
            b.insert(i, rng.randrange(256))
        elif op == 2 and b:
            b[min(i, len(b) - 1)] = rng.choice(b"\r\n\0 \t:;%#?/0fF\x7f\x80")
        else:
            b[i:i] = rng.choice([b"\r\n", b"\r\n\r\n", b"%", b"Transfer-Encoding: chunked\r\n"])
    return bytes(b)


def test_fuzz_parse_head():
    rng = random.Random(7)
    seeds = [
        TYPICAL,
        req("Content-Length: 5", "Transfer-Encoding: chunked"),
        req("Connection: upgrade", "Upgrade: websocket", "Expect: 100-continue"),
        b"\r\nOPTIONS * HTTP/1.0\r\n\r\n",
        req(line="CONNECT h:1 HTTP/1.1"),
        req(line="GET http://a:1/b HTTP/1.0", host=False),
        req("Transfer-Encoding: gzip, chunked"),
        b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n",
        req(line="GET http://h/%41%zz?x HTTP/1.1"),
    ]
    for n in range(20000):
        if n % 4 == 0:
            raw = rng.randbytes(rng.randint(0, 300))
        else:
            raw = _mutate(rng, rng.choice(seeds))
        start = rng.randint(0, min(3, len(raw)))
        max_size = rng.choice([0, 1, 16, 64, 8192])
        max_count = rng.choice([0, 1, 3, 100])
        try:
            r = parse_head(raw, start, max_size, max_count)
        except ParseError as e:
            assert e.status in (400, 405, 414, 431, 501, 505)
            continue
        if r is not None:
            assert isinstance(r, tuple) and len(r) == 10
            assert start < r[0] <= len(raw)
            assert len(r[6]) <= max_count


def _outcome(raw: bytes, max_size: int, max_count: int):
    try:
        return parse_head(raw, 0, max_size, max_count)
    except ParseError as e:
        return e.status


def test_fuzz_prefixes_agree_with_whole():
    # Feeding more bytes never changes an answer other than None.
    rng = random.Random(3)
    seeds = [TYPICAL, req("Content-Length: 5", "X-A: b"), b"\r\nGET /%41 HTTP/1.0\r\n\r\n"]
    for _ in range(300):
        raw = _mutate(rng, rng.choice(seeds)) + b"GET / HTTP/1.1\r\n"
        max_size = rng.choice([40, 8192])
        whole = _outcome(raw, max_size, 5)
        for i in range(len(raw)):
            part = _outcome(raw[:i], max_size, 5)
            assert part is None or part == whole, (raw, i, part, whole)


def test_fuzz_chunked():
    rng = random.Random(11)
    seeds = [BODY, b"0\r\n\r\n", b"ff;x\r\n" + b"y" * 255 + b"\r\n0\r\nA: b\r\n\r\n"]
    for n in range(5000):
        raw = rng.randbytes(rng.randint(0, 100)) if n % 3 == 0 else _mutate(rng, rng.choice(seeds))
        d = ChunkedDecoder()
        pos = 0
        try:
            while pos < len(raw):
                step = rng.randint(1, 50)
                consumed, chunks, done = d.feed(raw[pos : pos + step], 0)
                assert all(isinstance(c, memoryview) for c in chunks)
                pos += step
                if done:
                    break
        except ParseError as e:
            assert e.status == 400
