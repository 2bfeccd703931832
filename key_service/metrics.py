"""Metrics only key_service fills (shared/metrics.py has those both services record).

Kept here so that cert_service, which never imports this module, does not carry them; with
labels they would export no series there anyway, but a reader of the dashboard should find
the gateway's decisions where they are made (key_service/authz.py).
"""

from __future__ import annotations

from prometheus_client import Counter

# The gateway Check: allowed, unauthenticated (401), forbidden (403), rate_limited (429),
# not_found (404: no such route), invalid_argument (400).
GATEWAY_DECISIONS = Counter(
    "myl_gateway_decisions_total", "Gateway authorization decisions", ["result"]
)
