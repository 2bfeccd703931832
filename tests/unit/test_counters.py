"""Buffered counters: a write that fails is put back and made by the next flush."""

from __future__ import annotations

from collections.abc import Mapping

from shared.counters import CounterBuffer, Tally


async def test_a_failed_write_is_put_back_and_written_by_the_next_flush() -> None:
    written: list[dict[str, tuple[int, int]]] = []
    down = True

    async def write(batch: Mapping[str, Tally[int]]) -> int:
        if down:
            raise OSError("the database is away")
        written.append({key: (tally.count, tally.last) for key, tally in batch.items()})
        return len(batch)

    counters = CounterBuffer("test", write, 0, retry_on=(OSError,))
    counters.record("a", 1)
    counters.record("a", 3)
    assert await counters.flush() == 0
    counters.record("a", 2)
    counters.record("b", 5)
    down = False
    assert await counters.flush() == 2
    assert written == [{"a": (3, 3), "b": (1, 5)}]
    assert counters.pending == 0
