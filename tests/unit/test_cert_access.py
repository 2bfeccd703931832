"""The access-counter buffer keeps every count through a stop during a flush."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, cast

from cert_service.access import access_recorder
from cert_service.storage import CertificateStore


class SlowStore:
    """Stands in for the table: records what was written. A write says when it starts
    (`writing`) and finishes only when the test lets it (`finish`)."""

    def __init__(self) -> None:
        self.written: dict[str, int] = {}
        self.writing = asyncio.Event()
        self.finish = asyncio.Event()

    async def flush_access(
        self, device_ids: Sequence[str], counts: Sequence[int], last: Sequence[datetime]
    ) -> int:
        self.writing.set()
        await self.finish.wait()
        for device_id, count in zip(device_ids, counts, strict=True):
            self.written[device_id] = self.written.get(device_id, 0) + count
        return len(device_ids)


async def test_stop_during_a_timed_flush_loses_no_count() -> None:
    store = SlowStore()
    recorder = access_recorder(cast(CertificateStore, cast(Any, store)), 0.01)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    for _ in range(5):
        recorder.record("device-1", now)
    others = asyncio.all_tasks()
    recorder.start()
    (timer,) = asyncio.all_tasks() - others  # the flush timer's task
    async with asyncio.timeout(5):
        await store.writing.wait()  # the timed flush has taken the batch and is writing it
    recorder.record("device-1", now)
    stopping = asyncio.create_task(recorder.stop())  # cancels the timer, then flushes
    async with asyncio.timeout(5):
        await asyncio.wait({timer})  # the timer is cancelled while the write is in flight
    assert not stopping.done()  # the final flush waits for that write
    store.finish.set()
    async with asyncio.timeout(5):
        await stopping
    assert store.written == {"device-1": 6}
