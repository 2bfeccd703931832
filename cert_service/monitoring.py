"""Fleet gauges: what the certificate table and the outbox say about the service's health.

Sampled every `METRICS_INTERVAL` seconds by every replica (each exports the same numbers;
alerts take `max` over replicas): the delete cascade's outbox (pending events, the age of the
oldest one), the lifecycle backlog (active auto-renewing certificates past their renewal point,
which the worker should have renewed), active certificates expiring within 7 days (by
auto_renewal), the ACME orders wanted and the age of the oldest, and when the CA certificate
expires. The read-only statements live here beside
the gauges they feed, not in `storage.py`: no request path uses them.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from cryptography import x509

from cert_service.issuer import Issuer
from cert_service.metrics import (
    CA_EXPIRY,
    EXPIRING_SOON,
    FLEET_SAMPLE_TIME,
    ISSUANCE_OLDEST,
    ISSUANCE_PENDING,
    OUTBOX_LAG,
    OUTBOX_PENDING,
    RENEWAL_BACKLOG,
)
from cert_service.storage import CertificateStore
from shared.clock import Clock
from shared.errors import DomainError
from shared.logging import get_logger
from shared.tasks import run_periodically

log = get_logger(__name__)

EXPIRING_WINDOW = timedelta(days=7)
_SAMPLE_TIMEOUT = 30.0

_FLEET_SQL = """
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


class FleetSampler:
    def __init__(
        self,
        store: CertificateStore,
        issuer: Issuer,
        clock: Clock,
        renew_at_fraction: float,
    ) -> None:
        self.store = store
        self.issuer = issuer
        self.clock = clock
        self.renew_at_fraction = renew_at_fraction

    def sample_ca(self) -> None:
        chain = self.issuer.ca_chain_pem()
        if not chain:
            return  # an ACME CA: its expiry is the CA's business
        ca = x509.load_pem_x509_certificate(chain.encode())
        CA_EXPIRY.set(ca.not_valid_after_utc.timestamp())

    async def sample(self) -> None:
        self.sample_ca()
        now = self.clock.now()
        params = {"fraction": self.renew_at_fraction, "now": now, "soon": now + EXPIRING_WINDOW}
        # Not watched: on a large table the counts may take longer than a request may hold a
        # connection, and that must not read as the database hanging. Bounded instead.
        async with asyncio.timeout(_SAMPLE_TIMEOUT), self.store.connection(watched=False) as conn:
            cur = await conn.execute(_FLEET_SQL, params)
            row = await cur.fetchone()
        if row is None:
            return
        pending, oldest, backlog, expiring_auto, expiring_manual, orders, oldest_order = row
        OUTBOX_PENDING.set(pending)
        OUTBOX_LAG.set(max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0)
        RENEWAL_BACKLOG.set(backlog)
        EXPIRING_SOON.labels("true").set(expiring_auto)
        EXPIRING_SOON.labels("false").set(expiring_manual)
        ISSUANCE_PENDING.set(orders)
        ISSUANCE_OLDEST.set(
            max(0.0, (now - oldest_order).total_seconds()) if oldest_order is not None else 0.0
        )
        FLEET_SAMPLE_TIME.set(now.timestamp())

    async def run(self, interval: float) -> None:
        # The database away: the next pass tries again, and its own alerts say so.
        await run_periodically(
            "fleet sampler", self.sample, interval, quiet=(DomainError, TimeoutError)
        )
