"""HeapTrimmer: trims after a large release, not before, not twice for the same memory."""

from __future__ import annotations

import pytest

from fpy3.memory import HeapTrimmer


def test_trims_once_after_a_large_release() -> None:
    trimmer = HeapTrimmer(threshold=4 * 1024 * 1024)
    if trimmer._libc is None:
        pytest.skip("no glibc malloc_trim/mallinfo2 here")
    assert not trimmer.tick()  # nothing released yet
    # Large blocks interleaved with small survivors (from malloc, not Python's small-object
    # allocator): freed, the blocks cannot shrink the heap from its top.
    blocks, keep = [], []
    for _ in range(256):
        blocks.append(bytearray(64 * 1024 - 64))
        keep.append(bytearray(1024))
    assert not trimmer.tick()  # a tick while they live (the clock ticks every second)
    del blocks
    assert trimmer.tick()
    assert not trimmer.tick()  # the same free memory is not trimmed again
    assert trimmer.trims == 1
    del keep


def test_small_releases_do_not_trim() -> None:
    trimmer = HeapTrimmer(threshold=64 * 1024 * 1024)
    blocks = [bytearray(1000) for _ in range(1000)]
    del blocks
    assert not trimmer.tick()
