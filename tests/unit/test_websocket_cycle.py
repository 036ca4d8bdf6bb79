"""The websocket core in-process: the real cycle and protocol, a recording transport."""

from __future__ import annotations

import asyncio

from wsraw import close_payload, frame

from fpy3.config import WebSocketSettings
from fpy3.core.errors import ClientDisconnected
from fpy3.core.websocket import WebSocketCycle
from fpy3.wsproto import open_protocol
from fpy3.wsproto.protocol import _header


class Host:
    def __init__(self, app, loop):
        self.app = app
        self.loop = loop
        self.debug = False
        self.root_path = ""
        self.state: dict = {}
        self.timed = False
        self.proxy_headers = None
        self.health = None
        self.finished: list = []

    def spawn(self, coro):
        return self.loop.create_task(coro)

    def response_done(self, scope, status, sent, started_at):
        self.finished.append((scope["method"], status, sent))


class HTTP:
    def __init__(self, log):
        self.log = log

    def want_body(self):
        pass

    def write_head(self, status, headers, flags, data, end):
        self.log.append(("http", status, bytes(data), end))

    def write_body(self, data, end):
        self.log.append(("http-body", bytes(data), end))

    def abort(self):
        self.log.append(("http-abort",))


class Transport:
    method = "GET"

    def __init__(self):
        self.log: list = []
        self.out = bytearray()

    def accept(self, headers, flags):
        self.log.append(("accept", headers, flags))

    def http(self):
        return HTTP(self.log)

    def write(self, frames):
        self.out += b"".join(frames)

    def pause_reading(self):
        self.log.append(("pause",))

    def resume_reading(self):
        self.log.append(("resume",))

    def finish(self):
        self.log.append(("finish",))

    def abort(self):
        self.log.append(("abort",))

    def cycle_done(self, cycle):
        self.log.append(("done",))


def session(app, script=None, headers=()):
    async def main():
        loop = asyncio.get_running_loop()
        host = Host(app, loop)
        transport = Transport()
        scope = {
            "type": "websocket",
            "http_version": "1.1",
            "client": ["127.0.0.1", 1],
            "headers": list(headers),
            "subprotocols": ["chat"],
        }
        cycle = WebSocketCycle(scope, transport, host, WebSocketSettings(), open_protocol)
        task = loop.create_task(cycle.run())
        if script is not None:
            await script(cycle, transport)
        await asyncio.wait_for(task, 5)
        return transport, host

    return asyncio.run(main())


def masked(op: int, payload: bytes) -> bytes:
    return frame(op, payload)  # wsraw masks client frames


async def echo(scope, receive, send):
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept", "subprotocol": "chat", "headers": [(b"X-A", b"1")]})
    while True:
        msg = await receive()
        if msg["type"] == "websocket.disconnect":
            return
        await send({"type": "websocket.send", **{k: v for k, v in msg.items() if k != "type"}})


async def until(predicate):
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition not met")


def test_accept_echo_and_close():
    async def script(cycle, t):
        await until(lambda: cycle.accepted)
        cycle.feed_data(masked(1, b"hi") + masked(1, b"") + masked(2, b""))
        await until(lambda: len(t.out) >= 8)
        cycle.feed_data(masked(8, close_payload(1000)))

    t, host = session(echo, script)
    assert t.log[0] == ("accept", [(b"x-a", b"1"), (b"sec-websocket-protocol", b"chat")], 0)
    assert bytes(t.out).startswith(
        _header(1, 2) + b"hi" + _header(1, 0) + _header(2, 0) + _header(8, 2) + close_payload(1000)
    )
    assert ("finish",) in t.log
    assert host.finished == [("GET", 101, 0)]


def test_empty_text_from_the_app():
    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": ""})
        await send({"type": "websocket.send", "bytes": None, "text": ""})
        await send({"type": "websocket.close"})

    t, _ = session(app, None)
    assert bytes(t.out).startswith(_header(1, 0) * 2 + _header(8, 2))


def test_denial_goes_through_the_http_core():
    async def app(scope, receive, send):
        await receive()
        await send(
            {"type": "websocket.http.response.start", "status": 401, "headers": [(b"x", b"y")]}
        )
        await send({"type": "websocket.http.response.body", "body": b"no"})

    t, host = session(app)
    assert t.log[0] == ("http", 401, b"no", True)
    assert host.finished == [("GET", 401, 2)]


def test_denial_with_an_invalid_status_is_a_500():
    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.http.response.start", "status": 101, "headers": []})

    t, _ = session(app)
    assert t.log[0][:2] == ("http", 500)


def test_close_before_accept_is_403_and_error_before_accept_is_500():
    async def closes(scope, receive, send):
        await receive()
        await send({"type": "websocket.close"})

    async def fails(scope, receive, send):
        await receive()
        raise RuntimeError("boom")

    assert session(closes)[0].log[0] == ("http", 403, b"", True)
    assert session(fails)[0].log[0][:2] == ("http", 500)


def test_send_after_the_peer_went_away_raises():
    seen = []

    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        await receive()  # the disconnect
        try:
            await send({"type": "websocket.send", "text": "late"})
        except ClientDisconnected:
            seen.append("raised")

    async def script(cycle, t):
        await until(lambda: cycle.accepted)
        cycle.feed_disconnect()

    session(app, script)
    assert seen == ["raised"]


def test_protocol_error_closes_with_its_code():
    async def script(cycle, t):
        await until(lambda: cycle.accepted)
        cycle.feed_data(bytes((0x81, 0x02)) + b"hi")  # unmasked: 1002

    t, _ = session(echo, script)
    assert bytes(t.out)[:1] == b"\x88"  # a close frame went out
    assert close_payload(1002) in bytes(t.out)
    assert ("finish",) in t.log


def test_received_messages_past_the_mark_pause_reading():
    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        await asyncio.sleep(0.05)  # not reading
        while (await receive())["type"] != "websocket.disconnect":
            pass

    async def script(cycle, t):
        await until(lambda: cycle.accepted)
        for _ in range(6):
            cycle.feed_data(masked(2, b"x" * 60000))
        assert ("pause",) in t.log
        await until(lambda: ("resume",) in t.log)
        cycle.feed_data(masked(8, close_payload(1000)))

    session(app, script)
