"""cert_service's SQL for certificates, names, the outbox, access counters and the cache
invalidation log, and the row model with its protobuf converter.

The rest of its SQL runs on this store's connections from three modules of its own: the CRL
tables' in `crl.py` (`CrlStore`), the ACME order queue's in `issuance_queue.py` and the fleet
gauges' one query in `monitoring.py`. Statements are literal and parameterized; the one that is
composed (the list filters) is assembled from fixed fragments with `psycopg.sql`.

Connections are switched to autocommit once, when first used here: a single statement is then
one round trip (no BEGIN/COMMIT around it), and multi-statement work uses an explicit
`conn.transaction()`. Statements are prepared on first use (`prepare_threshold = 0`), so the hot
paths pay for parsing and planning once per connection.

Time always comes from the caller (the injected clock), never from the database's `now()`, so
that tests can move time and replicas agree on one notion of "now" per request.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import psycopg
from google.protobuf import timestamp_pb2
from psycopg import AsyncConnection, sql
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

from myl.cert.v1 import cert_pb2
from shared import idempotency
from shared.db import WRITE_GUARD, Database

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
_COLUMNS: Final = """device_id, uuid_subdomain, certificate_type, status,
    certificate_data->>'chain_pem', serial_number, fingerprint_sha256,
    certificate_data->>'public_key_sha256', certificate_data->>'issuer',
    certificate_data->'dns_names', issued_at, expires_at, auto_renewal, renewal_count,
    revoked_at, revocation_reason, last_accessed_at, access_count, created_at, updated_at,
    issuance_requested_at, issuance_attempts, issuance_error, issuance_due_at"""


# Forgets a wanted ACME order (its lease too, so a worker's completion of it is discarded):
# a revocation cancels the renewal of the revoked key.
CANCEL_ISSUANCE: Final = """issuance_csr = NULL, issuance_occasion = NULL,
    issuance_requested_at = NULL, issuance_due_at = NULL, issuance_attempts = 0,
    issuance_error = NULL, issuance_lease = NULL, issuance_lease_until = NULL,
    acme_order_url = NULL"""

# The CTE that logs a cache invalidation for the rows of a `changed` CTE (at the time of the
# `now` parameter); the statement then selects `changed.*, logged.id`.
_LOG_CHANGED: Final = """logged AS (
                    INSERT INTO certificate_cache_invalidations
                        (device_id, uuid_subdomain, created_at)
                    SELECT device_id, uuid_subdomain, %(now)s FROM changed RETURNING id
                )"""


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
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
            create_time=timestamp(self.created_at),
            update_time=timestamp(self.updated_at),
            access_count=self.access_count,
            renewal_count=self.renewal_count,
        )
        if self.serial_number:
            # A pending certificate has none: no validity to show yet.
            certificate.not_before.CopyFrom(timestamp(self.issued_at))
            certificate.not_after.CopyFrom(timestamp(self.expires_at))
        if self.issuance_requested_at is not None:
            pending = certificate.pending_issuance
            pending.request_time.CopyFrom(timestamp(self.issuance_requested_at))
            pending.attempts = self.issuance_attempts
            pending.last_error = self.issuance_error or ""
            if self.issuance_due_at is not None:
                pending.next_attempt_time.CopyFrom(timestamp(self.issuance_due_at))
        if self.revoked_at is not None:
            certificate.revoke_time.CopyFrom(timestamp(self.revoked_at))
            certificate.revocation_reason = REASON_TO_PB.get(
                self.revocation_reason or "unspecified",
                cert_pb2.REVOCATION_REASON_UNSPECIFIED,
            )
        if self.last_accessed_at is not None:
            certificate.last_access_time.CopyFrom(timestamp(self.last_accessed_at))
        return certificate


def _record(row: TupleRow) -> CertificateRecord:
    return CertificateRecord(*row)


@dataclass(frozen=True)
class NewCertificate:
    """What an issuance writes: the certificate's columns and its certificate_data document."""

    serial_number: str
    fingerprint_sha256: str
    not_before: datetime
    not_after: datetime
    data: dict[str, Any]


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


class CertificateStore:
    """SQL for device_certificates and device_events_outbox."""

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

    # -- certificates -------------------------------------------------------------------------

    async def insert(self, row: NewRow) -> CertificateRecord | None:
        """Insert a device's certificate; None when the device or subdomain exists, or a
        deletion of this device is still being delivered (see `conflict`).

        The stored row is known in full here, so the statement returns only whether it
        inserted, and the record is built from the values written.
        """
        return (await self._insert([row]))[0]

    async def insert_batch(
        self, rows: Sequence[NewRow]
    ) -> list[CertificateRecord | Exception | None]:
        """`insert` for several rows in one statement (one round trip, one commit).

        Each row gets what `insert` would have returned: its record, or None when it was not
        inserted. Two rows for the same device or subdomain in one batch: one of them is
        inserted and the other gets None, as if they had come one after the other. Should the
        statement fail for something a single row can cause (a constraint, a deadlock with
        another replica's batch), each row is retried alone, and only the row at fault gets
        the error.
        """
        if len(rows) == 1:
            return [await self.insert(rows[0])]
        try:
            return list(await self._insert(rows))
        except (
            psycopg.errors.IntegrityError,
            psycopg.errors.DataError,
            psycopg.errors.DeadlockDetected,
        ):
            pass
        results: list[CertificateRecord | Exception | None] = []
        for row in rows:
            try:
                results.append(await self.insert(row))
            except psycopg.Error as exc:
                results.append(exc)
        return results

    async def _insert(self, rows: Sequence[NewRow]) -> list[CertificateRecord | None]:
        # The rows travel as one JSON document (one parameter, one json.dumps, certificate_data
        # embedded as it is instead of encoded twice). They are inserted in device_id order, so
        # that concurrent batches of several replicas take their locks in the same order.
        document = json.dumps(
            [
                {
                    "device_id": row.device_id,
                    "uuid_subdomain": row.uuid_subdomain,
                    "certificate_type": row.certificate_type,
                    "certificate_data": row.certificate.data,
                    "serial_number": row.certificate.serial_number,
                    "fingerprint_sha256": row.certificate.fingerprint_sha256,
                    "issued_at": row.certificate.not_before.isoformat(),
                    "expires_at": row.certificate.not_after.isoformat(),
                    "auto_renewal": row.auto_renewal,
                    "created_at": row.now.isoformat(),
                    "request_id": str(row.request_id) if row.request_id else None,
                    "request_hash": row.request_hash.hex() if row.request_hash else None,
                    "issuance_csr": row.issuance_csr,
                }
                for row in rows
            ]
        )
        deadlines = [row.deadline for row in rows if row.deadline is not None]
        async with self.connection(deadline=min(deadlines, default=None)) as conn:
            self.db.on_unknown_outcome(conn, lambda: self.undo_unknown_inserts(rows))
            # `WRITE_GUARD`: a server that waits past the earliest caller's deadline (on a
            # lock, another transaction's row with the same device, name or request id) or
            # runs the statement only after it (it hung) inserts nothing, and says so.
            cur = await conn.execute(
                f"""
                INSERT INTO device_certificates (
                    device_id, uuid_subdomain, certificate_type, status, certificate_data,
                    serial_number, fingerprint_sha256, issued_at, expires_at, auto_renewal,
                    created_at, updated_at, request_id, request_hash, issuance_csr,
                    issuance_occasion, issuance_requested_at, issuance_due_at)
                SELECT r.device_id, r.uuid_subdomain, r.certificate_type,
                       CASE WHEN r.issuance_csr IS NULL THEN 'active' ELSE 'pending' END,
                       r.certificate_data, r.serial_number, r.fingerprint_sha256, r.issued_at,
                       r.expires_at, r.auto_renewal, r.created_at, r.created_at, r.request_id,
                       decode(r.request_hash, 'hex'), r.issuance_csr,
                       CASE WHEN r.issuance_csr IS NULL THEN NULL ELSE 'provision' END,
                       CASE WHEN r.issuance_csr IS NULL THEN NULL ELSE r.created_at END,
                       CASE WHEN r.issuance_csr IS NULL THEN NULL ELSE r.created_at END
                FROM jsonb_to_recordset(%(rows)s::jsonb) AS r(
                    device_id text, uuid_subdomain text, certificate_type text,
                    certificate_data jsonb, serial_number text, fingerprint_sha256 text,
                    issued_at timestamptz, expires_at timestamptz, auto_renewal boolean,
                    created_at timestamptz, request_id uuid, request_hash text,
                    issuance_csr text)
                WHERE NOT EXISTS (
                    SELECT 1 FROM device_events_outbox AS o WHERE o.device_id = r.device_id)
                  AND NOT EXISTS (
                    SELECT 1 FROM certificate_requests AS q
                    WHERE q.request_id = r.request_id AND q.method = 'provision'
                      AND q.created_at > r.created_at - %(window)s::interval)
                  AND {WRITE_GUARD}
                ORDER BY r.device_id
                ON CONFLICT DO NOTHING
                RETURNING device_id, serial_number
                """,
                {
                    "rows": document,
                    "window": idempotency.WINDOW,
                    "deadline": self.db.write_deadline(conn),
                },
            )
            if len(rows) == 1:
                return [rows[0].record() if cur.rowcount == 1 else None]
            inserted = set(await cur.fetchall())
        return [
            row.record() if (row.device_id, row.certificate.serial_number) in inserted else None
            for row in rows
        ]

    async def claim_provision(
        self, device_id: str, request_id: uuid.UUID, serial_number: str, now: datetime
    ) -> CertificateRecord | None:
        """A retry of a provision takes its row as it is (`updated_at` moves, so that
        `undo_unknown_inserts` leaves it alone); None when it is no longer there as read."""
        async with self.connection() as conn:
            cur = await conn.execute(
                f"""
                UPDATE device_certificates SET updated_at = greatest(%(now)s, created_at
                    + interval '1 microsecond')
                WHERE device_id = %(device)s AND request_id = %(request_id)s
                  AND serial_number = %(serial)s AND {WRITE_GUARD}
                RETURNING {_COLUMNS}
                """,
                {
                    "now": now,
                    "device": device_id,
                    "request_id": request_id,
                    "serial": serial_number,
                    "deadline": self.db.write_deadline(conn),
                },
                binary=True,
            )
            row = await cur.fetchone()
        return None if row is None else _record(row)

    async def undo_unknown_inserts(self, rows: Sequence[NewRow]) -> None:
        """Provisions answered OUTCOME_UNKNOWN (shared/db.py): a row one of them stored would
        refuse the caller's plain retry (ALREADY_EXISTS), and a generated key went to nobody.
        Delete each row that is still as its provision left it, with its cache invalidation;
        a retry that replaced its certificate, or any change since, leaves it alone."""
        document = json.dumps(
            [{"device_id": r.device_id, "serial": r.certificate.serial_number} for r in rows]
        )
        async with self.connection() as conn:
            await conn.execute(
                f"""
                WITH changed AS (
                    DELETE FROM device_certificates AS d
                    USING jsonb_to_recordset(%(rows)s::jsonb) AS r(device_id text, serial text)
                    WHERE d.device_id = r.device_id AND d.serial_number = r.serial
                      AND d.renewal_count = 0 AND d.updated_at = d.created_at
                      AND {WRITE_GUARD}
                    RETURNING d.device_id, d.uuid_subdomain
                ), {_LOG_CHANGED}
                SELECT count(*) FROM logged
                """,
                {
                    "rows": document,
                    "now": rows[0].now,
                    "deadline": self.db.write_deadline(conn),
                },
            )

    async def conflict(self, device_id: str, uuid_subdomain: str) -> Conflict:
        async with self.connection() as conn:
            cur = await conn.execute(
                """
                SELECT EXISTS (SELECT 1 FROM device_certificates WHERE device_id = %s),
                       EXISTS (SELECT 1 FROM device_certificates WHERE uuid_subdomain = %s),
                       EXISTS (SELECT 1 FROM device_events_outbox WHERE device_id = %s)
                """,
                (device_id, uuid_subdomain, device_id),
            )
            row = await cur.fetchone()
        assert row is not None
        return Conflict(bool(row[0]), bool(row[1]), bool(row[2]))

    async def provision_request(self, device_id: str) -> ProvisionedBy | None:
        """The request that provisioned the device's current row, if it named one."""
        async with self.connection() as conn:
            cur = await conn.execute(
                "SELECT request_id, request_hash, created_at, status, renewal_count "
                "FROM device_certificates WHERE device_id = %s AND request_id IS NOT NULL",
                (device_id,),
            )
            row = await cur.fetchone()
        return None if row is None else ProvisionedBy(*row)

    async def supersede_provision(
        self,
        device_id: str,
        request_id: uuid.UUID,
        serial_number: str,
        certificate: NewCertificate,
        now: datetime,
    ) -> tuple[CertificateRecord, int] | None:
        """Replace the certificate a provision issued with `certificate` (a retry of that
        provision, whose generated key never reached its caller). Only while the row is as
        that provision left it and as the caller read it: active, never renewed, still
        `serial_number` (else None: another retry or a revocation came first). Returns the
        record and the id of the logged cache invalidation."""
        async with self.connection() as conn:
            cur = await conn.execute(
                f"""
                WITH changed AS (
                    UPDATE device_certificates SET
                        certificate_data = %(data)s, serial_number = %(serial)s,
                        fingerprint_sha256 = %(fingerprint)s, issued_at = %(not_before)s,
                        expires_at = %(not_after)s, updated_at = %(now)s
                    WHERE device_id = %(device)s AND request_id = %(request_id)s
                      AND status = 'active' AND renewal_count = 0
                      AND serial_number = %(old_serial)s AND {WRITE_GUARD}
                    RETURNING {_COLUMNS}
                ), {_LOG_CHANGED}
                SELECT changed.*, logged.id FROM changed, logged
                """,
                {
                    "data": Jsonb(certificate.data),
                    "serial": certificate.serial_number,
                    "fingerprint": certificate.fingerprint_sha256,
                    "not_before": certificate.not_before,
                    "not_after": certificate.not_after,
                    "now": now,
                    "device": device_id,
                    "request_id": request_id,
                    "old_serial": serial_number,
                    "deadline": self.db.write_deadline(conn),
                },
                binary=True,
            )
            row = await cur.fetchone()
        return None if row is None else (_record(row[:-1]), row[-1])

    async def completed_request(
        self, request_id: uuid.UUID, method: str
    ) -> CompletedRequest | None:
        """The renewal, revocation or deletion done under `request_id` (or the provision of
        a device deleted since)."""
        async with self.connection() as conn:
            cur = await conn.execute(
                "SELECT request_hash, device_id, created_at, serial_number "
                "FROM certificate_requests WHERE request_id = %s AND method = %s",
                (request_id, method),
            )
            row = await cur.fetchone()
        return None if row is None else CompletedRequest(bytes(row[0]), row[1], row[2], row[3])

    async def record_request(
        self,
        request_id: uuid.UUID,
        method: str,
        request_hash: bytes,
        device_id: str,
        now: datetime,
        serial_number: str | None = None,
    ) -> None:
        """Record a request done; a retry that did the same concurrently recorded it
        already (DO NOTHING)."""
        async with self.connection() as conn:
            await conn.execute(
                "INSERT INTO certificate_requests "
                "(request_id, method, request_hash, device_id, created_at, serial_number) "
                "SELECT %(request_id)s, %(method)s, %(hash)s, %(device)s, %(now)s, %(serial)s "
                f"WHERE {WRITE_GUARD} ON CONFLICT DO NOTHING",
                {
                    "request_id": request_id,
                    "method": method,
                    "hash": request_hash,
                    "device": device_id,
                    "now": now,
                    "serial": serial_number,
                    "deadline": self.db.write_deadline(conn),
                },
            )

    async def forget_requests(self, before: datetime) -> int:
        """Drop request ids recorded before `before` (outside the AIP-155 window)."""
        async with self.connection() as conn:
            cur = await conn.execute(
                "DELETE FROM certificate_requests WHERE created_at < %s", (before,)
            )
            await conn.execute(
                "UPDATE device_certificates SET request_id = NULL, request_hash = NULL "
                "WHERE request_id IS NOT NULL AND created_at < %s",
                (before,),
            )
            return cur.rowcount

    async def get_by_device(self, device_id: str) -> CertificateRecord | None:
        async with self.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_COLUMNS} FROM device_certificates WHERE device_id = %s",
                (device_id,),
                binary=True,
            )
            row = await cur.fetchone()
        return None if row is None else _record(row)

    async def get_by_subdomain(self, uuid_subdomain: str) -> CertificateRecord | None:
        async with self.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_COLUMNS} FROM device_certificates WHERE uuid_subdomain = %s",
                (uuid_subdomain,),
                binary=True,
            )
            row = await cur.fetchone()
        return None if row is None else _record(row)

    async def list_certificates(self, query: ListQuery, now: datetime) -> list[CertificateRecord]:
        """Newest first, keyset-paginated on (created_at, device_id)."""
        conditions: list[sql.Composable] = []
        params: list[Any] = []
        if query.status == "active":
            conditions.append(sql.SQL("status = 'active' AND expires_at > %s"))
            params.append(now)
        elif query.status == "expired":
            conditions.append(
                sql.SQL("(status = 'expired' OR (status = 'active' AND expires_at <= %s))")
            )
            params.append(now)
        elif query.status == "revoked":
            conditions.append(sql.SQL("status = 'revoked'"))
        elif query.status == "pending":
            conditions.append(sql.SQL("status = 'pending'"))
        elif query.status is not None:
            raise ValueError(f"unknown status filter {query.status!r}")
        if query.expire_before is not None:
            # A pending row has no certificate, hence no expiry yet.
            conditions.append(sql.SQL("expires_at < %s AND status <> 'pending'"))
            params.append(query.expire_before)
        if query.after is not None:
            conditions.append(sql.SQL("(created_at, device_id) < (%s, %s)"))
            params.extend(query.after)
        where: sql.Composable = sql.SQL("")
        if conditions:
            where = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conditions)
        statement = sql.SQL(
            "SELECT {columns} FROM device_certificates{where} "
            "ORDER BY created_at DESC, device_id DESC LIMIT %s"
        ).format(columns=sql.SQL(_COLUMNS), where=where)
        params.append(query.limit)
        async with self.connection() as conn:
            cur = await conn.execute(statement, params, binary=True)
            rows = await cur.fetchall()
        return [_record(row) for row in rows]

    async def renewal_source(self, device_id: str) -> RenewalSource | None:
        async with self.connection() as conn:
            cur = await conn.execute(
                """
                SELECT device_id, uuid_subdomain, certificate_type, status, serial_number,
                       certificate_data->>'public_key_pem',
                       certificate_data->>'public_key_sha256',
                       (certificate_data->>'validity_days')::integer, expires_at,
                       certificate_data->>'csr_pem'
                FROM device_certificates WHERE device_id = %s
                """,
                (device_id,),
                binary=True,
            )
            row = await cur.fetchone()
        return None if row is None else RenewalSource(*row)

    async def replace_certificate(
        self,
        source: RenewalSource,
        certificate: NewCertificate,
        now: datetime,
        request: tuple[uuid.UUID, bytes] | None = None,
    ) -> tuple[CertificateRecord, int] | None:
        """Store a renewed certificate, active again; None when the row changed since `source`
        was read (renewed, revoked, expired or deleted meanwhile). Returns the record and the
        id of the cache invalidation logged with it.

        The CSR recorded in certificate_data is kept unless `certificate.data` brings a new one.
        `request` (AIP-155 id and fingerprint) is recorded with the new serial in the same
        statement: if another attempt of it was recorded first, nothing is stored and
        `RequestTaken` is raised, so concurrent attempts of one request renew once.
        """
        request_id, request_hash = request if request is not None else (None, None)
        async with self.connection() as conn:
            try:
                cur = await self._replace_certificate(
                    conn, source, certificate, now, request_id, request_hash
                )
            except psycopg.errors.UniqueViolation as exc:
                if exc.diag.constraint_name != "certificate_requests_pkey":
                    raise
                raise RequestTaken from exc
            row = await cur.fetchone()
        return None if row is None else (_record(row[:-1]), row[-1])

    async def _replace_certificate(
        self,
        conn: AsyncConnection[TupleRow],
        source: RenewalSource,
        certificate: NewCertificate,
        now: datetime,
        request_id: uuid.UUID | None,
        request_hash: bytes | None,
    ) -> psycopg.AsyncCursor[TupleRow]:
        return await conn.execute(
            f"""
                WITH changed AS (
                    UPDATE device_certificates SET
                        certificate_data = jsonb_build_object(
                            'csr_pem', certificate_data->'csr_pem') || %(data)s,
                        serial_number = %(serial)s, fingerprint_sha256 = %(fingerprint)s,
                        issued_at = %(not_before)s, expires_at = %(not_after)s,
                        status = 'active', revoked_at = NULL, revocation_reason = NULL,
                        renewal_count = renewal_count + 1, updated_at = %(now)s
                    WHERE device_id = %(device)s AND serial_number = %(old_serial)s
                      AND status = %(status)s AND {WRITE_GUARD}
                    RETURNING {_COLUMNS}
                ), requested AS (
                    INSERT INTO certificate_requests
                        (request_id, method, request_hash, device_id, created_at, serial_number)
                    SELECT %(request_id)s::uuid, 'renew', %(request_hash)s::bytea, device_id,
                           %(now)s, serial_number
                    FROM changed WHERE %(request_id)s::uuid IS NOT NULL
                ), {_LOG_CHANGED}
                SELECT changed.*, logged.id FROM changed, logged
                """,
            {
                "data": Jsonb(certificate.data),
                "serial": certificate.serial_number,
                "fingerprint": certificate.fingerprint_sha256,
                "not_before": certificate.not_before,
                "not_after": certificate.not_after,
                "now": now,
                "device": source.device_id,
                "old_serial": source.serial_number,
                "status": source.status,
                "request_id": request_id,
                "request_hash": request_hash,
                "deadline": self.db.write_deadline(conn),
            },
            binary=True,
        )

    async def revoke(
        self,
        device_id: str,
        reason: str,
        now: datetime,
        request: tuple[uuid.UUID, bytes] | None = None,
    ) -> tuple[CertificateRecord | None, int | None]:
        """Revoke; returns the row and, when this call revoked it, the id of the cache
        invalidation logged with it. (None, None): no row.

        The request id (if any) is recorded in the same statement as the revocation: a
        revocation whose record failed afterwards would be applied while its caller heard
        that nothing was, and its retry could revoke a later certificate."""
        async with self.connection() as conn:
            cur = await conn.execute(
                f"""
                WITH changed AS (
                    UPDATE device_certificates
                    SET status = 'revoked', revoked_at = %(now)s,
                        revocation_reason = %(reason)s, updated_at = %(now)s, {CANCEL_ISSUANCE}
                    WHERE device_id = %(device)s AND status <> 'revoked' AND {WRITE_GUARD}
                    RETURNING {_COLUMNS}
                ), requested AS (
                    INSERT INTO certificate_requests
                        (request_id, method, request_hash, device_id, created_at, serial_number)
                    SELECT %(request_id)s::uuid, 'revoke', %(request_hash)s::bytea, device_id,
                           %(now)s, serial_number
                    FROM changed WHERE %(request_id)s::uuid IS NOT NULL
                    ON CONFLICT DO NOTHING
                ), {_LOG_CHANGED}
                SELECT changed.*, logged.id FROM changed, logged
                """,
                {
                    "now": now,
                    "reason": reason,
                    "device": device_id,
                    "request_id": request[0] if request else None,
                    "request_hash": request[1] if request else None,
                    "deadline": self.db.write_deadline(conn),
                },
                binary=True,
            )
            row = await cur.fetchone()
            if row is not None:
                return _record(row[:-1]), row[-1]
            cur = await conn.execute(
                f"SELECT {_COLUMNS} FROM device_certificates WHERE device_id = %s",
                (device_id,),
                binary=True,
            )
            row = await cur.fetchone()
        return (None if row is None else _record(row)), None

    async def delete_device(
        self,
        device_id: str,
        now: datetime,
        lease_until: datetime,
        request: tuple[uuid.UUID, bytes] | None = None,
    ) -> tuple[str, OutboxEvent, int] | None:
        """Delete the device's row, queue its 'device_deleted' event and log the cache
        invalidation, atomically; the request id the row was provisioned with (if any) moves
        to certificate_requests, so that a retry of that provision stays recognised.

        Returns the freed subdomain, the event (already counted as attempt 1 and leased to the
        caller until `lease_until`) and the invalidation's id, or None when the device does
        not exist.
        """
        async with self.connection() as conn:
            cur = await conn.execute(
                f"""
                WITH deleted AS (
                    DELETE FROM device_certificates
                    WHERE device_id = %(device)s AND {WRITE_GUARD}
                    RETURNING device_id, uuid_subdomain, request_id, request_hash, created_at
                ), provisioned AS (
                    INSERT INTO certificate_requests
                        (request_id, method, request_hash, device_id, created_at)
                    SELECT request_id, 'provision', request_hash, device_id, created_at
                    FROM deleted WHERE request_id IS NOT NULL
                    ON CONFLICT DO NOTHING
                ), event AS (
                    INSERT INTO device_events_outbox
                        (device_id, event_type, created_at, attempts, next_attempt_at)
                    SELECT device_id, 'device_deleted', %(now)s, 1, %(lease_until)s FROM deleted
                    RETURNING device_id, id, event_type, attempts
                ), logged AS (
                    INSERT INTO certificate_cache_invalidations
                        (device_id, uuid_subdomain, created_at)
                    SELECT device_id, uuid_subdomain, %(now)s FROM deleted RETURNING id
                ), requested AS (
                    INSERT INTO certificate_requests
                        (request_id, method, request_hash, device_id, created_at)
                    SELECT %(request_id)s::uuid, 'delete', %(request_hash)s::bytea, device_id,
                           %(now)s
                    FROM deleted WHERE %(request_id)s::uuid IS NOT NULL
                )
                SELECT deleted.uuid_subdomain, event.device_id, event.id, event.event_type,
                       event.attempts, logged.id
                FROM deleted JOIN event USING (device_id), logged
                """,
                {
                    "device": device_id,
                    "now": now,
                    "lease_until": lease_until,
                    "request_id": request[0] if request else None,
                    "request_hash": request[1] if request else None,
                    "deadline": self.db.write_deadline(conn),
                },
            )
            row = await cur.fetchone()
        if row is None:
            return None
        return row[0], OutboxEvent(*row[1:5]), row[5]

    async def flush_access(
        self, device_ids: Sequence[str], counts: Sequence[int], times: Sequence[datetime]
    ) -> int:
        async with self.connection(budget=10.0) as conn:
            cur = await conn.execute(
                """
                UPDATE device_certificates AS d
                SET access_count = d.access_count + u.n,
                    last_accessed_at = GREATEST(d.last_accessed_at, u.t)
                FROM unnest(%s::text[], %s::bigint[], %s::timestamptz[]) AS u(device_id, n, t)
                WHERE d.device_id = u.device_id
                """,
                (list(device_ids), list(counts), list(times)),
            )
            return cur.rowcount

    # -- lifecycle ----------------------------------------------------------------------------

    async def mark_expired(self, now: datetime, limit: int) -> list[tuple[str, str]]:
        """Mark up to `limit` active certificates past their expiry; returns (device, name)."""
        async with self.connection() as conn:
            cur = await conn.execute(
                """
                UPDATE device_certificates SET status = 'expired', updated_at = %s
                WHERE device_id IN (
                    SELECT device_id FROM device_certificates
                    WHERE status = 'active' AND expires_at <= %s
                    ORDER BY expires_at LIMIT %s
                    FOR UPDATE SKIP LOCKED)
                  AND status = 'active'
                RETURNING device_id, uuid_subdomain
                """,
                (now, now, limit),
            )
            rows = await cur.fetchall()
        return [(device, name) for device, name in rows]

    @asynccontextmanager
    async def renewal_batch(
        self,
        now: datetime,
        fraction: float,
        limit: int,
        issued_before: datetime | None = None,
    ) -> AsyncIterator[tuple[AsyncConnection[TupleRow], list[RenewalSource]]]:
        """Lock up to `limit` active, auto-renewing certificates that are due for renewal:
        `fraction` of their lifetime has passed (or, for an ACME CA's certificate, the
        renewal time its ARI suggested, `certificate_data.ari_renew_at`), or they were
        issued before `issued_before` (a mass re-issue; see `cert_service.ari`).

        Yields inside a transaction; rows locked by another replica are skipped. Store the
        results with `store_renewals` on the yielded connection before the block ends.
        """
        async with self.connection(watched=False) as conn, conn.transaction():
            cur = await conn.execute(
                """
                SELECT device_id, uuid_subdomain, certificate_type, status, serial_number,
                       certificate_data->>'public_key_pem',
                       certificate_data->>'public_key_sha256',
                       (certificate_data->>'validity_days')::integer, expires_at,
                       certificate_data->>'csr_pem'
                FROM device_certificates
                WHERE status = 'active' AND auto_renewal AND issuance_csr IS NULL
                  AND (CASE WHEN certificate_data ? 'ari_renew_at'
                            THEN (certificate_data->>'ari_renew_at')::timestamptz <= %s
                            ELSE issued_at + (expires_at - issued_at) * %s <= %s END
                       OR issued_at < %s)
                ORDER BY expires_at LIMIT %s
                FOR UPDATE SKIP LOCKED
                """,
                (now, fraction, now, issued_before, limit),
                binary=True,
            )
            rows = await cur.fetchall()
            yield conn, [RenewalSource(*row) for row in rows]

    @staticmethod
    async def store_renewals(
        conn: AsyncConnection[TupleRow],
        renewals: Sequence[tuple[str, NewCertificate]],
        failed: Sequence[str],
        now: datetime,
    ) -> None:
        """Write the renewed certificates of a batch in one statement; switch auto-renewal
        off for the devices whose stored key could not be re-signed."""
        if renewals:
            await conn.execute(
                """
                UPDATE device_certificates AS d SET
                    certificate_data =
                        jsonb_build_object('csr_pem', d.certificate_data->'csr_pem')
                        || u.data::jsonb,
                    serial_number = u.serial, fingerprint_sha256 = u.fingerprint,
                    issued_at = u.not_before, expires_at = u.not_after,
                    renewal_count = d.renewal_count + 1, updated_at = %s
                FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[],
                            %s::timestamptz[], %s::timestamptz[])
                     AS u(device_id, data, serial, fingerprint, not_before, not_after)
                WHERE d.device_id = u.device_id
                """,
                (
                    now,
                    [device for device, _ in renewals],
                    [json.dumps(new.data) for _, new in renewals],
                    [new.serial_number for _, new in renewals],
                    [new.fingerprint_sha256 for _, new in renewals],
                    [new.not_before for _, new in renewals],
                    [new.not_after for _, new in renewals],
                ),
            )
        if failed:
            await conn.execute(
                "UPDATE device_certificates SET auto_renewal = false, updated_at = %s "
                "WHERE device_id = ANY(%s::text[])",
                (now, list(failed)),
            )

    # -- the durable cache invalidation log (shared/invalidation.py) -------------------------

    async def pending_invalidations(
        self, limit: int, *, after: int = 0, applied_since: datetime | None = None
    ) -> list[tuple[int, str, str]]:
        """Logged invalidations with ids above `after`, oldest first, as (id, device_id,
        uuid_subdomain): the pending ones, and with `applied_since` also those applied
        since."""
        condition = "applied_at IS NULL"
        if applied_since is not None:
            condition = "(applied_at IS NULL OR applied_at >= %(since)s)"
        async with self.connection() as conn:
            cur = await conn.execute(
                "SELECT id, device_id, uuid_subdomain FROM certificate_cache_invalidations "
                f"WHERE {condition} AND id > %(after)s ORDER BY id LIMIT %(limit)s",
                {"since": applied_since, "after": after, "limit": limit},
            )
            rows = await cur.fetchall()
        return [(ident, device, name) for ident, device, name in rows]

    async def acknowledge_invalidations(self, ids: Sequence[int], now: datetime) -> None:
        """Mark invalidations that Redis has applied."""
        if not ids:
            return
        async with self.connection() as conn:
            await conn.execute(
                "UPDATE certificate_cache_invalidations SET applied_at = %s "
                "WHERE id = ANY(%s::bigint[]) AND applied_at IS NULL",
                (now, list(ids)),
            )

    async def forget_invalidations(self, applied_before: datetime) -> None:
        """Drop invalidations applied before `applied_before` (older than any cache entry)."""
        async with self.connection() as conn:
            await conn.execute(
                "DELETE FROM certificate_cache_invalidations WHERE applied_at < %s",
                (applied_before,),
            )

    # -- outbox -------------------------------------------------------------------------------

    async def claim_events(
        self, now: datetime, lease_until: datetime, limit: int
    ) -> list[OutboxEvent]:
        """Lease up to `limit` due events to this relay (attempts + 1)."""
        async with self.connection() as conn:
            cur = await conn.execute(
                """
                UPDATE device_events_outbox AS o
                SET attempts = o.attempts + 1, next_attempt_at = %s
                FROM (SELECT device_id, id FROM device_events_outbox
                      WHERE next_attempt_at <= %s
                      ORDER BY next_attempt_at, id LIMIT %s
                      FOR UPDATE SKIP LOCKED) AS due
                WHERE o.device_id = due.device_id AND o.id = due.id
                RETURNING o.device_id, o.id, o.event_type, o.attempts
                """,
                (lease_until, now, limit),
            )
            rows = await cur.fetchall()
        return [OutboxEvent(*row) for row in rows]

    async def complete_event(self, event: OutboxEvent) -> None:
        async with self.connection() as conn:
            await conn.execute(
                "DELETE FROM device_events_outbox WHERE device_id = %s AND id = %s",
                (event.device_id, event.id),
            )

    async def retry_event(self, event: OutboxEvent, next_attempt_at: datetime, error: str) -> None:
        async with self.connection() as conn:
            await conn.execute(
                "UPDATE device_events_outbox SET next_attempt_at = %s, last_error = %s "
                "WHERE device_id = %s AND id = %s",
                (next_attempt_at, error[:1000], event.device_id, event.id),
            )

    async def pending_events(self) -> int:
        async with self.connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM device_events_outbox")
            row = await cur.fetchone()
        return int(row[0]) if row else 0
