"""HTTP/3 under fpy3-master: QUIC packets steered to the worker that owns the connection."""

from __future__ import annotations

import signal
import time
from collections import Counter

import h3clients
import pytest
from harness import client_missing, wait_until
from masters import wait_workers, workers

# Every test runs once per QUIC engine (msquic cases skip without libmsquic).
pytestmark = pytest.mark.usefixtures("quic_engine")

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
        client_missing(exc)
    assert {r.status for r in responses} == {200}
    return Counter(int(r.body) for r in responses)


def wait_serving(srv, pids) -> None:
    """Every one of ``pids`` has logged that it serves (with MsQuic, its sockets have
    joined the port's group and the master steers to them by then)."""
    wait_until(
        lambda: all(f"worker {pid} serving" in srv.stderr() for pid in pids),
        timeout=15,
        message=lambda: srv.stderr()[-2000:],
    )


def test_h3_spreads_over_workers_and_survives_reload(start_server):
    srv = start_server(
        app=APP, command="master", config={"workers": {"count": 3}, "http3": {"enabled": True}}
    )
    first = set(wait_workers(srv, 3))
    wait_serving(srv, first)
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
    wait_serving(srv, second)
    after = pids_over_h3(srv, 60, connections=20)
    assert set(after) <= second and len(after) >= 2, (after, second)
    assert srv.stop() == 0, srv.stderr()


@pytest.mark.parametrize("quic_engine", ["msquic"], indirect=True)  # its connection ids
def test_msquic_workers_steered_by_the_id_in_their_connection_ids(start_server, quic_engine):
    srv = start_server(
        app=APP, command="master", config={"workers": {"count": 2}, "http3": {"enabled": True}}
    )
    wait_serving(srv, wait_workers(srv, 2))

    async def one():
        async with h3clients._h3_connection(srv.host, srv.port, str(srv.cafile), 10, []) as p:
            authority = f"{srv.host}:{srv.port}"
            ex = await h3clients._send_request(p, "GET", "/pid", authority, (), b"")
            r = await h3clients._finish(p, ex)
            return int(r.body), p._quic._peer_cid.cid

    ids: dict[int, set[int]] = {}
    deadline = time.monotonic() + 20
    # Connections from new client ports hash over both workers' sockets.
    while len(ids) < 2 and time.monotonic() < deadline:
        pid, cid = h3clients._run(one, 10, "aioquic /pid")
        ids.setdefault(pid, set()).add(int.from_bytes(cid[1:5], "big"))
    assert len(ids) == 2, ids
    # Each worker issues connection ids carrying its own worker id (bytes 1-4): the
    # index of its first socket in the port's group (the first worker's is 0).
    assert all(len(v) == 1 for v in ids.values()), ids
    wids = sorted(v.pop() for v in ids.values())
    assert wids[0] == 1 << 16 and wids[1] > wids[0] and wids[1] >> 16 == 1, wids
