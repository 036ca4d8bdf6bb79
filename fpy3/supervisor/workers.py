"""Worker processes as the master sees them: the record it keeps of each, the fork
that starts one, and the lines each one writes on its pipe to the master.

A worker writes ``ready`` once serving, ``beat`` every ``workers.timeout / 4`` s,
``requests N`` (requests served so far) and, on MsQuic with steering, ``quic ID`` once
its sockets are bound (steering/msquic_group.py). The master answers that last one with
one byte on a second pipe: ``1`` its sockets are adopted, ``0`` they are not.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, NoReturn

from setproctitle import setproctitle

from fpy3 import worker
from fpy3.bootstrap import EXIT_STARTUP
from fpy3.config import Settings
from fpy3.keys import SessionKeys
from fpy3.metrics import Block
from fpy3.sockets import Listeners

from .privileges import UserIds, drop_privileges

logger = logging.getLogger("fpy3.error")

# Signals meant for the master may reach the whole process group (a kill to every
# process of a service): they must not kill or stop a worker. Its loop handles USR1
# once it runs.
MASTER_ONLY_SIGNALS = (
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


class Message(NamedTuple):
    kind: str  # "ready", "beat", "requests" or "quic"
    value: int = 0  # requests served, or the QUIC worker id


def parse_message(line: bytes) -> Message | None:
    """One line from a worker, without its newline; None when it means nothing."""
    if line in (b"ready", b"beat"):
        return Message(line.decode())
    kind, _, value = line.partition(b" ")
    if kind in (b"requests", b"quic") and value.isdigit():
        return Message(kind.decode(), int(value))
    return None


@dataclass
class WorkerProcess:
    pid: int
    number: int
    generation: int
    pipe: int  # read end of the worker's message pipe
    timeout: float  # workers.timeout of its generation
    request_limit: int = 0  # recycle after this many requests; 0 = never
    ready: bool = False
    started: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)  # last message of any kind
    requests: int = 0
    buf: bytes = b""  # a partial line
    eof: bool = False  # the worker closed its end of the pipe
    retiring: bool = False  # told to drain on purpose: its exit is no crash
    quic_id: int | None = None  # its QUIC worker id (and socket) when packets are steered
    quic_ack: int | None = None  # MsQuic: write end of the pipe answering its join
    timed_out: bool = False  # killed for missing heartbeats
    replaces: int | None = None  # pid of the worker this one is replacing (a recycle)
    replacement: int | None = None  # pid of the worker starting in place of this one
    next_recycle: float = 0.0
    metrics: Block | None = None  # its shared counters (metrics.port)

    def read(self) -> list[Message]:
        """The messages waiting on the pipe; sets ``eof`` once the worker closed it."""
        try:
            data = os.read(self.pipe, 4096)
        except BlockingIOError:
            return []
        if not data:
            self.eof = True  # it is exiting; reaping follows
            return []
        self.last_seen = time.monotonic()
        *lines, rest = (self.buf + data).split(b"\n")
        self.buf = rest[-256:]  # messages are short: never let junk grow
        messages = []
        for line in lines:
            message = parse_message(line)
            if message is None:
                logger.warning("worker %d sent an unknown message %r", self.pid, line[:40])
            else:
                messages.append(message)
        return messages

    def answer_join(self, adopted: bool) -> None:
        """Tell a worker that sent ``quic ID`` whether its sockets were adopted."""
        if self.quic_ack is not None:
            with contextlib.suppress(OSError):  # it may be gone already
                os.write(self.quic_ack, b"1" if adopted else b"0")

    def close(self) -> None:
        """Close the master's ends of the worker's pipes."""
        os.close(self.pipe)
        if self.quic_ack is not None:
            os.close(self.quic_ack)
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None


@dataclass(frozen=True)
class Launch:
    """What a new worker starts with."""

    number: int
    generation: int
    settings: Settings
    session_keys: SessionKeys  # reset, token and ticket keys, shared by every worker
    request_limit: int = 0
    ids: UserIds | None = None  # switch to these after the fork
    msquic_join: tuple[str, str] | None = None  # (lock path, id path) of the port group


def spawn(
    launch: Launch,
    detach: Callable[[], tuple[Listeners, int]],
    metrics: Block | None = None,
) -> WorkerProcess:
    """Fork a worker and return its record; raises OSError when it cannot be started.

    In the child, ``detach()`` undoes what belongs to the master (its signal handlers,
    its other fds) and returns the sockets the worker serves and its QUIC worker id;
    the child then runs the worker and exits without returning here.
    """
    fds: list[int] = []
    try:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        fds += (read_fd, write_fd)
        ack = None
        if launch.msquic_join is not None:
            ack = os.pipe2(os.O_CLOEXEC)
            fds += ack
    except OSError:
        for fd in fds:
            os.close(fd)
        raise
    # Signals stay blocked from the fork until the child has its own handlers: the
    # master's would queue a signal (a TERM from a stop) in the child's copy of the
    # master, where nothing ever reads it.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        pid = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for fd in fds:
            os.close(fd)
        raise
    if pid == 0:
        os.close(read_fd)
        join = None
        if ack is not None and launch.msquic_join is not None:
            os.close(ack[1])
            lock_path, id_path = launch.msquic_join
            join = (lock_path, id_path, ack[0])
        _worker_main(launch, detach, mask, write_fd, join, metrics)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    os.close(write_fd)
    if ack is not None:
        os.close(ack[0])
    os.set_blocking(read_fd, False)
    return WorkerProcess(
        pid,
        launch.number,
        launch.generation,
        read_fd,
        launch.settings.workers.timeout,
        launch.request_limit,
        quic_ack=ack[1] if ack is not None else None,
        metrics=metrics,
    )


def _worker_main(
    launch: Launch,
    detach: Callable[[], tuple[Listeners, int]],
    mask: set[signal.Signals | int],
    ready_fd: int,
    quic_join: tuple | None,
    metrics: Block | None,
) -> NoReturn:
    code = 1
    try:
        listeners, worker_id = detach()
        for sig in MASTER_ONLY_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        # A certificate reload before the worker serves means nothing (it reads the files
        # as they are then); by default USR2 would kill.
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # what came meanwhile acts now
        # Only the master talks to systemd; the app must not send READY=1 for it.
        os.environ.pop("NOTIFY_SOCKET", None)
        setproctitle(f"fpy3: worker {launch.number} gen {launch.generation}")
        if launch.ids is not None and not _switch_user(launch.ids):
            code = EXIT_STARTUP
        else:
            code = worker.run(
                launch.settings,
                listeners,
                ready_fd,
                worker_id,
                launch.session_keys,
                launch.request_limit,
                quic_join,
                metrics,
            )
    except BaseException:
        logger.exception("worker %d crashed", os.getpid())
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _switch_user(ids: UserIds) -> bool:
    try:
        drop_privileges(ids)
    except OSError as exc:
        logger.error("worker %d: cannot switch user: %s", os.getpid(), exc)
        return False
    return True
