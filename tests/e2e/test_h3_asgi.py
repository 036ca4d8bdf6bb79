"""The ASGI app served over HTTP/3 by a real ``fpy3 run`` process.

Three independent clients (aioquic, libcurl-gnutls, ngtcp2's gtlsclient; see
h3clients.py) talk to one module-wide server with HTTP/3 on. A test whose client is
not installed here is skipped with the reason.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import os
import time

import h3clients as kit
import pytest
from apps import CHUNK, stream_chunk
from harness import call

# Every test runs once per QUIC engine (msquic cases skip without libmsquic).
pytestmark = pytest.mark.usefixtures("quic_engine")

MiB = 1024 * 1024
H3_INTERNAL_ERROR = 0x102
H3_MESSAGE_ERROR = 0x10E


@pytest.fixture(scope="module")
def h3(module_server_factory, quic_engine):
    return module_server_factory(config={"http3": {"enabled": True, "engine": quic_engine}})


def aq(srv, method, path, **kw):
    kw.setdefault("cafile", str(srv.cafile))
    return call(kit.aioquic_request, srv.host, srv.port, method, path, **kw)


def curl(srv, path, **kw):
    return call(kit.curl_request, srv.url(path), cafile=str(srv.cafile), **kw)


def gtls(srv, path, **kw):
    return call(kit.gtlsclient_request, srv.host, srv.port, path, **kw)


def authority(srv) -> str:
    return f"[{srv.host}]:{srv.port}" if ":" in srv.host else f"{srv.host}:{srv.port}"


def assert_serving(srv) -> None:
    """The process is alive and a fresh HTTP/3 connection gets an answer."""
    assert srv.alive(), f"server exited with {srv.proc.returncode}:\n{srv.stderr()}"
    r = aq(srv, "GET", "/hello")
    assert (r.status, r.body) == (200, b"Hello, world!")


def assert_common_headers(r: kit.Response, ctype: str | None, length: int | None) -> None:
    assert r.http_version == "3"
    date = r.header("date")
    assert date is not None, r.headers
    # An IMF-fixdate near now (the server refreshes it once a second).
    sent = email.utils.parsedate_to_datetime(date).timestamp()
    assert abs(sent - time.time()) < 5 and date.endswith(" GMT"), date
    assert r.header("server") == "fpy3"
    assert r.header("content-type") == ctype
    if length is not None:
        assert r.header_all("content-length") == [str(length)]
    # Connection-specific fields are forbidden in HTTP/3 (RFC 9114, 4.2).
    for name in ("connection", "keep-alive", "transfer-encoding", "alt-svc"):
        assert r.header(name) is None, (name, r.headers)
    assert not any(n.startswith(":") for n, _ in r.headers)


# --- GET and POST with each client ------------------------------------------------------


def test_aioquic_get(h3):
    r = aq(h3, "GET", "/hello")
    assert (r.status, r.body) == (200, b"Hello, world!")
    assert_common_headers(r, "text/plain", 13)


def test_aioquic_post_echo(h3):
    body = os.urandom(200_000)
    r = aq(h3, "POST", "/echo", body=body, headers=[("content-type", "application/x-test")])
    assert (r.status, r.body) == (200, body)
    assert r.header("x-body-sha256") == hashlib.sha256(body).hexdigest()
    assert_common_headers(r, "application/octet-stream", len(body))


def test_curl_get(h3):
    r = curl(h3, "/hello")
    assert (r.status, r.body) == (200, b"Hello, world!")
    assert_common_headers(r, "text/plain", 13)


def test_curl_post_echo(h3):
    body = os.urandom(150_000)
    r = curl(h3, "/echo", method="POST", body=body)
    assert (r.status, r.body) == (200, body)
    assert r.header("x-body-sha256") == hashlib.sha256(body).hexdigest()
    assert_common_headers(r, "application/octet-stream", len(body))


def test_gtlsclient_get(h3):
    r = gtls(h3, "/hello")
    assert (r.status, r.body) == (200, b"Hello, world!")
    assert_common_headers(r, "text/plain", 13)


def test_gtlsclient_post_echo(h3, tmp_path):
    body = os.urandom(120_000)
    upload = tmp_path / "upload.bin"
    upload.write_bytes(body)
    r = gtls(h3, "/echo", body_file=str(upload))
    assert (r.status, r.body) == (200, body)
    assert r.header("x-body-sha256") == hashlib.sha256(body).hexdigest()
    assert_common_headers(r, "application/octet-stream", len(body))


def test_response_headers_kept_and_lowercased(h3):
    r = aq(h3, "GET", "/headers")
    assert (r.status, r.body) == (201, b"ok")
    # HTTP/3 field names are lowercase on the wire; repeated fields stay separate.
    assert r.header_all("set-cookie") == ["a=1", "b=2"]
    assert r.header("x-custom") == "Mixed-Case"


def test_response_without_content_length(h3):
    # The whole body came in one message: the core gives it a length, as on HTTP/1.1.
    r = aq(h3, "GET", "/nocl")
    assert (r.status, r.body) == (200, b"no content-length here")
    assert r.header_all("content-length") == ["22"]
    # A streamed one has none.
    r = aq(h3, "GET", "/stream?n=3&size=4")
    assert (r.status, r.body) == (200, b"0:..1:..2:..")
    assert r.header("content-length") is None


def test_status_204_has_no_body(h3):
    r = aq(h3, "GET", "/status?code=204")
    assert (r.status, r.body) == (204, b"")


def test_head_has_no_body(h3):
    # libcurl: aioquic checks content-length against the (empty) body even for HEAD.
    r = curl(h3, "/hello", method="HEAD")
    assert (r.status, r.body) == (200, b"")
    assert r.header("content-length") == "13"


# --- the ASGI scope ------------------------------------------------------------------


def aioquic_scope(srv, path, headers=()):
    """(scope, client's local UDP port) for one aioquic request."""

    async def go():
        async with kit._h3_connection(srv.host, srv.port, str(srv.cafile), 10, progress) as proto:
            local_port = proto._transport.get_extra_info("sockname")[1]
            ex = await kit._send_request(proto, "GET", path, authority(srv), list(headers), b"")
            return await kit._finish(proto, ex), local_port

    progress: list = []
    r, port = call(kit._run, go, 15, f"aioquic GET {path}", progress)
    assert r.status == 200, r
    return json.loads(r.body), port


def test_scope_fields(h3):
    scope, client_port = aioquic_scope(
        h3,
        "/scope/a%20b/%C3%A9?x=1&y=%20",
        [("x-first", "1"), ("x-dup", "a"), ("user-agent", "raw"), ("x-dup", "b")],
    )
    assert scope["type"] == "http"
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.4"}
    assert scope["http_version"] == "3"
    assert scope["method"] == "GET"
    assert scope["scheme"] == "https"
    assert scope["path"] == "/scope/a b/é"
    assert scope["raw_path"] == "/scope/a%20b/%C3%A9"  # bytes, dumped as latin-1
    assert scope["query_string"] == "x=1&y=%20"
    assert scope["root_path"] == ""
    # :authority becomes host; no pseudo-header reaches the app; order is kept.
    assert scope["headers"] == [
        ["host", authority(h3)],
        ["x-first", "1"],
        ["x-dup", "a"],
        ["user-agent", "raw"],
        ["x-dup", "b"],
    ]
    assert scope["client"] == ["127.0.0.1", client_port]
    assert scope["server"] == ["127.0.0.1", h3.port]
    assert scope["state"] == {"started": True}  # a copy of the lifespan state
    assert scope["extensions"]["http.response.trailers"] == {}
    tls = scope["extensions"]["tls"]  # the ASGI TLS extension, no client certificate here
    assert tls["tls_version"] == 0x0304 and tls["client_cert_chain"] == []


@pytest.mark.parametrize("path", ["/trailers", "/trailers?whole=1", "/trailers?cl=1"])
def test_response_trailers(h3, path):
    r = aq(h3, "GET", path)
    payload = b"body with trailers"
    assert (r.status, r.body) == (200, payload)
    assert r.trailers == [
        ("x-checksum", hashlib.sha256(payload).hexdigest()),
        ("x-count", str(len(payload))),
    ]


def test_scope_value_types(h3):
    types = json.loads(aq(h3, "GET", "/h3-scope-types?a=1").body)
    assert types["raw_path"] == types["query_string"] == "bytes"
    assert types["path"] == types["root_path"] == types["method"] == "str"
    assert types["headers[]"] == ["bytes,bytes"]
    assert types["state"] == "dict"


def test_scope_post_has_content_length(h3):
    r = aq(h3, "POST", "/scope?", body=b"ignored")
    scope = json.loads(r.body)
    assert scope["method"] == "POST"
    assert scope["query_string"] == ""
    assert ["content-length", "7"] in scope["headers"]


def test_scope_host_header_not_duplicated(h3):
    a = authority(h3).encode()
    headers = [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", a),
        (b":path", b"/scope"),
        (b"host", a),
    ]
    kind, r = call(kit.aioquic_raw_headers, h3.host, h3.port, headers, str(h3.cafile))
    assert kind == "response" and r.status == 200, (kind, r)
    names = [n for n, _ in json.loads(r.body)["headers"]]
    assert names.count("host") == 1 and not any(n.startswith(":") for n in names)


@pytest.mark.parametrize("client", ["curl", "gtlsclient"])
def test_scope_from_other_clients(h3, client):
    r = curl(h3, "/scope?c=1") if client == "curl" else gtls(h3, "/scope?c=1")
    scope = json.loads(r.body)
    assert (scope["http_version"], scope["scheme"], scope["method"]) == ("3", "https", "GET")
    assert scope["query_string"] == "c=1"
    assert ["host", authority(h3)] in scope["headers"]
    assert not any(n.startswith(":") for n, _ in scope["headers"])
    assert scope["client"][0] == "127.0.0.1" and scope["client"][1] not in (0, h3.port)


def test_scope_state_is_a_per_request_copy(h3):
    first = json.loads(aq(h3, "GET", "/state").body)["state"]
    second = json.loads(aq(h3, "GET", "/state").body)["state"]
    assert first == second == {"started": True}


# --- large bodies --------------------------------------------------------------------


def test_aioquic_upload_10mb(h3):
    body = os.urandom(10 * MiB)
    r = aq(h3, "POST", "/echo-info", body=body, timeout=30)
    info = json.loads(r.body)
    assert (info["len"], info["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
    assert info["messages"][-1]["more_body"] is False


def test_curl_upload_10mb(h3):
    body = os.urandom(10 * MiB)
    r = curl(h3, "/echo-info", method="POST", body=body, timeout=30)
    info = json.loads(r.body)
    assert (info["len"], info["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())


def download_digest(n: int) -> str:
    h = hashlib.sha256()
    for i in range(n):
        h.update(stream_chunk(i))
    return h.hexdigest()


@pytest.mark.parametrize("client", ["aioquic", "curl"])
def test_download_10mb(h3, client):
    n = 10 * MiB // CHUNK
    path = f"/h3-download?n={n}"
    r = aq(h3, "GET", path, timeout=30) if client == "aioquic" else curl(h3, path, timeout=30)
    assert r.status == 200
    assert r.header("content-length") == str(10 * MiB)
    assert len(r.body) == 10 * MiB
    assert hashlib.sha256(r.body).hexdigest() == download_digest(n)


# --- streaming responses ------------------------------------------------------------


def test_streaming_many_small_chunks(h3):
    r = aq(h3, "GET", "/stream?n=500&size=100")
    assert r.status == 200 and r.header("content-length") is None
    assert r.body == b"".join((b"%d:" % i).ljust(100, b".") for i in range(500))


@pytest.mark.parametrize("client", ["aioquic", "curl"])
def test_streaming_20mb_checksum(h3, client):
    n = 20 * MiB // CHUNK
    path = f"/big-stream?n={n}&progress=big-{client}"
    r = aq(h3, "GET", path, timeout=40) if client == "aioquic" else curl(h3, path, timeout=40)
    assert r.status == 200
    assert len(r.body) == n * CHUNK
    assert hashlib.sha256(r.body).hexdigest() == download_digest(n)


def test_backpressure_holds_the_app_while_the_client_reads_nothing(h3):
    n = 20 * MiB // CHUNK
    name = "bp-progress"
    progress_file = h3.shared / name
    # About a stream window (1 MiB by default) ahead of the client, plus slack.
    bound = 2 * MiB // CHUNK

    def app_progress():
        text = progress_file.read_text() if progress_file.exists() else ""
        return (int(text.split()[0]) if text.strip() else 0), "done" in text

    async def stalled(deadline: float, window: float = 0.5):
        # The app's chunk count stops moving (for ``window`` seconds) once it is held.
        last, since = None, time.monotonic()
        while time.monotonic() < deadline:
            now = app_progress()
            if now != last:
                last, since = now, time.monotonic()
            elif now[0] > 0 and time.monotonic() - since >= window:
                return now
            await asyncio.sleep(0.02)
        raise AssertionError(f"app progress never settled: {last} of {n} chunks")

    async def go():
        async with kit._h3_connection(h3.host, h3.port, str(h3.cafile), 30, progress) as proto:
            proto._transport.pause_reading()  # nothing is read, so nothing is acked
            path = f"/big-stream?n={n}&progress={name}"
            ex = await kit._send_request(proto, "GET", path, authority(h3), (), b"")
            held = await stalled(time.monotonic() + 15)
            proto._transport.resume_reading()
            return await kit._finish(proto, ex), held

    progress: list = []
    r, (held, done) = call(kit._run, go, 45, "aioquic paused reader", progress)
    assert not done and 0 < held <= bound, f"app sent {held} of {n} chunks to a stalled client"
    assert r.status == 200 and len(r.body) == n * CHUNK
    assert hashlib.sha256(r.body).hexdigest() == download_digest(n)
    assert app_progress() == (n, True)


# --- many streams and connections ----------------------------------------------------


def test_100_concurrent_streams_one_connection(h3):
    reqs = [("POST", f"/id?id={i}", b"body-%d" % i) for i in range(100)]
    rs = call(kit.aioquic_many, h3.host, h3.port, reqs, str(h3.cafile), connections=1)
    assert [(r.status, r.body) for r in rs] == [
        (200, b"id:%d:body-%d" % (i, i)) for i in range(100)
    ]


def test_50_connections(h3):
    reqs = [("GET", f"/id?id={i}", b"") for i in range(100)]
    rs = call(kit.aioquic_many, h3.host, h3.port, reqs, str(h3.cafile), connections=50)
    assert [(r.status, r.body) for r in rs] == [(200, b"id:%d:" % i) for i in range(100)]


def test_more_streams_than_the_limit(h3):
    # max_concurrent_streams is 100: the rest wait for stream credit, then succeed.
    reqs = [("GET", f"/id?id={i}", b"") for i in range(250)]
    rs = call(kit.aioquic_many, h3.host, h3.port, reqs, str(h3.cafile), connections=1)
    assert [r.body for r in rs] == [b"id:%d:" % i for i in range(250)]


# --- client abort ---------------------------------------------------------------------


def test_client_abort_mid_body_app_sees_disconnect(h3):
    name = "abort-mid-body"
    r = call(
        kit.aioquic_abort_upload,
        h3.host,
        h3.port,
        f"/h3-record-receive?name={name}",
        str(h3.cafile),
        send_bytes=100_000,
        declared_length=1_000_000,
        followup_path="/hello",
    )
    # The same connection still carries requests after the reset stream.
    assert (r.status, r.body) == (200, b"Hello, world!")
    h3.wait_record(name, "http.disconnect")
    lines = h3.record(name)
    assert lines[-1] == "http.disconnect" and lines.count("http.disconnect") == 1, lines
    received = [line.split() for line in lines[:-1]]
    # Whatever arrived before the reset came with more_body, never as a complete body.
    assert all(p[0] == "http.request" and p[2] == "True" for p in received), lines
    assert sum(int(p[1]) for p in received) <= 100_000, lines
    assert_serving(h3)


def test_client_abort_before_any_body(h3):
    name = "abort-no-body"
    call(
        kit.aioquic_abort_upload,
        h3.host,
        h3.port,
        f"/h3-record-receive?name={name}",
        str(h3.cafile),
        send_bytes=0,
        declared_length=5000,
    )
    h3.wait_record(name, "http.disconnect")
    assert h3.record(name) == ["http.disconnect"]
    assert_serving(h3)


# --- app errors ---------------------------------------------------------------------------


def test_exception_before_start_gives_500(h3):
    r = aq(h3, "GET", "/raise-before")
    assert (r.status, r.body) == (500, b"Internal Server Error\n")
    assert_common_headers(r, "text/plain; charset=utf-8", len(r.body))
    assert_serving(h3)


def test_exception_after_start_resets_stream(h3):
    with pytest.raises(kit.StreamReset) as e:
        aq(h3, "GET", "/raise-after")
    assert e.value.error_code == H3_INTERNAL_ERROR, str(e.value)
    assert_serving(h3)


def test_exception_after_start_raw(h3):
    a = authority(h3).encode()
    headers = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", a)]
    headers.append((b":path", b"/raise-after"))
    kind, code = call(kit.aioquic_raw_headers, h3.host, h3.port, headers, str(h3.cafile))
    assert (kind, code) == ("reset", H3_INTERNAL_ERROR), kit.h3_error_name(code)


def test_incomplete_response_resets_stream(h3):
    # Fewer bytes than the declared content-length after the head went out: reset.
    with pytest.raises(kit.StreamReset) as e:
        aq(h3, "GET", "/cl-less-stream")
    assert e.value.error_code == H3_INTERNAL_ERROR, str(e.value)
    # In one message, nothing went out yet: a 500.
    r = aq(h3, "GET", "/cl-less")
    assert (r.status, r.body) == (500, b"Internal Server Error\n")
    assert_serving(h3)


def test_more_than_content_length_never_sent(h3):
    # The app sends 20 bytes after declaring 10: the stream must not carry them.
    try:
        r = aq(h3, "GET", "/cl-more")
    except kit.StreamReset as e:
        assert e.error_code == H3_INTERNAL_ERROR, str(e)
    else:
        assert r.status == 500 or r.body == b"0123456789", r
    assert_serving(h3)


def test_double_start_fails_the_request(h3):
    # The first head is held until a body, so a clean 500 is as right as a reset.
    try:
        r = aq(h3, "GET", "/double-start")
    except kit.StreamReset as e:
        assert e.error_code == H3_INTERNAL_ERROR, str(e)
    else:
        assert r.status == 500 and r.body != b"second", r
    assert_serving(h3)


def test_body_after_final_keeps_the_complete_response(h3):
    r = aq(h3, "GET", "/body-after-final")
    assert (r.status, r.body) == (200, b"complete")
    assert_serving(h3)


def test_many_app_errors_on_one_connection(h3):
    # Failing requests reset only their own streams; the connection lives on.
    paths = ["/raise-before", "/raise-after", "/double-start", "/hello"] * 10
    expect = {
        "/raise-before": ("ok", 500, b"Internal Server Error\n"),
        "/raise-after": ("reset", H3_INTERNAL_ERROR),
        "/double-start": None,  # a reset or a clean 500, see above
        "/hello": ("ok", 200, b"Hello, world!"),
    }

    def outcome(ex):
        if ex.ended:
            return ("ok", ex.status, bytes(ex.body))
        return ("reset", ex.reset_code)

    async def go():
        async with kit._h3_connection(h3.host, h3.port, str(h3.cafile), 15, progress) as proto:
            exs = [await kit._send_request(proto, "GET", p, authority(h3), (), b"") for p in paths]
            for ex in exs:
                await ex.done.wait()
            return [outcome(ex) for ex in exs], proto.terminated

    progress: list = []
    got, terminated = call(kit._run, go, 20, "aioquic app errors", progress)
    assert terminated is None
    double = {("reset", H3_INTERNAL_ERROR), ("ok", 500, b"Internal Server Error\n")}
    for path, result in zip(paths, got, strict=True):
        assert result in (double if expect[path] is None else {expect[path]}), (path, result)
    assert_serving(h3)


# --- malformed requests -----------------------------------------------------------------


def req_headers(srv, drop=(), extra=()):
    base = [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", authority(srv).encode()),
        (b":path", b"/hello"),
    ]
    return [(n, v) for n, v in base if n not in drop] + list(extra)


MALFORMED = {
    "missing-path": {"drop": [b":path"]},
    "missing-method": {"drop": [b":method"]},
    "uppercase-name": {"extra": [(b"X-Upper", b"1")]},
    "connection": {"extra": [(b"connection", b"keep-alive")]},
    "keep-alive": {"extra": [(b"keep-alive", b"timeout=5")]},
    "transfer-encoding": {"extra": [(b"transfer-encoding", b"chunked")]},
    "upgrade": {"extra": [(b"upgrade", b"websocket")]},
    "te-not-trailers": {"extra": [(b"te", b"gzip")]},
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request_reset_with_message_error(h3, case):
    headers = req_headers(h3, **MALFORMED[case])
    kind, code = call(kit.aioquic_raw_headers, h3.host, h3.port, headers, str(h3.cafile))
    got = kit.h3_error_name(code) if isinstance(code, int) else code
    assert (kind, code) == ("reset", H3_MESSAGE_ERROR), f"{kind}: {got}"
    assert_serving(h3)


def test_te_trailers_is_allowed(h3):
    headers = req_headers(h3, extra=[(b"te", b"trailers")])
    kind, r = call(kit.aioquic_raw_headers, h3.host, h3.port, headers, str(h3.cafile))
    assert kind == "response" and (r.status, r.body) == (200, b"Hello, world!")


def test_header_section_too_large_gets_431(h3):
    # limits.max_header_size defaults to 32768.
    headers = req_headers(h3, extra=[(b"x-big", b"a" * 40_000)])
    kind, r = call(kit.aioquic_raw_headers, h3.host, h3.port, headers, str(h3.cafile))
    assert kind == "response" and r.status == 431, (kind, r)
    assert_serving(h3)


def test_too_many_header_fields_gets_431(h3):
    # limits.max_header_count defaults to 100.
    extra = [(b"x-h%d" % i, b"v") for i in range(150)]
    kind, r = call(kit.aioquic_raw_headers, h3.host, h3.port, req_headers(h3, extra=extra), None)
    assert kind == "response" and r.status == 431, (kind, r)
    assert_serving(h3)
