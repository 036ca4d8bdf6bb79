"""The end of a worker: what is left at the drain deadline is cancelled and awaited,
then lifespan shutdown runs; every QUIC connection still open gets a CONNECTION_CLOSE
at once (on both engines, for ``fpy3 run`` and for a worker under ``fpy3-master``,
which leaves through ``os._exit``), so clients learn now instead of at their idle
timeout. Background work left by finished requests is waited for.
"""

from __future__ import annotations

import concurrent.futures
import signal
import time

import h3clients as kit
import pytest
from harness import call, wait_until

pytestmark = pytest.mark.usefixtures("quic_engine")

H3_NO_ERROR = 0x100
DRAIN_TIMEOUT = 1.5
CLIENT_IDLE = 25.0  # the client's own idle timeout: a close before it came from the server


def h3_hanging_request(srv, path: str) -> concurrent.futures.Future:
    """An HTTP/3 request whose response never comes, in a thread: its future gives how
    the connection ended (see h3clients.aioquic_until_closed)."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(
        call,
        kit.aioquic_until_closed,
        srv.host,
        srv.port,
        path,
        cafile=str(srv.cafile),
        timeout=CLIENT_IDLE,
    )
    pool.shutdown(wait=False)
    return future


@pytest.mark.parametrize("command", ["run", "master"])
def test_deadline_cancels_tasks_closes_quic_then_lifespan_shutdown(
    start_server, quic_engine, command
):
    srv = start_server(
        app="apps:lifespan_state_app",
        http=True,
        command=command,
        config={
            "http3": {"enabled": True, "engine": quic_engine},
            "workers": {"count": 1, "drain_timeout": DRAIN_TIMEOUT},
        },
    )
    if command == "master":
        wait_until(lambda: "serving" in srv.stderr(), message=srv.stderr)
    # In flight at the deadline: one HTTP/1.1 request and one HTTP/3 request.
    conn = srv.connect(tls=False)
    conn.send(b"GET /cancellable?name=lifespan HTTP/1.1\r\nHost: x\r\n\r\n")
    h3 = h3_hanging_request(srv, "/cancellable?name=lifespan")
    wait_until(
        lambda: srv.record("lifespan").count("started") == 2,
        message=lambda: srv.record("lifespan"),
    )
    term = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.wait_exit() == 0
    code, by_server, when, _reset = h3.result(timeout=CLIENT_IDLE + 10)
    # The server closed the QUIC connection at its drain deadline: not the client's
    # idle timer, not a stateless reset.
    assert (code, by_server) == (H3_NO_ERROR, True), (code, by_server, srv.stderr()[-3000:])
    assert when - term < DRAIN_TIMEOUT + 5, when - term
    # The HTTP/1.1 request's connection was closed too.
    assert conn.read_until_close() == b""
    conn.close()
    lines = srv.record("lifespan")
    assert lines == ["startup", "started", "started", "cancelled", "cancelled", "shutdown"], lines
    err = srv.stderr()
    assert "Task was destroyed but it is pending" not in err, err[-3000:]
    assert "never retrieved" not in err, err[-3000:]
    assert "cancelling 2 request task(s)" in err, err[-3000:]


def test_drain_waits_for_background_work(start_server, quic_engine):
    srv = start_server(
        app="apps:lifespan_state_app",
        http=True,
        config={
            "http3": {"enabled": True, "engine": quic_engine},
            "workers": {"drain_timeout": 20},
        },
    )
    r = srv.get("/background?flag=bg", tls=False)
    assert r.text == "responded"
    srv.wait_record("bg-log", "background-started")
    srv.proc.send_signal(signal.SIGTERM)
    # Still draining: the background job runs on (it waits for the flag).
    offset = srv.stderr_size()
    srv.wait_stderr("draining", 0)
    assert srv.alive() and "shutdown" not in srv.record("lifespan")
    srv.flag("bg")
    assert srv.wait_exit() == 0
    assert srv.record("bg-log") == ["background-started", "background-finished"]
    assert srv.record("lifespan")[-1] == "shutdown"
    assert "drain timeout" not in srv.stderr_since(offset)


def test_second_interrupt_ends_the_drain_at_once(start_server):
    srv = start_server(
        app="apps:lifespan_state_app", http=True, config={"workers": {"drain_timeout": 60}}
    )
    conn = srv.connect(tls=False)
    conn.send(b"GET /cancellable?name=lifespan HTTP/1.1\r\nHost: x\r\n\r\n")
    srv.wait_record("lifespan", "started")
    srv.proc.send_signal(signal.SIGINT)  # the first Ctrl-C drains
    srv.wait_stderr("draining")
    assert srv.alive()
    srv.proc.send_signal(signal.SIGINT)  # the second stops now, not in a minute
    assert srv.wait_exit(timeout=10) == 0
    assert srv.record("lifespan")[-2:] == ["cancelled", "shutdown"]
    conn.close()
