"""HTTP/1.1 probe table: what a hostile or broken client sends, what RFC 9110/9112 ask
for, and what fpy3 does. The table below is the source; each row is one test.

Each probe sends its bytes on a fresh cleartext connection to a real server and
records an observation: the status and whether the connection was closed after the
response (``kept alive`` is proven by a second request answered on it), plus what
the probe checks besides. The test asserts the observation equals the expectation.

Print the table with the observed results (starts its own server, about 15 s):

    .venv/bin/python tests/e2e/test_http1_probes.py
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))

from harness import RawConn, Response, wait_until  # noqa: E402

# Short deadlines so the timing probes finish quickly; the defaults are 10/30/30 s.
TIMEOUTS = {"header_timeout": 1.5, "body_timeout": 1.5, "send_timeout": 1.5}
CONFIG = {
    "http1": TIMEOUTS,
    "tls": {"handshake_timeout": 1.0},
    "limits": {"max_connections": 0},
}

H = b"Host: x\r\n"


@dataclass(frozen=True)
class Probe:
    name: str
    sent: bytes  # the bytes sent first
    rfc: str  # where the expectation comes from
    expect: str  # the observation the RFC asks for
    run: Callable[[RawConn, Probe], str] | None = None  # default: one response


def _closed_or_alive(conn: RawConn) -> str:
    """After a response: the server closed, or it answers a second request."""
    if conn.readable_within(0.5) and conn.eof and not conn.buf:
        return "closed"
    if conn.buf:
        return f"extra bytes {bytes(conn.buf[:40])!r}"
    if not conn.try_send(b"GET /hello HTTP/1.1\r\n" + H + b"\r\n"):
        return "closed"
    try:
        resp = conn.read_response()
    except AssertionError:
        return "closed"
    return "kept alive" if resp.status == 200 and resp.body == b"Hello, world!" else "desync"


def _response(conn: RawConn, probe: Probe, check: Callable[[Response], str] | None = None) -> str:
    conn.try_send(probe.sent)
    resp = conn.read_response()
    extra = check(resp) if check else ""
    return f"{resp.status}, {_closed_or_alive(conn)}" + (f", {extra}" if extra else "")


def _scope_host(resp: Response) -> str:
    headers = dict(json.loads(resp.body)["headers"])
    return f"host={headers.get('host')}"


def _allow(resp: Response) -> str:
    return f"allow={'CONNECT' not in (resp.header('allow') or 'CONNECT')}"


def _version(resp: Response) -> str:
    return resp.version


def _conn_header(resp: Response) -> str:
    return f"connection: {resp.header('connection')}"


def _stall(conn: RawConn, probe: Probe) -> str:
    """Send part of a request, then nothing: the deadline must answer."""
    conn.try_send(probe.sent)
    started = time.monotonic()
    resp = conn.read_response(timeout=10)
    waited = time.monotonic() - started
    rest = conn.read_until_close()
    state = "closed" if not rest else "extra bytes"
    return f"{resp.status}, {state}, after {'deadline' if waited >= 1.0 else 'too soon'}"


def _trickle(conn: RawConn, probe: Probe) -> str:
    """One body byte at a time (slow POST): no progress, so the body deadline answers."""
    conn.try_send(probe.sent)
    for _ in range(40):  # bounded: 40 bytes, paced by waiting for the answer
        if conn.readable_within(0.25):
            break
        if not conn.try_send(b"a"):
            break
    resp = conn.read_response()
    return f"{resp.status}, {'closed' if not conn.read_until_close() else 'extra bytes'}"


def _tcp_state(sock: socket.socket) -> int:
    return struct.unpack("B", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))[0]


def _not_reading(conn: RawConn, probe: Probe) -> str:
    """Ask for a large response and never read it: the send deadline drops the
    connection (the socket leaves ESTABLISHED: reset or closed by the server)."""
    conn.try_send(probe.sent)
    established = 1
    gone = wait_until(
        lambda: _tcp_state(conn.sock) != established, timeout=15, message="still established"
    )
    return "dropped" if gone else "still open"


PROBES = [
    # --- framing: Transfer-Encoding (RFC 9112 6) ---
    Probe(
        "te-chunked-not-final",
        b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        "RFC 9112 6.3 (4): chunked not final: 400 and close",
        "400, closed",
    ),
    Probe(
        "te-identity",
        b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n\r\n",
        "RFC 9112 6.3 (4): chunked not final: 400 and close",
        "400, closed",
    ),
    Probe(
        "te-chunked-twice",
        b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        "RFC 9112 7: chunked MUST NOT be applied twice",
        "400, closed",
    ),
    Probe(
        "te-gzip-then-chunked",
        b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        "RFC 9112 6.1: a coding not understood: 501 (then close: framing unusable)",
        "501, closed",
    ),
    Probe(
        "te-and-content-length",
        b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "RFC 9112 6.3 (3): MAY reject; smuggling vector: 400 and close",
        "400, closed",
    ),
    Probe(
        "content-length-list",
        b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 1,1\r\n\r\nx",
        "RFC 9112 6.3 (5): invalid Content-Length: 400 and close",
        "400, closed",
    ),
    # --- Host (RFC 9112 3.2, RFC 9110 7.2) ---
    Probe(
        "host-with-space",
        b"GET /hello HTTP/1.1\r\nHost: a b\r\n\r\n",
        "RFC 9112 3.2: invalid Host value: 400",
        "400, closed",
    ),
    Probe(
        "host-path-userinfo",
        b"GET /hello HTTP/1.1\r\nHost: a/b@c\r\n\r\n",
        "RFC 9112 3.2: Host = uri-host [':' port]: 400",
        "400, closed",
    ),
    Probe(
        "host-bad-port",
        b"GET /hello HTTP/1.1\r\nHost: h:80x\r\n\r\n",
        "RFC 9112 3.2: port = *DIGIT: 400",
        "400, closed",
    ),
    Probe(
        "host-missing",
        b"GET /hello HTTP/1.1\r\nX-A: 1\r\n\r\n",
        "RFC 9112 3.2: HTTP/1.1 without Host: 400",
        "400, closed",
    ),
    Probe(
        "host-twice",
        b"GET /hello HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        "RFC 9112 3.2: more than one Host: 400",
        "400, closed",
    ),
    Probe(
        "host-ipv6-literal",
        b"GET /scope HTTP/1.1\r\nHost: [::1]:8443\r\n\r\n",
        "RFC 9110 7.2: IP-literal with port is valid",
        "200, kept alive, host=[::1]:8443",
        lambda c, p: _response(c, p, _scope_host),
    ),
    # --- request target (RFC 9112 3.2) ---
    Probe(
        "absolute-form",
        b"GET http://real.example:81/scope?q=1 HTTP/1.1\r\nHost: other\r\n\r\n",
        "RFC 9112 3.2.2: the target's authority replaces Host",
        "200, kept alive, host=real.example:81",
        lambda c, p: _response(c, p, _scope_host),
    ),
    Probe(
        "absolute-form-userinfo",
        b"GET http://user@real.example/ HTTP/1.1\r\n" + H + b"\r\n",
        "RFC 9110 4.2.4: userinfo in an http URI is an error",
        "400, closed",
    ),
    Probe(
        "fragment-in-target",
        b"GET /hello#frag HTTP/1.1\r\n" + H + b"\r\n",
        "RFC 9112 3.2: request-target has no fragment",
        "400, closed",
    ),
    Probe(
        "connect",
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        "RFC 9110 9.3.6: a tunnel is no ASGI request: 405 with Allow (15.5.6)",
        "405, closed, allow=True",
        lambda c, p: _response(c, p, _allow),
    ),
    # --- version (RFC 9110 6.2, 15.6.6) ---
    Probe(
        "http-1.2",
        b"GET /hello HTTP/1.2\r\n" + H + b"\r\n",
        "RFC 9110 6.2: a higher 1.x minor is served as HTTP/1.1",
        "200, kept alive, HTTP/1.1",
        lambda c, p: _response(c, p, _version),
    ),
    Probe(
        "http-1.9",
        b"GET /hello HTTP/1.9\r\n" + H + b"\r\n",
        "RFC 9110 6.2: a higher 1.x minor is served as HTTP/1.1",
        "200, kept alive, HTTP/1.1",
        lambda c, p: _response(c, p, _version),
    ),
    Probe(
        "http-2.0-line",
        b"GET /hello HTTP/2.0\r\n" + H + b"\r\n",
        "RFC 9110 15.6.6: major version not supported: 505",
        "505, closed",
    ),
    # --- message syntax (RFC 9112 2, 5) ---
    Probe(
        "leading-empty-line",
        b"\r\nGET /hello HTTP/1.1\r\n" + H + b"\r\n",
        "RFC 9112 2.2: SHOULD ignore an empty line before the request line",
        "200, kept alive",
    ),
    Probe(
        "bare-lf",
        b"GET /hello HTTP/1.1\n" + H + b"\r\n",
        "RFC 9112 2.2: bare LF MAY be accepted; rejected here",
        "400, closed",
    ),
    Probe(
        "obs-fold",
        b"GET /hello HTTP/1.1\r\n" + H + b"X-A: a\r\n b\r\n\r\n",
        "RFC 9112 5.2: obs-fold in a request: 400 (or replace with SP)",
        "400, closed",
    ),
    Probe(
        "space-before-colon",
        b"GET /hello HTTP/1.1\r\n" + H + b"X-A : a\r\n\r\n",
        "RFC 9112 5.1: whitespace before the colon MUST get 400",
        "400, closed",
    ),
    # --- Expect (RFC 9110 10.1.1) ---
    Probe(
        "expect-body-unread",
        b"POST /no-read HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nExpect: 100-continue\r\n\r\n",
        "RFC 9110 10.1.1: final response before the body: say whether the connection "
        "closes (it does)",
        "200, closed, connection: close",
        lambda c, p: _response(c, p, _conn_header),
    ),
    # --- deadlines (issue 11; http1.header_timeout, body_timeout, send_timeout) ---
    Probe(
        "head-stalled",
        b"GET /hello HTTP/1.1\r\n" + H,
        "RFC 9110 15.5.9: 408 when the head does not arrive in time",
        "408, closed, after deadline",
        _stall,
    ),
    Probe(
        "body-stalled",
        b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 10\r\n\r\nab",
        "RFC 9110 15.5.9: 408 when the body stops arriving (http1.body_timeout)",
        "408, closed, after deadline",
        _stall,
    ),
    Probe(
        "body-trickled",
        b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 100000\r\n\r\n",
        "slow POST: single bytes are no progress: 408 (http1.body_timeout)",
        "408, closed",
        _trickle,
    ),
    Probe(
        "response-not-read",
        b"GET /big-stream?n=4000&progress=probe HTTP/1.1\r\n" + H + b"\r\n",
        "a client that stops reading is dropped (http1.send_timeout)",
        "dropped",
        _not_reading,
    ),
]


def run_probe(server, probe: Probe) -> str:
    with RawConn(server.host, server.http_port, rcvbuf=4096) as conn:
        return (probe.run or _response)(conn, probe)


@pytest.fixture(scope="module")
def probed(module_server_factory):
    return module_server_factory(config=CONFIG, http=True)


@pytest.mark.parametrize("probe", PROBES, ids=[p.name for p in PROBES])
def test_probe(probed, probe):
    assert run_probe(probed, probe) == probe.expect


@pytest.mark.parametrize("sent", [b"", b"\x16\x03\x01\x02\x00\x01"], ids=["nothing", "partial"])
def test_tls_handshake_timeout(probed, sent):
    # tls.handshake_timeout (1 s here; uvloop alone would wait 60 s): closed in time.
    with socket.create_connection((probed.host, probed.port), timeout=10) as sock:
        sock.sendall(sent)
        started = time.monotonic()
        try:
            data = sock.recv(4096)
        except ConnectionResetError:
            data = b""
        waited = time.monotonic() - started
    assert data == b"" and 0.8 <= waited < 5, waited


def test_probe_names_unique():
    assert len({p.name for p in PROBES}) == len(PROBES)


def table(server) -> str:
    rows = ["| probe | bytes sent | expected (RFC) | result |", "|---|---|---|---|"]
    for probe in PROBES:
        try:
            got = run_probe(server, probe)
        except Exception as exc:  # the table still gets printed
            got = f"error: {exc}"
        mark = "pass" if got == probe.expect else "FAIL"
        sent = repr(probe.sent)[2:-1].replace("|", "\\|")
        rows.append(f"| {probe.name} | `{sent}` | {probe.rfc}: {probe.expect} | {mark}: {got} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import tempfile

    from harness import ServerFactory

    with tempfile.TemporaryDirectory(prefix="fpy3-probes-") as tmp:
        count = iter(range(1000))
        factory = ServerFactory(lambda: Path(tmp) / f"srv{next(count)}")
        try:
            print(table(factory(config=CONFIG, http=True)))
        finally:
            factory.cleanup()
