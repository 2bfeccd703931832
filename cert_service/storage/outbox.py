"""The delete cascade's outbox (`cert_service.outbox`)."""

from __future__ import annotations

from datetime import datetime

from cert_service.storage.base import (
    OutboxEvent,
    StoreBase,
)


class OutboxRows(StoreBase):
    """SQL for device_events_outbox."""

    async def claim_events(
        self, now: datetime, lease_until: datetime, limit: int
    ) -> list[OutboxEvent]:
        """Lease up to `limit` due events to this relay (attempts + 1)."""
        async with self.connection() as conn:
            cur = await conn.execute(
                """
                UPDATE device_events_outbox AS o
                SET attempts = o.attempts + 1, next_attempt_at = %s
                FROM (SELECT device_id, id FROM device_events_outbox
                      WHERE next_attempt_at <= %s
                      ORDER BY next_attempt_at, id LIMIT %s
                      FOR UPDATE SKIP LOCKED) AS due
                WHERE o.device_id = due.device_id AND o.id = due.id
                RETURNING o.device_id, o.id, o.event_type, o.attempts
                """,
                (lease_until, now, limit),
            )
            rows = await cur.fetchall()
        return [OutboxEvent(*row) for row in rows]

    async def complete_event(self, event: OutboxEvent) -> None:
        async with self.connection() as conn:
            await conn.execute(
                "DELETE FROM device_events_outbox WHERE device_id = %s AND id = %s",
                (event.device_id, event.id),
            )

    async def retry_event(self, event: OutboxEvent, next_attempt_at: datetime, error: str) -> None:
        async with self.connection() as conn:
            await conn.execute(
                "UPDATE device_events_outbox SET next_attempt_at = %s, last_error = %s "
                "WHERE device_id = %s AND id = %s",
                (next_attempt_at, error[:1000], event.device_id, event.id),
            )

    async def pending_events(self) -> int:
        async with self.connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM device_events_outbox")
            row = await cur.fetchone()
        return int(row[0]) if row else 0
