"""The reclaimer trims once after a flood's connections are gone, not on ordinary churn."""

from __future__ import annotations

import pytest

from fpy3 import memory


@pytest.fixture
def trims(monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(memory, "malloc_trim", lambda: calls.append(1) or True)
    return calls


def test_trims_after_a_large_drop(trims):
    r = memory.Reclaimer(min_drop=100, interval=5.0)
    for load in (10, 500, 3000):
        assert not r.tick(load, 0.0)
    assert not r.tick(2000, 1.0)  # still above half the peak
    assert r.tick(1200, 2.0)
    assert trims == [1] and r.peak == 1200
    assert not r.tick(0, 3.0)  # within the interval
    assert r.tick(0, 7.5)  # the rest of the flood went away
    assert len(trims) == 2 and r.trims == 2
    assert not r.tick(0, 20.0)  # nothing fell since


def test_ordinary_churn_never_trims(trims):
    r = memory.Reclaimer(min_drop=256)
    for i in range(1000):
        r.tick(50 + (i % 7) * 20, float(i))
    assert trims == []


def test_malloc_trim_runs_here():
    # glibc on the supported platforms: the real call works and returns True.
    assert memory.malloc_trim() is True
