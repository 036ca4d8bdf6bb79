"""The master's loop survives steering failures (fpy3/supervisor/arbiter.py).

The arbiter runs in this process with a real steering group on a free UDP port. Its
workers are small forked processes that do what an fpy3 worker does towards the
master: write lines on their pipe and, on MsQuic, join the port group with the real
``GroupJoin`` (lock, worker id, SO_REUSEPORT socket, ``quic ID``, wait for the answer).
The failures are real too: no fd left (a lowered RLIMIT_NOFILE), a worker or a socket
gone, an id file that cannot be replaced.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import resource
import select
import signal
import socket
from dataclasses import dataclass

import pytest
from harness import wait_until

from fpy3.config import HTTP3Settings, ServerSettings, Settings, WorkersSettings
from fpy3.h3.engine import GroupJoin
from fpy3.sockets import Listeners
from fpy3.supervisor.arbiter import Arbiter
from fpy3.supervisor.workers import WorkerProcess

HOST = "127.0.0.1"
needs_pidfd = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="no pidfd_open")


@pytest.fixture(autouse=True)
def _no_systemd_and_same_limits(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, limits)  # the arbiter raises the soft one


def make_arbiter(tmp_path, engine: str, workers: int = 1) -> Arbiter:
    """An arbiter whose UDP socket became its steering group, as in ``Arbiter.run``."""
    settings = Settings(
        server=ServerSettings(host=HOST, state_dir=str(tmp_path / "state")),
        workers=WorkersSettings(count=workers),
        http3=HTTP3Settings(engine=engine),
    )
    tls = socket.socket()  # never listened on here
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((HOST, 0))
    arbiter = Arbiter(argparse.Namespace(config=None), settings, Listeners(tls=[tls], udp=[udp]))
    arbiter._steer_udp()
    return arbiter


@pytest.fixture
def arbiters():
    made: list[Arbiter] = []
    yield made
    for arbiter in made:
        for worker in arbiter.workers.values():
            worker.close()
        arbiter.listeners.close()
        for group in (arbiter.quic, arbiter.msquic):
            if group is not None:
                group.close()
        os.close(arbiter.wake_r)
        os.close(arbiter.wake_w)


@dataclass
class Child:
    """A forked stand-in for a worker process, as the master's record and a handle."""

    record: WorkerProcess
    send_w: int  # the worker's end of its message pipe
    result_r: int  # the child's answer to a join, when it joins
    hold_w: int  # closing it lets the child exit

    def send(self, line: bytes) -> None:
        os.write(self.send_w, line + b"\n")

    def join_answer(self) -> bytes:
        return os.read(self.result_r, 1)


@contextlib.contextmanager
def child_worker(arbiter: Arbiter, number: int, join: bool = False):
    """A child process registered as worker ``number``. With ``join``, it joins the
    arbiter's MsQuic port group like a worker whose MsQuic bound its socket."""
    send_r, send_w = os.pipe2(os.O_CLOEXEC)
    ack_r, ack_w = os.pipe2(os.O_CLOEXEC)
    result_r, result_w = os.pipe2(os.O_CLOEXEC)
    hold_r, hold_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd in (send_r, ack_w, result_r, hold_w):  # the master's ends
                os.close(fd)
            if arbiter.msquic is not None:
                arbiter.msquic.forget_in_child()  # as the master's fork does
            if join:
                group = arbiter.msquic
                joining = GroupJoin(group.lock_path, group.id_path, ack_r)
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind((HOST, group.port))
                adopted = joining.done(lambda line: os.write(send_w, line))
                if not adopted:
                    sock.close()  # as a worker does: out of the group before the next joins
                joining.close()
                os.write(result_w, b"1" if adopted else b"0")
            os.read(hold_r, 1)  # serve until the test lets go
            code = 0
        finally:
            os._exit(code)
    for fd in (ack_r, result_w, hold_r):  # the child's ends
        os.close(fd)
    os.set_blocking(send_r, False)
    record = WorkerProcess(pid, number, arbiter.generation, send_r, 30.0, quic_ack=ack_w)
    arbiter.workers[pid] = record
    child = Child(record, send_w, result_r, hold_w)
    try:
        yield child
    finally:
        os.close(hold_w)
        os.close(send_w)
        os.close(result_r)
        os.waitpid(pid, 0)


def run_loop_until(arbiter: Arbiter, predicate, timeout: float = 10.0):
    """The loop's message handling, round after round, until ``predicate()``."""

    def round_done():
        arbiter._wait(0.05)
        return predicate()

    return wait_until(round_done, timeout)


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


@contextlib.contextmanager
def fds_left(count: int):
    """Lower RLIMIT_NOFILE so that only ``count`` more fds can be open at once."""
    gc.collect()  # no finalizer may free a slot below the limit meanwhile
    lowest, other = os.pipe()  # every fd below ``lowest`` is in use
    os.close(lowest)
    os.close(other)
    # New fds take free numbers below the limit: leave exactly ``count`` of those.
    limit, free = lowest, 0
    while free < count:
        free += not _is_open(limit)
        limit += 1
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, saved[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, saved)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def alive(pid: int) -> bool:
    return os.waitpid(pid, os.WNOHANG) == (0, 0)


# --- MsQuic: a worker's join ------------------------------------------------------------


@needs_pidfd
def test_a_join_that_cannot_be_adopted_is_refused_and_the_master_goes_on(
    tmp_path, arbiters, caplog
):
    arbiter = make_arbiter(tmp_path, "msquic", workers=2)
    arbiters.append(arbiter)
    group = arbiter.msquic
    assert group is not None
    with child_worker(arbiter, 1, join=True) as first:
        # Room for one fd: the lookups open and close theirs, pidfd_open keeps it and
        # pidfd_getfd finds none.
        with fds_left(1), caplog.at_level(logging.ERROR, logger="fpy3.error"):
            run_loop_until(arbiter, lambda: readable(first.result_r))
        assert first.join_answer() == b"0"
        assert "Too many open files" in caplog.text
        assert f"worker {first.record.pid} (number 1)" in caplog.text
        assert f"UDP port {group.port}" in caplog.text
        assert group.live == set() and first.record.quic_id is None
        # The master goes on: the refused worker is still its worker, and the next
        # join, with fds to spare again, is adopted and steered to.
        assert arbiter.stopping is None and first.record.pid in arbiter.workers
        assert alive(first.record.pid)
        with child_worker(arbiter, 2, join=True) as second:
            run_loop_until(arbiter, lambda: readable(second.result_r))
            assert second.join_answer() == b"1"
            wid = second.record.quic_id
            assert wid is not None and group.live == {wid}
            assert len(group.sockets) == 1  # a copy of the second worker's socket


@needs_pidfd
def test_a_join_from_a_worker_gone_is_refused(tmp_path, arbiters, caplog):
    arbiter = make_arbiter(tmp_path, "msquic")
    arbiters.append(arbiter)
    with child_worker(arbiter, 1) as gone:
        os.kill(gone.record.pid, signal.SIGKILL)
        os.waitid(os.P_PID, gone.record.pid, os.WEXITED | os.WNOWAIT)
        gone.send(b"quic 65536")  # as if written just before it died
        with caplog.at_level(logging.ERROR, logger="fpy3.error"):
            run_loop_until(arbiter, lambda: "cannot be adopted" in caplog.text)
        assert arbiter.msquic.live == set() and arbiter.stopping is None


@needs_pidfd
def test_an_id_that_cannot_be_offered_is_retried(tmp_path, arbiters, caplog):
    arbiter = make_arbiter(tmp_path, "msquic", workers=2)
    arbiters.append(arbiter)
    group = arbiter.msquic
    assert group is not None
    blocker = group.id_path + ".tmp"
    os.mkdir(blocker)  # the id file cannot be replaced
    with (
        child_worker(arbiter, 1, join=True) as first,
        caplog.at_level(logging.INFO, logger="fpy3.error"),
    ):
        run_loop_until(arbiter, lambda: readable(first.result_r))
        assert first.join_answer() == b"1"  # adopted, whatever the id file
        assert group.live == {first.record.quic_id}
        arbiter._tidy_msquic()  # the loop's step after the messages
        assert arbiter.msquic_id_stale and "Is a directory" in caplog.text
        arbiter._tidy_msquic()  # the next round: logged once only
        assert caplog.text.count("no worker id offered") == 1
        os.rmdir(blocker)
        arbiter._tidy_msquic()  # the loop's retry
        assert "QUIC port group: worker ids offered again" in caplog.text
        assert not arbiter.msquic_id_stale
        with child_worker(arbiter, 2, join=True) as second:
            run_loop_until(arbiter, lambda: readable(second.result_r))
            assert second.join_answer() == b"1"  # the fresh id was the right one
            assert group.live == {first.record.quic_id, second.record.quic_id}
            assert [sock.getsockname()[1] for sock in group.sockets] == [group.port] * 2
        assert arbiter.stopping is None and alive(first.record.pid)


# --- ngtcp2: the master's socket group ---------------------------------------------------


def test_a_group_socket_gone_does_not_end_the_loop(tmp_path, arbiters, caplog):
    arbiter = make_arbiter(tmp_path, "ngtcp2")
    arbiters.append(arbiter)
    group = arbiter.quic
    if group is None:
        pytest.skip("no SO_REUSEPORT + SO_ATTACH_REUSEPORT_CBPF here")
    with child_worker(arbiter, 1) as worker:
        worker.record.quic_id = group.acquire(arbiter.generation)
        group.groups[0].sockets[0].close()  # the program is attached through this one
        with caplog.at_level(logging.ERROR, logger="fpy3.error"):
            worker.send(b"ready")
            run_loop_until(arbiter, lambda: arbiter.announced)
        assert arbiter.steering_stale and "QUIC steering not updated" in caplog.text
        assert arbiter.serving == 1 and arbiter.stopping is None


# --- starting a worker ---------------------------------------------------------------------


def test_a_worker_that_cannot_be_started_counts_as_a_crash(tmp_path, arbiters, caplog, monkeypatch):
    arbiter = make_arbiter(tmp_path, "ngtcp2")
    arbiters.append(arbiter)

    def no_fork():
        raise AssertionError("the pipes should have failed first")

    monkeypatch.setattr(os, "fork", no_fork)
    with fds_left(0), caplog.at_level(logging.ERROR, logger="fpy3.error"):
        assert arbiter._spawn(1) is None
    assert "cannot start worker number 1: [Errno 24] Too many open files" in caplog.text
    assert len(arbiter.crashes) == 1 and arbiter.workers == {}
    if arbiter.quic is not None:
        assert arbiter.quic.groups[0].live == set()  # the socket it was given is free again
