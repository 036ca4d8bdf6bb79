"""QUIC packet steering: each connection's datagrams reach the worker that owns it.

The master binds one SO_REUSEPORT UDP socket per worker (a *group*, all on the same
address) before forking, and attaches a classic BPF program to the group
(SO_ATTACH_REUSEPORT_CBPF). For every datagram the kernel runs the program on the UDP
payload and delivers the datagram to the socket whose index in the group it returns.

Worker ids. A worker id is ``generation << 16 | index`` (uint32): ``index`` is the
worker's socket in the group. fpy3 workers put their id in bytes 1..4 (big-endian) of
every 18-byte server connection id they issue (native/engine_ngtcp2.c). Sockets are a
pool: ``acquire()`` hands a free one to a new worker, ``release()`` takes it back when
that worker process has exited. Old and new generations hold different sockets, so a
reload needs no fixed banks and overlapping reloads or changes of worker count just
take more sockets (the group grows on demand).

The program, rebuilt and re-attached by ``steer()`` whenever the workers change:

1. A packet whose DCID is 18 bytes and carries a *live* worker id (acquired, not yet
   released: serving or draining) goes to that worker's socket. Short header: DCID
   from payload byte 1; long header: DCID length at byte 5, DCID from byte 6.
2. Anything else goes to one of the *active* workers (those taking new connections),
   chosen by a hash of 8 DCID bytes modulo their count. That covers a client's first
   Initial (random DCID, so its retransmits, 0-RTT and split ClientHello all hash to
   the same worker) and packets for a worker id that is not live any more: the worker
   that gets those does not know the connection and answers a short-header packet with
   a stateless reset (the reset key is shared by all workers), so clients of a dead
   worker learn at once instead of waiting for their idle timeout. Nothing is steered
   to a socket that nobody reads.
3. Datagrams too short to hold a DCID go to an active worker too (which drops them).

The match on the full 32-bit id is exact: a client's random 18-byte DCID looks live
with odds (live ids) / 2**32. Lookups are a binary search, so a packet costs
O(log live) instructions. The program must fit BPF_MAXINSNS (4096): MAX_SOCKETS live
ids fit when the active indexes are contiguous (the usual case: ``acquire`` takes the
lowest free socket); with scattered active ones, about 1600 live ids.

Needs Linux >= 4.6 (SO_REUSEPORT for UDP since 3.9, SO_ATTACH_REUSEPORT_CBPF since
4.5, UDP reuseport groups with programs since 4.6). No privileges. Without it
``QuicSockets.bind`` raises SteeringUnavailable and the master falls back to one
plain UDP socket served by one worker.

Group membership is by index in join order, and the kernel moves the last socket into
the hole when one leaves, so the master keeps every socket open until it exits;
workers only inherit copies.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import resource
import socket
import struct
from collections.abc import Iterable

from fpy3.h3.engine import udp_inodes

__all__ = [
    "CID_LEN",
    "MAX_SOCKETS",
    "QuicSockets",
    "SteeringError",
    "SteeringUnavailable",
    "build_program",
]

SO_ATTACH_REUSEPORT_CBPF = 51  # not in the socket module
BPF_MAXINSNS = 4096
CID_LEN = 18  # server connection ids issued by fpy3 workers
INDEX_BITS = 16
INDEX_MASK = (1 << INDEX_BITS) - 1
MAX_SOCKETS = 2048
NO_SOCKET = 0xFFFFFFFF  # out of range: the kernel falls back to its 4-tuple hash
LEAF = 16  # ids compared one by one at the bottom of the search tree

# Classic BPF opcodes (linux/filter.h).
LD_B_ABS = 0x30
LD_W_ABS = 0x20
LD_W_LEN = 0x80
LD_IMM = 0x00
LD_MEM = 0x60
ST = 0x02
TAX = 0x07
ALU_XOR_X = 0xAC
ALU_AND_K = 0x54
ALU_ADD_K = 0x04
ALU_MOD_K = 0x94
JA = 0x05
JEQ_K = 0x15
JGT_K = 0x25
JGE_K = 0x35
JSET_K = 0x45
RET_K = 0x06
RET_A = 0x16

SHORT_MIN = 1 + CID_LEN  # first byte + DCID
LONG_MIN = 14  # first byte, version, DCID length, 8 bytes to hash


class SteeringError(OSError):
    """The group cannot do what was asked (no free socket, program too large)."""


class SteeringUnavailable(SteeringError):
    """The kernel lacks SO_REUSEPORT or SO_ATTACH_REUSEPORT_CBPF for this address."""


# --- the program ----------------------------------------------------------------------


class _Asm:
    """Classic BPF with named jump targets, resolved at the end."""

    def __init__(self) -> None:
        self.code: list[list] = []
        self.labels: dict[str, int] = {}
        self.count = 0

    def new(self) -> str:
        self.count += 1
        return f"L{self.count}"

    def at(self, label: str) -> None:
        self.labels[label] = len(self.code)

    def op(self, code: int, k: int = 0, jt: str | int = 0, jf: str | int = 0) -> None:
        self.code.append([code, jt, jf, k])

    def ja(self, label: str) -> None:
        self.code.append([JA, 0, 0, label])

    def assemble(self) -> list[tuple[int, int, int, int]]:
        out = []
        for pc, (code, jt, jf, k) in enumerate(self.code):
            if code == JA:
                k = self.labels[k] - pc - 1
                if k < 0:
                    raise AssertionError(f"backward jump at {pc}")
            else:
                jt, jf = (self.labels[j] - pc - 1 if isinstance(j, str) else j for j in (jt, jf))
                if not (0 <= jt <= 255 and 0 <= jf <= 255):
                    raise AssertionError(f"jump out of range at {pc}")
            out.append((code, jt, jf, k & 0xFFFFFFFF))
        return out


def _search(asm: _Asm, keys: list, leaf) -> None:
    """Binary search on A over sorted ``keys``; ``leaf`` emits the code for a few keys."""
    if len(keys) <= LEAF:
        leaf(keys)
        return
    mid = len(keys) // 2
    right = asm.new()
    asm.op(JGT_K, keys[mid - 1], 0, 1)  # A > pivot: take the ja below
    asm.ja(right)
    _search(asm, keys[:mid], leaf)
    asm.at(right)
    _search(asm, keys[mid:], leaf)


def build_program(
    live: Iterable[int], active: Iterable[int], cid_len: int = CID_LEN
) -> list[tuple[int, int, int, int]]:
    """The steering program as (code, jt, jf, k) tuples; see the module docstring.

    ``live``: worker ids whose packets go to their own socket. ``active``: worker ids
    that take new connections; when empty, the live ones do. ``cid_len``: the length
    of the server's connection ids (18 for ngtcp2, 14 for MsQuic).
    """
    live = sorted(set(live))
    targets = sorted({wid & INDEX_MASK for wid in active} or {wid & INDEX_MASK for wid in live})
    if not targets:
        return [(RET_K, 0, 0, NO_SOCKET)]
    a = _Asm()
    lookup, fallback, tiny, long_ = (a.new() for _ in range(4))
    # cBPF only jumps forward, conditional jumps at most 255 ahead: far ones go via ja.
    a.op(LD_W_LEN)
    a.op(JGE_K, 1, 1, 0)  # an out-of-bounds load would return index 0
    a.ja(tiny)
    a.op(LD_B_ABS, 0)
    a.op(JSET_K, 0x80, long_, 0)
    # Short header: DCID at 1, worker id at 2..5.
    a.op(LD_W_LEN)
    a.op(JGE_K, SHORT_MIN, 1, 0)
    a.ja(tiny)
    a.op(LD_W_ABS, 1)
    a.op(TAX)
    a.op(LD_W_ABS, 5)
    a.op(ALU_XOR_X)
    a.op(ST, 0)  # M[0]: the hash, used when the id is not live
    a.op(LD_W_ABS, 2)
    a.ja(lookup)
    # Long header: DCID length at 5, DCID at 6, worker id at 7..10.
    a.at(long_)
    a.op(LD_W_LEN)
    a.op(JGE_K, LONG_MIN, 1, 0)
    a.ja(tiny)
    a.op(LD_W_ABS, 6)
    a.op(TAX)
    a.op(LD_W_ABS, 10)
    a.op(ALU_XOR_X)
    a.op(ST, 0)
    a.op(LD_B_ABS, 5)
    a.op(JEQ_K, cid_len, 1, 0)
    a.ja(fallback)
    a.op(LD_W_ABS, 7)

    def live_leaf(keys):
        hit = a.new()
        for wid in keys:
            a.op(JEQ_K, wid, hit, 0)
        a.ja(fallback)
        a.at(hit)
        a.op(ALU_AND_K, INDEX_MASK)
        a.op(RET_A)

    a.at(lookup)
    if live:
        _search(a, live, live_leaf)
    else:
        a.ja(fallback)
    a.at(tiny)
    a.op(LD_IMM, 0)
    a.op(ST, 0)
    a.at(fallback)
    a.op(LD_MEM, 0)
    # Hash onto the active sockets.
    a.op(ALU_MOD_K, len(targets))
    if targets == list(range(targets[0], targets[0] + len(targets))):
        a.op(ALU_ADD_K, targets[0])
        a.op(RET_A)
    else:

        def hash_leaf(keys):
            for r in keys[:-1]:
                a.op(JEQ_K, r, 0, 1)
                a.op(RET_K, targets[r])
            a.op(RET_K, targets[keys[-1]])  # the search left only this value

        _search(a, list(range(len(targets))), hash_leaf)
    prog = a.assemble()
    if len(prog) > BPF_MAXINSNS:
        raise SteeringError(
            errno.E2BIG,
            f"steering program too large ({len(prog)} > {BPF_MAXINSNS} instructions) "
            f"for {len(live)} live and {len(targets)} active workers",
        )
    return prog


def program_bytes(prog: list[tuple[int, int, int, int]]) -> bytes:
    """struct sock_filter[] as the kernel takes it."""
    return b"".join(struct.pack("=HBBI", *i) for i in prog)


def _attach(sock: socket.socket, prog: list[tuple[int, int, int, int]]) -> None:
    filt = ctypes.create_string_buffer(program_bytes(prog))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    fprog = struct.pack("@HP", len(prog), ctypes.addressof(filt))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


# --- the socket group -----------------------------------------------------------------


class QuicSockets:
    """The master's SO_REUSEPORT group of UDP sockets for HTTP/3 and its steering."""

    def __init__(self, family: int, address: tuple) -> None:
        self.family = family
        self.address = address  # as bound, with the real port
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
    def take_over(cls, sock: socket.socket, count: int) -> QuicSockets:
        """Move the address of an already bound plain UDP socket to a new group.

        ``sock`` is closed on success. On SteeringUnavailable it is left as it was, so
        the caller can keep serving HTTP/3 from it with one worker.
        """
        family, addr = sock.family, sock.getsockname()
        cls._bind(family, (addr[0], 0, *addr[2:]), 2).close()  # probe, same address
        sock.close()
        return cls._bind(family, addr, count)

    @classmethod
    def _bind(cls, family: int, addr: tuple, count: int) -> QuicSockets:
        if not 1 <= count <= MAX_SOCKETS:
            raise ValueError(f"count must be 1..{MAX_SOCKETS}")
        group = cls(family, addr)
        try:
            for _ in range(count):
                group._add()
            _attach(group.sockets[0], build_program((), ()))
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
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
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
        _attach(self.sockets[0], build_program(self.live, active))
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


def _flush(sock: socket.socket, limit: int = 100_000) -> None:
    """Drop the datagrams queued on a socket nobody reads."""
    for _ in range(limit):
        try:
            sock.recv(1, socket.MSG_DONTWAIT)  # a short read still consumes the datagram
        except OSError:
            return


# --- MsQuic ---------------------------------------------------------------------------

MSQUIC_CID_LEN = 14  # MsQuic's connection ids in its fixed-server-id load-balancing mode
_SYS_PIDFD_GETFD = 438  # same number on every Linux architecture


def _pidfd_getfd(pid: int, fds: list[int]) -> list[socket.socket]:
    """Copies of another process's fds (Linux >= 5.6; ptrace rights over it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    got = []
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
    """

    def __init__(self, port: int, state_dir: str) -> None:
        self.port = port
        # Every worker ever started leaves its sockets here (a few fds per worker and
        # reload): allow what the hard limit allows, as nginx's worker_rlimit_nofile does.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
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
            _attach(self.sockets[0], prog)
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
