"""The background loop: a failed pass is counted and the next one follows; a cancellation of
its own task stops it, and so does a step that says it has nothing left to do."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from shared.tasks import STOP, BackgroundTask, run_periodically


def _failures(task: str) -> float:
    return REGISTRY.get_sample_value("myl_background_failures_total", {"task": task}) or 0.0


async def test_a_failed_pass_is_counted_and_the_loop_goes_on_until_stopped() -> None:
    passes = 0
    third = asyncio.Event()

    async def step() -> None:
        nonlocal passes
        passes += 1
        if passes == 1:
            raise RuntimeError("the database is away")
        if passes == 2:
            raise asyncio.CancelledError  # a call cancelled under the pass, not a stop
        third.set()

    before = _failures("flaky pass")
    loop = BackgroundTask("flaky", lambda: run_periodically("flaky pass", step, 0))
    loop.start()
    await third.wait()
    await loop.stop()
    assert _failures("flaky pass") == before + 1


async def test_a_poke_ends_the_wait_and_a_poke_during_the_pass_does_not() -> None:
    wake = asyncio.Event()
    passes: list[int] = []
    first, second = asyncio.Event(), asyncio.Event()

    async def step() -> None:
        passes.append(len(passes))
        wake.set()  # what a pass's own failure does (the cache guard's breaker pokes it)
        (first if len(passes) == 1 else second).set()

    task = asyncio.create_task(run_periodically("poked", step, 3600, wake=wake))
    await first.wait()
    assert not wake.is_set()  # the hour's wait is not cut short by the pass's own poke
    wake.set()
    await second.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_work_announced_during_a_pass_starts_the_next_one_at_once() -> None:
    """`woken_by_others` (the ACME worker: a job queued while it claims): a poke that
    arrives while a pass runs is not lost to the hour's wait."""
    wake = asyncio.Event()
    passes = 0
    in_first, release, second = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def step() -> None:
        nonlocal passes
        passes += 1
        if passes == 1:
            in_first.set()
            await release.wait()
        else:
            second.set()

    task = asyncio.create_task(
        run_periodically("claims", step, 3600, wake=wake, woken_by_others=True)
    )
    await in_first.wait()
    wake.set()  # a job queued while the first pass claims
    release.set()
    await asyncio.wait_for(second.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert passes == 2


async def test_a_step_with_nothing_left_to_do_ends_the_loop() -> None:
    passes = 0

    async def step() -> object:
        nonlocal passes
        passes += 1
        return STOP if passes == 3 else None

    await asyncio.wait_for(run_periodically("ending pass", step, 0), 5)
    assert passes == 3
