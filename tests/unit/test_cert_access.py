"""The access-counter buffer keeps every count through a stop during a flush."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, cast

from cert_service.access import access_recorder
from cert_service.storage import CertificateStore


class SlowStore:
    """Stands in for the table: records what was written, slowly."""

    def __init__(self) -> None:
        self.written: dict[str, int] = {}

    async def flush_access(
        self, device_ids: Sequence[str], counts: Sequence[int], last: Sequence[datetime]
    ) -> int:
        await asyncio.sleep(0.2)
        for device_id, count in zip(device_ids, counts, strict=True):
            self.written[device_id] = self.written.get(device_id, 0) + count
        return len(device_ids)


async def test_stop_during_a_timed_flush_loses_no_count() -> None:
    store = SlowStore()
    recorder = access_recorder(cast(CertificateStore, cast(Any, store)), 0.01)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    for _ in range(5):
        recorder.record("device-1", now)
    recorder.start()
    await asyncio.sleep(0.05)  # the timed flush has taken the batch and is writing it
    recorder.record("device-1", now)
    await recorder.stop()  # cancels the timer, then flushes
    assert store.written == {"device-1": 6}
