"""HTTP/3 on MsQuic under the master: the workers' own sockets, steered (MsQuicGroup)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import socket
from collections.abc import Iterable

from fpy3.h3.engine import udp_inodes

from .bpf import INDEX_BITS, INDEX_MASK, SteeringError, attach_program, build_program

__all__ = ["MSQUIC_CID_LEN", "MsQuicGroup", "udp_fds"]

MSQUIC_CID_LEN = 14  # MsQuic's connection ids in its fixed-server-id load-balancing mode
SERIALS = 1 << (32 - INDEX_BITS)  # the worker id's upper bits: a serial number per join
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

    Each worker's MsQuic binds one SO_REUSEPORT socket on the port (native/
    engine_msquic.c) and the kernel puts it at the end of the port's group. Workers
    join one at a time: a worker holds ``lock_path`` from reading its worker id (the
    master writes the next one to ``id_path``) until the master has answered. The id is
    ``serial << 16 | index``: the socket's index in the group and a serial number
    that changes with every join, so an id is not given again for a long time. The
    master takes a copy of the socket (pidfd_getfd), so ``sockets[i]`` is the group's
    socket i, and a socket stays in the group after its worker has gone.

    The kernel fills the hole a socket leaves with the group's last socket, so a socket
    may leave only when that moves nothing still in use. The sockets of workers that
    are gone (no connection can reach them any more: their ids are out of the
    program, so their packets go to the active workers, which answer with a stateless
    reset) leave thus:

    - at the end of the group, at once (under the lock, so no join is under way);
    - elsewhere, when the next worker joins: its id names that index, its socket lands
      at the end, and closing the old one moves it into place.

    So the group holds at most as many sockets as there were workers alive at once
    (two generations during a reload), however many reloads come.
    """

    def __init__(self, port: int, state_dir: str) -> None:
        self.port = port
        os.makedirs(state_dir, exist_ok=True)
        base = os.path.join(state_dir, f"quic-{os.getpid()}")
        self.lock_path, self.id_path = base + ".lock", base + ".id"
        self._lock = open(self.lock_path, "a")  # noqa: SIM115 (held for the group's life)
        self.sockets: list[socket.socket] = []  # the group's sockets, in index order
        self.owners: list[int | None] = []  # the worker id at each index; None: gone
        self.live: set[int] = set()
        self.active: list[int] = []
        self.serial = 1
        self.id_stale = True  # id_path does not offer next_id() yet
        self._write_next_id()

    def next_id(self) -> int:
        """The worker id of the next worker to join: the first gone socket's index, or
        the end of the group."""
        index = next((i for i, w in enumerate(self.owners) if w is None), len(self.sockets))
        return self.serial << INDEX_BITS | index

    def adopt(self, pid: int, worker_id: int) -> None:
        """Keep a copy of the worker's socket, in the place its id names; then it is
        live. Called while the worker holds the lock."""
        fds = udp_fds(pid, self.port)
        if len(fds) != 1:
            raise OSError(
                errno.EINVAL, f"worker {pid} has {len(fds)} UDP sockets on port {self.port}"
            )
        end = len(self.sockets)
        index = worker_id & INDEX_MASK
        # The worker read its id from id_path under the lock; only adopt() moves the
        # serial on and only tidy() (under the lock) shortens the group, so the index is
        # the end of the group or a place some worker has left since.
        if worker_id >> INDEX_BITS != self.serial or not (
            index == end or (index < end and self.owners[index] is None)
        ):
            raise SteeringError(errno.EINVAL, f"worker id {worker_id:#x} was not offered")
        # The worker's socket is the group's last: all of ours, then it.
        if (size := len(udp_inodes(self.port))) != end + 1:
            raise SteeringError(
                errno.EINVAL, f"UDP port {self.port} has {size} sockets, expected {end + 1}"
            )
        (sock,) = _pidfd_getfd(pid, fds)
        self.sockets.append(sock)
        self.owners.append(worker_id)
        if index < end:
            # The gone socket leaves its place to the last one: the new worker's.
            self.sockets[index].close()
            self.sockets[index] = self.sockets.pop()
            self.owners[index] = self.owners.pop()
        self.live.add(worker_id)
        self.serial = self.serial % (SERIALS - 1) + 1  # 1 .. SERIALS - 1: ids are never 0
        self.id_stale = True
        with contextlib.suppress(OSError):  # then tidy() retries, and raises it
            self._write_next_id()

    def forget_in_child(self) -> None:
        """In a forked worker: close the inherited copies. A worker that kept them would
        show them as its own sockets, and the master would adopt them again."""
        for sock in self.sockets:
            sock.close()
        self.sockets = []
        self._lock.close()

    def release(self, worker_id: int) -> None:
        """The worker has exited: no connection reaches its socket any more (call
        steer() next, and tidy() soon)."""
        self.live.discard(worker_id)
        self.active = [w for w in self.active if w != worker_id]
        if worker_id in self.owners:
            self.owners[self.owners.index(worker_id)] = None
            self.id_stale = True  # its place goes to the next worker to join

    def tidy(self) -> None:
        """Close the gone sockets at the end of the group (unless a worker is joining:
        then a later call does it) and offer the next worker id. Raises OSError when
        id_path cannot be written; every call tries again."""
        if self.owners and self.owners[-1] is None:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            else:
                try:
                    while self.owners and self.owners[-1] is None:
                        self.owners.pop()
                        self.sockets.pop().close()
                    self._write_next_id()
                finally:
                    fcntl.flock(self._lock, fcntl.LOCK_UN)
        if self.id_stale:
            self._write_next_id()

    def steer(self, active: Iterable[int]) -> None:
        self.active = [w for w in dict.fromkeys(active) if w in self.live]
        if self.sockets:  # the program belongs to the group: any member attaches it
            attach_program(self.sockets[0], build_program(self.live, self.active, MSQUIC_CID_LEN))

    def _write_next_id(self) -> None:
        self.id_stale = True
        tmp = self.id_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{self.next_id()}\n")
        os.replace(tmp, self.id_path)
        self.id_stale = False

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()
        self.owners.clear()
        self._lock.close()
        for path in (self.lock_path, self.id_path):
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
