"""WebSocket over HTTP/1.1 (RFC 6455) against a real fpy3 process.

The ``websockets`` library is the real client (cleartext and TLS); raw sockets send
the frames it would refuse to send, and each such case asserts its close code.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal

import pytest
from harness import wait_until
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect
from wsraw import RawWS, close_payload, frame

MAX_MESSAGE = 64 * 1024


@pytest.fixture(scope="module")
def ws_server(module_server_factory):
    return module_server_factory(
        app="ws_apps:app",
        http=True,
        config={"websocket": {"max_message_size": MAX_MESSAGE}},
    )


def ws_url(srv, path: str, tls: bool = False) -> str:
    if tls:
        return f"wss://{srv.host}:{srv.port}{path}"
    return f"ws://{srv.host}:{srv.http_port}{path}"


def ws_connect(srv, path: str = "/echo", tls: bool = False, **kw):
    kw.setdefault("open_timeout", 10)
    kw.setdefault("close_timeout", 10)
    if tls:
        kw["ssl"] = srv.ssl_context()
    return connect(ws_url(srv, path, tls), **kw)


# --- a real client --------------------------------------------------------------------


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
@pytest.mark.parametrize("compression", [None, "deflate"])
def test_echo_text_and_bytes(ws_server, tls, compression):
    with ws_connect(ws_server, tls=tls, compression=compression) as ws:
        ext = ws.response.headers.get("sec-websocket-extensions")
        if compression:
            assert ext is not None and ext.startswith("permessage-deflate")
        else:
            assert ext is None
        assert ws.response.headers["x-accepted-by"] == "fpy3-test"
        ws.send("héllo wörld ✓")
        assert ws.recv(timeout=10) == "héllo wörld ✓"
        blob = os.urandom(50_000)
        ws.send(blob)
        assert ws.recv(timeout=10) == blob
        # A fragmented message, reassembled by the server.
        ws.send(["frag", "mented ", "text"])
        assert ws.recv(timeout=10) == "fragmented text"
        # Compressible data, several times (the deflate context carries over).
        for i in range(3):
            text = ("abc" * 5000) + str(i)
            ws.send(text)
            assert ws.recv(timeout=10) == text
        ws.ping(b"are you there").wait(10)
    ws_server.wait_record("ws-echo", "disconnect 1000 ")


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
@pytest.mark.parametrize("compression", [None, "deflate"])
def test_empty_messages_both_ways(ws_server, tls, compression):
    with ws_connect(ws_server, "/empty", tls=tls, compression=compression) as ws:
        assert ws.recv(timeout=10) == ""
        assert ws.recv(timeout=10) == b""
        assert ws.recv(timeout=10) == ""
        ws.send("")
        assert ws.recv(timeout=10) == ""
        ws.send(b"")
        assert ws.recv(timeout=10) == b""
    ws_server.wait_record("ws-empty", "disconnect 1000")
    assert ws_server.record("ws-empty")[:2] == ["text ''", "bytes b''"]


def test_subprotocol_negotiation(ws_server):
    with ws_connect(ws_server, subprotocols=["unknown", "superchat", "chat"]) as ws:
        assert ws.subprotocol == "superchat"
        assert ws.response.headers["sec-websocket-protocol"] == "superchat"
    with ws_connect(ws_server, subprotocols=["nothing-we-know"]) as ws:
        assert ws.subprotocol is None
        assert "sec-websocket-protocol" not in ws.response.headers


def test_scope(ws_server):
    with ws_connect(
        ws_server, "/scope?x=1", tls=True, subprotocols=["a", "b"], compression=None
    ) as ws:
        scope = json.loads(ws.recv(timeout=10))
    assert scope["type"] == "websocket"
    assert scope["scheme"] == "wss"
    assert scope["http_version"] == "1.1"
    assert scope["path"] == "/scope"
    assert scope["query_string"] == "x=1"
    assert scope["subprotocols"] == ["a", "b"]
    assert scope["asgi"]["version"] == "3.0"
    assert "websocket.http.response" in scope["extensions"]
    names = [name for name, _ in scope["headers"]]
    assert "sec-websocket-key" in names and "upgrade" in names
    assert scope["client"][0] == "127.0.0.1"


def test_app_close_with_code_and_reason(ws_server):
    with ws_connect(ws_server) as ws:
        ws.send("close-me")
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=10)
    assert info.value.rcvd.code == 4001
    assert info.value.rcvd.reason == "bye now"
    ws_server.wait_record("ws-echo", "disconnect 4001 bye now")


def test_denial_response(ws_server):
    with pytest.raises(InvalidStatus) as info:
        ws_connect(ws_server, "/deny")
    assert info.value.response.status_code == 401
    assert info.value.response.body == b"go away"


def test_close_before_accept_is_403(ws_server):
    with pytest.raises(InvalidStatus) as info:
        ws_connect(ws_server, "/close-first")
    assert info.value.response.status_code == 403


def test_app_errors(ws_server):
    with pytest.raises(InvalidStatus) as info:
        ws_connect(ws_server, "/raise-before")
    assert info.value.response.status_code == 500
    with ws_connect(ws_server, "/raise-after") as ws:
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd.code == 1011
    ws_server.assert_serving()


def test_too_big_message_1009(ws_server):
    with ws_connect(ws_server, compression=None, max_size=None) as ws:
        ws.send(b"x" * (MAX_MESSAGE + 1))
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=10)
    assert info.value.rcvd.code == 1009


def test_too_big_after_inflating_1009(ws_server):
    # Compresses to a few hundred bytes; inflates past the limit.
    with ws_connect(ws_server, compression="deflate", max_size=None) as ws:
        ws.send(b"\0" * (MAX_MESSAGE * 4))
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=10)
    assert info.value.rcvd.code == 1009


def test_server_backpressure_to_slow_client(ws_server):
    # 8 MiB from the app to a client that reads only after the app is blocked.
    n, size = 128, 65536
    with ws_connect(ws_server, f"/flood?n={n}&size={size}", compression=None) as ws:
        total = 0
        while True:
            msg = ws.recv(timeout=20)
            if msg == "done":
                break
            total += len(msg)
    assert total == n * size


def test_receive_backpressure_slow_app(ws_server):
    # The app does not read until told: the server stops reading, nothing is lost.
    with ws_connect(ws_server, "/slow-reader", compression=None) as ws:
        chunk = b"y" * 65536
        for _ in range(64):
            ws.send(chunk)
        ws_server.flag("go")
        ws.send("end")
        assert ws.recv(timeout=20) == str(64 * 65536)


# --- raw frames, each with its close code -----------------------------------------------


def raw_close_code(srv, *frames: bytes) -> int:
    ws = RawWS.open(srv)
    try:
        for f in frames:
            ws.send(f)
        code, _ = ws.recv_close()
        # The server closes the TCP connection after its close frame.
        assert ws.conn.is_closed_within(10)
        return code
    finally:
        ws.close()


def test_raw_echo_and_ping(ws_server):
    ws = RawWS.open(ws_server)
    try:
        ws.send(frame(9, b"ping!"))
        assert ws.recv_frame() == (10, True, b"ping!")
        ws.send(frame(1, b"one"))
        assert ws.recv_frame() == (1, True, b"one")
        ws.send(frame(8, close_payload(1000, b"done")))
        assert ws.recv_close() == (1000, "")
        assert ws.conn.is_closed_within(10)
    finally:
        ws.close()


def test_control_frame_inside_fragmented_message(ws_server):
    ws = RawWS.open(ws_server)
    try:
        ws.send(frame(1, b"hel", fin=False) + frame(9, b"mid") + frame(0, b"lo"))
        assert ws.recv_frame() == (10, True, b"mid")
        assert ws.recv_frame() == (1, True, b"hello")
    finally:
        ws.close()


def test_fragmented_text_with_invalid_utf8_1007(ws_server):
    # The bad byte is in the second fragment: the server must fail without the rest.
    code = raw_close_code(ws_server, frame(1, b"ok ", fin=False), frame(0, b"\xc3\x28", fin=False))
    assert code == 1007


def test_utf8_split_across_fragments_is_fine(ws_server):
    ws = RawWS.open(ws_server)
    try:
        euro = "€".encode()
        ws.send(frame(1, euro[:1], fin=False) + frame(0, euro[1:2], fin=False) + frame(0, euro[2:]))
        assert ws.recv_frame() == (1, True, euro)
    finally:
        ws.close()


def test_text_ending_mid_sequence_1007(ws_server):
    assert raw_close_code(ws_server, frame(1, "€".encode()[:2])) == 1007


def test_oversized_control_frame_1002(ws_server):
    assert raw_close_code(ws_server, frame(9, b"p" * 126)) == 1002


def test_fragmented_control_frame_1002(ws_server):
    assert raw_close_code(ws_server, frame(9, b"p", fin=False)) == 1002


@pytest.mark.parametrize("code", [999, 1004, 1005, 1006, 1015, 1016, 2999, 5000])
def test_invalid_close_codes_1002(ws_server, code):
    assert raw_close_code(ws_server, frame(8, close_payload(code))) == 1002


def test_close_with_one_byte_payload_1002(ws_server):
    assert raw_close_code(ws_server, frame(8, b"\x03")) == 1002


def test_close_reason_invalid_utf8_1007(ws_server):
    assert raw_close_code(ws_server, frame(8, close_payload(1000, b"\xff"))) == 1007


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1011, 3000, 4999])
def test_valid_close_codes_echoed(ws_server, code):
    assert raw_close_code(ws_server, frame(8, close_payload(code))) == code


def test_unmasked_client_frame_1002(ws_server):
    assert raw_close_code(ws_server, frame(1, b"hi", mask=False)) == 1002


@pytest.mark.parametrize("rsv", [0x40, 0x20, 0x10], ids=["rsv1", "rsv2", "rsv3"])
def test_rsv_bits_without_extension_1002(ws_server, rsv):
    assert raw_close_code(ws_server, frame(1, b"hi", rsv=rsv)) == 1002


def test_reserved_opcode_1002(ws_server):
    assert raw_close_code(ws_server, frame(3, b"")) == 1002


def test_continuation_without_start_1002(ws_server):
    assert raw_close_code(ws_server, frame(0, b"x")) == 1002


def test_new_message_inside_fragmented_1002(ws_server):
    assert raw_close_code(ws_server, frame(1, b"a", fin=False), frame(2, b"b")) == 1002


def test_too_big_fragmented_message_1009(ws_server):
    half = b"z" * (MAX_MESSAGE // 2 + 1)
    assert raw_close_code(ws_server, frame(2, half, fin=False), frame(0, half)) == 1009


# --- handshake errors -----------------------------------------------------------------------


def test_handshake_errors(ws_server):
    base = b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    resp, conn = ws_server.request(base + b"Sec-WebSocket-Version: 13\r\n\r\n", tls=False)
    conn.close()
    assert resp.status == 400
    resp, conn = ws_server.request(
        base + b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n",
        tls=False,
    )
    conn.close()
    assert resp.status == 426
    assert resp.header("sec-websocket-version") == "13"


# --- lifecycle: limits, keep-alive, drain -----------------------------------------------------


def test_limits_and_keepalive(start_server):
    srv = start_server(
        app="ws_apps:app",
        http=True,
        config={
            "websocket": {
                "max_connections": 2,
                "ping_interval": 0.3,
                "ping_timeout": 0.5,
                "idle_timeout": 0,
            }
        },
    )
    a = RawWS.open(srv, "/hold")
    b = RawWS.open(srv, "/hold")
    try:
        assert a.recv_frame() == (1, True, b"hello")
        assert b.recv_frame() == (1, True, b"hello")
        resp, conn = srv.request(
            b"GET /hold HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            tls=False,
        )
        conn.close()
        assert resp.status == 503
        # a answers the keep-alive ping; b stays silent and is dropped.
        op, _, payload = a.recv_frame()
        assert op == 9
        a.send(frame(10, payload))
        assert b.recv_frame()[0] == 9
        assert b.conn.is_closed_within(10)
        srv.wait_record("ws-hold", "disconnect 1006 ")
        # With b gone there is room again.
        c = RawWS.open(srv, "/hold")
        assert c.recv_frame() == (1, True, b"hello")
        c.close()
    finally:
        a.close()
        b.close()


def test_idle_timeout_1001(start_server):
    srv = start_server(
        app="ws_apps:app",
        http=True,
        config={"websocket": {"idle_timeout": 0.5, "ping_interval": 0}},
    )
    ws = RawWS.open(srv, "/hold")
    try:
        assert ws.recv_frame() == (1, True, b"hello")
        assert ws.recv_close()[0] == 1001
    finally:
        ws.close()


def test_drain_sends_1001(start_server):
    srv = start_server(app="ws_apps:app", http=True)
    with ws_connect(srv, "/hold") as ws:
        assert ws.recv(timeout=10) == "hello"
        srv.wait_record("ws-hold", "open")
        os.kill(srv.pid, signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=10)
    assert info.value.rcvd.code == 1001
    assert srv.wait_exit() == 0
    wait_until(lambda: "disconnect 1001 " in srv.record("ws-hold"))


def test_disabled(start_server):
    srv = start_server(app="ws_apps:app", http=True, config={"websocket": {"enabled": False}})
    with pytest.raises(InvalidStatus) as info:
        ws_connect(srv, "/echo")
    # Without websockets the app sees a plain HTTP request.
    assert info.value.response.status_code == 200


def test_max_requests_counts_websockets(start_server):
    # Websockets alone (after the readiness probes) reach the limit; the recycled
    # worker's drain closes the ones it holds with 1001.
    srv = start_server(
        app="ws_apps:app",
        http=True,
        command="master",
        config={"workers": {"count": 1, "max_requests": 6, "max_requests_jitter": 0}},
    )
    with contextlib.ExitStack() as stack:
        first_pid, held = None, []
        for _ in range(6):
            ws = stack.enter_context(ws_connect(srv, "/hold?pid=1"))
            pid = ws.recv(timeout=10).split()[1]
            first_pid = first_pid or pid
            if pid == first_pid:
                held.append(ws)
        srv.wait_stderr("(workers.max_requests); starting worker", timeout=15)
        for ws in held:
            with pytest.raises(ConnectionClosed) as info:
                ws.recv(timeout=15)
            assert info.value.rcvd.code == 1001
    srv.assert_serving()


def test_deflate_parameters_negotiated(ws_server):
    from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

    factory = ClientPerMessageDeflateFactory(
        server_no_context_takeover=True,
        client_no_context_takeover=True,
        server_max_window_bits=10,
        client_max_window_bits=True,
    )
    with ws_connect(ws_server, compression=None, extensions=[factory]) as ws:
        ext = ws.response.headers["sec-websocket-extensions"]
        assert "server_no_context_takeover" in ext
        assert "client_no_context_takeover" in ext
        assert "server_max_window_bits=10" in ext
        for i in range(3):
            text = "compress me " * 400 + str(i)
            ws.send(text)
            assert ws.recv(timeout=10) == text


def test_upgrade_after_a_request_on_the_same_connection(ws_server):
    conn = ws_server.connect(tls=False)
    try:
        conn.send(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        first = conn.read_response()
        assert (first.status, first.body) == (200, b"Hello, world!")
        conn.send(
            b"GET /deny HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        denied = conn.read_response()
        assert (denied.status, denied.body) == (401, b"go away")
        assert denied.header("content-length") == "7"
        assert conn.is_closed_within(10)
    finally:
        conn.close()
    ws = RawWS.open(ws_server, "/echo")
    try:
        assert ws.response.header("sec-websocket-accept")
        assert ws.response.header("upgrade").lower() == "websocket"
    finally:
        ws.close()


def test_reload_closes_websockets_1001(start_server):
    srv = start_server(
        app="ws_apps:app", http=True, command="master", config={"workers": {"count": 1}}
    )
    with ws_connect(srv, "/hold?pid=1") as ws:
        old = ws.recv(timeout=10).split()[1]
        os.kill(srv.pid, signal.SIGHUP)
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=20)
    assert info.value.rcvd.code == 1001
    with ws_connect(srv, "/hold?pid=1") as ws:
        assert ws.recv(timeout=10).split()[1] != old


def test_example_app_echoes_over_wss(start_server):
    srv = start_server(app="fpy3.examples.hello:app")
    with ws_connect(srv, "/ws", tls=True) as ws:
        ws.send("hi")
        assert ws.recv(timeout=10) == "hi"
        ws.send(b"\x00\x01")
        assert ws.recv(timeout=10) == b"\x00\x01"
