"""Counters kept in process and written in batches: a use costs no I/O.

`record` adds one to a key's count and keeps its latest time. Every `interval` seconds the
whole buffer is handed to `write` (one statement for the batch); a write that fails with one
of `retry_on` puts its counts back, so the next flush writes them. `stop()` flushes what is
left, so a graceful shutdown loses nothing; a crash loses at most one interval of counts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from shared.logging import get_logger
from shared.tasks import BackgroundTask, run_periodically

log = get_logger(__name__)

# The time of a use: whatever the writer stores (microseconds, a datetime); the latest is kept.
T = TypeVar("T", int, datetime)


@dataclass(slots=True)
class Tally(Generic[T]):
    count: int
    last: T


# Stores a batch (one statement) and returns how many rows it wrote.
Write = Callable[[Mapping[str, Tally[T]]], Awaitable[int]]


class CounterBuffer(Generic[T]):
    def __init__(
        self,
        name: str,
        write: Write[T],
        interval: float,
        *,
        retry_on: tuple[type[Exception], ...] = (Exception,),
    ) -> None:
        """`interval` <= 0: no timer (a test or a tool calls `flush`)."""
        self.name = name
        self.write: Write[T] = write
        self.interval = interval
        self.retry_on = retry_on
        self._pending: dict[str, Tally[T]] = {}
        self._lock = asyncio.Lock()
        self._timer = BackgroundTask(f"{name} flush", self._run)

    def record(self, key: str, at: T) -> None:
        """Count one use of `key` at `at`."""
        entry = self._pending.get(key)
        if entry is None:
            self._pending[key] = Tally(1, at)
        else:
            entry.count += 1
            entry.last = max(entry.last, at)

    @property
    def pending(self) -> int:
        """Keys with counts not yet written."""
        return len(self._pending)

    async def flush(self) -> int:
        """Write the buffered counts; returns what `write` returned (0 when it failed).

        Serialized by a lock, so a final flush at shutdown waits for a timed one still
        writing its batch."""
        async with self._lock:
            batch, self._pending = self._pending, {}
            if not batch:
                return 0
            try:
                return await self.write(batch)
            except self.retry_on as exc:
                for key, tally in batch.items():
                    entry = self._pending.setdefault(key, Tally(0, tally.last))
                    entry.count += tally.count
                    entry.last = max(entry.last, tally.last)
                log.warning(
                    "counter flush failed; will retry",
                    counters=self.name,
                    keys=len(batch),
                    error=str(exc),
                )
                return 0

    def start(self) -> None:
        if self.interval > 0:
            self._timer.start()

    async def _run(self) -> None:
        # Shielded: a stop() arriving mid-write must not cancel the write of a batch already
        # taken out of the buffer; the final flush waits for it.
        await run_periodically(
            f"{self.name} flush",
            lambda: asyncio.shield(self.flush()),
            self.interval,
            wait_first=True,
        )

    async def stop(self) -> None:
        """Stop the timer and write what is left."""
        await self._timer.stop()
        await self.flush()
