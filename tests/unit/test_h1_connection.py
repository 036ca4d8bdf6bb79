"""The HTTP/1.1 connection in-process: the real service and connection, a mock
transport (as uvicorn's tests/protocols do); no sockets, milliseconds per test."""

from __future__ import annotations

import asyncio

import pytest

from fpy3.config import Settings
from fpy3.h1.connection import H1Listener
from fpy3.service import HTTPService


class Transport(asyncio.Transport):
    def __init__(self):
        super().__init__()
        self.out = bytearray()
        self.closed = False
        self.paused = False

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 5555), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def write(self, data):
        assert not self.closed, "write after close"
        self.out += data

    unsent = 0  # what a client that stops reading leaves in the send buffer

    def get_write_buffer_size(self):
        return self.unsent

    def writelines(self, parts):
        for p in parts:
            self.write(p)

    def close(self):
        self.closed = True

    def abort(self):
        self.closed = True

    def is_closing(self):
        return self.closed

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False

    def take(self) -> bytes:
        data = bytes(self.out)
        self.out.clear()
        return data


def responses(data: bytes) -> list[tuple[bytes, dict, bytes]]:
    """Split raw HTTP/1.1 responses (Content-Length or chunked framing)."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b": ")
            headers.setdefault(k.lower(), []).append(v)
        status = lines[0]
        if b"content-length" in headers and b" 304 " not in status and b" 204 " not in status:
            n = int(headers[b"content-length"][0])
            body, data = rest[:n], rest[n:]
        elif headers.get(b"transfer-encoding") == [b"chunked"]:
            body = b""
            while True:
                size, _, rest = rest.partition(b"\r\n")
                n = int(size, 16)
                body += rest[:n]
                rest = rest[n + 2 :]
                if n == 0:
                    break
            data = rest
        else:
            body, data = b"", rest
        out.append((status, headers, body))
    return out


class Harness:
    def __init__(self, app, **settings):
        self.loop = asyncio.get_running_loop()
        s = Settings()
        for section, values in settings.items():
            import dataclasses

            s = dataclasses.replace(
                s, **{section: dataclasses.replace(getattr(s, section), **values)}
            )
        self.svc = HTTPService(app, self.loop, s)
        self.svc.start()
        self.conn = H1Listener(self.svc, "http")()
        self.transport = Transport()
        self.conn.connection_made(self.transport)

    def feed(self, data: bytes) -> None:
        self.conn.data_received(data)

    async def until(self, predicate, timeout: float = 2.0):
        deadline = self.loop.time() + timeout
        while not predicate():
            if self.loop.time() > deadline:
                raise AssertionError(f"not met; transport has {bytes(self.transport.out)!r}")
            await asyncio.sleep(0.001)

    async def close(self):
        self.svc.close()
        await asyncio.sleep(0)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


async def hello(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello " + scope["path"].encode()})


GET = b"GET /%s HTTP/1.1\r\nHost: x\r\n\r\n"


def test_pipelined_requests_answered_in_order():
    async def main():
        h = Harness(hello)
        h.feed(GET % b"a" + GET % b"b" + GET % b"c")
        await h.until(lambda: h.transport.out.count(b"HTTP/1.1 200") == 3)
        got = [r[2] for r in responses(h.transport.take())]
        assert got == [b"hello /a", b"hello /b", b"hello /c"]
        await h.close()

    run(main())


def test_next_request_runs_while_background_work_of_the_last_goes_on():
    release = asyncio.Event()
    log = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": scope["path"].encode()})
        if scope["path"] == "/slow":
            log.append("background started")
            await release.wait()
            log.append("background done")

    async def main():
        h = Harness(app)
        h.feed(GET % b"slow")
        await h.until(lambda: log == ["background started"])
        h.feed(GET % b"next")
        await h.until(lambda: h.transport.out.count(b"HTTP/1.1 200") == 2)
        assert [r[2] for r in responses(h.transport.take())] == [b"/slow", b"/next"]
        assert log == ["background started"]
        assert len(h.svc.tasks) == 1  # the background work, tracked for the drain
        release.set()
        await h.until(lambda: not h.svc.tasks)
        await h.close()

    run(main())


def test_unread_body_is_discarded_and_the_connection_goes_on():
    async def main():
        h = Harness(hello)
        h.feed(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01234")
        await h.until(lambda: b"hello /up" in h.transport.out)
        h.feed(b"56789" + GET % b"after")
        await h.until(lambda: b"hello /after" in h.transport.out)
        assert [r[2] for r in responses(h.transport.take())] == [b"hello /up", b"hello /after"]
        await h.close()

    run(main())


def test_head_and_bodyless_framing():
    async def app(scope, receive, send):
        status = int(scope["path"][1:])
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"dropped", "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def main():
        h = Harness(app)
        h.feed(b"HEAD /200 HTTP/1.1\r\nHost: x\r\n\r\n" + GET % b"204" + GET % b"304")
        await h.until(lambda: h.transport.out.count(b"HTTP/1.1") == 3)
        out = h.transport.take()
        assert b"dropped" not in out and b"chunked" not in out
        assert not h.transport.closed
        await h.close()

    run(main())


def test_http10_streamed_response_closes():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await send({"type": "http.response.body", "body": b"b"})

    async def main():
        h = Harness(app)
        h.feed(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        await h.until(lambda: h.transport.closed)
        out = h.transport.take()
        assert out.startswith(b"HTTP/1.0 200 OK\r\n") and out.endswith(b"\r\n\r\nab")
        assert b"connection: close" in out
        await h.close()

    run(main())


def test_expect_continue_when_the_app_reads():
    async def app(scope, receive, send):
        msg = await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": msg["body"]})

    async def main():
        h = Harness(app)
        h.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        await h.until(lambda: b"100 Continue" in h.transport.out)
        h.feed(b"abc")
        await h.until(lambda: h.transport.out.endswith(b"abc"))
        await h.close()

    run(main())


def test_app_connection_close_closes_after_the_response():
    async def app(scope, receive, send):
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"connection", b"close")]}
        )
        await send({"type": "http.response.body", "body": b"bye"})

    async def main():
        h = Harness(app)
        h.feed(GET % b"")
        await h.until(lambda: h.transport.closed)
        out = h.transport.take()
        assert out.count(b"connection: close") == 1 and out.endswith(b"bye")
        await h.close()

    run(main())


@pytest.mark.parametrize("draining", [False, True])
def test_drain_says_connection_close(draining):
    async def main():
        h = Harness(hello)
        if draining:
            h.svc.draining = True
        h.feed(GET % b"x")
        await h.until(lambda: b"hello /x" in h.transport.out)
        assert (b"connection: close" in h.transport.out) == draining
        assert h.transport.closed == draining
        await h.close()

    run(main())


def test_server_and_date_from_the_app_replace_ours():
    async def app(scope, receive, send):
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"server", b"mine"), (b"date", b"then")],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    async def main():
        h = Harness(app)
        h.feed(GET % b"")
        await h.until(lambda: h.transport.out.endswith(b"\r\n\r\n"))
        [(_, headers, _)] = responses(h.transport.take())
        assert headers[b"server"] == [b"mine"] and headers[b"date"] == [b"then"]
        await h.close()

    run(main())


def test_disconnect_reaches_the_app_and_send_raises():
    seen = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        assert (await receive())["type"] == "http.request"
        seen.append(await receive())
        try:
            await send({"type": "http.response.body", "body": b"b", "more_body": True})
        except OSError as exc:
            seen.append(type(exc).__name__)

    async def main():
        h = Harness(app)
        h.feed(GET % b"")
        await h.until(lambda: b"\r\n\r\n" in h.transport.out)
        h.conn.connection_lost(None)
        await h.until(lambda: len(seen) == 2)
        assert seen == [{"type": "http.disconnect"}, "ClientDisconnected"]
        await h.close()

    run(main())


def test_header_timeout_answers_408():
    async def main():
        h = Harness(hello, http1={"header_timeout": 0.2})
        h.feed(b"GET / HTTP/1.1\r\n")
        await h.until(lambda: h.transport.closed)
        assert h.transport.take().startswith(b"HTTP/1.1 408 ")
        await h.close()

    run(main())


# ---- deadlines (driven through the service clock, with deadlines moved into the past) ----


def expire(h: Harness, attr: str = "deadline") -> None:
    """Let the clock find ``attr`` passed, as it would after the timeout."""
    assert getattr(h.conn, attr), f"{attr} is not armed"
    setattr(h.conn, attr, h.loop.time() - 0.001)
    h.svc._tick()


async def reader(scope, receive, send):
    body = b""
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            return
        body += msg["body"]
        if not msg["more_body"]:
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"got %d" % len(body)})


POST = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"
POST_CHUNKED = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("head, part", [(POST, b"01234"), (POST_CHUNKED, b"5\r\n01234\r\n")])
def test_stalled_body_gets_408_and_close(head, part):
    async def main():
        h = Harness(reader, http1={"body_timeout": 7.0})
        t0 = h.loop.time()
        h.feed(head + part)
        await asyncio.sleep(0)
        # Armed from the last progress; not fired before then.
        assert h.conn.deadline >= t0 + 7.0
        h.svc._tick()
        assert not h.transport.closed
        expire(h)
        assert h.transport.closed
        out = h.transport.take()
        assert out.startswith(b"HTTP/1.1 408 ") and b"connection: close" in out
        assert not h.svc.connections
        await h.close()

    run(main())


def test_body_progress_moves_the_deadline():
    async def main():
        h = Harness(reader, http1={"body_timeout": 7.0})
        n = 3000
        h.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % n + b"0")
        await asyncio.sleep(0)
        h.conn.deadline = armed = 1.0  # as if time went on
        h.feed(b"1" * 100)
        assert h.conn.deadline == armed  # a trickle is no progress
        h.feed(b"2" * 1000)
        assert h.conn.deadline > armed  # BODY_PROGRESS bytes since the last move are
        h.feed(b"3" * (n - 1101))
        await h.until(lambda: b"got %d" % n in h.transport.out)
        assert h.conn.deadline and not h.transport.closed  # now the keep-alive timer
        await h.close()

    run(main())


def test_trickled_body_times_out():
    # One byte at a time (slow POST) never reaches BODY_PROGRESS: 408 at the deadline.
    async def main():
        h = Harness(reader, http1={"body_timeout": 7.0})
        h.feed(POST)
        for b in b"012345":
            h.feed(bytes([b]))
        expire(h)
        assert h.transport.take().startswith(b"HTTP/1.1 408 ") and h.transport.closed
        await h.close()

    run(main())


def test_no_body_timer_while_the_app_is_behind():
    release = asyncio.Event()

    async def slow(scope, receive, send):
        await release.wait()
        await reader(scope, receive, send)

    async def main():
        h = Harness(slow, http1={"body_timeout": 7.0})
        big = 300 * 1024
        h.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (big + 1))
        h.feed(b"a" * big)
        # Reading paused at the high-water mark: the stall is ours, not the client's.
        assert h.transport.paused and h.conn.deadline == 0.0
        release.set()
        await h.until(lambda: not h.transport.paused)
        assert h.conn.deadline  # reading again: the client owes the last byte
        h.feed(b"a")
        await h.until(lambda: b"got %d" % (big + 1) in h.transport.out)
        await h.close()

    run(main())


def test_no_body_timer_before_100_continue_then_one():
    async def app(scope, receive, send):
        await asyncio.sleep(0)
        await reader(scope, receive, send)

    async def main():
        h = Harness(app, http1={"body_timeout": 7.0})
        h.feed(POST[:-2] + b"Expect: 100-continue\r\n\r\n")
        assert h.conn.deadline == 0.0  # the client waits for us
        await h.until(lambda: b"100 Continue" in h.transport.out)
        assert h.conn.deadline  # 100 sent: now the client owes the body
        expire(h)
        assert b" 408 " in h.transport.take() and h.transport.closed
        await h.close()

    run(main())


def test_stalled_body_after_the_response_just_closes():
    async def main():
        h = Harness(hello, http1={"body_timeout": 7.0})
        h.feed(POST + b"01")
        await h.until(lambda: b"hello /" in h.transport.out)
        h.transport.take()
        expire(h)  # the rest of the body never comes
        assert h.transport.closed and h.transport.take() == b""
        await h.close()

    run(main())


def test_client_not_reading_is_dropped_after_send_timeout():
    async def main():
        h = Harness(hello, http1={"send_timeout": 9.0})
        t0 = h.loop.time()
        h.conn.pause_writing()
        assert h.conn.send_deadline >= t0 + 9.0
        h.svc._tick()
        assert not h.transport.closed
        h.conn.resume_writing()  # progress: the transport drained
        assert h.conn.send_deadline == 0.0
        h.conn.pause_writing()
        expire(h, "send_deadline")
        assert h.transport.closed and not h.svc.connections
        await h.close()

    run(main())


def test_closing_with_unsent_bytes_stays_under_the_send_timeout():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        h.transport.unsent = 5000  # the client has not read it
        await send({"type": "http.response.body", "body": b"x"})

    async def main():
        nonlocal h
        h = Harness(app, http1={"send_timeout": 9.0})
        h.feed(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await h.until(lambda: h.transport.closed)
        # Closed, but the bytes are not delivered: still counted, and bounded in time.
        assert h.conn in h.svc.connections and h.conn.send_deadline
        aborted = []
        h.transport.abort = lambda: aborted.append(True)
        expire(h, "send_deadline")
        assert aborted and not h.svc.connections
        await h.close()

    h = None
    run(main())


def test_closing_connection_is_forgotten_when_the_transport_is_done():
    async def main():
        h = Harness(hello)
        h.transport.unsent = 10
        h.feed(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await h.until(lambda: h.transport.closed)
        assert h.conn in h.svc.connections
        h.conn.connection_lost(None)
        assert not h.svc.connections
        await h.close()

    run(main())


# ---- request rules ----


def test_expect_continue_unread_body_says_connection_close():
    async def main():
        h = Harness(hello)
        h.feed(POST[:-2] + b"Expect: 100-continue\r\n\r\n")
        await h.until(lambda: h.transport.closed)
        out = h.transport.take()
        assert b"100 Continue" not in out
        [(status, headers, body)] = responses(out)
        assert status.startswith(b"HTTP/1.1 200") and headers[b"connection"] == [b"close"]
        await h.close()

    run(main())


def test_expect_continue_without_body_keeps_alive():
    async def main():
        h = Harness(hello)
        h.feed(b"GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n")
        await h.until(lambda: b"hello /" in h.transport.out)
        assert b"connection: close" not in h.transport.out and not h.transport.closed
        await h.close()

    run(main())


def test_connect_gets_405_without_the_app():
    called = []

    async def app(scope, receive, send):
        called.append(scope)

    async def main():
        h = Harness(app)
        h.feed(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        assert h.transport.closed
        out = h.transport.take()
        assert out.startswith(b"HTTP/1.1 405 ") and b"\r\nallow: GET, HEAD, POST" in out
        assert b"CONNECT" not in out.split(b"\r\nallow:")[1].split(b"\r\n")[0]
        await asyncio.sleep(0)
        assert called == []
        await h.close()

    run(main())


def test_scope_of_absolute_form_and_http12():
    scopes = []

    async def app(scope, receive, send):
        scopes.append(scope)
        await hello(scope, receive, send)

    async def main():
        h = Harness(app)
        h.feed(b"GET http://real.example:81/p?q=1 HTTP/1.2\r\nHost: other\r\n\r\n")
        await h.until(lambda: b"hello /p" in h.transport.out)
        assert h.transport.take().startswith(b"HTTP/1.1 200 ")
        [scope] = scopes
        assert scope["http_version"] == "1.1"
        assert scope["headers"] == [(b"host", b"real.example:81")]
        assert (scope["path"], scope["query_string"]) == ("/p", b"q=1")
        assert not h.transport.closed  # 1.1 semantics: kept alive
        await h.close()

    run(main())
