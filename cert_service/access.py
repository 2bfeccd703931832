"""`last_accessed_at` and `access_count` without a database write per look-up.

Each look-up adds to an in-process buffer (`shared.counters`); a background task writes the
buffer in one `UPDATE ... FROM unnest(...)` every `ACCESS_FLUSH_INTERVAL` seconds, and
graceful shutdown flushes what is left. A failed flush puts its counts back into the buffer,
so they are written by the next one. What a crash loses is at most one interval of counters,
never a certificate.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from cert_service.storage import CertificateStore
from shared.counters import CounterBuffer, Tally

# device id -> look-ups, and the last one.
AccessRecorder = CounterBuffer[datetime]


def access_recorder(store: CertificateStore, interval: float) -> AccessRecorder:
    async def write(batch: Mapping[str, Tally[datetime]]) -> int:
        # Sorted, so concurrent flushes of several replicas lock rows in one order.
        device_ids = sorted(batch)
        return await store.flush_access(
            device_ids, [batch[d].count for d in device_ids], [batch[d].last for d in device_ids]
        )

    return CounterBuffer("access", write, interval)
