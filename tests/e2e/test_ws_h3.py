"""WebSocket over HTTP/3 extended CONNECT (RFC 9220), with aioquic as the client.

aioquic's H3Connection sends any header list, so the test speaks RFC 9220 itself:
it checks the server's SETTINGS_ENABLE_CONNECT_PROTOCOL, sends ``:method CONNECT``
with ``:protocol websocket``, expects 200, then exchanges masked frames on the stream.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import zlib

import h3clients as kit
import pytest
from wsraw import close_payload, frame

SETTINGS_ENABLE_CONNECT_PROTOCOL = 0x8


# Every test runs once per QUIC engine (msquic cases skip without libmsquic).
pytestmark = pytest.mark.usefixtures("quic_engine")


@pytest.fixture(scope="module")
def h3ws(module_server_factory, quic_engine):
    return module_server_factory(
        app="ws_apps:app", config={"http3": {"enabled": True, "engine": quic_engine}}
    )


def parse_frames(buf: bytearray) -> list[tuple[int, bytes]]:
    """Pop the whole (unmasked, server) frames at the front of ``buf``: (opcode, payload),
    with 0x40 added to the opcode when RSV1 (compressed) is set."""
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
        out.append((buf[0] & 0x4F, bytes(buf[hl : hl + n])))
        del buf[: hl + n]
    return out


def run_session(srv, path: str, script, extra_headers=(), timeout: float = 15.0):
    """Open an extended CONNECT stream and run ``script(ex, send, recv)``."""

    async def go():
        async with kit._h3_connection(srv.host, srv.port, str(srv.cafile), timeout) as proto:
            deadline = time.monotonic() + timeout
            # The server's SETTINGS arrive right after the handshake.
            while proto.h3.received_settings is None:
                assert time.monotonic() < deadline, "no SETTINGS from the server"
                await asyncio.sleep(0.01)
            settings = proto.h3.received_settings
            ex = proto.new_request()
            headers = [
                (b":method", b"CONNECT"),
                (b":protocol", b"websocket"),
                (b":scheme", b"https"),
                (b":path", path.encode()),
                (b":authority", f"{srv.host}:{srv.port}".encode()),
                (b"sec-websocket-version", b"13"),
                *extra_headers,
            ]
            proto.h3.send_headers(ex.stream_id, headers, end_stream=False)
            proto.transmit()
            buf = bytearray()

            def send(data: bytes, end: bool = False) -> None:
                proto.h3.send_data(ex.stream_id, data, end_stream=end)
                proto.transmit()

            async def recv() -> tuple[int, bytes]:
                while True:
                    if ex.body:
                        buf.extend(ex.body)
                        ex.body.clear()
                    frames = parse_frames(buf)
                    if frames:
                        buf[:0] = b"".join(_reframe(f) for f in frames[1:])
                        return frames[0]
                    if ex.ended or ex.reset_code is not None or proto.terminated:
                        raise EOFError(f"stream over: {ex.describe()}")
                    assert time.monotonic() < deadline, f"no frame in time: {ex.describe()}"
                    await asyncio.sleep(0.01)

            async def head():
                while ex.status is None:
                    assert time.monotonic() < deadline, f"no response: {ex.describe()}"
                    assert not proto.terminated, proto.close_message()
                    await asyncio.sleep(0.01)
                return ex

            return settings, await script(head, send, recv)

    return kit._run(go, timeout + 5, "extended CONNECT session", [])


def _reframe(f: tuple[int, bytes]) -> bytes:
    op, payload = f
    n = len(payload)
    if n < 126:
        return bytes((0x80 | op, n)) + payload
    if n < 65536:
        return bytes((0x80 | op, 126)) + n.to_bytes(2) + payload
    return bytes((0x80 | op, 127)) + n.to_bytes(8) + payload


def test_h3_websocket_echo(h3ws):
    async def script(head, send, recv):
        ex = await head()
        assert ex.status == 200
        assert dict(ex.headers)["sec-websocket-protocol"] == "chat"
        send(frame(1, "héllo over h3".encode()))
        assert await recv() == (1, "héllo over h3".encode())
        blob = bytes(range(256)) * 400
        send(frame(2, blob))
        assert await recv() == (2, blob)
        send(frame(9, b"p"))
        assert await recv() == (10, b"p")
        send(frame(8, close_payload(1000)))
        assert await recv() == (8, close_payload(1000))
        return True

    settings, ok = run_session(h3ws, "/echo", script, [(b"sec-websocket-protocol", b"chat")])
    assert settings.get(SETTINGS_ENABLE_CONNECT_PROTOCOL) == 1
    assert ok
    h3ws.wait_record("ws-echo", "disconnect 1000 ")


def test_h3_websocket_empty_messages_both_ways(h3ws):
    async def script(head, send, recv):
        ex = await head()
        assert ex.status == 200
        assert await recv() == (1, b"")
        assert await recv() == (2, b"")
        assert await recv() == (1, b"")
        send(frame(1, b""))
        assert await recv() == (1, b"")
        send(frame(2, b""))
        assert await recv() == (2, b"")
        send(frame(8, close_payload(1000)))
        assert await recv() == (8, close_payload(1000))
        return True

    _, ok = run_session(h3ws, "/empty", script)
    assert ok
    h3ws.wait_record("ws-empty", "disconnect 1000")
    assert h3ws.record("ws-empty")[:2] == ["text ''", "bytes b''"]


def test_h3_websocket_scope_and_protocol_error(h3ws):
    async def script(head, send, recv):
        await head()
        scope = json.loads((await recv())[1])
        send(frame(1, b"x", mask=False))  # unmasked -> 1002
        op, payload = await recv()
        return scope, op, payload

    _, (scope, op, payload) = run_session(h3ws, "/scope?q=1", script)
    assert scope["type"] == "websocket"
    assert scope["http_version"] == "3"
    assert scope["scheme"] == "wss"
    assert scope["path"] == "/scope" and scope["query_string"] == "q=1"
    assert "websocket.http.response" in scope["extensions"]
    assert (op, payload[:2]) == (8, close_payload(1002))


def test_h3_websocket_denial(h3ws):
    async def script(head, send, recv):
        ex = await head()
        while not ex.ended:
            await asyncio.sleep(0.01)
        return ex.status, bytes(ex.body)

    _, (status, body) = run_session(h3ws, "/deny", script)
    assert (status, body) == (401, b"go away")


def test_h3_websocket_drain_1001(start_server):
    srv = start_server(app="ws_apps:app", config={"http3": {"enabled": True}})

    async def script(head, send, recv):
        ex = await head()
        assert ex.status == 200
        assert await recv() == (1, b"hello")
        srv.wait_record("ws-hold", "open")
        os.kill(srv.pid, signal.SIGTERM)
        op, payload = await recv()
        send(frame(8, payload[:2]), end=True)
        # The server ends the stream once it has our close (RFC 6455 7.1.1). Only then
        # may the connection go: a CONNECTION_CLOSE resets every open stream (RFC 9000
        # 10.2), and a QUIC stack may drop our close frame if both arrive together.
        with pytest.raises(EOFError):
            await recv()
        assert ex.ended and ex.reset_code is None, ex.describe()
        return op, payload

    _, (op, payload) = run_session(srv, "/hold", script)
    assert (op, payload[:2]) == (8, close_payload(1001))
    assert srv.wait_exit() == 0
    srv.wait_record("ws-hold", "disconnect 1001 ")


def _stalled_request_reset(srv) -> int | None:
    """A POST that sends 10 of its 100 body bytes and stalls: the code it is reset with."""

    async def go():
        async with kit._h3_connection(srv.host, srv.port, str(srv.cafile), 15) as proto:
            ex = proto.new_request()
            headers = kit._request_headers(
                "POST", "/echo", f"{srv.host}:{srv.port}", [("content-length", "100")]
            )
            proto.h3.send_headers(ex.stream_id, headers, end_stream=False)
            proto.h3.send_data(ex.stream_id, b"x" * 10, end_stream=False)
            proto.transmit()
            await ex.done.wait()
            return ex.reset_code

    return kit._run(go, 20, "stalled request")


def test_h3_websocket_outlives_body_timeout(start_server):
    # A websocket's request stream never ends: http3.body_timeout is not for it.
    srv = start_server(
        app="ws_apps:app",
        config={"http3": {"enabled": True, "body_timeout": 1}, "websocket": {"ping_interval": 0}},
    )

    async def script(head, send, recv):
        ex = await head()
        assert ex.status == 200
        send(frame(1, b"before"))
        assert await recv() == (1, b"before")
        # A plain request opened after the websocket stalls and is reset at its deadline;
        # by then the websocket has been quiet longer than body_timeout too.
        assert await asyncio.to_thread(_stalled_request_reset, srv) == 0x10C
        send(frame(1, b"after"))
        assert await recv() == (1, b"after")
        assert ex.reset_code is None, ex.describe()
        send(frame(8, close_payload(1000)))
        assert await recv() == (8, close_payload(1000))
        return True

    _, ok = run_session(srv, "/echo", script, timeout=30)
    assert ok


def test_h3_websocket_large_message_and_deflate(h3ws):
    # 3 MiB is more than the stream's flow-control window: the server must give
    # credit back as it reads. Then one compressed message each way.
    big = bytes(range(256)) * (3 * 4096)
    inflate = zlib.decompressobj(-15)  # the server keeps its context across messages

    def inflated(payload: bytes) -> bytes:
        return inflate.decompress(payload + b"\x00\x00\xff\xff")

    async def script(head, send, recv):
        ex = await head()
        assert dict(ex.headers)["sec-websocket-extensions"] == "permessage-deflate"
        send(frame(2, big))
        op, payload = await recv()
        assert op == 0x40 | 2 and inflated(payload) == big
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        text = "squeeze me " * 200
        wire = c.compress(text.encode()) + c.flush(zlib.Z_SYNC_FLUSH)
        send(frame(1, wire[:-4], rsv=0x40))
        op, payload = await recv()
        assert op == 0x40 | 1 and inflated(payload) == text.encode()
        return len(payload)

    _, n = run_session(
        h3ws, "/echo", script, [(b"sec-websocket-extensions", b"permessage-deflate")], timeout=30
    )
    assert n < 200  # it was compressed on the way back too
