"""HTTP/3 under fpy3-master: QUIC packets steered to the worker that owns the connection."""

from __future__ import annotations

import signal
from collections import Counter

import h3clients
import pytest
from conftest import wait_until
from test_master_workers import wait_workers, workers

APP = "apps:app"


def pids_over_h3(srv, n: int, connections: int) -> Counter:
    try:
        responses = h3clients.aioquic_many(
            srv.host,
            srv.port,
            [("GET", "/pid", b"")] * n,
            str(srv.cafile),
            connections=connections,
            timeout=30,
        )
    except h3clients.ClientUnavailable as exc:
        pytest.skip(str(exc))
    assert {r.status for r in responses} == {200}
    return Counter(int(r.body) for r in responses)


def test_h3_spreads_over_workers_and_survives_reload(start_server):
    srv = start_server(
        app=APP, command="master", config={"workers": {"count": 3}, "http3": {"enabled": True}}
    )
    first = set(wait_workers(srv, 3))
    seen = pids_over_h3(srv, 90, connections=30)
    # Connections land on every worker, and every request on a connection is
    # answered (a packet reaching the wrong worker would reset its connection).
    assert set(seen) <= first and len(seen) >= 2, (seen, first)

    srv.proc.send_signal(signal.SIGHUP)
    # The new generation serves once the old one has drained away.
    wait_until(
        lambda: len(w := set(workers(srv))) == 3 and not (w & first),
        timeout=30,
        message=lambda: srv.stderr()[-2000:],
    )
    second = set(wait_workers(srv, 3))
    after = pids_over_h3(srv, 60, connections=20)
    assert set(after) <= second and len(after) >= 2, (after, second)
    assert srv.stop() == 0, srv.stderr()
