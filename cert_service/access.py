"""`last_accessed_at` and `access_count` without a database write per look-up.

Each look-up adds to an in-process buffer; a background task writes the buffer in one
`UPDATE ... FROM unnest(...)` every `ACCESS_FLUSH_INTERVAL` seconds, and graceful shutdown
flushes what is left. A failed flush puts its counts back into the buffer, so they are written
by the next one. What a crash loses is at most one interval of counters, never a certificate.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

from cert_service.storage import CertificateStore
from shared.clock import Clock
from shared.logging import get_logger

log = get_logger(__name__)


class _Access:
    __slots__ = ("count", "last")

    def __init__(self, count: int, last: datetime) -> None:
        self.count = count
        self.last = last


class AccessRecorder:
    def __init__(self, store: CertificateStore, clock: Clock) -> None:
        self.store = store
        self.clock = clock
        self._pending: dict[str, _Access] = {}
        self._lock = asyncio.Lock()

    def record(self, device_id: str) -> None:
        """Count one look-up of `device_id` now."""
        entry = self._pending.get(device_id)
        if entry is None:
            self._pending[device_id] = _Access(1, self.clock.now())
        else:
            entry.count += 1
            entry.last = self.clock.now()

    @property
    def pending(self) -> int:
        """Devices with counts not yet written."""
        return len(self._pending)

    async def flush(self) -> int:
        """Write the buffered counts; returns the number of rows updated."""
        async with self._lock:
            if not self._pending:
                return 0
            batch, self._pending = self._pending, {}
            # Sorted, so concurrent flushes of several replicas lock rows in one order.
            device_ids = sorted(batch)
            try:
                return await self.store.flush_access(
                    device_ids,
                    [batch[d].count for d in device_ids],
                    [batch[d].last for d in device_ids],
                )
            except Exception:
                self._merge_back(batch)
                log.warning("access counter flush failed; will retry", exc_info=True)
                return 0

    def _merge_back(self, batch: dict[str, _Access]) -> None:
        for device_id, access in batch.items():
            entry = self._pending.get(device_id)
            if entry is None:
                self._pending[device_id] = access
            else:
                entry.count += access.count
                entry.last = max(entry.last, access.last)

    async def run(self, interval: float) -> None:
        """Flush every `interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            # Shielded: a stop() arriving mid-flush must not cancel the write of a
            # batch already taken out of the buffer; the final flush waits for it.
            await asyncio.shield(self.flush())
