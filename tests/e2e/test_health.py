"""Health paths answered by fpy3 itself, on every protocol, and the readiness that
fails before a stop drains (``health.drain_delay``), under ``fpy3 run`` and
``fpy3-master``."""

from __future__ import annotations

import signal
import time

import h3clients as kit
import httpx
from harness import call, free_port, wait_until

HEALTH = {"ready_path": "/readyz", "live_path": "/livez"}


def status(srv, path: str) -> int | None:
    """The status of GET ``path`` on a new connection; None when refused."""
    try:
        with srv.client(timeout=3.0) as c:
            return c.get(path).status_code
    except httpx.HTTPError:
        return None


def test_health_paths_over_http1_and_http3_without_the_app(start_server):
    port = free_port(udp=True)
    srv = start_server(
        http=True,
        config={"server": {"port": port}, "http3": {"enabled": True}, "health": HEALTH},
    )
    for tls in (True, False):
        r = srv.get("/readyz", tls)
        assert (r.status_code, r.text) == (200, "ready\n")  # the app would dump its scope
        assert r.headers["cache-control"] == "no-store"
        r = srv.get("/livez?probe=1", tls)
        assert (r.status_code, r.text) == (200, "alive\n")
    h3 = call(kit.aioquic_request, srv.host, port, "GET", "/readyz", cafile=str(srv.cafile))
    assert (h3.status, h3.body) == (200, b"ready\n")
    assert srv.get("/hello").text == "Hello, world!"
    # Counted and logged as any request.
    wait_until(lambda: '"GET /livez?probe=1 HTTP/1.1" 200' in srv.stdout(), message=srv.stdout)


def test_health_paths_off_by_default(server):
    assert server.get("/readyz").headers["content-type"] == "application/json"  # the app's


def test_master_fails_readiness_for_the_drain_delay_then_drains(start_server):
    delay = 3.0
    srv = start_server(
        command="master",
        config={
            "workers": {"count": 2, "drain_timeout": 5.0},
            "health": {**HEALTH, "drain_delay": delay},
        },
    )
    wait_until(lambda: srv.stderr().count("serving") >= 2, message=srv.stderr)
    assert status(srv, "/readyz") == 200
    keep = srv.connect()  # an open keep-alive connection across the stop
    keep.send(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    assert keep.read_response().status == 200
    stopped_at = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    # New connections see 503 on the readiness path, whichever worker takes them ...
    wait_until(
        lambda: all(status(srv, "/readyz") == 503 for _ in range(4)),
        message=srv.stderr,
    )
    # ... while everything else is served as before: new connections, keep-alive, no close.
    assert status(srv, "/livez") == 200
    assert status(srv, "/hello") == 200
    keep.send(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    resp = keep.read_response()
    assert resp.status == 200 and resp.header("connection") is None
    assert time.monotonic() - stopped_at < delay, "the delay ended before the checks"
    # Then the drain: new connections are refused and the master exits.
    wait_until(lambda: status(srv, "/hello") is None, timeout=delay + 5, message=srv.stderr)
    assert time.monotonic() - stopped_at >= delay
    assert srv.wait_exit() == 0, srv.stderr()
    assert f"draining in {delay:g}s" in srv.stderr()


def test_run_fails_readiness_for_the_drain_delay_and_quit_cuts_it_short(start_server):
    srv = start_server(config={"health": {**HEALTH, "drain_delay": 60.0}})
    assert status(srv, "/readyz") == 200
    srv.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: status(srv, "/readyz") == 503, message=srv.stderr)
    assert srv.get("/hello").status_code == 200
    srv.proc.send_signal(signal.SIGQUIT)
    assert srv.wait_exit(10) == 0, srv.stderr()
