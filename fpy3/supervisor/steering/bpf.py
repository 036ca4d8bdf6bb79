"""The cBPF program that steers QUIC datagrams within a SO_REUSEPORT group.

A worker id is ``generation << 16 | index`` (uint32): ``index`` is the worker's socket
in the group. The program, rebuilt and re-attached whenever the workers change:

1. A packet whose DCID has the server's length and carries a *live* worker id (one
   that is serving or draining) goes to that worker's socket. Short header: DCID from
   payload byte 1; long header: DCID length at byte 5, DCID from byte 6. The worker id
   is the DCID's bytes 1..4 (big-endian).
2. Anything else goes to one of the *active* workers (those taking new connections),
   chosen by a hash of 8 DCID bytes modulo their count. That covers a client's first
   Initial (random DCID, so its retransmits, 0-RTT and split ClientHello all hash to
   the same worker) and packets for a worker id that is not live any more: the worker
   that gets those does not know the connection and answers a short-header packet with
   a stateless reset (the reset key is shared by all workers), so clients of a dead
   worker learn at once instead of waiting for their idle timeout. Nothing is steered
   to a socket that nobody reads.
3. Datagrams too short to hold a DCID go to an active worker too (which drops them).

The match on the full 32-bit id is exact: a client's random DCID looks live with odds
(live ids) / 2**32. Lookups are a binary search, so a packet costs O(log live)
instructions. The program must fit BPF_MAXINSNS (4096): 2048 live ids fit when the
active indexes are contiguous (the usual case: groups hand out the lowest free
socket); with scattered active ones, about 1600 live ids.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
from collections.abc import Iterable

__all__ = [
    "BPF_MAXINSNS",
    "CID_LEN",
    "INDEX_BITS",
    "INDEX_MASK",
    "NO_SOCKET",
    "SteeringError",
    "attach_program",
    "build_program",
    "program_bytes",
]

SO_ATTACH_REUSEPORT_CBPF = 51  # not in the socket module
BPF_MAXINSNS = 4096
CID_LEN = 18  # server connection ids issued by fpy3 workers
INDEX_BITS = 16
INDEX_MASK = (1 << INDEX_BITS) - 1
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


def attach_program(sock: socket.socket, prog: list[tuple[int, int, int, int]]) -> None:
    """Attach ``prog`` to the reuseport group of ``sock`` (replacing the group's program)."""
    filt = ctypes.create_string_buffer(program_bytes(prog))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    fprog = struct.pack("@HP", len(prog), ctypes.addressof(filt))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
