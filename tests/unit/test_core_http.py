"""The HTTP core in-process: the response rules and the ASGI message flow, with a
recording adapter and host (no sockets; each test takes milliseconds)."""

from __future__ import annotations

import array
import asyncio

import pytest

from fpy3.core.errors import ClientDisconnected
from fpy3.core.http import (
    APP_DATE,
    APP_SERVER,
    BODYLESS,
    CLOSE,
    STREAM,
    TRAILERS,
    AppError,
    HTTPCycle,
    check_status,
    response_headers,
)


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
        self.finished: list[tuple[int, int]] = []

    def spawn(self, coro):
        return self.loop.create_task(coro)

    def response_done(self, scope, status, sent, started_at):
        self.finished.append((status, sent))


class Adapter:
    """Records what the core asks for."""

    def __init__(self):
        self.ops: list = []
        self.wants = 0

    def want_body(self):
        self.wants += 1

    def write_head(self, status, headers, flags, data, end):
        self.ops.append(("head", status, list(headers), flags, bytes(data), end))

    def write_body(self, data, end):
        self.ops.append(("body", bytes(data), end))

    def write_trailers(self, headers):
        self.ops.append(("trailers", list(headers)))

    def abort(self):
        self.ops.append(("abort",))


def exchange(app, method="GET", more_body=False, feed=None):
    """Run ``app`` as one cycle; ``feed(cycle)`` may drive the adapter side meanwhile."""

    async def main():
        loop = asyncio.get_running_loop()
        host = Host(app, loop)
        adapter = Adapter()
        scope = {"type": "http", "method": method, "path": "/", "headers": []}
        cycle = HTTPCycle(scope, adapter, host, more_body)
        task = loop.create_task(cycle.run())
        if feed is not None:
            await feed(cycle)
        await asyncio.wait_for(task, 5)
        return adapter, host, cycle

    return asyncio.run(main())


def responder(*messages, then=None):
    async def app(scope, receive, send):
        for m in messages:
            await send(m)
        if then is not None:
            await then(scope, receive, send)

    return app


def start(status=200, headers=()):
    return {"type": "http.response.start", "status": status, "headers": list(headers)}


def body(data=b"", more=False):
    return {"type": "http.response.body", "body": data, "more_body": more}


# --- status and headers ------------------------------------------------------------------


@pytest.mark.parametrize("status", [True, False, -1, 99, 100, 101, 199, 600, 1000, "200", 200.0])
def test_bad_status_rejected(status):
    with pytest.raises(AppError):
        check_status(status)


def test_good_status():
    import http

    assert check_status(200) == 200 and check_status(599) == 599
    assert check_status(http.HTTPStatus.NOT_FOUND) == 404
    assert type(check_status(http.HTTPStatus.OK)) is int


@pytest.mark.parametrize(
    "headers",
    [
        [(b"bad name", b"x")],
        [(b"bad:name", b"x")],
        [(b"", b"x")],
        [(b"x", b"a\rb")],
        [(b"x", b"a\nb")],
        [(b"x", b"a\x00b")],
        [(b"a\nb", b"x")],
        [("str", b"x")],
        [(b"x", "str")],
        [(b"x",)],
        [(b"content-length", b"1"), (b"content-length", b"1")],
        [(b"content-length", b"x")],
        [(b"content-length", b"-1")],
        [(b"content-length", b"1,1")],
        [(b"content-length", b"9" * 19)],
    ],
)
def test_bad_headers_rejected(headers):
    with pytest.raises(AppError):
        response_headers(headers)


def test_headers_normalised():
    out, flags, declared = response_headers(
        [
            (b"Content-Type", b"text/plain"),
            (b"Connection", b"close"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Server", b"mine"),
            (b"Date", b"today"),
            (b"Content-Length", b" 12 "),
            (b"X-Token!#$%&'*+-.^_`|~", b"v\tw"),
        ]
    )
    assert out == [
        (b"content-type", b"text/plain"),
        (b"server", b"mine"),
        (b"date", b"today"),
        (b"content-length", b" 12 "),
        (b"x-token!#$%&'*+-.^_`|~", b"v\tw"),
    ]
    assert flags == CLOSE | APP_SERVER | APP_DATE
    assert declared == 12


def test_invalid_start_is_a_500_and_the_error_reaches_the_app():
    seen = []

    async def app(scope, receive, send):
        try:
            await send(start(99))
        except AppError as exc:
            seen.append(str(exc))
            raise

    adapter, host, _ = exchange(app)
    assert "99" in seen[0]
    assert adapter.ops == [
        (
            "head",
            500,
            [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"22")],
            0,
            b"Internal Server Error\n",
            True,
        )
    ]
    assert host.finished == [(500, 22)]


# --- framing ------------------------------------------------------------------------------


def test_whole_body_gets_a_length():
    adapter, host, _ = exchange(responder(start(200, [(b"x", b"1")]), body(b"hello")))
    assert adapter.ops == [
        ("head", 200, [(b"x", b"1"), (b"content-length", b"5")], 0, b"hello", True)
    ]
    assert host.finished == [(200, 5)]


def test_streamed_body_is_stream_flagged():
    adapter, _, _ = exchange(responder(start(), body(b"a", True), body(b"b", True), body()))
    assert adapter.ops == [
        ("head", 200, [], STREAM, b"a", False),
        ("body", b"b", False),
        ("body", b"", True),
    ]


@pytest.mark.parametrize("status", [204, 304])
def test_204_and_304_never_carry_a_body(status):
    adapter, host, _ = exchange(responder(start(status), body(b"nope", True), body(b"nope")))
    assert adapter.ops == [
        ("head", status, [], BODYLESS, b"", False),
        ("body", b"", True),
    ]
    assert host.finished == [(status, 0)]


def test_204_drops_content_length_304_keeps_it():
    adapter, _, _ = exchange(responder(start(204, [(b"content-length", b"4")]), body()))
    assert adapter.ops[0][2] == []
    adapter, _, _ = exchange(responder(start(304, [(b"content-length", b"4")]), body()))
    assert adapter.ops[0][2] == [(b"content-length", b"4")]


def test_head_with_declared_length_and_no_body():
    adapter, host, _ = exchange(
        responder(start(200, [(b"content-length", b"1230")]), body()), method="HEAD"
    )
    assert adapter.ops == [("head", 200, [(b"content-length", b"1230")], BODYLESS, b"", True)]
    assert host.finished == [(200, 0)]


def test_head_gets_the_length_of_a_whole_body():
    adapter, _, _ = exchange(responder(start(), body(b"hello")), method="HEAD")
    assert adapter.ops == [("head", 200, [(b"content-length", b"5")], BODYLESS, b"", True)]


@pytest.mark.parametrize(
    "data",
    [
        bytearray(b"hello"),
        memoryview(b"hello"),
        memoryview(b"xhellox")[1:-1],
        array.array("B", b"hello"),
        array.array("H", [0x6568, 0x6C6C]),  # 4 bytes, not 2 elements
    ],
)
def test_bytes_like_bodies(data):
    expected = bytes(memoryview(data).cast("B"))
    adapter, host, _ = exchange(responder(start(), body(data)))
    assert adapter.ops[0][4] == expected
    assert adapter.ops[0][2] == [(b"content-length", b"%d" % len(expected))]


def test_str_body_is_an_app_error():
    adapter, _, _ = exchange(responder(start(), body("text")))  # type: ignore[arg-type]
    assert adapter.ops[0][1] == 500


def test_body_longer_than_declared_before_anything_went_out_is_a_500():
    adapter, _, _ = exchange(responder(start(200, [(b"content-length", b"2")]), body(b"abc")))
    assert [op[1] for op in adapter.ops] == [500]


def test_body_shorter_than_declared_when_streamed_aborts():
    adapter, host, _ = exchange(
        responder(start(200, [(b"content-length", b"10")]), body(b"abc", True), body(b"de"))
    )
    assert adapter.ops == [
        ("head", 200, [(b"content-length", b"10")], 0, b"abc", False),
        ("body", b"de", False),
        ("abort",),
    ]
    assert host.finished == [(200, 5)]


def test_body_longer_than_declared_when_streamed_aborts():
    adapter, _, _ = exchange(
        responder(start(200, [(b"content-length", b"4")]), body(b"abc", True), body(b"de"))
    )
    assert adapter.ops[-1] == ("abort",)
    assert all(op[0] != "body" for op in adapter.ops)


# --- the app's lifecycle ---------------------------------------------------------------------


def test_exception_after_start_aborts():
    async def fail(scope, receive, send):
        raise RuntimeError("boom")

    adapter, _, _ = exchange(responder(start(), body(b"x", True), then=fail))
    assert adapter.ops[-1] == ("abort",)


def test_exception_after_complete_touches_nothing():
    async def fail(scope, receive, send):
        raise RuntimeError("late")

    adapter, host, _ = exchange(responder(start(), body(b"x"), then=fail))
    assert [op[0] for op in adapter.ops] == ["head"]
    assert host.finished == [(200, 1)]


def test_returning_without_response_is_a_500():
    adapter, _, _ = exchange(responder())
    assert adapter.ops[0][1] == 500


def test_returning_with_head_held_is_a_500_and_mid_body_aborts():
    adapter, _, _ = exchange(responder(start(201)))
    assert adapter.ops[0][1] == 500
    adapter, _, _ = exchange(responder(start(201), body(b"x", True)))
    assert adapter.ops[-1] == ("abort",)


def test_send_after_disconnect_raises_client_disconnected():
    raised = []

    async def app(scope, receive, send):
        await send(start())
        await send(body(b"a", True))
        while True:
            try:
                await send(body(b"b", True))
            except OSError as exc:
                raised.append(exc)
                raise
            await asyncio.sleep(0)

    async def feed(cycle):
        await asyncio.sleep(0.01)
        cycle.feed_disconnect()

    adapter, host, _ = exchange(app, feed=feed)
    assert isinstance(raised[0], ClientDisconnected) and isinstance(raised[0], OSError)
    assert ("abort",) not in adapter.ops  # nobody left to tell


def test_receive_returns_disconnect_once_the_response_is_complete():
    got = []

    async def app(scope, receive, send):
        await send(start())
        await send(body(b"done"))
        got.append(await receive())  # the request body is never read: disconnect

    exchange(app, more_body=True)
    assert got == [{"type": "http.disconnect"}]


def test_receive_body_then_waits_for_the_end():
    got = []

    async def app(scope, receive, send):
        got.append(await receive())
        got.append(await receive())
        waiting = asyncio.ensure_future(receive())
        await asyncio.sleep(0)
        assert not waiting.done()
        await send(start())
        await send(body(b"ok"))
        got.append(await waiting)

    async def feed(cycle):
        await asyncio.sleep(0)
        cycle.feed_body(b"ab", True)
        await asyncio.sleep(0.01)
        cycle.feed_body(b"c", False)

    adapter, _, _ = exchange(app, more_body=True, feed=feed)
    assert got == [
        {"type": "http.request", "body": b"ab", "more_body": True},
        {"type": "http.request", "body": b"c", "more_body": False},
        {"type": "http.disconnect"},
    ]
    assert adapter.wants >= 1


def test_send_after_complete_is_an_error():
    seen = []

    async def late(scope, receive, send):
        try:
            await send(body(b"more"))
        except RuntimeError as exc:
            seen.append(str(exc))

    exchange(responder(start(), body(b"x"), then=late))
    assert "after the response completed" in seen[0]


def test_cancelled_mid_response_aborts_and_reraises():
    async def main():
        loop = asyncio.get_running_loop()

        async def app(scope, receive, send):
            await send(start())
            await send(body(b"x", True))
            await asyncio.sleep(3600)

        host = Host(app, loop)
        adapter = Adapter()
        cycle = HTTPCycle({"type": "http", "method": "GET"}, adapter, host, False)
        task = loop.create_task(cycle.run())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return adapter

    adapter = asyncio.run(main())
    assert adapter.ops[-1] == ("abort",)


# --- the http.response.trailers extension -------------------------------------------------


def trailers(headers=(), more=False):
    return {"type": "http.response.trailers", "headers": list(headers), "more_trailers": more}


def start_trailers(status=200, headers=()):
    return {**start(status, headers), "trailers": True}


def test_trailers_end_the_response_not_the_body():
    app = responder(
        start_trailers(),
        body(b"ab", more=True),
        body(b"cd"),
        trailers([(b"X-Sum", b"1")], more=True),
        trailers([(b"x-count", b"4")]),
    )
    adapter, host, cycle = exchange(app)
    assert adapter.ops == [
        ("head", 200, [], STREAM | TRAILERS, b"ab", False),
        ("body", b"cd", False),
        ("trailers", [(b"x-sum", b"1"), (b"x-count", b"4")]),
    ]
    assert host.finished == [(200, 4)] and cycle.complete


def test_trailers_after_a_whole_body_keep_it_streamed():
    # A body given whole would get a Content-Length and end; with trailers it goes out
    # unended (chunked on HTTP/1.1) and the trailers end it.
    adapter, host, _ = exchange(responder(start_trailers(), body(b"whole"), trailers()))
    assert adapter.ops == [
        ("head", 200, [], STREAM | TRAILERS, b"whole", False),
        ("trailers", []),
    ]
    assert host.finished == [(200, 5)]


def test_trailers_with_declared_length():
    app = responder(
        start_trailers(headers=[(b"content-length", b"3")]), body(b"abc"), trailers([(b"x", b"y")])
    )
    adapter, _, _ = exchange(app)
    assert adapter.ops == [
        ("head", 200, [(b"content-length", b"3")], TRAILERS, b"abc", False),
        ("trailers", [(b"x", b"y")]),
    ]


def test_trailers_on_head_end_without_them():
    adapter, host, _ = exchange(
        responder(start_trailers(), body(b"abc"), trailers([(b"x", b"y")])), method="HEAD"
    )
    assert adapter.ops == [
        ("head", 200, [(b"content-length", b"3")], BODYLESS | TRAILERS, b"", False),
        ("body", b"", True),
    ]
    assert host.finished == [(200, 0)]


@pytest.mark.parametrize(
    "messages",
    [
        # Trailers the start did not announce.
        [start(), body(b"x", more=True), trailers()],
        # Trailers before the body ended.
        [start_trailers(), body(b"x", more=True), trailers()],
        # A body part after the last one.
        [start_trailers(), body(b"x"), body(b"y")],
    ],
    ids=["not-announced", "before-body-end", "body-after-end"],
)
def test_trailers_out_of_order_are_app_errors(messages):
    adapter, _, _ = exchange(responder(*messages))
    assert adapter.ops[-1] == ("abort",)


def test_invalid_trailer_field_is_an_app_error():
    adapter, _, _ = exchange(
        responder(start_trailers(), body(b"x"), trailers([(b"bad name", b"v")]))
    )
    assert adapter.ops[-1] == ("abort",)


def test_app_returning_before_its_trailers_aborts():
    adapter, _, _ = exchange(responder(start_trailers(), body(b"x")))
    assert adapter.ops[-1] == ("abort",)


def test_scope_advertises_trailers_on_http11_2_and_3_not_10():
    from fpy3.core.scope import build_scope

    host = Host(None, None)
    for version in ("1.1", "2", "3"):
        scope = build_scope(host, "http", version, "https", "GET", "/", b"/", b"", [], None, None)
        assert scope["extensions"] == {"http.response.trailers": {}}
    scope = build_scope(host, "http", "1.0", "http", "GET", "/", b"/", b"", [], None, None)
    assert "extensions" not in scope
