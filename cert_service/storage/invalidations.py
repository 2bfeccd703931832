"""The durable cache invalidation log (`shared.invalidation`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from cert_service.storage.base import (
    StoreBase,
)
from shared.seal import load_secret


class InvalidationRows(StoreBase):
    """SQL for certificate_cache_invalidations."""

    async def pending_invalidations(
        self, limit: int, *, after: int = 0, applied_since: datetime | None = None
    ) -> list[tuple[int, tuple[str, str]]]:
        """Logged invalidations with ids above `after`, oldest first, as (id, (device_id,
        uuid_subdomain)): the pending ones, and with `applied_since` also those applied
        since."""
        condition = "applied_at IS NULL"
        if applied_since is not None:
            condition = "(applied_at IS NULL OR applied_at >= %(since)s)"
        async with self.connection() as conn:
            cur = await conn.execute(
                "SELECT id, device_id, uuid_subdomain FROM certificate_cache_invalidations "
                f"WHERE {condition} AND id > %(after)s ORDER BY id LIMIT %(limit)s",
                {"since": applied_since, "after": after, "limit": limit},
            )
            rows = await cur.fetchall()
        return [(ident, (device, name)) for ident, device, name in rows]

    async def acknowledge_invalidations(self, ids: Sequence[int], now: datetime) -> None:
        """Mark invalidations that Redis has applied."""
        if not ids:
            return
        async with self.connection() as conn:
            await conn.execute(
                "UPDATE certificate_cache_invalidations SET applied_at = %s "
                "WHERE id = ANY(%s::bigint[]) AND applied_at IS NULL",
                (now, list(ids)),
            )

    async def forget_invalidations(self, applied_before: datetime) -> None:
        """Drop invalidations applied before `applied_before` (older than any cache entry)."""
        async with self.connection() as conn:
            await conn.execute(
                "DELETE FROM certificate_cache_invalidations WHERE applied_at < %s",
                (applied_before,),
            )

    async def cache_secret(self) -> bytes:
        """The secret that seals cached certificates (`shared.seal`)."""
        async with self.connection() as conn:
            return await load_secret(conn, "certificate_cache_secret")
