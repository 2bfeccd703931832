"""The fleet gauges' one read (`cert_service.monitoring`): no request path uses it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from cert_service.storage.base import StoreBase

_FLEET_SQL: Final = """
SELECT
  (SELECT count(*) FROM device_events_outbox),
  (SELECT min(created_at) FROM device_events_outbox),
  (SELECT count(*) FROM device_certificates
     WHERE status = 'active' AND auto_renewal
       AND issued_at + (expires_at - issued_at) * %(fraction)s <= %(now)s),
  (SELECT count(*) FROM device_certificates
     WHERE status = 'active' AND auto_renewal
       AND expires_at > %(now)s AND expires_at <= %(soon)s),
  (SELECT count(*) FROM device_certificates
     WHERE status = 'active' AND NOT auto_renewal
       AND expires_at > %(now)s AND expires_at <= %(soon)s),
  (SELECT count(*) FROM device_certificates WHERE issuance_csr IS NOT NULL),
  (SELECT min(issuance_requested_at) FROM device_certificates WHERE issuance_csr IS NOT NULL)
"""


@dataclass(frozen=True)
class FleetCounts:
    outbox_pending: int
    outbox_oldest: datetime | None
    renewal_backlog: int
    expiring_auto: int
    expiring_manual: int
    orders: int
    oldest_order: datetime | None


class FleetRows(StoreBase):
    """SQL for the fleet gauges."""

    async def fleet_counts(
        self, now: datetime, renew_at_fraction: float, expiring: timedelta
    ) -> FleetCounts | None:
        """The outbox, the lifecycle backlog (active auto-renewing certificates past their
        renewal point), active certificates expiring before `now + expiring` (by auto_renewal)
        and the ACME orders wanted, with their oldest.

        Not watched: on a large table the counts may take longer than a request may hold a
        connection, and that must not read as the database hanging: the caller bounds it."""
        params = {"fraction": renew_at_fraction, "now": now, "soon": now + expiring}
        async with self.connection(watched=False) as conn:
            cur = await conn.execute(_FLEET_SQL, params)
            row = await cur.fetchone()
        return None if row is None else FleetCounts(*row)
