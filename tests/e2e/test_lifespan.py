"""Lifespan: startup/shutdown, failed startup (exit 3), apps without lifespan, state."""

import signal

from harness import wait_until


def test_startup_and_shutdown_complete(start_server):
    srv = start_server(app="apps:lifespan_state_app")
    assert srv.record("lifespan") == ["startup"]
    assert srv.get("/hello").text == "Hello, world!"
    code = srv.stop()
    assert code == 0, srv.stderr()
    assert srv.record("lifespan") == ["startup", "shutdown"]


def test_state_from_lifespan_visible_in_requests(start_server):
    srv = start_server(app="apps:lifespan_state_app", http=True)
    for tls in (True, False):
        state = srv.get("/state", tls).json()["state"]
        assert state["token"] == "abc123"
        assert state["number"] == 42
        # each request gets its own copy
        assert "mutated_by_request" not in state
    scope = srv.get("/scope").json()
    assert scope["state"]["token"] == "abc123"


def test_startup_failed_exits_3_with_message(start_server):
    srv = start_server(app="apps:lifespan_failed_app", wait=False)
    code = srv.wait_exit(20)
    assert code == 3, f"exit {code}\n{srv.stderr()}"
    assert "database unreachable xyzzy" in srv.stderr()
    assert srv.record("lifespan") == ["startup-failing"]


def test_app_without_lifespan_support_still_serves(start_server):
    srv = start_server(app="apps:lifespan_unsupported_app", http=True)
    assert srv.get("/hello").text == "Hello, world!"
    assert srv.get("/hello", tls=False).text == "Hello, world!"
    state = srv.get("/state").json()["state"]
    assert state in (None, {})
    assert srv.alive()
    assert srv.stop() == 0


def test_app_returning_on_lifespan_still_serves(start_server):
    srv = start_server(app="apps:lifespan_returns_app")
    assert srv.get("/hello").text == "Hello, world!"
    assert srv.stop() == 0


def test_requests_wait_for_startup(start_server):
    srv = start_server(app="apps:lifespan_slow_startup_app", wait=False)
    srv.wait_record("lifespan", "startup-begin", timeout=20)
    assert srv.alive()
    srv.flag("startup-go")
    srv.wait_ready()
    assert srv.record("lifespan") == ["startup-begin", "startup-done"]
    assert srv.get("/state").json()["state"]["ready"] == "yes"


def test_sigint_also_runs_shutdown(start_server):
    srv = start_server(app="apps:lifespan_state_app")
    srv.proc.send_signal(signal.SIGINT)
    srv.wait_exit(15)
    wait_until(lambda: srv.record("lifespan") == ["startup", "shutdown"], timeout=5)
