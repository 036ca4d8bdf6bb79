"""The master's Prometheus endpoint: one view of every worker, across reloads, read
with prometheus_client's own text parser."""

from __future__ import annotations

import os
import signal
import socket

import h3clients
import httpx
import pytest
from harness import RawConn, call, free_port, wait_until
from masters import wait_workers
from wsraw import RawWS, frame

parser = pytest.importorskip("prometheus_client.parser")

APP = "ws_apps:app"


def scrape(port: int) -> dict[str, dict]:
    """name -> {"type": ..., "samples": {(sample name, sorted labels): value}}."""
    resp = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10, trust_env=False)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {}
    for family in parser.text_string_to_metric_families(resp.text):
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
        families[family.name] = {"type": family.type, "samples": samples}
    return families


def value(families, name: str, sample: str | None = None, **labels) -> float:
    family = families[name]
    key = (sample or name, tuple(sorted(labels.items())))
    return family["samples"].get(key, 0.0)


def requests(families, protocol: str, code: int) -> float:
    return value(
        families, "fpy3_requests", "fpy3_requests_total", protocol=protocol, code=str(code)
    )


def test_metrics_cover_every_worker_protocol_and_reload(start_server):
    port = free_port()
    srv = start_server(
        app=APP,
        command="master",
        http=True,
        config={
            "workers": {"count": 2},
            "http3": {"enabled": True, "engine": "ngtcp2"},
            "metrics": {"port": port},
        },
    )
    wait_workers(srv, 2)
    assert f"metrics on http://127.0.0.1:{port}/metrics" in srv.stderr()
    base = scrape(port)
    ready_probes = requests(base, "http/1.1", 200)  # the harness' readiness GETs

    # HTTP/1.1 over TLS and cleartext, with statuses; HTTP/3; a websocket session.
    with srv.client() as c:
        for _ in range(5):
            assert c.get("/hello").status_code == 200
        assert c.get("/status?code=404").status_code == 404
    with RawConn("127.0.0.1", srv.http_port) as c:
        c.send(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        assert c.read_response().status == 200
    for _ in range(3):
        resp = call(
            h3clients.aioquic_request, srv.host, srv.port, "GET", "/hello", cafile=str(srv.cafile)
        )
        assert resp.status == 200
    ws = RawWS.open(srv, "/echo", tls=False)
    ws.send(frame(0x1, b"hi", mask=True))
    assert ws.recv_frame()[2] == b"hi"

    # Gauges are sampled once a second: the open websocket shows up, on its connection.
    def gauges():
        f = scrape(port)
        return value(f, "fpy3_open_websockets") == 1 and f

    open_now = wait_until(gauges, timeout=10)
    assert value(open_now, "fpy3_open_connections", protocol="http/1.1") >= 1
    assert value(open_now, "fpy3_open_streams", protocol="http/1.1") >= 1
    assert open_now["fpy3_open_connections"]["type"] == "gauge"
    ws.close()

    def counted():
        f = scrape(port)
        return (
            requests(f, "http/1.1", 200) >= ready_probes + 6
            and requests(f, "h3", 200) == 3
            and value(f, "fpy3_quic_handshakes", "fpy3_quic_handshakes_total") >= 3
            and f
        )

    families = wait_until(counted, timeout=10)
    assert requests(families, "http/1.1", 404) == 1
    assert requests(families, "http/1.1", 101) == 1  # the websocket handshake
    assert (
        value(
            families,
            "fpy3_websocket_sessions",
            "fpy3_websocket_sessions_total",
            protocol="http/1.1",
        )
        == 1
    )
    # The histogram agrees with the counters.
    h1_total = sum(
        v
        for (name, labels), v in families["fpy3_requests"]["samples"].items()
        if dict(labels)["protocol"] == "http/1.1"
    )
    count = value(
        families,
        "fpy3_request_duration_seconds",
        "fpy3_request_duration_seconds_count",
        protocol="http/1.1",
    )
    inf = value(
        families,
        "fpy3_request_duration_seconds",
        "fpy3_request_duration_seconds_bucket",
        protocol="http/1.1",
        le="+Inf",
    )
    assert count == inf == h1_total
    assert families["fpy3_request_duration_seconds"]["type"] == "histogram"
    assert value(families, "fpy3_workers") == 2
    assert value(families, "fpy3_worker_starts", "fpy3_worker_starts_total") == 2
    # QUIC connections end after their request here (aioquic closes): RTT observed.
    wait_until(
        lambda: value(scrape(port), "fpy3_quic_rtt_seconds", "fpy3_quic_rtt_seconds_count") >= 3,
        timeout=10,
    )

    # A reload: the old workers' counts stay, the new ones add to them.
    before = scrape(port)
    old = set(wait_workers(srv, 2))
    offset = srv.stderr_size()
    os.kill(srv.pid, signal.SIGHUP)
    srv.wait_stderr("generation 2 ready", offset, 20)
    wait_until(lambda: not (set(wait_workers(srv, 2)) & old), timeout=20)
    wait_until(lambda: value(scrape(port), "fpy3_workers") == 2, timeout=10)
    with srv.client() as c:
        assert c.get("/hello").status_code == 200
    after = wait_until(
        lambda: (
            requests(f := scrape(port), "http/1.1", 200) > requests(before, "http/1.1", 200) and f
        ),
        timeout=10,
    )
    assert requests(after, "h3", 200) == 3
    assert requests(after, "http/1.1", 404) == 1
    assert value(after, "fpy3_quic_handshakes", "fpy3_quic_handshakes_total") >= 3
    assert value(after, "fpy3_reloads", "fpy3_reloads_total", result="ok") == 1
    assert value(after, "fpy3_worker_starts", "fpy3_worker_starts_total") == 4
    assert value(after, "fpy3_worker_exits", "fpy3_worker_exits_total", how="ok") == 2
    assert value(after, "fpy3_generation") == 2
    assert value(after, "fpy3_open_websockets") == 0
    assert srv.stop() == 0, srv.stderr()


def test_metrics_endpoint_answers_404_405_and_survives_bad_clients(start_server):
    port = free_port()
    srv = start_server(app=APP, config={"metrics": {"port": port}})  # fpy3 run becomes a master
    wait_workers(srv, 1)
    # A client that sends nothing, and one that sends an endless head: the master goes on.
    idle = socket.create_connection(("127.0.0.1", port))
    junk = socket.create_connection(("127.0.0.1", port))
    junk.sendall(b"GET /" + b"a" * 10000)
    assert httpx.get(f"http://127.0.0.1:{port}/nope", trust_env=False).status_code == 404
    assert httpx.post(f"http://127.0.0.1:{port}/metrics", trust_env=False).status_code == 405
    head = httpx.head(f"http://127.0.0.1:{port}/metrics", trust_env=False)
    assert head.status_code == 200 and head.content == b""
    assert "fpy3_requests_total" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
    srv.assert_serving()
    idle.close()
    junk.close()
    assert srv.stop() == 0, srv.stderr()


def test_metrics_port_in_use_exits_2(run_cli):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = run_cli(["run", "apps:app", "--port", str(free_port()), "--metrics-port", str(port)])
    assert p.returncode == 2
    assert f"metrics.port: cannot listen on 127.0.0.1:{port} (TCP)" in p.stderr


class LossyRelay:
    """A UDP relay between one client and the server that drops every ``nth`` datagram
    the server sends once the handshake is done (a lossy path, in user space)."""

    def __init__(self, server_port: int, nth: int = 6) -> None:
        import threading

        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.back.connect(("127.0.0.1", server_port))
        self.port = self.front.getsockname()[1]
        self.nth = nth
        self.dropped = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)
        self.front.close()
        self.back.close()

    def _run(self) -> None:
        import select

        client = None
        seen = 0
        while not self.stop.is_set():
            ready, _, _ = select.select([self.front, self.back], [], [], 0.1)
            for sock in ready:
                data, addr = sock.recvfrom(65536)
                if sock is self.front:
                    client = addr
                    self.back.send(data)
                elif client is not None:
                    seen += 1
                    if seen > 10 and seen % self.nth == 0:
                        self.dropped += 1
                        continue
                    self.front.sendto(data, client)


def test_quic_lost_packets_are_counted(start_server):
    port = free_port()
    srv = start_server(
        app=APP,
        config={"http3": {"enabled": True, "engine": "ngtcp2"}, "metrics": {"port": port}},
    )
    with LossyRelay(srv.port) as relay:
        resp = call(
            h3clients.aioquic_request,
            "127.0.0.1",
            relay.port,
            "GET",
            "/h3-download?n=80",
            cafile=str(srv.cafile),
            timeout=30,
        )
    assert resp.status == 200 and relay.dropped > 0
    lost = wait_until(
        lambda: value(scrape(port), "fpy3_quic_lost_packets", "fpy3_quic_lost_packets_total"),
        timeout=10,
    )
    assert 0 < lost
