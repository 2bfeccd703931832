"""AIP-155 request ids: which request provisioned, renewed, revoked or deleted what."""

from __future__ import annotations

import uuid
from datetime import datetime

from cert_service.storage.base import (
    CompletedRequest,
    ProvisionedBy,
    StoreBase,
)
from shared.db import WRITE_GUARD


class RequestRows(StoreBase):
    """SQL for certificate_requests and the request columns of device_certificates."""

    async def provision_request(self, device_id: str) -> ProvisionedBy | None:
        """The request that provisioned the device's current row, if it named one."""
        async with self.connection() as conn:
            cur = await conn.execute(
                "SELECT request_id, request_hash, created_at, status, renewal_count "
                "FROM device_certificates WHERE device_id = %s AND request_id IS NOT NULL",
                (device_id,),
            )
            row = await cur.fetchone()
        return None if row is None else ProvisionedBy(*row)

    async def completed_request(
        self, request_id: uuid.UUID, method: str
    ) -> CompletedRequest | None:
        """The renewal, revocation or deletion done under `request_id` (or the provision of
        a device deleted since)."""
        async with self.connection() as conn:
            cur = await conn.execute(
                "SELECT request_hash, device_id, created_at, serial_number "
                "FROM certificate_requests WHERE request_id = %s AND method = %s",
                (request_id, method),
            )
            row = await cur.fetchone()
        return None if row is None else CompletedRequest(bytes(row[0]), row[1], row[2], row[3])

    async def record_request(
        self,
        request_id: uuid.UUID,
        method: str,
        request_hash: bytes,
        device_id: str,
        now: datetime,
        serial_number: str | None = None,
    ) -> None:
        """Record a request done; a retry that did the same concurrently recorded it
        already (DO NOTHING)."""
        async with self.connection() as conn:
            await conn.execute(
                "INSERT INTO certificate_requests "
                "(request_id, method, request_hash, device_id, created_at, serial_number) "
                "SELECT %(request_id)s, %(method)s, %(hash)s, %(device)s, %(now)s, %(serial)s "
                f"WHERE {WRITE_GUARD} ON CONFLICT DO NOTHING",
                {
                    "request_id": request_id,
                    "method": method,
                    "hash": request_hash,
                    "device": device_id,
                    "now": now,
                    "serial": serial_number,
                    "deadline": self.db.write_deadline(conn),
                },
            )

    async def forget_requests(self, before: datetime) -> int:
        """Drop request ids recorded before `before` (outside the AIP-155 window)."""
        async with self.connection() as conn:
            cur = await conn.execute(
                "DELETE FROM certificate_requests WHERE created_at < %s", (before,)
            )
            await conn.execute(
                "UPDATE device_certificates SET request_id = NULL, request_hash = NULL "
                "WHERE request_id IS NOT NULL AND created_at < %s",
                (before,),
            )
            return cur.rowcount
