"""The response rules of the ASGI core, the same on every protocol.

Each test runs over HTTP/1.1 in cleartext, HTTP/1.1 over TLS, HTTP/2 over TLS (ALPN)
and in cleartext (prior knowledge), and HTTP/3 on both QUIC engines (the msquic cases
skip without libmsquic), against one real ``fpy3 run`` process per engine: keep-alive past background work, bodyless responses, bytes-like
bodies, what the app may send as status and headers, Server and Date from the app,
and ``send()`` after the client went away.
"""

from __future__ import annotations

import dataclasses

import h3clients as kit
import pytest
from h2clients import H2Raw
from harness import call, msquic_unavailable, wait_until

PROTOCOLS = ["h1", "h1-tls", "h2", "h2c", "h3-ngtcp2", "h3-msquic"]


@pytest.fixture(scope="module")
def servers(module_server_factory):
    made: dict[str, object] = {}

    def get(engine: str):
        if engine not in made:
            made[engine] = module_server_factory(
                http=True, config={"http3": {"enabled": True, "engine": engine}}
            )
        return made[engine]

    return get


@pytest.fixture(params=PROTOCOLS)
def proto(request) -> str:
    if request.param == "h3-msquic" and (reason := msquic_unavailable()):
        pytest.skip(reason)
    return request.param


@pytest.fixture
def srv(proto, servers):
    return servers("msquic" if proto == "h3-msquic" else "ngtcp2")


@dataclasses.dataclass
class Result:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    complete: bool = True
    reset: int | None = None  # HTTP/2 and HTTP/3: the stream was reset with this code

    def all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name]

    def one(self, name: str) -> str | None:
        values = self.all(name)
        assert len(values) <= 1, (name, self.headers)
        return values[0] if values else None


def h1_request(method: str, path: str) -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()


def h2_connect(proto: str, srv) -> H2Raw:
    if proto == "h2":
        return H2Raw(srv.host, srv.port, str(srv.cafile))
    return H2Raw(srv.host, srv.http_port, tls=False)


def fetch(proto: str, srv, method: str, path: str, check_keepalive: bool = True) -> Result:
    """One request; over HTTP/1.1 and HTTP/2 the connection must then still serve a
    request (the response was framed right and nothing of a dropped body is left on the
    wire)."""
    if proto in ("h2", "h2c"):
        with h2_connect(proto, srv) as h2:
            st = h2.response(h2.request(method, path))
            result = Result(st.status, st.headers[1:], bytes(st.data), st.ended, st.reset)
            if check_keepalive:
                again = h2.get("/hello")
                assert (again.status, bytes(again.data)) == (200, b"Hello, world!"), again
        return result
    if proto.startswith("h3"):
        try:
            r = call(kit.aioquic_request, srv.host, srv.port, method, path, cafile=str(srv.cafile))
        except kit.StreamReset as exc:
            return Result(0, [], b"", False, exc.error_code)
        return Result(r.status, [(n.lower(), v) for n, v in r.headers], r.body)
    with srv.connect(tls=proto == "h1-tls") as conn:
        conn.send(h1_request(method, path))
        r = conn.read_response(method=method, allow_incomplete=True)
        result = Result(r.status, [(n.lower(), v) for n, v in r.headers], r.body, r.complete)
        if check_keepalive and r.complete and result.one("connection") != "close":
            conn.send(h1_request("GET", "/hello"))
            again = conn.read_response()
            assert (again.status, again.body) == (200, b"Hello, world!"), again
    return result


# --- 1. keep-alive is not held up by background work ---------------------------------------


def test_next_request_does_not_wait_for_background_work(proto, srv, request):
    flag = f"bg-{proto}-{request.node.name}".replace("[", "-").replace("]", "")
    path = f"/background?flag={flag}"
    try:
        if proto in ("h2", "h2c"):
            with h2_connect(proto, srv) as h2:
                st = h2.get(path)
                assert (st.status, bytes(st.data)) == (200, b"responded")
                st = h2.get("/hello", timeout=8)
                assert (st.status, bytes(st.data)) == (200, b"Hello, world!")
        elif proto.startswith("h3"):
            rs = call(
                kit.aioquic_sequence,
                srv.host,
                srv.port,
                [("GET", path), ("GET", "/hello")],
                cafile=str(srv.cafile),
                timeout=8,
            )
            assert [(r.status, r.body) for r in rs] == [
                (200, b"responded"),
                (200, b"Hello, world!"),
            ]
        else:
            with srv.connect(tls=proto == "h1-tls", timeout=8) as conn:
                conn.send(h1_request("GET", path))
                r = conn.read_response()
                assert (r.status, r.body) == (200, b"responded")
                # The app is still running its background job (it waits for the flag,
                # created only below): the next request must be answered meanwhile.
                conn.send(h1_request("GET", "/hello"))
                r = conn.read_response(timeout=8)
                assert (r.status, r.body) == (200, b"Hello, world!")
        assert srv.record(flag + "-log") == ["background-started"]
    finally:
        srv.flag(flag)
    srv.wait_record(flag + "-log", "background-finished")


# --- 2. bodyless responses ------------------------------------------------------------------


def test_head_with_declared_length_and_empty_body(proto, srv):
    # Starlette's FileResponse: Content-Length and an empty body on HEAD.
    offset = srv.stderr_size()
    r = fetch(proto, srv, "HEAD", "/file")
    assert r.status == 200 and r.body == b"" and r.complete
    assert r.one("content-length") == "1230"
    assert r.one("transfer-encoding") is None
    r = fetch(proto, srv, "GET", "/file")
    assert (r.status, len(r.body), r.one("content-length")) == (200, 1230, "1230")
    assert "shorter" not in srv.stderr_since(offset).lower()


def test_head_gets_the_length_a_get_would(proto, srv):
    r = fetch(proto, srv, "HEAD", "/hello")
    assert (r.status, r.body, r.one("content-length")) == (200, b"", "13")
    r = fetch(proto, srv, "HEAD", "/nocl")
    assert (r.status, r.body, r.one("content-length")) == (200, b"", "22")
    r = fetch(proto, srv, "HEAD", "/stream?n=3")
    assert (r.status, r.body) == (200, b"")
    assert r.one("transfer-encoding") is None and r.one("content-length") is None


@pytest.mark.parametrize("code", [204, 304])
def test_app_body_on_204_and_304_is_never_sent(proto, srv, code):
    r = fetch(proto, srv, "GET", f"/bodyless?code={code}")
    assert (r.status, r.body, r.reset) == (code, b"", None)
    assert r.one("etag") == '"v1"'
    assert r.one("content-length") is None and r.one("transfer-encoding") is None


def test_304_keeps_its_declared_length_and_204_drops_it(proto, srv):
    # RFC 9110 8.6: a 304 may carry the length a 200 would have; a 204 never has one.
    r = fetch(proto, srv, "GET", "/bodyless?code=304&cl=42")
    assert (r.status, r.body, r.reset) == (304, b"", None)
    assert r.one("content-length") == "42"
    r = fetch(proto, srv, "GET", "/bodyless?code=204&cl=8")
    assert (r.status, r.body, r.reset) == (204, b"", None)
    assert r.one("content-length") is None


# --- 3. any bytes-like body -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "memoryview-slice", "array"])
@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_bytes_like_bodies(proto, srv, kind, streamed):
    path = f"/body-type?kind={kind}" + ("&stream=1" if streamed else "")
    r = fetch(proto, srv, "GET", path)
    assert (r.status, r.body, r.reset) == (200, b"hello bytes-like world", None)


# --- 4. what the app may send ----------------------------------------------------------------


def assert_app_error(proto, srv, path: str, needle: str) -> None:
    offset = srv.stderr_size()
    r = fetch(proto, srv, "GET", path)
    assert (r.status, r.body) == (500, b"Internal Server Error\n"), r
    assert not any(n.startswith("x-split") or "evil" in v for n, v in r.headers), r.headers
    assert r.one("set-cookie") is None
    srv.wait_stderr("Exception in ASGI application", offset)
    assert needle in srv.stderr_since(offset), srv.stderr_since(offset)[-2000:]


@pytest.mark.parametrize(
    "value", ["true", "minus1", "99", "100", "103", "199", "600", "1000", "str", "float"]
)
def test_invalid_status_is_an_app_error(proto, srv, value):
    assert_app_error(proto, srv, f"/bad-status?v={value}", "status")


@pytest.mark.parametrize(
    "case",
    [
        "space-name",
        "colon-name",
        "empty-name",
        "cr-value",
        "lf-value",
        "crlf-value",
        "nul-value",
        "lf-name",
        "str-name",
        "str-value",
    ],
)
def test_invalid_header_is_an_app_error(proto, srv, case):
    assert_app_error(proto, srv, f"/bad-header?v={case}", "header")


@pytest.mark.parametrize("case", ["cl-letters", "cl-negative", "cl-duplicate", "cl-two-values"])
def test_invalid_content_length_is_an_app_error(proto, srv, case):
    assert_app_error(proto, srv, f"/bad-header?v={case}", "Content-Length")


def test_app_server_and_date_replace_the_defaults(proto, srv):
    r = fetch(proto, srv, "GET", "/server-date")
    assert (r.status, r.body) == (200, b"own headers")
    assert r.all("server") == ["my-app/1.0"]
    assert r.all("date") == ["Mon, 01 Jan 2024 00:00:00 GMT"]
    # Without them, the server's own, once each.
    r = fetch(proto, srv, "GET", "/hello")
    assert r.all("server") == ["fpy3"] and len(r.all("date")) == 1


# --- 6. send() after the client went away ------------------------------------------------------


def test_send_after_disconnect_raises_oserror(proto, srv, request):
    name = f"sse-{proto}-{request.node.name}".replace("[", "-").replace("]", "")
    if proto in ("h2", "h2c"):
        with h2_connect(proto, srv) as h2:
            st = h2.streams[h2.request("GET", f"/sse?name={name}")]
            h2.wait(lambda: b"data: 2\n\n" in st.data, message="three events")
    elif proto.startswith("h3"):
        got = call(
            kit.aioquic_read_then_close,
            srv.host,
            srv.port,
            f"/sse?name={name}",
            cafile=str(srv.cafile),
            min_bytes=20,
        )
        assert got >= 20
    else:
        with srv.connect(tls=proto == "h1-tls") as conn:
            conn.send(h1_request("GET", f"/sse?name={name}"))
            conn.read_until(b"data: 2\n\n")
    wait_until(lambda: srv.record(name), message=lambda: f"no record from {name}")
    line = srv.record(name)[0]
    assert line.startswith("ClientDisconnected True after "), line
