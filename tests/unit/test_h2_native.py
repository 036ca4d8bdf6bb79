"""The native HTTP/2 session (native/h2.c) in-process, against hyper-h2 as the client:
bytes in, event batches and bytes out, no sockets (each test takes milliseconds)."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame

from fpy3.h2.native import (
    CLOSED,
    DATA,
    END,
    ENHANCE_YOUR_CALM,
    FIN,
    FORGET,
    INTERNAL_ERROR,
    REQUEST,
    RESET,
    WRITABLE,
    ffi,
    lib,
)


class Session:
    """One native session and a hyper-h2 client wired to it."""

    def __init__(self, **cfg):
        c = ffi.new("fpy3_h2_config *")
        c.max_concurrent_streams = cfg.get("max_concurrent_streams", 100)
        c.initial_window_size = cfg.get("initial_window_size", 65535)
        c.connection_window_size = 1 << 20
        c.max_header_size = cfg.get("max_header_size", 16384)
        c.max_header_count = 100
        c.max_body_size = cfg.get("max_body_size", 0)
        c.send_high_water = 64 * 1024
        c.enable_connect_protocol = 1
        c.control_burst = cfg.get("control_burst", 1000)
        c.control_rate = 1
        c.reset_burst = 1000
        c.reset_rate = 33
        c.max_continuations = 8
        self.s = ffi.gc(lib.fpy3_h2_new(c), lib.fpy3_h2_free)
        self.client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.client.initiate_connection()
        self._n = ffi.new("size_t *")
        self.client_events: list = []
        self.exchange()

    def feed(self, data: bytes) -> list[tuple]:
        """Client bytes into the session: (type, stream, bytes, code) per event."""
        n = lib.fpy3_h2_recv(self.s, data, len(data))
        if n < 0:
            return [("broken",)]
        return self.events()

    def events(self) -> list[tuple]:
        ev = lib.fpy3_h2_events(self.s, self._n)
        out = []
        for i in range(self._n[0]):
            e = ev[i]
            data = ffi.buffer(e.data, e.len)[:] if e.data != ffi.NULL else b""
            out.append((e.type, e.stream, data, e.code))
        return out

    def output(self) -> tuple[bytes, list[tuple]]:
        p = lib.fpy3_h2_output(self.s, self._n)
        data = ffi.buffer(p, self._n[0])[:] if self._n[0] else b""
        return data, self.events()

    def exchange(self) -> list[tuple]:
        """Client -> session -> client, once: the session's events (recv and output)."""
        got = self.feed(self.client.data_to_send())
        out, more = self.output()
        if out:
            self.client_events += self.client.receive_data(out)
        return got + more

    def request(self, headers, body: bytes | None = None) -> int:
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, headers, end_stream=body is None)
        if body is not None:
            for i in range(0, len(body), 16384):
                last = i + 16384 >= len(body)
                self.client.send_data(sid, body[i : i + 16384], end_stream=last)
        return sid

    def of(self, kind) -> list:
        return [e for e in self.client_events if isinstance(e, kind)]


GET = [(":method", "GET"), (":scheme", "https"), (":authority", "x.test"), (":path", "/a?b")]
POST = [(":method", "POST"), (":scheme", "https"), (":authority", "x.test"), (":path", "/up")]


def test_request_block_and_whole_response():
    s = Session()
    sid = s.request([*GET, ("user-agent", "t"), ("host", "x.test")])
    events = s.exchange()
    assert events[0][:2] == (REQUEST, sid)
    # Pseudo-header values first, in a fixed order (no :scheme), then the fields.
    assert events[0][2] == b"GET\0/a?b\0x.test\0\0user-agent\0t\0host\0x.test\0"
    assert events[0][3] == 1  # a host field is among them
    assert events[1][:2] == (END, sid)
    block = b"content-type\0text/plain\0"
    assert lib.fpy3_h2_respond(s.s, sid, 200, block, len(block), b"hi", 2, FIN | FORGET) == 2
    events = s.exchange()
    assert events == []  # forgotten: no CLOSED event
    (resp,) = s.of(h2.events.ResponseReceived)
    assert resp.headers == [(":status", "200"), ("content-type", "text/plain")]
    assert [e.data for e in s.of(h2.events.DataReceived)] == [b"hi"]
    assert s.of(h2.events.StreamEnded)
    assert lib.fpy3_h2_open_streams(s.s) == 0


def test_body_credit_goes_back_only_when_consumed():
    s = Session()
    sid = s.request(POST, b"x" * 40000)
    events = s.exchange()
    data = b"".join(e[2] for e in events if e[0] == DATA)
    assert data == b"x" * 40000 and events[-1][:2] == (END, sid)
    before = s.client.remote_flow_control_window(sid)
    s.client_events.clear()
    assert lib.fpy3_h2_consume(s.s, sid, 40000) == 0
    s.exchange()
    assert s.of(h2.events.WindowUpdated)
    assert s.client.outbound_flow_control_window > before


def test_trailers_and_stream_closed_event():
    s = Session()
    sid = s.request(GET)
    s.exchange()
    assert lib.fpy3_h2_respond(s.s, sid, 200, b"", 0, b"part", 4, 0) == 4
    fields = b"x-sum\x001\0"
    assert lib.fpy3_h2_trailers(s.s, sid, fields, len(fields), 0) == 0
    events = s.exchange()
    assert (CLOSED, sid) in [e[:2] for e in events]
    (trailers,) = s.of(h2.events.TrailersReceived)
    assert trailers.headers == [("x-sum", "1")]
    assert b"".join(e.data for e in s.of(h2.events.DataReceived)) == b"part"


def test_reset_after_partial_response_sends_what_was_given():
    s = Session()
    sid = s.request(GET)
    s.exchange()
    lib.fpy3_h2_respond(s.s, sid, 200, b"", 0, b"partial", 7, 0)
    assert lib.fpy3_h2_reset(s.s, sid, INTERNAL_ERROR) == 0
    s.exchange()
    s.exchange()
    assert s.of(h2.events.ResponseReceived)
    assert b"".join(e.data for e in s.of(h2.events.DataReceived)) == b"partial"
    (reset,) = s.of(h2.events.StreamReset)
    assert reset.error_code == INTERNAL_ERROR


def test_peer_reset_reaches_python():
    s = Session()
    sid = s.client.get_next_available_stream_id()
    s.client.send_headers(sid, POST)
    s.client.send_data(sid, b"abc")
    s.exchange()
    s.client.reset_stream(sid, 8)
    events = s.exchange()
    assert [e[:2] for e in events] == [(RESET, sid), (CLOSED, sid)]
    assert events[0][3] == 8


def test_oversized_head_is_answered_431_in_c():
    s = Session(max_header_size=4096)
    sid = s.request([*GET, ("x-big", "v" * 5000)])
    assert s.exchange() == []  # Python never sees it
    (resp,) = s.of(h2.events.ResponseReceived)
    assert dict(resp.headers)[":status"] == "431"
    assert resp.stream_id == sid


def test_declared_body_over_the_limit_is_413():
    s = Session(max_body_size=10)
    sid = s.client.get_next_available_stream_id()
    headers = [*POST, ("content-length", "11")]
    s.client.send_headers(sid, headers, end_stream=False)
    assert s.exchange() == []
    (resp,) = s.of(h2.events.ResponseReceived)
    assert dict(resp.headers)[":status"] == "413"


def test_ping_flood_is_enhance_your_calm():
    s = Session(control_burst=50)
    for i in range(100):
        s.client.ping(b"%08d" % i)
    events = s.feed(s.client.data_to_send())
    assert events == [("broken",)]
    out, _ = s.output()
    goaway = [
        e for e in s.client.receive_data(out) if isinstance(e, h2.events.ConnectionTerminated)
    ]
    assert goaway and goaway[0].error_code == ENHANCE_YOUR_CALM
    assert lib.fpy3_h2_alive(s.s) == 0


def test_writable_after_the_window_opens_and_expire_on_a_stalled_one():
    s = Session()
    s.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    s.exchange()
    sid = s.request(GET)
    s.exchange()
    body = b"y" * 100_000
    pending = lib.fpy3_h2_respond(s.s, sid, 200, b"", 0, body, len(body), 0)
    assert pending == len(body)  # over the high-water mark: Python would wait
    s.exchange()
    assert not s.of(h2.events.DataReceived)  # the window is closed
    s.client.increment_flow_control_window(200_000, sid)
    s.client.increment_flow_control_window(200_000)
    events = s.exchange()
    assert (WRITABLE, sid) in [e[:2] for e in events]
    assert sum(len(e.data) for e in s.of(h2.events.DataReceived)) == len(body)
    # A second response the client never gives window to: reset by expire().
    sid2 = s.request(GET)
    s.exchange()
    lib.fpy3_h2_respond(s.s, sid2, 200, b"", 0, b"z" * 10, 10, 0)
    s.exchange()
    n = lib.fpy3_h2_expire(s.s, 0)
    assert n == 1 and s.events()[0][:2] == (RESET, sid2)
    s.exchange()
    assert [e.stream_id for e in s.of(h2.events.StreamReset)] == [sid2]


def frames(data: bytes) -> list:
    out = []
    while data:
        f, length = Frame.parse_frame_header(memoryview(data[:9]))
        f.parse_body(memoryview(data[9 : 9 + length]))
        out.append(f)
        data = data[9 + length :]
    return out


@pytest.mark.parametrize("phase", [1, 2])
def test_shutdown_goaway(phase):
    s = Session()
    sid = s.request(GET)
    s.exchange()
    lib.fpy3_h2_shutdown(s.s, 1)
    if phase == 2:
        lib.fpy3_h2_shutdown(s.s, 2)
    # The stream in flight is still answered.
    lib.fpy3_h2_respond(s.s, sid, 204, b"", 0, ffi.NULL, 0, FIN | FORGET)
    out, _ = s.output()
    sent = frames(out)
    goaways = [f.last_stream_id for f in sent if isinstance(f, GoAwayFrame)]
    assert goaways == ([2**31 - 1] if phase == 1 else [2**31 - 1, sid])
    assert [f.stream_id for f in sent if isinstance(f, HeadersFrame)] == [sid]
    # After the final GOAWAY and its last stream, the session is done.
    assert lib.fpy3_h2_alive(s.s) == (phase == 1)
