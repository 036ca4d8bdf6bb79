"""fpy3-master: HUP reloads without failed requests, refuses a bad config, TERM drains."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import psutil
from harness import to_toml, wait_until
from master_support import Load
from masters import APP, wait_workers, workers


def rewrite_config(srv, **sections) -> None:
    for section, values in sections.items():
        srv.config.setdefault(section, {}).update(values)
    srv.config_path.write_text(to_toml(srv.config))


def test_hup_under_load_no_failed_request_and_new_config(start_server):
    srv = start_server(app=APP, command="master", config={"workers": {"count": 2}})
    old = set(wait_workers(srv, 2))
    # New connections, and keep-alive ones that may have a request on the wire when
    # their worker starts draining.
    with Load(srv.connect, threads=4) as load, Load(srv.connect, threads=4, keepalive=True) as kept:
        wait_until(lambda: load.count() > 50 and kept.count() > 50, timeout=10)
        assert {h.get("server") for h in load.headers} == {"fpy3"}
        rewrite_config(srv, server={"server_header": "fpy3-gen2"})
        offset = srv.stderr_size()
        os.kill(srv.pid, signal.SIGHUP)
        srv.wait_stderr("generation 2 ready; draining 2 old worker(s)", offset)
        new = wait_until(
            lambda: len(w := workers(srv)) == 2 and not (set(w) & old) and set(w),
            timeout=15,
            message=lambda: f"{workers(srv)}\n{srv.stderr_since(offset)}",
        )
        served, kept_served = load.count(), kept.count()
        wait_until(
            lambda: load.count() > served + 50 and kept.count() > kept_served + 50, timeout=10
        )
    assert load.failures == []
    assert kept.failures == []
    assert new <= load.pids()
    assert all("gen 2" in t for t in workers(srv).values())
    assert srv.get("/hello").headers["server"] == "fpy3-gen2"
    assert {h.get("server") for h in load.headers} == {"fpy3-gen2"}
    assert {h.get("server") for h in kept.headers} == {"fpy3-gen2"}  # they moved over
    assert srv.stop() == 0, srv.stderr()


def test_hup_with_broken_config_keeps_the_old_workers(start_server):
    srv = start_server(app=APP, command="master", config={"workers": {"count": 2}})
    old = set(wait_workers(srv, 2))
    good = srv.config_path.read_text()

    # Not even TOML: refused before any worker starts.
    srv.config_path.write_text(good + "\n[workers\n")
    offset = srv.stderr_size()
    os.kill(srv.pid, signal.SIGHUP)
    log = srv.wait_stderr("reload refused, keeping the running workers", offset)
    assert str(srv.config_path) in log
    srv.assert_serving()
    assert set(workers(srv)) == old

    # Valid config, but the app cannot be imported: generation 2 fails, 1 keeps serving.
    rewrite_config(srv, server={"app": "no_such_module_xyz:app"})
    offset = srv.stderr_size()
    os.kill(srv.pid, signal.SIGHUP)
    log = srv.wait_stderr("generation 2 failed to start; generation 1 keeps serving", offset)
    assert "no_such_module_xyz" in log
    wait_until(lambda: set(workers(srv)) == old, timeout=10)
    for _ in range(5):
        srv.assert_serving()

    # Fixed again: the next reload goes through.
    srv.config_path.write_text(good)
    offset = srv.stderr_size()
    os.kill(srv.pid, signal.SIGHUP)
    srv.wait_stderr("ready; draining 2 old worker(s)", offset)
    wait_until(lambda: len(w := workers(srv)) == 2 and not (set(w) & old), timeout=15)
    srv.assert_serving()
    assert srv.stop() == 0, srv.stderr()


def _refused(srv) -> bool:
    try:
        with socket.create_connection((srv.host, srv.port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def test_term_under_load_finishes_in_flight_refuses_new_exits_0(start_server):
    drain_timeout = 20.0
    config = {"workers": {"count": 2, "drain_timeout": drain_timeout}}
    srv = start_server(app=APP, command="master", config=config)
    pids = set(wait_workers(srv, 2))
    results: list = []

    def in_flight(i: int) -> None:
        try:
            with srv.client(timeout=30) as c:
                r = c.get(f"/wait-flag?flag=term{i}")
                results.append((r.status_code, r.text))
        except Exception as exc:
            results.append(repr(exc))

    threads = [threading.Thread(target=in_flight, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    for i in range(4):
        srv.wait_record(f"term{i}-started", "started")

    started = time.monotonic()
    srv.proc.terminate()
    # The listening socket goes away at once; the requests in flight stay.
    wait_until(lambda: _refused(srv), timeout=10, message=lambda: srv.stderr()[-2000:])
    assert srv.alive()
    for i in range(4):
        srv.flag(f"term{i}")
    for t in threads:
        t.join(15)
    assert results == [(200, "finished")] * 4
    assert srv.wait_exit(drain_timeout) == 0, srv.stderr()
    assert time.monotonic() - started < drain_timeout
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
