"""Metrics only cert_service fills (shared/metrics.py has those both services record).

Kept here so that key_service, which never imports this module, does not export them as a
constant 0. The fleet gauges are sampled by every replica (cert_service/monitoring.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Operation (provision, renew, auto_renew) and outcome (ok, or the error reason).
CERTIFICATE_OPERATIONS = Counter(
    "myl_certificate_operations_total",
    "Certificate issuance and renewal outcomes",
    ["operation", "outcome"],
)
# The ACME server's answers: the resource (directory, new-order, finalize, ...) and the
# outcome (ok, or the problem type: badNonce, rejectedIdentifier, ...).
ACME_REQUESTS = Counter(
    "myl_acme_server_requests_total",
    "Requests to the RFC 8555 server devices use, by resource and outcome",
    ["resource", "outcome"],
)
OUTBOX_PENDING = Gauge("myl_outbox_pending_events", "Device events not yet delivered")
OUTBOX_LAG = Gauge(
    "myl_outbox_lag_seconds", "Age of the oldest undelivered device event (0 when none)"
)
RENEWAL_BACKLOG = Gauge(
    "myl_certificates_renewal_backlog",
    "Active auto-renewing certificates past their renewal point",
)
ISSUANCE_PENDING = Gauge(
    "myl_certificates_pending_issuance",
    "Certificates with an ACME order wanted (first issuance or renewal)",
)
ISSUANCE_OLDEST = Gauge(
    "myl_certificates_pending_issuance_oldest_seconds",
    "Age of the oldest wanted ACME order (0 when none)",
)
EXPIRING_SOON = Gauge(
    "myl_certificates_expiring_soon",
    "Active certificates expiring within 7 days",
    ["auto_renewal"],
)
FLEET_SAMPLE_TIME = Gauge(
    "myl_fleet_sample_timestamp_seconds", "When the fleet gauges were last sampled"
)


class _CaExpiry(Collector):
    """`myl_ca_certificate_not_after_timestamp_seconds`, exported only once it is known.

    A plain gauge would read 0 (1970) until set, and under an ACME issuer, whose CA is not
    ours to watch, for ever: MylCaNearExpiry would fire, critical, for a CA that is fine.
    """

    name = "myl_ca_certificate_not_after_timestamp_seconds"
    documentation = "When the issuing CA certificate expires"

    def __init__(self) -> None:
        self.value: float | None = None

    def set(self, value: float) -> None:
        self.value = value

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [GaugeMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        if self.value is None:
            return []
        return [GaugeMetricFamily(self.name, self.documentation, value=self.value)]


CA_EXPIRY = _CaExpiry()
REGISTRY.register(CA_EXPIRY)
