"""HeapTrimmer: trims after a large release, not before, not twice for the same memory."""

from __future__ import annotations

import pytest

from fpy3.memory import HeapTrimmer


def test_trims_once_after_a_large_release() -> None:
    trimmer = HeapTrimmer(threshold=4 * 1024 * 1024)
    if trimmer._libc is None:
        pytest.skip("malloc is not glibc's here (a sanitizer's runtime?)")
    assert not trimmer.tick()  # nothing released yet
    # Blocks side by side; every other one is freed: 8 MiB of holes between live blocks,
    # which the heap cannot give back from its top.
    blocks = [bytearray(32 * 1024 - 64) for _ in range(512)]
    assert not trimmer.tick()  # a tick while they live (the clock ticks every second)
    del blocks[::2]
    assert trimmer.tick()
    assert not trimmer.tick()  # the same free memory is not trimmed again
    assert trimmer.trims == 1
    del blocks


def test_small_releases_do_not_trim() -> None:
    trimmer = HeapTrimmer(threshold=64 * 1024 * 1024)
    if trimmer._libc is None:
        pytest.skip("malloc is not glibc's here (a sanitizer's runtime?)")
    blocks = [bytearray(1000) for _ in range(1000)]
    del blocks
    assert not trimmer.tick()
