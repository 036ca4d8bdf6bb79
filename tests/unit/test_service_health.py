"""Health paths and the Alt-Svc value in-process: the real service and HTTP/1.1
connection over a mock transport (see test_h1_connection.py)."""

from __future__ import annotations

import asyncio

from test_h1_connection import Harness, responses, run

from fpy3.config import HTTP3Settings, ServerSettings, Settings
from fpy3.service import alt_svc

HEALTH = {"ready_path": "/readyz", "live_path": "/livez"}


def app_calls() -> tuple[list, object]:
    calls: list[str] = []

    async def app(scope, receive, send):
        calls.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"from the app"})

    return calls, app


def get(path: bytes, method: bytes = b"GET") -> bytes:
    return method + b" " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n"


def test_health_paths_are_answered_without_the_app():
    calls, app = app_calls()

    async def main():
        h = Harness(app, health=HEALTH)
        h.feed(get(b"/readyz") + get(b"/livez") + get(b"/readyz?verbose=1") + get(b"/other"))
        await h.until(lambda: h.transport.out.count(b"HTTP/1.1 200") == 4)
        got = responses(h.transport.take())
        assert [r[2] for r in got] == [b"ready\n", b"alive\n", b"ready\n", b"from the app"]
        assert got[0][1][b"cache-control"] == [b"no-store"]
        assert got[0][1][b"content-type"] == [b"text/plain; charset=utf-8"]
        assert calls == ["/other"]
        assert h.svc.requests_served == 4  # counted as any request
        await h.close()

    run(main())


def test_readiness_fails_once_not_ready_and_liveness_stays():
    calls, app = app_calls()

    async def main():
        h = Harness(app, health=HEALTH)
        h.svc.not_ready()
        h.feed(get(b"/readyz") + get(b"/livez") + get(b"/x"))
        await h.until(lambda: h.transport.out.count(b"HTTP/1.1") == 3)
        got = responses(h.transport.take())
        assert [r[0] for r in got] == [
            b"HTTP/1.1 503 Service Unavailable",
            b"HTTP/1.1 200 OK",
            b"HTTP/1.1 200 OK",
        ]
        assert got[0][2] == b"stopping\n"
        assert not h.transport.closed  # nothing else changes before the drain
        assert calls == ["/x"]
        await h.close()

    run(main())


def test_readiness_is_503_with_connection_close_during_the_drain():
    calls, app = app_calls()

    async def main():
        h = Harness(app, health=HEALTH)
        h.feed(get(b"/readyz"))
        await h.until(lambda: b"ready\n" in h.transport.out)
        h.transport.take()
        drain = asyncio.ensure_future(h.svc.drain(5.0))
        await asyncio.sleep(0)
        h.feed(get(b"/readyz"))
        await h.until(lambda: h.transport.closed)
        ((status, headers, body),) = responses(h.transport.take())
        assert status == b"HTTP/1.1 503 Service Unavailable"
        assert headers[b"connection"] == [b"close"]
        assert body == b"stopping\n"
        h.conn.connection_lost(None)
        await asyncio.wait_for(drain, 5)
        assert calls == []

    run(main())


def test_head_gets_the_length_without_a_body():
    async def main():
        _, app = app_calls()
        h = Harness(app, health=HEALTH)
        h.feed(get(b"/livez", b"HEAD") + get(b"/livez"))
        await h.until(lambda: h.transport.out.count(b"HTTP/1.1 200") == 2)
        out = h.transport.take()
        head, _, rest = out.partition(b"\r\n\r\n")
        assert b"content-length: 6" in head
        assert rest.startswith(b"HTTP/1.1 200")
        await h.close()

    run(main())


def test_health_is_off_by_default():
    calls, app = app_calls()

    async def main():
        h = Harness(app)
        assert h.svc.health is None
        h.feed(get(b"/readyz"))
        await h.until(lambda: b"from the app" in h.transport.out)
        assert calls == ["/readyz"]
        await h.close()

    run(main())


# --- Alt-Svc -------------------------------------------------------------------------------


def settings(server_port: int = 8443, **http3) -> Settings:
    return Settings(server=ServerSettings(port=server_port), http3=HTTP3Settings(**http3))


def test_alt_svc_values():
    assert alt_svc(settings()) == b'h3=":8443"; ma=86400'
    assert alt_svc(settings(8443, port=9443)) == b'h3=":9443"; ma=86400'  # the UDP port
    assert alt_svc(settings(alt_svc_port=443, alt_svc_max_age=3600)) == b'h3=":443"; ma=3600'
    assert alt_svc(settings(alt_svc_host="h3.example.com", alt_svc_port=443)) == (
        b'h3="h3.example.com:443"; ma=86400'
    )
    assert alt_svc(settings(alt_svc_host="2001:db8::1")) == b'h3="[2001:db8::1]:8443"; ma=86400'
    assert alt_svc(settings(alt_svc=False)) == b""
    assert alt_svc(settings(enabled=False, alt_svc_port=443)) == b""


def test_alt_svc_goes_on_every_http1_response():
    async def main():
        _, app = app_calls()
        h = Harness(app, http3={"alt_svc_port": 443, "alt_svc_max_age": 60})
        h.feed(get(b"/") + get(b"/"))
        await h.until(lambda: h.transport.out.count(b"from the app") == 2)
        assert h.transport.out.count(b'\r\nalt-svc: h3=":443"; ma=60\r\n') == 2
        await h.close()

    run(main())


def test_the_service_reads_alt_svc_from_its_settings():
    async def main():
        _, app = app_calls()
        h = Harness(app, http3={"alt_svc_port": 4433})
        assert h.svc.alt_svc == b'h3=":4433"; ma=86400'
        h2 = Harness(app, http3={"alt_svc": False})
        assert h2.svc.alt_svc == b""
        await h.close()
        await h2.close()

    run(main())
