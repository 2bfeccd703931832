"""The usage buffer keeps every count through a stop during a timed flush."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any, cast

from key_service.storage import KeyStore, UsageDelta
from key_service.usage import usage_buffer


class SlowStore:
    """Stands in for the table: adds up what was written. A write says when it starts
    (`writing`) and finishes only when the test lets it (`finish`)."""

    def __init__(self) -> None:
        self.written: dict[uuid.UUID, int] = {}
        self.writing = asyncio.Event()
        self.finish = asyncio.Event()

    async def add_usage(self, deltas: Sequence[UsageDelta]) -> None:
        self.writing.set()
        await self.finish.wait()
        for delta in deltas:
            self.written[delta.key_id] = self.written.get(delta.key_id, 0) + delta.count


async def test_stop_during_a_timed_flush_loses_no_use() -> None:
    store = SlowStore()
    usage = usage_buffer(cast(KeyStore, cast(Any, store)), interval=0.01)
    key_id = uuid.uuid4()
    for _ in range(5):
        usage.record(str(key_id), 1_700_000_000_000_000)
    others = asyncio.all_tasks()
    usage.start()
    (timer,) = asyncio.all_tasks() - others  # the flush timer's task
    async with asyncio.timeout(5):
        await store.writing.wait()  # the timed flush has taken the batch and is writing it
    usage.record(str(key_id), 1_700_000_000_000_001)
    stopping = asyncio.create_task(usage.stop())
    async with asyncio.timeout(5):
        await asyncio.wait({timer})  # the stop has cancelled the timer mid-write
    assert not stopping.done()  # its final flush waits for the write in flight
    store.finish.set()
    async with asyncio.timeout(5):
        await stopping
    assert store.written == {key_id: 6}
