"""Usage counters: counted in process, written to PostgreSQL in batches.

A verify that admits a key adds one to an in-memory counter (no I/O). Every
`interval` seconds the counters are written with one UPDATE for the whole
batch; a failed write is merged back and retried on the next flush. `stop()`
flushes what is left, so a graceful shutdown loses nothing. Redis is not
involved, so a Redis restart loses nothing either. `usage_count` and
`last_used_at` therefore lag by up to one interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

from key_service.storage import KeyStore, UsageDelta
from shared.clock import from_micros
from shared.errors import DomainError
from shared.logging import get_logger

log = get_logger(__name__)


class UsageBuffer:
    def __init__(self, store: KeyStore, interval: float) -> None:
        self.store = store
        self.interval = interval
        # key id -> [uses, last use in microseconds since the epoch]
        self._pending: dict[str, list[int]] = {}
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def record(self, key_id: str, now_us: int) -> None:
        entry = self._pending.get(key_id)
        if entry is None:
            self._pending[key_id] = [1, now_us]
        else:
            entry[0] += 1
            if now_us > entry[1]:
                entry[1] = now_us

    @property
    def pending(self) -> int:
        """Keys with unflushed uses."""
        return len(self._pending)

    async def flush(self) -> int:
        """Write the counters; returns how many keys were written.

        Serialized by a lock, so a final flush at shutdown waits for a timed one
        still writing its batch."""
        async with self._lock:
            return await self._flush()

    async def _flush(self) -> int:
        batch, self._pending = self._pending, {}
        if not batch:
            return 0
        deltas = [
            UsageDelta(uuid.UUID(key_id), count, from_micros(last_us))
            for key_id, (count, last_us) in batch.items()
        ]
        try:
            await self.store.add_usage(deltas)
        except (DomainError, OSError) as exc:
            for key_id, (count, last_us) in batch.items():
                self._merge(key_id, count, last_us)
            log.warning("usage flush failed; will retry", keys=len(batch), error=str(exc))
            return 0
        return len(deltas)

    def _merge(self, key_id: str, count: int, last_us: int) -> None:
        entry = self._pending.get(key_id)
        if entry is None:
            self._pending[key_id] = [count, last_us]
        else:
            entry[0] += count
            entry[1] = max(entry[1], last_us)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="usage-flush")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                # Shielded: a stop() arriving mid-write must not cancel the write
                # of a batch already taken out of the buffer.
                await asyncio.shield(self.flush())
            except Exception:
                log.exception("usage flush crashed")

    async def stop(self) -> None:
        """Stop the timer and write what is left."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()
