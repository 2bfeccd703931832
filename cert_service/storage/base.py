"""The row model every part of the store shares: records and their protobuf form, the SQL
fragments several statements embed, and the connection every statement runs on.

Connections are switched to autocommit once, when first used: a single statement is then
one round trip (no BEGIN/COMMIT around it), and multi-statement work uses an explicit
`conn.transaction()`. Statements are prepared on first use (`prepare_threshold = 0`), so the hot
paths pay for parsing and planning once per connection.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from google.protobuf import timestamp_pb2
from psycopg import AsyncConnection, AsyncCursor
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

from myl.cert.v1 import cert_pb2
from shared.db import Database

STATUS_TO_PB: Final = {
    "pending": cert_pb2.CERTIFICATE_STATUS_PENDING,
    "active": cert_pb2.CERTIFICATE_STATUS_ACTIVE,
    "expired": cert_pb2.CERTIFICATE_STATUS_EXPIRED,
    "revoked": cert_pb2.CERTIFICATE_STATUS_REVOKED,
}
TYPE_TO_PB: Final = {
    "wildcard": cert_pb2.CERTIFICATE_TYPE_WILDCARD,
    "single": cert_pb2.CERTIFICATE_TYPE_SINGLE,
}
REASON_TO_PB: Final = {
    "unspecified": cert_pb2.REVOCATION_REASON_UNSPECIFIED,
    "key_compromise": cert_pb2.REVOCATION_REASON_KEY_COMPROMISE,
    "affiliation_changed": cert_pb2.REVOCATION_REASON_AFFILIATION_CHANGED,
    "superseded": cert_pb2.REVOCATION_REASON_SUPERSEDED,
    "cessation_of_operation": cert_pb2.REVOCATION_REASON_CESSATION_OF_OPERATION,
}
STATUS_FROM_PB: Final = {value: key for key, value in STATUS_TO_PB.items()}
REASON_FROM_PB: Final = {value: key for key, value in REASON_TO_PB.items()}

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

# The columns a CertificateRecord is built from, in order. JSON fields are extracted in SQL so
# that the CSR and public key PEM never travel on the read path.
COLUMNS: Final = """device_id, uuid_subdomain, certificate_type, status,
    certificate_data->>'chain_pem', serial_number, fingerprint_sha256,
    certificate_data->>'public_key_sha256', certificate_data->>'issuer',
    certificate_data->'dns_names', issued_at, expires_at, auto_renewal, renewal_count,
    revoked_at, revocation_reason, last_accessed_at, access_count, created_at, updated_at,
    issuance_requested_at, issuance_attempts, issuance_error, issuance_due_at"""


# The columns a RenewalSource is built from, in order.
RENEWAL_COLUMNS: Final = """device_id, uuid_subdomain, certificate_type, status, serial_number,
    certificate_data->>'public_key_pem', certificate_data->>'public_key_sha256',
    (certificate_data->>'validity_days')::integer, expires_at, certificate_data->>'csr_pem'"""

# Forgets a wanted ACME order (its lease too, so a worker's completion of it is discarded):
# a revocation cancels the renewal of the revoked key.
CANCEL_ISSUANCE: Final = """issuance_csr = NULL, issuance_occasion = NULL,
    issuance_requested_at = NULL, issuance_due_at = NULL, issuance_attempts = 0,
    issuance_error = NULL, issuance_lease = NULL, issuance_lease_until = NULL,
    acme_order_url = NULL"""

# The CTE that logs a cache invalidation for the rows of a `changed` CTE (at the time of the
# `now` parameter); the statement then selects `changed.*, logged.id`.
LOG_CHANGED: Final = """logged AS (
                    INSERT INTO certificate_cache_invalidations
                        (device_id, uuid_subdomain, created_at)
                    SELECT device_id, uuid_subdomain, %(now)s FROM changed RETURNING id
                )"""


def to_pb_timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    """The protobuf Timestamp of an aware `value`, to the microsecond (what
    `shared.wire.timestamp` reads back from a request)."""
    delta = value - _EPOCH
    return timestamp_pb2.Timestamp(
        seconds=delta.days * 86_400 + delta.seconds, nanos=delta.microseconds * 1000
    )


@dataclass(frozen=True, slots=True)
class CertificateRecord:
    """One row of device_certificates, as the service reads it."""

    device_id: str
    uuid_subdomain: str
    certificate_type: str
    status: str
    chain_pem: str
    serial_number: str
    fingerprint_sha256: str
    public_key_sha256: str
    issuer: str
    dns_names: list[str]
    issued_at: datetime
    expires_at: datetime
    auto_renewal: bool
    renewal_count: int
    revoked_at: datetime | None
    revocation_reason: str | None
    last_accessed_at: datetime | None
    access_count: int
    created_at: datetime
    updated_at: datetime
    # An ACME order wanted (CERT_ISSUER=acme): since when, attempts, the last failure, and
    # when the next attempt is due (None: only a new request can help).
    issuance_requested_at: datetime | None = None
    issuance_attempts: int = 0
    issuance_error: str | None = None
    issuance_due_at: datetime | None = None

    def status_at(self, now: datetime) -> str:
        """The truthful status: an active certificate past its expiry reads as expired."""
        if self.status == "active" and self.expires_at <= now:
            return "expired"
        return self.status

    def to_pb(self, now: datetime) -> cert_pb2.Certificate:
        certificate = cert_pb2.Certificate(
            device_id=self.device_id,
            uuid_subdomain=self.uuid_subdomain,
            certificate_type=TYPE_TO_PB[self.certificate_type],
            status=STATUS_TO_PB[self.status_at(now)],
            certificate_chain_pem=self.chain_pem,
            serial_number=self.serial_number,
            fingerprint_sha256=self.fingerprint_sha256,
            public_key_sha256=self.public_key_sha256,
            issuer=self.issuer,
            dns_names=self.dns_names,
            auto_renewal=self.auto_renewal,
            create_time=to_pb_timestamp(self.created_at),
            update_time=to_pb_timestamp(self.updated_at),
            access_count=self.access_count,
            renewal_count=self.renewal_count,
        )
        if self.serial_number:
            # A pending certificate has none: no validity to show yet.
            certificate.not_before.CopyFrom(to_pb_timestamp(self.issued_at))
            certificate.not_after.CopyFrom(to_pb_timestamp(self.expires_at))
        if self.issuance_requested_at is not None:
            pending = certificate.pending_issuance
            pending.request_time.CopyFrom(to_pb_timestamp(self.issuance_requested_at))
            pending.attempts = self.issuance_attempts
            pending.last_error = self.issuance_error or ""
            if self.issuance_due_at is not None:
                pending.next_attempt_time.CopyFrom(to_pb_timestamp(self.issuance_due_at))
        if self.revoked_at is not None:
            certificate.revoke_time.CopyFrom(to_pb_timestamp(self.revoked_at))
            certificate.revocation_reason = REASON_TO_PB.get(
                self.revocation_reason or "unspecified",
                cert_pb2.REVOCATION_REASON_UNSPECIFIED,
            )
        if self.last_accessed_at is not None:
            certificate.last_access_time.CopyFrom(to_pb_timestamp(self.last_accessed_at))
        return certificate


def to_record(row: TupleRow) -> CertificateRecord:
    return CertificateRecord(*row)


async def changed_row(cur: AsyncCursor[TupleRow]) -> tuple[CertificateRecord, int] | None:
    """The row a statement ending in `SELECT changed.*, logged.id` (see `LOG_CHANGED`) wrote,
    and the id of the cache invalidation logged with it; None when it wrote none."""
    row = await cur.fetchone()
    return None if row is None else (to_record(row[:-1]), row[-1])


@dataclass(frozen=True)
class NewCertificate:
    """What an issuance writes: the certificate's columns and its certificate_data document."""

    serial_number: str
    fingerprint_sha256: str
    not_before: datetime
    not_after: datetime
    data: dict[str, Any]

    def params(self) -> dict[str, Any]:
        """The parameters a statement writing these columns names: %(data)s, %(serial)s,
        %(fingerprint)s, %(not_before)s and %(not_after)s."""
        return {
            "data": Jsonb(self.data),
            "serial": self.serial_number,
            "fingerprint": self.fingerprint_sha256,
            "not_before": self.not_before,
            "not_after": self.not_after,
        }


@dataclass(frozen=True, slots=True)
class NewRow:
    """A device's first certificate, as `insert` writes it."""

    device_id: str
    uuid_subdomain: str
    certificate_type: str
    auto_renewal: bool
    certificate: NewCertificate
    now: datetime
    # AIP-155: the provision's request id and request fingerprint, if it sent one.
    request_id: uuid.UUID | None = None
    request_hash: bytes | None = None
    # Set: the row is inserted PENDING, and this CSR queued for the ACME CA.
    issuance_csr: str | None = None
    # When the provision's caller is answered at the latest (`time.monotonic()`); None: the
    # default budget from the moment the statement gets its connection.
    deadline: float | None = None

    def record(self) -> CertificateRecord:
        """The row as stored, right after the insert."""
        certificate, data, now = self.certificate, self.certificate.data, self.now
        pending = self.issuance_csr is not None
        return CertificateRecord(
            device_id=self.device_id,
            uuid_subdomain=self.uuid_subdomain,
            certificate_type=self.certificate_type,
            status="pending" if pending else "active",
            chain_pem=data.get("chain_pem", ""),
            serial_number=certificate.serial_number,
            fingerprint_sha256=certificate.fingerprint_sha256,
            public_key_sha256=data["public_key_sha256"],
            issuer=data.get("issuer", ""),
            dns_names=data["dns_names"],
            issued_at=certificate.not_before,
            expires_at=certificate.not_after,
            auto_renewal=self.auto_renewal,
            renewal_count=0,
            revoked_at=None,
            revocation_reason=None,
            last_accessed_at=None,
            access_count=0,
            created_at=now,
            updated_at=now,
            issuance_requested_at=now if pending else None,
            issuance_due_at=now if pending else None,
        )


@dataclass(frozen=True)
class RenewalSource:
    """What renewing a device's certificate starts from."""

    device_id: str
    uuid_subdomain: str
    certificate_type: str
    status: str
    serial_number: str
    public_key_pem: str
    public_key_sha256: str
    validity_days: int | None
    expires_at: datetime
    # The CSR recorded with the certificate (None: the service generated the key).
    csr_pem: str | None = None


@dataclass(frozen=True)
class ProvisionedBy:
    """The AIP-155 request a device's row was provisioned by, and what became of the row."""

    request_id: uuid.UUID
    request_hash: bytes
    created_at: datetime
    status: str
    renewal_count: int


@dataclass(frozen=True)
class CompletedRequest:
    """An AIP-155 request recorded in certificate_requests, and what it left current."""

    request_hash: bytes
    device_id: str
    created_at: datetime
    # The serial a renewal or revocation left current (None: a deletion, an ACME renewal,
    # or a provision whose device was deleted).
    serial_number: str | None


class RequestTaken(Exception):
    """Another attempt of the same AIP-155 request was recorded first (it committed while
    this one ran); nothing of this attempt was stored."""


@dataclass(frozen=True)
class Conflict:
    """Why an insert did not happen."""

    device_exists: bool
    subdomain_taken: bool
    deletion_pending: bool


@dataclass(frozen=True)
class OutboxEvent:
    device_id: str
    id: int
    event_type: str
    attempts: int


@dataclass(frozen=True)
class ListQuery:
    limit: int
    status: str | None
    expire_before: datetime | None
    after: tuple[datetime, str] | None


class StoreBase:
    """The database and its autocommit connections; each part of the store derives from it."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @asynccontextmanager
    async def connection(
        self, *, watched: bool = True, budget: float | None = None, deadline: float | None = None
    ) -> AsyncIterator[AsyncConnection[TupleRow]]:
        """An autocommit connection; UNAVAILABLE at once while the database is unreachable
        (`shared.db.Database`). `watched=False` for background work that holds it long;
        `deadline`: when its caller is answered at the latest."""
        async with self.db.connection(watched=watched, budget=budget, deadline=deadline) as conn:
            if not conn.autocommit:
                await conn.set_autocommit(True)
                conn.prepare_threshold = 0
            yield conn
