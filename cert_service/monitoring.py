"""Fleet gauges: what the certificate table and the outbox say about the service's health.

Sampled every `METRICS_INTERVAL` seconds by every replica (each exports the same numbers;
alerts take `max` over replicas): the delete cascade's outbox (pending events, the age of the
oldest one), the lifecycle backlog (active auto-renewing certificates past their renewal point,
which the worker should have renewed), active certificates expiring within 7 days (by
auto_renewal), the ACME orders wanted and the age of the oldest, and when the CA certificate
expires. Their one read is the store's (`cert_service.storage.fleet`).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from cert_service.ca import LocalCertificateAuthority
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


class FleetSampler:
    def __init__(
        self,
        store: CertificateStore,
        ca: LocalCertificateAuthority | None,
        clock: Clock,
        renew_at_fraction: float,
    ) -> None:
        self.store = store
        self.ca = ca
        self.clock = clock
        self.renew_at_fraction = renew_at_fraction

    def sample_ca(self) -> None:
        if self.ca is None:
            return  # an ACME CA: its expiry is the CA's business
        CA_EXPIRY.set(self.ca.certificate.not_valid_after_utc.timestamp())

    async def sample(self) -> None:
        self.sample_ca()
        now = self.clock.now()
        async with asyncio.timeout(_SAMPLE_TIMEOUT):
            counts = await self.store.fleet_counts(now, self.renew_at_fraction, EXPIRING_WINDOW)
        if counts is None:
            return
        oldest, oldest_order = counts.outbox_oldest, counts.oldest_order
        OUTBOX_PENDING.set(counts.outbox_pending)
        OUTBOX_LAG.set(max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0)
        RENEWAL_BACKLOG.set(counts.renewal_backlog)
        EXPIRING_SOON.labels("true").set(counts.expiring_auto)
        EXPIRING_SOON.labels("false").set(counts.expiring_manual)
        ISSUANCE_PENDING.set(counts.orders)
        ISSUANCE_OLDEST.set(
            max(0.0, (now - oldest_order).total_seconds()) if oldest_order is not None else 0.0
        )
        FLEET_SAMPLE_TIME.set(now.timestamp())

    async def run(self, interval: float) -> None:
        # The database away: the next pass tries again, and its own alerts say so.
        await run_periodically(
            "fleet sampler", self.sample, interval, quiet=(DomainError, TimeoutError)
        )
