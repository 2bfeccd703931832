"""The lifecycle worker: renews certificates before they expire and marks the expired ones.

One pass (`run_once`) does, in batches of `LIFECYCLE_BATCH_SIZE`:

1. Renewal: active certificates with auto_renewal once their renewal window has opened
   (`cert_service.ari`: `RENEW_AT_FRACTION` of their lifetime has passed, now >= not_before +
   fraction * (not_after - not_before), compared in whole seconds as GetRenewalInfo answers; or
   they were issued before the mass re-issue cut-off), including ones already past their
   expiry, are renewed by the issuer (`cert_service.issuance`): re-signed with the public key
   stored in certificate_data, for the validity they were provisioned with, or ordered from
   the ACME CA with the stored CSR. A certificate that cannot be renewed so switches its
   auto_renewal off (logged) so the batch does not retry it forever.
2. Expiry: active certificates with expires_at <= now become 'expired'.

Each batch locks its rows with `FOR UPDATE SKIP LOCKED` inside one transaction, so several
replicas can run passes at the same time without renewing a certificate twice. Reads compute
the truthful status themselves, so a certificate reads EXPIRED the moment it expires, whether
or not a pass has run yet. Every changed row's cache entries are fenced after the commit.
"""

from __future__ import annotations

from dataclasses import dataclass

from cert_service import certcache
from cert_service.ari import RenewalPolicy
from cert_service.certcache import CertificateCache
from cert_service.issuance import CertificateIssuer
from cert_service.metrics import CERTIFICATE_OPERATIONS
from cert_service.storage import CertificateStore
from shared import idempotency
from shared.clock import Clock
from shared.logging import get_logger
from shared.tasks import run_periodically

log = get_logger(__name__)


@dataclass(frozen=True)
class LifecycleResult:
    renewed: int
    expired: int
    failed: int


class LifecycleWorker:
    def __init__(
        self,
        store: CertificateStore,
        cache: CertificateCache,
        issuer: CertificateIssuer,
        clock: Clock,
        *,
        renew_at_fraction: float,
        batch_size: int,
        renewal: RenewalPolicy | None = None,
    ) -> None:
        self.store = store
        self.cache = cache
        self.issuer = issuer
        self.clock = clock
        self.renew_at_fraction = renew_at_fraction
        self.batch_size = batch_size
        self.renewal = renewal or RenewalPolicy(renew_at_fraction, "")

    async def run_once(self) -> LifecycleResult:
        renewed, failed = await self._renew_due()
        expired = await self._mark_expired()
        # AIP-155 request ids are recognised for a day, then forgotten.
        await self.store.forget_requests(self.clock.now() - idempotency.WINDOW)
        if renewed or expired or failed:
            log.info("lifecycle pass", renewed=renewed, expired=expired, failed=failed)
            CERTIFICATE_OPERATIONS.labels("auto_renew", "ok").inc(renewed)
            CERTIFICATE_OPERATIONS.labels("auto_renew", "KEY_UNUSABLE").inc(failed)
        return LifecycleResult(renewed, expired, failed)

    async def _renew_due(self) -> tuple[int, int]:
        renewed = failed = 0
        while True:
            # Whole seconds: due exactly when GetRenewalInfo's window has opened.
            now = self.clock.now().replace(microsecond=0)
            async with self.store.renewal_batch(
                now,
                self.renewal.fraction,
                self.batch_size,
                self.renewal.reissue_issued_before,
            ) as (conn, sources):
                batch = await self.issuer.renew_batch(conn, sources, now)
                await self.store.store_renewals(conn, batch.signed, batch.broken, now)
            keys = [
                key
                for source in sources
                for key in (
                    certcache.device_key(source.device_id),
                    certcache.name_key(source.uuid_subdomain),
                )
            ]
            if keys:
                await self.cache.invalidate(*keys)
            renewed += len(batch.signed) + batch.queued
            failed += len(batch.broken)
            if len(sources) < self.batch_size:
                return renewed, failed

    async def _mark_expired(self) -> int:
        expired = 0
        while True:
            marked = await self.store.mark_expired(self.clock.now(), self.batch_size)
            if marked:
                await self.cache.invalidate(
                    *(
                        key
                        for device_id, fqdn in marked
                        for key in (certcache.device_key(device_id), certcache.name_key(fqdn))
                    )
                )
            expired += len(marked)
            if len(marked) < self.batch_size:
                return expired

    async def run(self, interval: float) -> None:
        """A pass every `interval` seconds until cancelled; a failed pass is logged."""
        await run_periodically(
            "lifecycle",
            self.run_once,
            interval,
            wait_first=True,
            on_error=lambda _: CERTIFICATE_OPERATIONS.labels("auto_renew", "PASS_FAILED").inc(),
        )
