"""Coalescing concurrent calls into batches: one round trip (and one commit) for many callers.

Under load, most of a provision's CPU outside signing is spent on round trips to PostgreSQL and
Redis (building the message, system calls, event-loop wake-ups), not on the rows themselves. A
`Coalescer` lets concurrent callers share them: a caller runs its own item at once while fewer
than `max_in_flight` flushes are running, so a lone request waits for nothing; otherwise it queues,
and the queue is flushed as one batch as soon as a running flush finishes. Nothing waits on a
timer, batches grow only when round trips are already overlapping, and every caller still gets
its own result (or exception) only after its batch's flush has completed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

Flush = Callable[[Sequence[T]], Awaitable[Sequence[R | BaseException]]]


class Coalescer(Generic[T, R]):
    """`await submit(item)` runs `flush` for a batch containing `item` and returns its result.

    `flush(items)` returns one entry per item, in order: the item's result, or an exception
    that is raised to that item's caller alone. An exception raised by `flush` itself goes to
    every caller of the batch.
    """

    def __init__(self, flush: Flush[T, R], *, max_in_flight: int, max_batch: int) -> None:
        self._flush = flush
        self._max_in_flight = max(1, max_in_flight)
        self._max_batch = max(1, max_batch)
        self._in_flight = 0
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: T) -> R:
        if self._in_flight < self._max_in_flight and not self._pending:
            # Nothing to share the round trip with: run it in this caller's task.
            self._in_flight += 1
            try:
                result = (await self._flush((item,)))[0]
            finally:
                self._in_flight -= 1
                self._start_pending()
            if isinstance(result, BaseException):
                raise result
            return result
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        self._start_pending()
        return await future

    def _start_pending(self) -> None:
        # A caller that has gone (cancelled: its deadline passed, or it hung up) is dropped
        # before its item is flushed: no work is done, and nothing committed, for nobody.
        if any(future.done() for _, future in self._pending):
            self._pending = [(item, f) for item, f in self._pending if not f.done()]
        while self._pending and self._in_flight < self._max_in_flight:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            self._in_flight += 1
            task = asyncio.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._flush([item for item, _ in batch])
        except BaseException as exc:
            for _, future in batch:
                if future.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            self._in_flight -= 1
            self._start_pending()
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
