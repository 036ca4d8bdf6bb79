"""Freed memory goes back to the operating system after large releases, for every
protocol.

glibc's malloc keeps what a worker frees in its heaps for reuse. After a flood (tens of
thousands of QUIC handshakes, thousands of connections left to time out, thousands of
idle TLS connections: OpenSSL holds about 14.5 KiB per TLS connection) that is hundreds
of MiB, scattered between the few objects still alive, so the heap's top cannot shrink
and the RSS stays at its peak: measured, 3,000 idle TLS connections left a worker about
60 MiB above its baseline for good, and a second wave added as much again.
``malloc_trim(0)`` hands every free page inside the heaps back (``MADV_DONTNEED``),
wherever it is: the same worker came back within 6 to 9 MiB of its baseline, for a few
milliseconds of work. Tuning instead (a fixed ``M_MMAP_THRESHOLD``) gave back nothing
more, since what is retained is small blocks; an allocator like jemalloc needs
``LD_PRELOAD`` before the interpreter starts, which forked workers cannot have.

Trimming costs time in proportion to the free memory, so it runs only once a large
amount was released: the service's clock asks once a second (``HeapTrimmer.tick``), and
the trimmer compares the heaps' free bytes (``mallinfo2``) with what they were after the
last trim. Without glibc's malloc (no ``mallinfo2``/``malloc_trim``, or another
allocator in its place) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger("fpy3.error")

# Free bytes released since the last trim that make the next tick trim.
TRIM_AFTER = 8 * 1024 * 1024


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallinfo2, malloc_trim = libc.mallinfo2, libc.malloc_trim
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    mallinfo2.argtypes = []
    malloc_trim.restype = ctypes.c_int
    malloc_trim.argtypes = [ctypes.c_size_t]
    if mallinfo2().arena == 0:
        return None  # another allocator serves malloc (a sanitizer's, jemalloc...)
    return mallinfo2, malloc_trim


class HeapTrimmer:
    """Trims the heaps when enough was freed since the last trim."""

    def __init__(self, threshold: int = TRIM_AFTER) -> None:
        self.threshold = threshold
        self._libc = _libc()
        self._base = self.free_bytes()
        self.trims = 0

    def free_bytes(self) -> int:
        """Bytes free inside malloc's heaps (0 without glibc)."""
        if self._libc is None:
            return 0
        return self._libc[0]().fordblks

    def tick(self) -> bool:
        """Trim if more than ``threshold`` bytes were freed since the last trim (or were
        in use again since then): True when it trimmed."""
        if self._libc is None:
            return False
        free = self.free_bytes()
        if free < self._base:
            self._base = free  # reused: what is freed next counts from here
            return False
        if free - self._base < self.threshold:
            return False
        self._libc[1](0)
        self.trims += 1
        logger.debug(
            "memory: %.1f MiB freed since the last trim, trimmed", (free - self._base) / 2**20
        )
        self._base = self.free_bytes()
        return True
