"""Renewal windows (RFC 9773, ACME Renewal Information), shared by GetRenewalInfo and the worker.

One rule, used by both, so that a device that asks and the lifecycle worker never disagree:

* Ordinary certificate: the window opens `RENEW_AT_FRACTION` (two thirds by default) into the
  lifetime and closes halfway between that point and expiry (at five sixths by default). The
  worker renews auto-renewing certificates as soon as the window opens; a device that renews
  itself picks a random moment inside it, as RFC 9773 asks, which spreads load.
* A certificate from an ACME CA that offers renewal information: the moment it suggested
  (chosen inside its window when the certificate was stored), which the worker renews at.
* Urgent: a revoked certificate, or one issued before the operator's mass re-issue cut-off
  (`REISSUE_ISSUED_BEFORE`, e.g. after an issuance bug), is due now. The window then lies in
  the past (from an hour ago to half an hour ago, as Boulder answers), which RFC 9773 clients read
  as "renew immediately", and carries `ARI_EXPLANATION_URL`. The worker renews re-issue
  certificates in its next pass; a revoked one needs a new key, so only the device can renew it
  (RenewCertificate with a CSR for a new key).

Times are whole seconds (what RFC 3339 in ACME carries). The window opens at the first whole
second at or after the exact fraction point, which is also when the worker's query
(`issued_at + (expires_at - issued_at) * fraction <= now`) first holds to within a second.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

_URGENT_START: Final = timedelta(hours=1)
_URGENT_END: Final = timedelta(minutes=30)


@dataclass(frozen=True)
class RenewalWindow:
    start: datetime
    end: datetime
    explanation_url: str = ""

    @property
    def urgent(self) -> bool:
        return bool(self.explanation_url)


def _ceil_second(moment: datetime) -> datetime:
    seconds = math.ceil(moment.timestamp())
    return datetime.fromtimestamp(seconds, UTC)


class RenewalPolicy:
    def __init__(
        self,
        renew_at_fraction: float,
        explanation_url: str,
        reissue_issued_before: datetime | None = None,
    ) -> None:
        if not 0.0 < renew_at_fraction < 1.0:
            raise ValueError("renew_at_fraction must lie between 0 and 1")
        self.fraction = renew_at_fraction
        self.explanation_url = explanation_url
        self.reissue_issued_before = reissue_issued_before

    def must_reissue(self, issued_at: datetime) -> bool:
        cutoff = self.reissue_issued_before
        return cutoff is not None and issued_at < cutoff

    def window(
        self,
        issued_at: datetime,
        expires_at: datetime,
        *,
        revoked: bool,
        now: datetime,
        ca_suggested: datetime | None = None,
    ) -> RenewalWindow:
        if revoked or self.must_reissue(issued_at):
            base = now.astimezone(UTC).replace(microsecond=0)
            return RenewalWindow(
                base - _URGENT_START, base - _URGENT_END, explanation_url=self.explanation_url
            )
        if ca_suggested is not None:
            # The ACME CA's renewal information (its moment, which the worker renews at).
            start_s = _ceil_second(ca_suggested)
            return RenewalWindow(start_s, start_s + timedelta(seconds=1))
        lifetime = expires_at - issued_at
        start = issued_at + lifetime * self.fraction
        end = start + (expires_at - start) / 2
        start_s = _ceil_second(start)
        end_s = max(_ceil_second(end), start_s + timedelta(seconds=1))
        return RenewalWindow(start_s, end_s)


def ari_cert_id(authority_key_id: bytes, serial_hex: str) -> str:
    """RFC 9773 section 4.1: base64url(AKI keyIdentifier) "." base64url(serial DER content)."""
    serial = int(serial_hex, 16)
    # The DER INTEGER's content octets: big-endian two's complement, so a leading zero byte
    # when the top bit is set.
    serial_bytes = serial.to_bytes(serial.bit_length() // 8 + 1, "big")

    def encode(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")

    return f"{encode(authority_key_id)}.{encode(serial_bytes)}"
