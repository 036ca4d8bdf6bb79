"""HTTP/3 under fpy3-master: QUIC packets steered to the worker that owns the connection."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import h3clients
import pytest
from harness import client_missing, wait_until
from masters import wait_workers, workers

from fpy3.h3.engine import udp_inodes
from fpy3.supervisor.steering.msquic_group import udp_fds

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
    # index of its socket in the port's group (low 16 bits), under a serial number the
    # master gives each join (high 16 bits, never 0).
    assert all(len(v) == 1 for v in ids.values()), ids
    wids = [v.pop() for v in ids.values()]
    assert sorted(w & 0xFFFF for w in wids) == [0, 1], [hex(w) for w in wids]
    assert len({w >> 16 for w in wids}) == 2 and all(w >> 16 for w in wids), wids


def test_clients_of_a_killed_worker_learn_at_once(start_server):
    # The master's workers share one stateless-reset key: a datagram for a connection
    # of a worker that was killed reaches another worker, which answers with a
    # stateless reset the client accepts, so the client learns at once that the
    # connection is gone instead of waiting for its idle timeout (30 s here).
    srv = start_server(
        app=APP,
        command="master",
        config={"workers": {"count": 1}, "http3": {"enabled": True, "idle_timeout": 30}},
    )
    (first,) = wait_workers(srv, 1)
    wait_serving(srv, [first])
    try:
        with h3clients.curl_session(str(srv.cafile), timeout=20) as session:
            r, opened = session.get(srv.url("/pid"))
            assert (r.status, int(r.body), opened) == (200, first, 1)
            os.kill(first, signal.SIGKILL)
            (second,) = wait_until(
                lambda: (w := workers(srv)) and first not in w and len(w) == 1 and list(w),
                timeout=15,
                message=lambda: srv.stderr()[-2000:],
            )
            wait_serving(srv, [second])
            # libcurl sends the request on its old connection and takes the reset.
            started = time.monotonic()
            with pytest.raises(h3clients.H3ClientError) as failed:
                session.get(srv.url("/pid"))
            took = time.monotonic() - started
            assert not isinstance(failed.value, h3clients.ClientTimeout), failed.value
            assert took < 5, f"took {took:.1f}s: {failed.value}"
            r, opened = session.get(srv.url("/pid"))
            assert (r.status, int(r.body), opened) == (200, second, 1)
    except h3clients.ClientUnavailable as exc:
        client_missing(exc)
    assert srv.stop() == 0, srv.stderr()


def cpu_ticks(pid: int, tid: str) -> int:
    """User + system CPU time a thread has used, in clock ticks."""
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


@pytest.mark.parametrize("quic_engine", ["msquic"], indirect=True)  # ngtcp2 never had more
def test_msquic_worker_has_one_socket_and_works_on_its_loop_thread(start_server, quic_engine):
    # MsQuic runs on the worker's event loop: no thread and no socket per CPU.
    srv = start_server(
        app=APP, command="master", config={"workers": {"count": 2}, "http3": {"enabled": True}}
    )
    pids = list(wait_workers(srv, 2))
    wait_serving(srv, pids)
    assert set(pids_over_h3(srv, 20, connections=10)) <= set(pids)
    for pid in pids:
        assert len(udp_fds(pid, srv.port)) == 1, pid
        # MsQuic keeps a few threads that only wait to close registrations; all the
        # work is on the loop's thread.
        others = [t for t in os.listdir(f"/proc/{pid}/task") if t != str(pid)]
        assert len(others) <= 3, (pid, others)
        busy = {t: ticks for t in others if (ticks := cpu_ticks(pid, t)) > 1}
        assert not busy, (pid, busy)
    assert len(udp_inodes(srv.port)) == 2
    assert srv.stop() == 0, srv.stderr()


@pytest.mark.parametrize("quic_engine", ["msquic"], indirect=True)
def test_msquic_port_group_stays_bounded_across_reloads(start_server, quic_engine):
    # A reload's new workers join the port's group while the old ones drain; once the
    # old ones are gone, their sockets leave the group (their places go to the next
    # generation), so the group never holds more than two generations' sockets.
    count = 2
    srv = start_server(
        app=APP,
        command="master",
        config={"workers": {"count": count}, "http3": {"enabled": True}},
    )
    current = set(wait_workers(srv, count))
    wait_serving(srv, current)
    for _ in range(3):
        old = current
        srv.proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda old=old: len(w := set(workers(srv))) == count and not (w & old),
            timeout=30,
            message=lambda: srv.stderr()[-2000:],
        )
        current = set(wait_workers(srv, count))
        wait_serving(srv, current)
        wait_until(
            lambda: len(udp_inodes(srv.port)) <= 2 * count,
            timeout=10,
            message=lambda: f"{len(udp_inodes(srv.port))} sockets\n{srv.stderr()[-2000:]}",
        )
        assert len(udp_fds(srv.pid, srv.port)) <= 2 * count
    # Every connection's packets still reach the worker that owns it.
    assert set(pids_over_h3(srv, 60, connections=20)) == current
    assert srv.stop() == 0, srv.stderr()
