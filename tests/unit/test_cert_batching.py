from __future__ import annotations

import asyncio
from collections.abc import Sequence

from cert_service.batching import Coalescer


async def test_a_caller_that_has_gone_is_dropped_before_its_batch_is_flushed() -> None:
    flushed: list[list[str]] = []
    release = asyncio.Event()

    async def flush(items: Sequence[str]) -> list[str]:
        flushed.append(list(items))
        await release.wait()
        return [f"done {item}" for item in items]

    coalescer: Coalescer[str, str] = Coalescer(flush, max_in_flight=1, max_batch=10)
    first = asyncio.create_task(coalescer.submit("first"))
    await asyncio.sleep(0)
    gone = asyncio.create_task(coalescer.submit("gone"))
    kept = asyncio.create_task(coalescer.submit("kept"))
    await asyncio.sleep(0)
    gone.cancel()  # its deadline passed while the first flush was running
    await asyncio.sleep(0)
    release.set()
    assert await first == "done first"
    assert await kept == "done kept"
    assert flushed == [["first"], ["kept"]]
    assert gone.cancelled()
