"""fpy3-master keeps N workers serving: crash respawn, TTIN/TTOU, heartbeats, recycling."""

from __future__ import annotations

import os
import re
import signal
import threading

import psutil
from harness import wait_until
from master_support import PID_REQUEST, Load, spread_connections
from masters import APP, pid_over_new_connection, wait_workers, workers


def test_every_worker_serves(start_server):
    srv = start_server(app=APP, command="master", config={"workers": {"count": 3}})
    pids = set(wait_workers(srv, 3))
    seen: set[int] = set()
    # The kernel spreads new connections over the workers; all of them must answer.
    wait_until(
        lambda: seen.add(pid_over_new_connection(srv)) or seen == pids,
        timeout=20,
        interval=0,
        message=lambda: f"saw {seen}, workers {pids}",
    )
    assert srv.stop() == 0, srv.stderr()


def test_kill9_worker_is_replaced_and_only_its_connections_fail(start_server):
    srv = start_server(app=APP, command="master", config={"workers": {"count": 2}})
    before = set(wait_workers(srv, 2))
    # Every worker has keep-alive connections in use before the kill.
    conns = spread_connections(srv.connect, before, per_worker=3)
    with Load(srv.connect, conns=conns) as load:
        wait_until(lambda: load.pids() == before, timeout=20, interval=0.01)
        victim = min(before)
        served = load.count()
        os.kill(victim, signal.SIGKILL)
        replaced = wait_until(
            lambda: len(w := workers(srv)) == 2 and victim not in w and set(w),
            timeout=15,
            message=lambda: srv.stderr()[-2000:],
        )
        (new,) = replaced - before
        # The replacement takes new connections; the survivor never stopped serving.
        wait_until(lambda: pid_over_new_connection(srv) == new, timeout=20, interval=0)
        wait_until(lambda: load.count() > served + 20, timeout=10)
    assert load.failures, "the killed worker's connections must have failed"
    assert {pid for pid, _ in load.failures} == {victim}, load.failures
    assert "killed by signal 9; replacing it" in srv.stderr()
    assert srv.stop() == 0, srv.stderr()


def test_ttin_adds_and_ttou_drains_the_highest_number(start_server):
    srv = start_server(app=APP, command="master", config={"workers": {"count": 1}})
    wait_workers(srv, 1)
    for n in (2, 3):
        offset = srv.stderr_size()
        os.kill(srv.pid, signal.SIGTTIN)
        srv.wait_stderr(f"TTIN: now {n} worker(s)", offset)
        wait_workers(srv, n)
    titles = wait_workers(srv, 3)
    assert sorted(t.split(" gen")[0] for t in titles.values()) == [
        "fpy3: worker 1",
        "fpy3: worker 2",
        "fpy3: worker 3",
    ]
    (third,) = [pid for pid, t in titles.items() if "worker 3 " in t]

    os.kill(srv.pid, signal.SIGTTOU)
    left = wait_workers(srv, 2)
    assert third not in left
    assert all("worker 3 " not in t for t in left.values())
    os.kill(srv.pid, signal.SIGTTOU)
    wait_workers(srv, 1)
    offset = srv.stderr_size()
    os.kill(srv.pid, signal.SIGTTOU)
    srv.wait_stderr("TTOU ignored", offset)
    assert len(workers(srv)) == 1
    srv.assert_serving()
    assert "replacing it" not in srv.stderr()  # drained, not crashed
    assert srv.stop() == 0, srv.stderr()


def test_blocked_worker_misses_heartbeats_and_is_replaced(start_server):
    srv = start_server(app=APP, command="master", config={"workers": {"count": 2, "timeout": 2.0}})
    before = set(wait_workers(srv, 2))
    conn = srv.connect(timeout=30)
    conn.send(PID_REQUEST)
    victim = int(conn.read_response().body)
    result = {}

    def block():
        try:
            conn.send(b"GET /block?s=60 HTTP/1.1\r\nHost: x\r\n\r\n")
            result["response"] = conn.read_response(timeout=30)
        except Exception as exc:
            result["error"] = repr(exc)

    thread = threading.Thread(target=block, daemon=True)
    thread.start()
    log = srv.wait_stderr("sent no heartbeat", timeout=10)
    assert f"worker {victim} (number" in log.split("sent no heartbeat")[0].splitlines()[-1]
    now = wait_until(
        lambda: len(w := workers(srv)) == 2 and victim not in w and set(w),
        timeout=15,
        message=lambda: srv.stderr()[-2000:],
    )
    thread.join(15)
    conn.close()
    assert "error" in result, result  # its connection died with it
    assert len(now - before) == 1
    for _ in range(10):
        assert pid_over_new_connection(srv) in now
    assert srv.stop() == 0, srv.stderr()


def test_max_requests_recycles_without_failed_requests(start_server):
    config = {"workers": {"count": 2, "max_requests": 30, "max_requests_jitter": 10}}
    srv = start_server(app=APP, command="master", config=config)
    first = set(wait_workers(srv, 2))
    with Load(srv.connect, threads=4) as load:
        # Both original workers are replaced, and a replacement serves.
        wait_until(
            lambda: (load.pids() - first) and not (first & set(workers(srv))),
            timeout=30,
            interval=0.05,
            message=lambda: f"{workers(srv)} {load.failures[:3]}\n{srv.stderr()[-2000:]}",
        )
        served = load.count()
        wait_until(lambda: load.count() > served + 20, timeout=10)
    assert load.failures == []
    log = srv.stderr()
    assert log.count("(workers.max_requests); starting worker") >= 2
    assert "replacing it" not in log
    assert srv.stop() == 0, srv.stderr()


def test_max_rss_recycles(start_server):
    # Every Python process is above 1 MiB: the first RSS sample recycles the worker.
    srv = start_server(app=APP, command="master", config={"workers": {"max_rss_mb": 1}})
    log = srv.wait_stderr("(workers.max_rss_mb = 1); starting worker", timeout=15)
    line = next(x for x in log.splitlines() if "(workers.max_rss_mb = 1)" in x)
    old, new = (int(w) for w in re.findall(r"worker (\d+)", line))
    wait_until(lambda: old not in workers(srv) and new in workers(srv), timeout=15)
    srv.assert_serving()
    assert srv.stop() == 0, srv.stderr()


def test_workers_exit_when_the_master_is_killed(start_server):
    srv = start_server(app=APP, command="master", config={"workers": {"count": 2}})
    pids = wait_workers(srv, 2)
    # Signals for the master that reach a worker too must not hurt it.
    for pid in pids:
        for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
            os.kill(pid, sig)
    srv.assert_serving()
    assert set(workers(srv)) == set(pids)
    assert all(psutil.Process(pid).status() != psutil.STATUS_STOPPED for pid in pids)

    os.kill(srv.pid, signal.SIGKILL)
    srv.wait_exit()

    def gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    # Orphans would keep the port: they notice the broken pipe and drain.
    wait_until(lambda: all(gone(pid) for pid in pids), timeout=10)
