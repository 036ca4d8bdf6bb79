"""Starting a worker process (fpy3/supervisor/workers.py): the fork and the pipe protocol."""

from __future__ import annotations

import os
import signal
import socket

import pytest

from fpy3 import worker
from fpy3.config import Settings
from fpy3.sockets import Listeners
from fpy3.supervisor.workers import Launch, Message, WorkerProcess, parse_message, spawn


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"ready", Message("ready")),
        (b"beat", Message("beat")),
        (b"requests 12", Message("requests", 12)),
        (b"quic 65537", Message("quic", 65537)),
        (b"requests", None),
        (b"quic -1", None),
        (b"hello", None),
    ],
)
def test_parse_message(line, message):
    assert parse_message(line) == message


def test_read_keeps_a_partial_line_for_later(caplog):
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK)
    record = WorkerProcess(1, 1, 1, read_fd, 30.0)
    try:
        os.write(write_fd, b"ready\nrequests 3\nbogus\nbe")
        assert record.read() == [Message("ready"), Message("requests", 3)]
        assert "unknown message b'bogus'" in caplog.text
        os.write(write_fd, b"at\n")
        assert record.read() == [Message("beat")]
        os.close(write_fd)
        assert record.read() == [] and record.eof
    finally:
        record.close()


def test_a_signal_between_the_fork_and_the_workers_handlers_is_not_lost(monkeypatch):
    """A TERM sent to a worker that still has the master's handlers (it was forked a
    moment ago) must act once the worker has its own, not vanish into the master's queue."""
    monkeypatch.setattr(worker, "run", lambda *args: 0)  # reached only if the TERM got lost
    # Like the master's handler: it queues the signal for a loop the child never runs.
    master_handler = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    forked_r, forked_w = os.pipe()
    sent_r, sent_w = os.pipe()
    tls = socket.socket()

    def detach():
        os.write(forked_w, b"1")
        os.read(sent_r, 1)  # the master's TERM has been sent by now
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as the arbiter's detach does
        return Listeners(tls=[tls]), 1

    try:
        record = spawn(Launch(1, 1, Settings(), b"\0" * 32), detach)
        try:
            os.read(forked_r, 1)
            os.kill(record.pid, signal.SIGTERM)
            os.write(sent_w, b"1")
            _, status = os.waitpid(record.pid, 0)
        finally:
            record.close()
    finally:
        signal.signal(signal.SIGTERM, master_handler)
        for fd in (forked_r, forked_w, sent_r, sent_w):
            os.close(fd)
        tls.close()
    assert os.waitstatus_to_exitcode(status) == -signal.SIGTERM
