"""An apply allocates a plan of up to millions of objects; the cyclic collector stays out of
it (each automatic collection would walk what was built so far) and comes back afterwards,
also when the apply fails."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from egressgw.runtime import collections_paused


@pytest.fixture
def collections() -> Iterator[list[int]]:
    """The generations of the collections that start while the test runs."""
    started: list[int] = []

    def seen(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(info["generation"])

    gc.callbacks.append(seen)
    try:
        yield started
    finally:
        gc.callbacks.remove(seen)


def test_an_apply_sized_allocation_runs_no_collection_and_the_collector_comes_back(
    collections: list[int],
) -> None:
    assert gc.isenabled()
    with collections_paused():
        before = len(collections)  # one may have run just before the pause
        plan = [(n, [str(n)]) for n in range(200_000)]  # 400,000 tracked objects
        during = collections[before:]
    assert during == [] and len(plan) == 200_000
    assert gc.isenabled()
    more = [(n, [n]) for n in range(20_000)]
    assert collections, "the collector did not come back"
    assert len(more) == 20_000


def test_a_failed_apply_gives_the_collector_back_and_a_disabled_one_stays_off() -> None:
    with pytest.raises(ValueError), collections_paused():
        raise ValueError("the apply failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with collections_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
