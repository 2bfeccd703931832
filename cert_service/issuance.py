"""Turning a public key and a device name into what device_certificates stores."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from prometheus_client import Counter

from cert_service.issuer import IssuedCertificate, Issuer, PublicKey
from cert_service.names import certificate_names
from cert_service.storage import NewCertificate

ISSUED = Counter("myl_certificates_issued_total", "Certificates signed, by occasion", ["occasion"])

CSR_UNCHANGED: Any = object()
"""Pass as `csr_pem` when renewing with the stored key: certificate_data keeps its CSR."""


def issue_device_certificate(
    issuer: Issuer,
    public_key: PublicKey,
    fqdn: str,
    certificate_type: str,
    validity_days: int,
    now: datetime,
    csr_pem: str | None,
    *,
    occasion: str,
    not_after: datetime | None = None,
) -> NewCertificate:
    """Sign a certificate for the device name valid from `now` for `validity_days`, or until
    `not_after` when given (a replacement is never valid for longer than what it replaces).

    CPU work (one signature, ~0.1 ms with the built-in P-256 CA): callers run it without holding
    a database connection. `csr_pem` is recorded in certificate_data (None: the service made
    the key; `CSR_UNCHANGED`: keep what is recorded). `occasion` labels the issue counter
    (provision, renew, auto_renew).
    """
    issued = issuer.issue(
        public_key,
        certificate_names(fqdn, certificate_type == "wildcard"),
        now,
        not_after if not_after is not None else now + timedelta(days=validity_days),
    )
    return new_certificate(issued, validity_days, csr_pem, occasion=occasion)


def new_certificate(
    issued: IssuedCertificate, validity_days: int, csr_pem: str | None, *, occasion: str
) -> NewCertificate:
    """What device_certificates stores of `issued` (see `issue_device_certificate`)."""
    data: dict[str, Any] = {
        "chain_pem": issued.chain_pem,
        "serial_number": issued.serial_hex,
        "fingerprint_sha256": issued.fingerprint_sha256,
        "public_key_sha256": issued.public_key_sha256,
        "public_key_pem": issued.public_key_pem,
        "issuer": issued.issuer,
        "dns_names": issued.dns_names,
        "not_before": issued.not_before.isoformat(),
        "not_after": issued.not_after.isoformat(),
        "validity_days": validity_days,
    }
    if issued.crl_shard is not None:
        # Read by the database (migration 0005): the row's crl_shard column and the
        # revocation log take them from here.
        data["crl_shard"] = issued.crl_shard
        data["issuer_key_id"] = issued.issuer_key_id
    if csr_pem is not CSR_UNCHANGED:
        data["csr_pem"] = csr_pem
    ISSUED.labels(occasion).inc()
    return NewCertificate(
        serial_number=issued.serial_hex,
        fingerprint_sha256=issued.fingerprint_sha256,
        not_before=issued.not_before,
        not_after=issued.not_after,
        data=data,
    )
