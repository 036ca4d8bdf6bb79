"""HTTP/2 limits and the known attacks, frame by frame: after each, the worker still
serves and its memory stays bounded.

The server runs with small budgets so each attack trips them quickly: rapid reset
(CVE-2023-44487), CONTINUATION flood (CVE-2024-27316), oversized header blocks, an
HPACK bomb, SETTINGS/PING/PRIORITY/empty-DATA floods, more streams than
max_concurrent_streams, and a flow-control window the client never opens.
"""

from __future__ import annotations

import os

import psutil
import pytest
from h2clients import (
    CANCEL,
    ENHANCE_YOUR_CALM,
    REFUSED_STREAM,
    SETTINGS_INITIAL_WINDOW_SIZE,
    H2Raw,
    StreamState,
    continuation,
)
from harness import wait_until
from hpack.hpack import encode_integer
from hyperframe.frame import (
    DataFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
)

MAX_STREAMS = 20
CONFIG = {
    "http2": {
        "max_concurrent_streams": MAX_STREAMS,
        "reset_burst": 100,
        "reset_rate": 10,
        "control_frame_burst": 300,
        "control_frame_rate": 10,
        "send_timeout": 1.0,
    },
}
# What an attack may leave behind in the worker's resident memory. Under the sanitizer
# suites (./dev.sh sanitize) ASan keeps freed memory in quarantine: a looser bound.
SANITIZED = "libasan" in os.environ.get("LD_PRELOAD", "")
RSS_SLACK = (512 if SANITIZED else 48) * 1024 * 1024


@pytest.fixture(scope="module")
def srv(module_server_factory):
    return module_server_factory(config=CONFIG)


def connect(srv, **kwargs) -> H2Raw:
    h2 = H2Raw(srv.host, srv.port, str(srv.cafile), **kwargs)
    h2.wait(lambda: h2.server_settings, message="server SETTINGS")
    return h2


def rss(srv) -> int:
    return psutil.Process(srv.pid).memory_info().rss


def healthy(srv, before: int) -> None:
    """The worker serves a new HTTP/2 connection and kept its memory bounded."""
    assert srv.alive(), srv.stderr()[-2000:]
    with connect(srv) as h2:
        st = h2.get("/hello")
        assert (st.status, bytes(st.data)) == (200, b"Hello, world!")
    grown = rss(srv) - before
    assert grown < RSS_SLACK, f"RSS grew by {grown / 2**20:.1f} MiB"


def goaway_and_close(h2: H2Raw, code: int | None = None) -> None:
    h2.wait_closed(timeout=15)
    assert h2.goaway, "no GOAWAY before the close"
    if code is not None:
        assert h2.goaway[-1][1] == code, h2.goaway


@pytest.fixture
def baseline(srv) -> int:
    # Warm: a few requests first, so the baseline includes the session's own buffers.
    with connect(srv) as h2:
        for _ in range(5):
            assert h2.get("/hello").status == 200
    return rss(srv)


def test_rapid_reset(srv, baseline):
    flag = "rapid-reset"
    try:
        with connect(srv) as h2:
            out = bytearray()
            for _ in range(5000):
                sid = h2.next_sid
                h2.next_sid += 2
                block = h2.header_block(h2.request_headers("GET", f"/wait-flag?flag={flag}"))
                out += HeadersFrame(
                    sid, data=block, flags=["END_HEADERS", "END_STREAM"]
                ).serialize()
                out += RstStreamFrame(sid, error_code=CANCEL).serialize()
                if len(out) > 65536:
                    if not h2.send(bytes(out)):
                        break
                    out.clear()
            h2.send(bytes(out))
            goaway_and_close(h2)
        # Reset streams whose app still runs count as open: never more app tasks than
        # max_concurrent_streams, however many streams were opened and reset.
        started = len(srv.record(f"{flag}-started"))
        assert 0 < started <= MAX_STREAMS, started
        healthy(srv, baseline)
    finally:
        srv.flag(flag)


def test_continuation_flood(srv, baseline):
    with connect(srv) as h2:
        sid = h2.next_sid
        block = h2.header_block(h2.request_headers("GET", "/hello"))
        h2.send(HeadersFrame(sid, data=block, flags=["END_STREAM"]).serialize())
        filler = h2.header_block([("x-filler", "f" * 1000)])
        for _ in range(2000):
            if not h2.send(continuation(sid, filler)):
                break
        goaway_and_close(h2)
    healthy(srv, baseline)


def test_endless_header_block_within_frames_gets_431(srv, baseline):
    with connect(srv) as h2:
        # Many small fields: past limits.max_header_count.
        many = [(f"x-h{i}", "v") for i in range(300)]
        st = h2.response(h2.open_stream(h2.request_headers("GET", "/hello", many)))
        assert st.status == 431
        # One block of 100 KiB over several CONTINUATION frames: past the size limit.
        big = [(f"x-big{i}", "v" * 10000) for i in range(10)]
        st = h2.response(h2.open_stream(h2.request_headers("GET", "/hello", big)))
        assert st.status == 431
        assert h2.get("/hello").status == 200
    healthy(srv, baseline)


def test_hpack_bomb(srv, baseline):
    # A 4000-byte field goes into the dynamic table; then one small block names it
    # 10000 times: 10 KB on the wire that would decode to 40 MB.
    with connect(srv) as h2:
        authority = h2.authority.encode()
        pseudo = b"\x82\x87\x84" + b"\x01" + bytes(encode_integer(len(authority), 7)) + authority
        value = b"b" * 4000
        first = pseudo + b"\x40\x06x-bomb" + bytes(encode_integer(len(value), 7)) + value
        h2.streams[1] = StreamState()
        h2.send(HeadersFrame(1, data=first, flags=["END_HEADERS", "END_STREAM"]).serialize())
        assert h2.response(1).status == 200
        h2.streams[3] = StreamState()
        bomb = pseudo + b"\xbe" * 10000  # index 62: the x-bomb entry
        h2.send(HeadersFrame(3, data=bomb, flags=["END_HEADERS", "END_STREAM"]).serialize())
        assert h2.response(3).status == 431
        h2.next_sid = 5
        assert h2.get("/hello").status == 200
    healthy(srv, baseline)


@pytest.mark.parametrize("kind", ["settings", "ping", "priority", "empty-data"])
def test_control_frame_floods(srv, baseline, kind):
    with connect(srv) as h2:
        if kind == "empty-data":
            sid = h2.open_stream(h2.request_headers("POST", "/echo"), end_stream=False)
            one = DataFrame(sid, data=b"").serialize()
        elif kind == "settings":
            one = SettingsFrame(0, settings={}).serialize()
        elif kind == "ping":
            one = PingFrame(0, opaque_data=b"12345678").serialize()
        else:
            one = PriorityFrame(99, depends_on=0, stream_weight=16).serialize()
        for _ in range(50):
            if not h2.send(one * 200):
                break
        goaway_and_close(h2, ENHANCE_YOUR_CALM)
    healthy(srv, baseline)


def test_more_streams_than_max_concurrent_streams(srv, baseline):
    flag = "too-many-streams"
    try:
        # Before the client acknowledged the server's SETTINGS: the extra streams are
        # refused (REFUSED_STREAM, safe to retry), the others are served.
        with H2Raw(srv.host, srv.port, str(srv.cafile)) as h2:
            sids = [h2.request("GET", f"/wait-flag?flag={flag}") for _ in range(MAX_STREAMS + 10)]
            h2.wait(
                lambda: sum(h2.streams[s].reset == REFUSED_STREAM for s in sids) == 10,
                message="10 streams refused",
            )
            wait_until(lambda: len(srv.record(f"{flag}-started")) == MAX_STREAMS)
            srv.flag(flag)
            h2.wait(lambda: all(h2.streams[s].done for s in sids), 15, "the others answered")
            answered = [s for s in sids if h2.streams[s].status == 200]
            assert len(answered) == MAX_STREAMS
            assert h2.get("/hello").status == 200
        # After it: past the limit the client knows is a connection error.
        with connect(srv) as h2:
            h2.wait(lambda: h2.pings_acked or True)
            for _ in range(MAX_STREAMS + 10):
                h2.request("GET", "/wait-flag?flag=never-created-flag")
            goaway_and_close(h2, 0x1)  # PROTOCOL_ERROR
    finally:
        srv.flag(flag)
        srv.flag("never-created-flag")
    healthy(srv, baseline)


def test_window_never_opened_resets_the_stream(srv, baseline):
    progress = "window-zero"
    with connect(srv, settings={SETTINGS_INITIAL_WINDOW_SIZE: 0}, auto_window=False) as h2:
        sid = h2.request("GET", f"/big-stream?n=2000&progress={progress}")
        st = h2.streams[sid]
        # http2.send_timeout = 1 s: the stalled response is reset, the app stops.
        h2.wait(lambda: st.reset is not None, 10, "the stalled stream's reset")
        assert st.reset == CANCEL and st.status == 200 and not st.data
        sent = (srv.shared / progress).read_text().split()
        assert int(sent[0]) < 10 and "done" not in sent  # held back by send(), then stopped
        # The connection itself goes on.
        h2.send(SettingsFrame(0, settings={SETTINGS_INITIAL_WINDOW_SIZE: 65535}).serialize())
        assert h2.get("/hello").status == 200
    healthy(srv, baseline)
