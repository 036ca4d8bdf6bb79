"""The reclaimer trims once after a flood's connections are gone, not on ordinary churn."""

from __future__ import annotations

import pytest

from fpy3 import memory


@pytest.fixture
def trims(monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(memory, "malloc_trim", lambda: calls.append(1) or True)
    return calls


def test_trims_once_the_flood_is_gone(trims):
    r = memory.Reclaimer(min_drop=100, rise=10**6, interval=5.0)
    for load in (10, 500, 3000, 3000):
        assert not r.tick(load, 0.0)
    assert not r.tick(2000, 1.0)  # still above half the peak
    assert not r.tick(1200, 2.0)  # still falling fast: their memory is not free yet
    assert not r.tick(150, 3.0)
    assert r.tick(149, 4.0)  # stopped falling: one trim
    assert trims == [1] and r.peak == 149
    assert not r.tick(0, 5.0)  # the stragglers leave; still falling
    assert not r.tick(0, 6.0)  # within the interval, and too few anyway
    assert len(trims) == 1


def test_second_flood_trims_again(trims):
    r = memory.Reclaimer(min_drop=100, rise=10**6, interval=5.0)
    for t, load in enumerate((3000, 0, 0, 3000, 3000, 0, 0)):
        r.tick(load, float(t * 3))
    assert len(trims) == 2 and r.trims == 2


def test_trims_while_a_flood_arrives(trims):
    r = memory.Reclaimer(min_drop=100, rise=1000, interval=1.0)
    assert not r.tick(900, 0.0)
    assert r.tick(1100, 1.0)  # 1,000 more than at the last trim (none: 0)
    assert not r.tick(2000, 2.0)
    assert r.tick(2200, 3.0)
    assert not r.tick(3000, 3.5)  # within the interval
    assert len(trims) == 2


def test_ordinary_churn_never_trims(trims):
    r = memory.Reclaimer(min_drop=256)
    for i in range(1000):
        r.tick(50 + (i % 7) * 20, float(i))
    assert trims == []


def test_malloc_trim_runs_here():
    # glibc on the supported platforms: the real call works and returns True.
    assert memory.malloc_trim() is True
