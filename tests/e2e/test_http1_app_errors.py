"""App errors: exceptions, broken message sequences, wrong content-length.

Each test checks what the client sees, what is logged, and that the worker keeps serving.
"""

import pytest
from harness import wait_until

REQ = b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n"
TRACEBACK_MARK = "Exception in ASGI application"


@pytest.mark.parametrize("tls", [True, False], ids=["https", "http"])
def test_exception_before_start_gives_500(server, tls):
    offset = server.stderr_size()
    with server.connect(tls) as conn:
        conn.send(REQ % b"/raise-before")
        resp = conn.read_response()
        assert resp.status == 500
        assert "boom-before-start" not in resp.body.decode("latin-1")
        assert "Traceback" not in resp.body.decode("latin-1")
        # a complete 500 leaves the connection usable (or closed, never garbled)
        if conn.try_send(REQ % b"/hello"):
            nxt = conn.read_response(allow_incomplete=True)
            assert not nxt.complete or nxt.body == b"Hello, world!"
    log = server.wait_stderr(TRACEBACK_MARK, offset)
    server.wait_stderr("boom-before-start", offset)
    assert "Traceback" in log
    server.assert_serving(tls)


def test_debug_puts_traceback_in_500_body(start_server):
    srv = start_server(config={"server": {"debug": True}})
    r = srv.get("/raise-before")
    assert r.status_code == 500
    assert "boom-before-start" in r.text
    assert "Traceback" in r.text
    srv.wait_stderr(TRACEBACK_MARK)
    srv.assert_serving()


def test_traceback_goes_to_error_log_file(start_server, tmp_path):
    errlog = tmp_path / "error.log"
    srv = start_server(config={"logging": {"error_log_file": str(errlog)}})
    assert srv.get("/raise-before").status_code == 500
    wait_until(
        lambda: errlog.exists() and TRACEBACK_MARK in errlog.read_text(),
        message=lambda: errlog.read_text() if errlog.exists() else "no error log file",
    )
    assert "boom-before-start" in errlog.read_text()


@pytest.mark.parametrize("tls", [True, False], ids=["https", "http"])
def test_exception_after_start_closes_connection(server, tls):
    offset = server.stderr_size()
    with server.connect(tls) as conn:
        conn.send(REQ % b"/raise-after")
        resp = conn.read_response(allow_incomplete=True)
        assert conn.eof, "connection still open after the app failed mid-response"
    # The 200 head may have been sent, but the body must visibly be cut short.
    assert not resp.complete
    if resp.status:
        assert resp.status == 200
        assert resp.body in (b"", b"partial")
    server.wait_stderr(TRACEBACK_MARK, offset)
    server.wait_stderr("boom-after-start", offset)
    server.assert_serving(tls)


def test_double_start_is_an_app_error(server):
    offset = server.stderr_size()
    with server.connect() as conn:
        conn.send(REQ % b"/double-start")
        resp = conn.read_response(allow_incomplete=True)
        if resp.complete:
            # nothing was on the wire yet: a clean 500
            assert resp.status == 500
            assert resp.body != b"second"
        else:
            # the first head went out: the connection is closed instead
            assert conn.eof
            assert resp.status in (0, 200)
    wait_for_any_log(server, offset)
    server.assert_serving()


def test_body_after_final_body_closes_connection(server):
    offset = server.stderr_size()
    with server.connect() as conn:
        conn.send(REQ % b"/body-after-final")
        resp = conn.read_response()
        assert resp.status == 200
        assert resp.body == b"complete"
        rest = conn.read_until_close()
    assert b"extra" not in rest
    assert rest == b""
    wait_for_any_log(server, offset)
    server.assert_serving()


def test_content_length_too_much_closes_connection(server):
    offset = server.stderr_size()
    with server.connect() as conn:
        conn.send(REQ % b"/cl-more")
        resp = conn.read_response(allow_incomplete=True)
        rest = conn.read_until_close()
    # Nothing, a 500 (nothing was on the wire yet), or the 200 cut at 10 bytes; never more
    # than declared, and nothing left over to pass for a "next response".
    assert resp.status in (0, 200, 500), resp
    if resp.status == 200:
        assert len(resp.body) <= 10
    assert rest == b""
    assert b"ABCDEFGHIJ" not in resp.body + rest
    wait_for_log(server, offset, "content-length")
    server.assert_serving()


def test_content_length_too_little_in_one_message_is_a_500(server):
    # Nothing was on the wire yet: the declared length is checked before the head goes.
    offset = server.stderr_size()
    with server.connect() as conn:
        conn.send(REQ % b"/cl-less")
        resp = conn.read_response()
        assert resp.status == 500
        assert resp.body == b"Internal Server Error\n"
        conn.send(REQ % b"/hello")  # the connection stays usable
        assert conn.read_response().body == b"Hello, world!"
    wait_for_log(server, offset, "content-length")
    server.assert_serving()


def test_content_length_too_little_streamed_closes_connection(server):
    offset = server.stderr_size()
    with server.connect() as conn:
        conn.send(REQ % b"/cl-less-stream")
        resp = conn.read_response(allow_incomplete=True)
        assert conn.eof or conn.read_until_close() == b""
    assert resp.status == 200
    assert not resp.complete
    assert resp.body == b"01234"
    wait_for_log(server, offset, "content-length")
    server.assert_serving()


def test_worker_survives_many_errors(server):
    for path in [b"/raise-before", b"/raise-after", b"/double-start", b"/cl-more"] * 5:
        with server.connect() as conn:
            conn.send(REQ % path)
            conn.read_response(allow_incomplete=True)
    server.assert_serving()
    server.assert_serving(tls=False)


# --- helpers ------------------------------------------------------------------------


def wait_for_any_log(server, offset):
    """The server logged something about the app error (any level, any wording)."""
    wait_until(
        lambda: server.stderr_since(offset).strip(),
        message="nothing was logged for the app error",
    )


def wait_for_log(server, offset, needle):
    """A log line mentioning ``needle`` (case-insensitive) appeared after ``offset``."""
    wait_until(
        lambda: needle in server.stderr_since(offset).lower(),
        message=lambda: f"{needle!r} not logged:\n{server.stderr_since(offset)[-2000:]}",
    )
