"""HTTP/3 on MsQuic under the master: the workers' own sockets, steered (MsQuicGroup)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
from collections.abc import Iterable

from fpy3.h3.engine import udp_inodes

from .bpf import attach_program, build_program, program_bytes

__all__ = ["MSQUIC_CID_LEN", "MsQuicGroup", "udp_fds"]

MSQUIC_CID_LEN = 14  # MsQuic's connection ids in its fixed-server-id load-balancing mode
_SYS_PIDFD_GETFD = 438  # same number on every Linux architecture


def _pidfd_getfd(pid: int, fds: list[int]) -> list[socket.socket]:
    """Copies of another process's fds (Linux >= 5.6; ptrace rights over it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    got: list[socket.socket] = []
    try:
        for fd in fds:
            new = libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
            if new < 0:
                err = ctypes.get_errno()
                for sock in got:
                    sock.close()
                raise OSError(err, f"pidfd_getfd: {os.strerror(err)}")
            got.append(socket.socket(fileno=new))
    finally:
        os.close(pidfd)
    return got


class MsQuicGroup:
    """HTTP/3 on MsQuic under the master: the workers' own sockets, steered.

    Each worker's MsQuic binds its own SO_REUSEPORT sockets on the port; they join the
    port's group one worker at a time (the worker holds ``lock_path`` from counting the
    group to the master's answer), so a worker's sockets sit at indexes
    [group size, group size + its count) and its worker id is ``1 << 16 | that size``.
    The master then takes copies of them (pidfd_getfd) and keeps them until it exits:
    no socket leaves the group, so no index moves (the kernel fills a hole with the
    last socket). The program is ``build_program`` with MsQuic's id length; the worker
    puts the current one (``prog_path``) back on right after MsQuic attaches its own.

    Every worker ever started leaves a few fds here: the master runs it with a raised
    open-files limit.
    """

    def __init__(self, port: int, state_dir: str) -> None:
        self.port = port
        os.makedirs(state_dir, exist_ok=True)
        base = os.path.join(state_dir, f"quic-{os.getpid()}")
        self.lock_path, self.prog_path = base + ".lock", base + ".prog"
        with open(self.lock_path, "a"):
            pass
        self.sockets: list[socket.socket] = []
        self.live: set[int] = set()
        self.active: list[int] = []
        self._write(build_program((), (), MSQUIC_CID_LEN))

    def adopt(self, pid: int, worker_id: int) -> None:
        """Keep copies of the worker's sockets on the port; then it is live."""
        fds = udp_fds(pid, self.port)
        if not fds:
            raise OSError(errno.ENOENT, f"worker {pid} has no UDP socket on port {self.port}")
        self.sockets += _pidfd_getfd(pid, fds)
        self.live.add(worker_id)

    def forget_in_child(self) -> None:
        """In a forked worker: close the inherited copies. A worker that kept them would
        show them as its own sockets, and the master would adopt them again."""
        for sock in self.sockets:
            sock.close()
        self.sockets = []

    def release(self, worker_id: int) -> None:
        """The worker has exited (its sockets stay: the master holds them)."""
        self.live.discard(worker_id)
        self.active = [w for w in self.active if w != worker_id]

    def steer(self, active: Iterable[int]) -> None:
        self.active = [w for w in dict.fromkeys(active) if w in self.live]
        prog = build_program(self.live, self.active, MSQUIC_CID_LEN)
        if self.sockets:
            attach_program(self.sockets[0], prog)
        self._write(prog)

    def _write(self, prog) -> None:
        tmp = self.prog_path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(program_bytes(prog))
        os.replace(tmp, self.prog_path)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()
        for path in (self.lock_path, self.prog_path):
            with contextlib.suppress(OSError):
                os.unlink(path)


def udp_fds(pid: int, port: int) -> list[int]:
    """The fds of process ``pid`` that are UDP sockets bound to ``port``."""
    inodes = udp_inodes(port)
    fds = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{name}")
            if link.startswith("socket:[") and link[8:-1] in inodes:
                fds.append(int(name))
    return sorted(fds)
