"""Memory given back to the operating system after a flood, for every protocol.

A connection's native state (OpenSSL's about 14.5 KiB per TLS connection, uvloop's
buffers, QUIC engine state) comes from glibc's malloc, which keeps what is freed inside
its heap: after 3,000 idle TLS connections closed, a worker stayed about 60 MiB above its
baseline for good, and a second flood added as much again, because the small blocks
freed are scattered among live ones and glibc only shrinks the heap from its top.
``malloc_trim(0)`` hands every free page back (madvise), wherever it lies: measured, the
same worker came back within 6 to 9 MiB of its baseline, for 3 to 7 ms of work.
Tuning instead (a fixed ``M_MMAP_THRESHOLD`` to keep uvloop's 256 KiB read buffers in
their own mappings) gave back nothing more, since what is retained is the small blocks;
an allocator like jemalloc needs ``LD_PRELOAD`` before the interpreter starts, which forked
workers cannot have.

So the service clock tells a ``Reclaimer`` how many connections are open (all protocols)
each tick, and it trims once that count has fallen well below its peak since the last
trim and stopped falling: a flood's end, not the ordinary coming and going of clients
(trimming while connections are still closing would leave their memory behind). Only glibc has
``malloc_trim``; elsewhere nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["Reclaimer", "malloc_trim"]

logger = logging.getLogger("fpy3.error")


def _load_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_trim = _load_trim()


def malloc_trim() -> bool:
    """Give the free pages of every malloc arena back to the OS; False if not glibc."""
    if _trim is None:
        return False
    _trim(0)
    return True


class Reclaimer:
    """Trims when a flood ends: the open connections fell by at least ``min_drop`` and to
    at most half their peak since the last trim, and no longer fall faster than
    ``min_drop / 8`` a tick. Also while a flood arrives, for each ``rise`` connections
    more than at the last trim: what the handshakes freed goes back at once (measured,
    12 to 17 MiB of 3,000 idle TLS connections' peak, for 2 to 3 ms). At most once every
    ``interval`` seconds."""

    __slots__ = ("min_drop", "rise", "interval", "peak", "floor", "last", "next_at", "trims")

    def __init__(self, min_drop: int = 256, rise: int = 1024, interval: float = 2.0):
        self.min_drop = min_drop
        self.rise = rise
        self.interval = interval
        self.peak = 0  # the most connections since the last trim
        self.floor = 0  # connections at the last trim
        self.last = 0  # connections at the previous tick
        self.next_at = 0.0
        self.trims = 0

    def tick(self, load: int, now: float) -> bool:
        """``load``: connections open now. True when this tick trimmed."""
        last, self.last = self.last, load
        if load > self.peak:
            self.peak = load
        if now < self.next_at:
            return False
        if load - self.floor < self.rise and (
            self.peak - load < self.min_drop
            or load > self.peak // 2
            or last - load > self.min_drop // 8  # still closing: their memory is not free yet
        ):
            return False
        self.peak = self.floor = load
        self.next_at = now + self.interval
        if not malloc_trim():
            return False
        self.trims += 1
        logger.debug("gave freed memory back to the OS (%d connections open)", load)
        return True
