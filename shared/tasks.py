"""Background loops that stop when they are told to, and only then.

On Python 3.11, `asyncio.timeout` and `asyncio.wait_for` can turn a cancellation that arrives
just as their timeout fires into a TimeoutError, which a polling loop then takes for an
ordinary timeout: the loop goes on, and whoever cancelled it waits for ever (a service's
shutdown hung that way). Every periodic loop calls `stop_if_cancelled()` once per round.

`run_periodically` is the one loop of the services' background work (samplers, flushers,
relays, lifecycle and CRL passes, the cache guard): a pass that raises is logged and counted
and the next one follows; only a cancellation of the task itself ends it. A CancelledError
the pass did not ask for (a call whose channel was closed under it) is not a stop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final

from shared.logging import get_logger
from shared.metrics import BACKGROUND_FAILURES

log = get_logger(__name__)


def stop_if_cancelled() -> None:
    """Raise CancelledError if the current task has been asked to stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


# What a step returns when there is nothing left for it to do: `run_periodically` then ends.
STOP: Final = object()


async def run_periodically(
    name: str,
    step: Callable[[], Awaitable[object]],
    interval: float | Callable[[], float],
    *,
    wait_first: bool = False,
    wake: asyncio.Event | None = None,
    woken_by_others: bool = False,
    quiet: tuple[type[Exception], ...] = (),
    on_error: Callable[[Exception], object] | None = None,
) -> None:
    """`step()`, then wait `interval` seconds (a callable: asked after each pass), until
    cancelled or a step returns `STOP`. `wait_first`: wait before the first pass too.
    `wake`: setting it ends a wait early; it is cleared after each pass, so a pass that sets
    it (its own failure pokes it) does not start the next one at once. `woken_by_others`:
    it is cleared before each pass instead, so work announced while a pass runs (a job
    queued meanwhile) starts the next pass at once. A failure is counted; one of the `quiet`
    kinds (an outage the next pass simply retries) is not logged; `on_error` sees every
    failure."""

    async def pause() -> None:
        delay = interval() if callable(interval) else interval
        if wake is None:
            await asyncio.sleep(delay)
            return
        if not woken_by_others:
            wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), delay)
        stop_if_cancelled()

    if wait_first:
        await pause()
    while True:
        if wake is not None and woken_by_others:
            wake.clear()
        try:
            if await step() is STOP:
                return
        except asyncio.CancelledError:
            stop_if_cancelled()
            log.warning("background pass cancelled from within; going on", task=name)
        except Exception as exc:
            BACKGROUND_FAILURES.labels(name).inc()
            if not isinstance(exc, quiet):
                log.warning("background pass failed", task=name, exc_info=True)
            if on_error is not None:
                on_error(exc)
        stop_if_cancelled()
        await pause()


class BackgroundTask:
    """One background coroutine its owner starts once and stops (cancels and awaits): how
    every service starts its background work. Work that ends with an error (`run_periodically`
    never does) is logged when it ends, and `stop` does not raise it."""

    def __init__(self, name: str, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self.name = name
        self.work = work
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def _run(self) -> None:
        try:
            await self.work()
        except Exception:
            log.exception("background task stopped", task=self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
