"""Which provisioning limits a certificate operation spends (`shared.limits` does the counting).

- **NewDevicesPerOperatorKey** (default 1,000 per hour): a first provision made through the
  gateway with an operator key spends from that key's bucket (named by key id). A device key
  can only provision its own, already known device, and internal callers (no identity
  headers: other services, operators on the service port) are trusted.
- **CertificatesPerDeviceName** (default 5 per 7 days, Let's Encrypt's duplicate-certificate
  limit): every certificate issued for a name on request spends from that name's bucket: the
  first provision, a provision after the device was deleted, and a renewal asked for *before*
  the certificate's renewal point (the point the lifecycle worker renews at,
  `RENEW_AT_FRACTION` of its lifetime). Renewals at or after that point (or of an expired
  certificate) and automatic renewals do not count: a device that renews when it should is
  never limited. It applies to every caller, internal ones included, since it protects the CA.

A provision is checked before and spent after its certificate is stored (not a retry's replay),
so only certificates actually issued count; a renewal spends first and is refunded if it fails.
"""

from __future__ import annotations

import contextlib
from datetime import datetime, timedelta

from cert_service.storage import RenewalSource
from shared.errors import DomainError
from shared.limits import Bucket, Limiter, LimitName, Spend, limit_exceeded
from shared.metrics import LIMIT_DECISIONS


class CertificateLimits:
    def __init__(
        self, limiter: Limiter, renew_at_fraction: float, default_validity_days: int
    ) -> None:
        self.limiter = limiter
        self.renew_at_fraction = renew_at_fraction
        self.default_validity_days = default_validity_days

    @staticmethod
    def _provision_buckets(fqdn: str, operator_key_id: str | None) -> list[Bucket]:
        buckets = [Bucket(LimitName.CERTIFICATES_PER_DEVICE_NAME, fqdn)]
        if operator_key_id is not None:
            buckets.insert(0, Bucket(LimitName.NEW_DEVICES_PER_OPERATOR_KEY, operator_key_id))
        return buckets

    async def check_provision(self, fqdn: str, operator_key_id: str | None) -> None:
        """Refuse (RESOURCE_EXHAUSTED) a provision a limit has no room for; spends nothing.

        A provision spends only once its certificate is stored (`spend_provision`): of
        concurrent provisions of one name only one can succeed, and the others must hear
        ALREADY_EXISTS, not a limit their failed attempts used up."""
        for bucket in self._provision_buckets(fqdn, operator_key_id):
            decision = await self.limiter.check(bucket)
            if not decision.allowed:
                LIMIT_DECISIONS.labels(bucket.name.value, "refused").inc()
                limit = self.limiter.limits.limit(bucket.name, bucket.ident)
                raise limit_exceeded(bucket, limit, decision.retry_after_us)

    async def spend_provision(self, fqdn: str, operator_key_id: str | None) -> None:
        """Count a stored provision (a concurrent one may have taken the last room: it is
        counted as far as it fits)."""
        with contextlib.suppress(DomainError):
            await self.limiter.spend(*self._provision_buckets(fqdn, operator_key_id))

    def renewal_point(self, source: RenewalSource) -> datetime:
        lifetime = timedelta(days=source.validity_days or self.default_validity_days)
        return source.expires_at - lifetime * (1 - self.renew_at_fraction)

    async def for_renewal(self, source: RenewalSource, now: datetime) -> Spend | None:
        """None when the renewal is due (it does not count)."""
        if now >= self.renewal_point(source):
            return None
        return await self.limiter.spend(
            Bucket(LimitName.CERTIFICATES_PER_DEVICE_NAME, source.uuid_subdomain)
        )
