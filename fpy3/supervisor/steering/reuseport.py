"""The ngtcp2 workers' SO_REUSEPORT group, bound by the master and steered by worker id.

The master binds one UDP socket per worker, all on the same address, before forking,
and attaches the steering program (``bpf``) to the group. fpy3 workers put their
worker id in bytes 1..4 (big-endian) of every 18-byte server connection id they issue
(native/engine_ngtcp2.c). Sockets are a pool: ``acquire()`` hands a free one to a new
worker, ``release()`` takes it back when that worker process has exited. Old and new
generations hold different sockets, so a reload needs no fixed banks and overlapping
reloads or changes of worker count just take more sockets (the group grows on demand).

Needs Linux >= 4.6 (SO_REUSEPORT for UDP since 3.9, SO_ATTACH_REUSEPORT_CBPF since
4.5, UDP reuseport groups with programs since 4.6). No privileges. Without it
``QuicSockets.bind`` raises SteeringUnavailable and the master falls back to one
plain UDP socket served by one worker.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable, Set

from .bpf import INDEX_BITS, INDEX_MASK, SteeringError, attach_program, build_program

__all__ = ["MAX_SOCKETS", "QuicGroups", "QuicSockets", "SteeringUnavailable"]

MAX_SOCKETS = 2048


class SteeringUnavailable(SteeringError):
    """The kernel lacks SO_REUSEPORT or SO_ATTACH_REUSEPORT_CBPF for this address."""


class QuicSockets:
    """The master's SO_REUSEPORT group of UDP sockets for HTTP/3 and its steering."""

    def __init__(self, family: int, address: tuple, v6only: bool = True) -> None:
        self.family = family
        self.address = address  # as bound, with the real port
        self.v6only = v6only  # IPv6 sockets: off for a dual-stack wildcard
        self.sockets: list[socket.socket] = []
        self.live: set[int] = set()
        self.active: list[int] = []

    # -- binding

    @classmethod
    def bind(cls, host: str, port: int, count: int) -> QuicSockets:
        """Bind ``count`` sockets on host:port (port 0: one free port for all of them).

        Raises SteeringUnavailable (nothing left bound) when the kernel cannot steer,
        or OSError when the address cannot be bound.
        """
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
        )
        family, _, _, _, addr = infos[0]
        return cls._bind(family, addr, count)

    @classmethod
    def take_over(cls, sock: socket.socket, count: int, rebind: bool = True) -> QuicSockets:
        """Move the address of an already bound UDP socket to a new group.

        A socket already in a SO_REUSEPORT group (inherited from systemd with
        ``ReusePort=yes``) stays in it as the first member, and the others join it.
        Any other one is closed and its address bound again by the group, which
        ``rebind=False`` forbids (an inherited socket: its first owner keeps the
        address): SteeringUnavailable then. On SteeringUnavailable ``sock`` is left as
        it was, so the caller can keep serving HTTP/3 from it with one worker.
        """
        family, addr = sock.family, sock.getsockname()
        v6only = family != socket.AF_INET6 or bool(
            sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
        )
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
            return cls._bind(family, addr, count, v6only, first=sock)
        if not rebind:
            raise SteeringUnavailable(
                errno.EOPNOTSUPP,
                f"QUIC steering unavailable: the inherited UDP socket on {addr[0]} port "
                f"{addr[1]} is not in a SO_REUSEPORT group (systemd: ReusePort=yes)",
            )
        cls.probe(sock)
        sock.close()
        return cls._bind(family, addr, count, v6only)

    @classmethod
    def probe(cls, sock: socket.socket) -> None:
        """Raise SteeringUnavailable when a group cannot be made on ``sock``'s address."""
        family, addr = sock.family, sock.getsockname()
        cls._bind(family, (addr[0], 0, *addr[2:]), 2).close()

    @classmethod
    def _bind(
        cls,
        family: int,
        addr: tuple,
        count: int,
        v6only: bool = True,
        first: socket.socket | None = None,
    ) -> QuicSockets:
        if not 1 <= count <= MAX_SOCKETS:
            raise ValueError(f"count must be 1..{MAX_SOCKETS}")
        group = cls(family, addr, v6only)
        if first is not None:
            first.setblocking(False)
            group.sockets.append(first)
        try:
            while len(group.sockets) < count:
                group._add()
            attach_program(group.sockets[0], build_program((), ()))
        except OSError as exc:
            group.close()
            if exc.errno in (errno.ENOPROTOOPT, errno.EINVAL, errno.EOPNOTSUPP):
                raise SteeringUnavailable(exc.errno, f"QUIC steering unavailable: {exc}") from None
            raise
        return group

    def _add(self) -> socket.socket:
        sock = socket.socket(self.family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if self.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(self.v6only))
            sock.bind(self.address)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self.address = sock.getsockname()  # port 0 becomes the real port
        self.sockets.append(sock)  # joins the group at this index
        return sock

    # -- worker ids

    @staticmethod
    def worker_id(index: int, generation: int) -> int:
        return (generation & 0xFFFF) << INDEX_BITS | index

    @staticmethod
    def index_of(worker_id: int) -> int:
        return worker_id & INDEX_MASK

    def acquire(self, generation: int) -> int:
        """A socket for a new worker: returns its worker id (steer() to route to it)."""
        used = {self.index_of(w) for w in self.live}
        index = next((i for i in range(len(self.sockets)) if i not in used), len(self.sockets))
        if index == len(self.sockets):
            if index >= MAX_SOCKETS:
                raise SteeringError(errno.ENOSPC, f"all {MAX_SOCKETS} QUIC sockets in use")
            self._add()  # inherits the group's program
        wid = self.worker_id(index, generation)
        self.live.add(wid)
        return wid

    def release(self, worker_id: int) -> None:
        """The worker has exited: its socket is free. Call steer() next."""
        self.live.discard(worker_id)
        self.active = [w for w in self.active if w != worker_id]

    def socket_for(self, worker_id: int) -> socket.socket:
        if worker_id not in self.live:
            raise KeyError(f"worker id {worker_id:#x} is not acquired")
        return self.sockets[self.index_of(worker_id)]

    def for_worker(self, worker_id: int) -> socket.socket:
        """In a forked worker: close the inherited copies of the other sockets."""
        own = self.socket_for(worker_id)
        for sock in self.sockets:
            if sock is not own:
                sock.close()
        return own

    # -- steering

    def steer(self, active: Iterable[int]) -> None:
        """Route new connections to ``active`` and every live id to its own socket.

        Then empties the free sockets: what is queued there is for workers that are
        gone (or came before the first steer), and their next owner must not read it.
        On SteeringError (program too large) the previous program stays attached.
        """
        active = list(dict.fromkeys(active))
        unknown = [w for w in active if w not in self.live]
        if unknown:
            raise ValueError(f"not acquired: {', '.join(f'{w:#x}' for w in unknown)}")
        attach_program(self.sockets[0], build_program(self.live, active))
        self.active = active
        used = {self.index_of(w) for w in self.live}
        for index, sock in enumerate(self.sockets):
            if index not in used:
                _flush(sock)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()
        self.live.clear()
        self.active = []


class QuicGroups:
    """One QuicSockets group per UDP address HTTP/3 is served on, in lockstep: a worker
    holds the socket of the same index in every group, so its one worker id steers its
    packets on each address (groups hand out the lowest free index, and they acquire
    and release together)."""

    def __init__(self, groups: list[QuicSockets]) -> None:
        self.groups = groups

    @classmethod
    def take_over(
        cls, socks: list[socket.socket], count: int, keep: Set[int] = frozenset()
    ) -> QuicGroups:
        """QuicSockets.take_over for each socket; ``keep`` has the fds that must not be
        rebound (inherited). All or nothing: on SteeringUnavailable every socket is
        left as it was."""
        for sock in socks:  # before any socket is touched
            if sock.fileno() in keep and not sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_REUSEPORT
            ):
                QuicSockets.take_over(sock, count, rebind=False)  # raises
            QuicSockets.probe(sock)
        groups: list[QuicSockets] = []
        try:
            for sock in socks:
                groups.append(QuicSockets.take_over(sock, count, sock.fileno() not in keep))
        except OSError:
            for group in groups:
                group.close()
            raise
        return cls(groups)

    def acquire(self, generation: int) -> int:
        wid = self.groups[0].acquire(generation)
        done = [self.groups[0]]
        try:
            for group in self.groups[1:]:
                if group.acquire(generation) != wid:
                    raise SteeringError(errno.EINVAL, "QUIC socket groups out of step")
                done.append(group)
        except OSError:
            for group in done:
                group.release(wid)
            raise
        return wid

    def release(self, worker_id: int) -> None:
        for group in self.groups:
            group.release(worker_id)

    def for_worker(self, worker_id: int) -> list[socket.socket]:
        return [group.for_worker(worker_id) for group in self.groups]

    def steer(self, active: Iterable[int]) -> None:
        active = list(active)
        for group in self.groups:
            group.steer(active)

    def close(self) -> None:
        for group in self.groups:
            group.close()


def _flush(sock: socket.socket, limit: int = 100_000) -> None:
    """Drop the datagrams queued on a socket nobody reads."""
    for _ in range(limit):
        try:
            sock.recv(1, socket.MSG_DONTWAIT)  # a short read still consumes the datagram
        except OSError:
            return
