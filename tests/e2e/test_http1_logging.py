"""Access log: Common/combined-style lines or JSON lines, to stdout or a file, or none."""

import json
from datetime import UTC, datetime

from harness import ACCESS_COMMON_RE, wait_until

UA = "fpy3-tests/1.0"
REFERER = "https://ref.example/page"


def make_request(srv, path="/hello?q=1", tls=True):
    with srv.client(tls) as c:
        r = c.get(path, headers={"user-agent": UA, "referer": REFERER})
    assert r.status_code == 200
    return r


def access_lines(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


def test_common_format_on_stdout(start_server):
    srv = start_server(http=True)
    r = make_request(srv, "/hello?q=1")
    lines = wait_until(
        lambda: access_lines(srv.stdout(), '"GET /hello?q=1 HTTP/1.1"'),
        message=lambda: f"no access line on stdout:\n{srv.stdout()[-2000:]}",
    )
    m = ACCESS_COMMON_RE.match(lines[0])
    assert m, f"not a common-format line: {lines[0]!r}"
    assert m["addr"] == "127.0.0.1"
    assert m["request"] == "GET /hello?q=1 HTTP/1.1"
    assert m["status"] == "200"
    assert m["bytes"] == str(len(r.content)) == "13"
    assert m["referer"] == REFERER
    assert m["ua"] == UA
    when = datetime.strptime(m["time"], "%d/%b/%Y:%H:%M:%S %z")
    assert abs((datetime.now(UTC) - when).total_seconds()) < 120


def test_common_format_dashes_and_statuses(start_server):
    srv = start_server(http=True)
    with srv.connect(tls=False) as conn:
        conn.send(b"GET /status?code=404 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.read_response().status == 404
    lines = wait_until(lambda: access_lines(srv.stdout(), '"GET /status?code=404 HTTP/1.1"'))
    m = ACCESS_COMMON_RE.match(lines[0])
    assert m, lines[0]
    assert m["status"] == "404"
    assert m["referer"] == "-"
    assert m["ua"] == "-"


def test_access_log_records_errors(start_server):
    srv = start_server()
    assert srv.get("/raise-before").status_code == 500
    lines = wait_until(lambda: access_lines(srv.stdout(), '"GET /raise-before HTTP/1.1"'))
    m = ACCESS_COMMON_RE.match(lines[0])
    assert m and m["status"] == "500"


def test_json_format(start_server):
    srv = start_server(config={"logging": {"access_format": "json"}})
    r = make_request(srv, "/hello?q=1")

    def entry():
        for line in srv.stdout().splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and obj.get("path") == "/hello":
                return obj
        return None

    obj = wait_until(entry, message=lambda: srv.stdout()[-2000:])
    for key in (
        "time",
        "remote_addr",
        "method",
        "path",
        "query",
        "protocol",
        "status",
        "bytes",
        "duration_ms",
        "user_agent",
        "referer",
    ):
        assert key in obj, f"missing {key!r} in {obj}"
    assert obj["remote_addr"] == "127.0.0.1"
    assert obj["method"] == "GET"
    assert obj["query"] == "q=1"
    assert obj["protocol"] == "HTTP/1.1"
    assert obj["status"] == 200
    assert obj["bytes"] == len(r.content)
    assert isinstance(obj["duration_ms"], int | float) and obj["duration_ms"] >= 0
    assert obj["user_agent"] == UA
    assert obj["referer"] == REFERER
    assert isinstance(obj["time"], str) and obj["time"]


def test_access_log_file(start_server, tmp_path):
    logfile = tmp_path / "access.log"
    srv = start_server(config={"logging": {"access_log_file": str(logfile)}})
    make_request(srv, "/hello?q=file")
    wait_until(
        lambda: logfile.exists() and access_lines(logfile.read_text(), "/hello?q=file"),
        message="no access line in access_log_file",
    )
    line = access_lines(logfile.read_text(), "/hello?q=file")[0]
    assert ACCESS_COMMON_RE.match(line), line
    assert "/hello?q=file" not in srv.stdout()


def test_access_log_disabled(start_server):
    srv = start_server(config={"logging": {"access_log": False}})
    make_request(srv, "/hello?q=silent")
    # Stopping flushes whatever the server would have written.
    srv.stop()
    assert "/hello?q=silent" not in srv.stdout()
    assert "/hello?q=silent" not in srv.stderr()


def test_access_log_line_per_pipelined_request(start_server):
    srv = start_server()
    with srv.connect() as conn:
        conn.send(b"GET /id?id=a HTTP/1.1\r\nHost: x\r\n\r\n" * 3)
        for _ in range(3):
            assert conn.read_response().status == 200
    wait_until(lambda: len(access_lines(srv.stdout(), '"GET /id?id=a HTTP/1.1"')) == 3)


def test_http10_request_logged_with_its_protocol(start_server):
    srv = start_server(config={"logging": {"access_format": "json"}})
    with srv.connect() as conn:
        conn.send(b"GET /hello?v=10 HTTP/1.0\r\n\r\n")
        assert conn.read_response().status == 200

    def entry():
        for line in srv.stdout().splitlines():
            if '"v=10"' in line and line.rstrip().endswith("}"):
                return json.loads(line)
        return None

    obj = wait_until(entry, message=lambda: srv.stdout()[-2000:])
    assert obj["protocol"] == "HTTP/1.0"
    assert obj["user_agent"] in ("", "-", None)
