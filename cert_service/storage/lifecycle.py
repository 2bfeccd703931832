"""The lifecycle worker's SQL: due renewals, locked in batches, and expiry."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime

from psycopg import AsyncConnection
from psycopg.rows import TupleRow

from cert_service.storage.base import (
    RENEWAL_COLUMNS,
    NewCertificate,
    RenewalSource,
    StoreBase,
)


class LifecycleRows(StoreBase):
    """SQL for the lifecycle's passes over device_certificates."""

    async def mark_expired(self, now: datetime, limit: int) -> list[tuple[str, str]]:
        """Mark up to `limit` active certificates past their expiry; returns (device, name)."""
        async with self.connection() as conn:
            cur = await conn.execute(
                """
                UPDATE device_certificates SET status = 'expired', updated_at = %s
                WHERE device_id IN (
                    SELECT device_id FROM device_certificates
                    WHERE status = 'active' AND expires_at <= %s
                    ORDER BY expires_at LIMIT %s
                    FOR UPDATE SKIP LOCKED)
                  AND status = 'active'
                RETURNING device_id, uuid_subdomain
                """,
                (now, now, limit),
            )
            rows = await cur.fetchall()
        return [(device, name) for device, name in rows]

    @asynccontextmanager
    async def renewal_batch(
        self,
        now: datetime,
        fraction: float,
        limit: int,
        issued_before: datetime | None = None,
    ) -> AsyncIterator[tuple[AsyncConnection[TupleRow], list[RenewalSource]]]:
        """Lock up to `limit` active, auto-renewing certificates that are due for renewal:
        `fraction` of their lifetime has passed (or, for an ACME CA's certificate, the
        renewal time its ARI suggested, `certificate_data.ari_renew_at`), or they were
        issued before `issued_before` (a mass re-issue; see `cert_service.ari`).

        Yields inside a transaction; rows locked by another replica are skipped. Store the
        results with `store_renewals` on the yielded connection before the block ends.
        """
        async with self.connection(watched=False) as conn, conn.transaction():
            cur = await conn.execute(
                f"""
                SELECT {RENEWAL_COLUMNS}
                FROM device_certificates
                WHERE status = 'active' AND auto_renewal AND issuance_csr IS NULL
                  AND (CASE WHEN certificate_data ? 'ari_renew_at'
                            THEN (certificate_data->>'ari_renew_at')::timestamptz <= %s
                            ELSE issued_at + (expires_at - issued_at) * %s <= %s END
                       OR issued_at < %s)
                ORDER BY expires_at LIMIT %s
                FOR UPDATE SKIP LOCKED
                """,
                (now, fraction, now, issued_before, limit),
                binary=True,
            )
            rows = await cur.fetchall()
            yield conn, [RenewalSource(*row) for row in rows]

    @staticmethod
    async def store_renewals(
        conn: AsyncConnection[TupleRow],
        renewals: Sequence[tuple[str, NewCertificate]],
        failed: Sequence[str],
        now: datetime,
    ) -> None:
        """Write the renewed certificates of a batch in one statement; switch auto-renewal
        off for the devices whose stored key could not be re-signed."""
        if renewals:
            await conn.execute(
                """
                UPDATE device_certificates AS d SET
                    certificate_data =
                        jsonb_build_object('csr_pem', d.certificate_data->'csr_pem')
                        || u.data::jsonb,
                    serial_number = u.serial, fingerprint_sha256 = u.fingerprint,
                    issued_at = u.not_before, expires_at = u.not_after,
                    renewal_count = d.renewal_count + 1, updated_at = %s
                FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[],
                            %s::timestamptz[], %s::timestamptz[])
                     AS u(device_id, data, serial, fingerprint, not_before, not_after)
                WHERE d.device_id = u.device_id
                """,
                (
                    now,
                    [device for device, _ in renewals],
                    [json.dumps(new.data) for _, new in renewals],
                    [new.serial_number for _, new in renewals],
                    [new.fingerprint_sha256 for _, new in renewals],
                    [new.not_before for _, new in renewals],
                    [new.not_after for _, new in renewals],
                ),
            )
        if failed:
            await conn.execute(
                "UPDATE device_certificates SET auto_renewal = false, updated_at = %s "
                "WHERE device_id = ANY(%s::text[])",
                (now, list(failed)),
            )
