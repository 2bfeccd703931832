"""The access-counter buffer keeps every count through a stop during a flush."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, cast

from cert_service.access import AccessRecorder
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


class FixedClock:
    def now(self) -> datetime:
        return datetime(2026, 1, 1, tzinfo=UTC)


async def test_stop_during_a_timed_flush_loses_no_count() -> None:
    store = SlowStore()
    recorder = AccessRecorder(cast(CertificateStore, cast(Any, store)), FixedClock())
    for _ in range(5):
        recorder.record("device-1")
    timer = asyncio.create_task(recorder.run(0.01))
    await asyncio.sleep(0.05)  # the timed flush has taken the batch and is writing it
    timer.cancel()
    recorder.record("device-1")
    await recorder.flush()  # what a graceful stop does after cancelling the timer
    assert store.written == {"device-1": 6}
