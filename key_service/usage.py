"""Usage counters: counted in process, written to PostgreSQL in batches.

A verify that admits a key adds one to an in-memory counter (no I/O); every `interval`
seconds the counters are written with one UPDATE for the whole batch, and a write that
fails because PostgreSQL is away is retried by the next flush (`shared.counters`). Redis is
not involved, so a Redis restart loses nothing. `usage_count` and `last_used_at` therefore
lag by up to one interval.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping

from key_service.storage import KeyStore, UsageDelta
from shared.clock import from_micros
from shared.counters import CounterBuffer, Tally
from shared.errors import DomainError

# key id -> uses, and the last one in microseconds since the epoch.
UsageBuffer = CounterBuffer[int]


def usage_buffer(store: KeyStore, interval: float) -> UsageBuffer:
    async def write(batch: Mapping[str, Tally[int]]) -> int:
        deltas = [
            UsageDelta(uuid.UUID(key_id), tally.count, from_micros(tally.last))
            for key_id, tally in batch.items()
        ]
        await store.add_usage(deltas)
        return len(deltas)

    return CounterBuffer("usage", write, interval, retry_on=(DomainError, OSError))
