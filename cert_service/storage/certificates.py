"""The certificate rows: provisioning (batched inserts), reads, lists, renewal, revocation,
deletion and access counters; and `CertificateStore`, the one store the service holds.

Statements are literal and parameterized; the one that is composed (the list filters) is
assembled from fixed fragments with `psycopg.sql`. Time always comes from the caller (the
injected clock), never from the database's `now()`, so that tests can move time and replicas
agree on one notion of "now" per request.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.rows import TupleRow

from cert_service.storage.base import (
    CANCEL_ISSUANCE,
    COLUMNS,
    LOG_CHANGED,
    RENEWAL_COLUMNS,
    CertificateRecord,
    Conflict,
    ListQuery,
    NewCertificate,
    NewRow,
    OutboxEvent,
    RenewalSource,
    RequestTaken,
    changed_row,
    to_record,
)
from cert_service.storage.fleet import FleetRows
from cert_service.storage.invalidations import InvalidationRows
from cert_service.storage.lifecycle import LifecycleRows
from cert_service.storage.outbox import OutboxRows
from cert_service.storage.requests import RequestRows
from shared import idempotency
from shared.clock import Clock
from shared.db import WRITE_GUARD, Connection, Database
from shared.outcomes import Unconfirmed, UnconfirmedWrites

# The kind of write whose callers must hear of it (shared/outcomes.py): a provision.
WRITE_PROVISION: Final = "provision"


class CertificateStore(RequestRows, LifecycleRows, InvalidationRows, OutboxRows, FleetRows):
    """SQL for device_certificates, with the other parts' (requests, lifecycle, the
    invalidation log, the outbox, the fleet gauges) on the same connections; and
    certificate_unconfirmed_writes, the provisions whose callers have not been told of them
    yet (shared/outcomes.py)."""

    def __init__(self, db: Database, clock: Clock | None = None) -> None:
        super().__init__(db)
        self.unconfirmed = UnconfirmedWrites(
            db,
            "certificate_unconfirmed_writes",
            {WRITE_PROVISION: self._undo_provisions},
            clock,
        )

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
            self.unconfirmed.undo_if_unknown(
                conn,
                [
                    Unconfirmed(
                        WRITE_PROVISION,
                        row.device_id,
                        {"device_id": row.device_id, "serial": row.certificate.serial_number},
                    )
                    for row in rows
                ],
            )
            # `WRITE_GUARD`: a server that waits past the earliest caller's deadline (on a
            # lock, another transaction's row with the same device, name or request id) or
            # runs the statement only after it (it hung) inserts nothing, and says so. Each
            # row inserted is marked unconfirmed in the same statement (shared/outcomes.py).
            cur = await conn.execute(
                f"""
                WITH inserted AS (
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
                ), marked AS (
                    INSERT INTO certificate_unconfirmed_writes (subject, kind, args)
                    SELECT device_id, '{WRITE_PROVISION}',
                           jsonb_build_object('device_id', device_id, 'serial', serial_number)
                    FROM inserted
                    -- A marker of the device's earlier certificate, gone since (deleted with
                    -- its device): this write's replaces it.
                    ON CONFLICT (subject) DO UPDATE SET kind = excluded.kind,
                        args = excluded.args, created_at = excluded.created_at
                )
                SELECT device_id, serial_number FROM inserted
                """,
                {
                    "rows": document,
                    "window": idempotency.WINDOW,
                    "deadline": self.db.write_deadline(conn),
                },
            )
            inserted = set(await cur.fetchall())
            self.unconfirmed.confirm_on_commit(conn, [device for device, _ in inserted])
        return [
            row.record() if (row.device_id, row.certificate.serial_number) in inserted else None
            for row in rows
        ]

    async def claim_provision(
        self, device_id: str, request_id: uuid.UUID, serial_number: str, now: datetime
    ) -> CertificateRecord | None:
        """A retry of a provision takes its row as it is (`updated_at` moves, so that an undo
        leaves it alone, and its unconfirmed marker goes); None when it is no longer there as
        read."""
        async with self.connection() as conn:
            cur = await conn.execute(
                f"""
                WITH claimed AS (
                    UPDATE device_certificates SET updated_at = greatest(%(now)s, created_at
                        + interval '1 microsecond')
                    WHERE device_id = %(device)s AND request_id = %(request_id)s
                      AND serial_number = %(serial)s AND {WRITE_GUARD}
                    RETURNING {COLUMNS}
                ), confirmed AS (
                    DELETE FROM certificate_unconfirmed_writes
                    WHERE subject IN (SELECT device_id FROM claimed)
                )
                SELECT * FROM claimed
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
        return None if row is None else to_record(row)

    async def _undo_provisions(
        self, conn: Connection, writes: Sequence[Unconfirmed], now: datetime
    ) -> None:
        """Provisions whose callers were never told of them (answered OUTCOME_UNKNOWN, or their
        process died first): a row one of them stored would refuse the caller's plain retry
        (ALREADY_EXISTS), and a generated key went to nobody. Delete each row that is still
        as its provision left it, with its cache invalidation; a retry that took it over or
        replaced its certificate, or any change since, leaves it alone."""
        document = json.dumps(
            [
                {"device_id": w.args["device_id"], "serial": w.args.get("serial", w.subject)}
                for w in writes
            ]
        )
        await conn.execute(
            f"""
            WITH changed AS (
                DELETE FROM device_certificates AS d
                USING jsonb_to_recordset(%(rows)s::jsonb) AS r(device_id text, serial text)
                WHERE d.device_id = r.device_id AND d.serial_number = r.serial
                  AND d.renewal_count = 0 AND d.updated_at = d.created_at
                  AND {WRITE_GUARD}
                RETURNING d.device_id, d.uuid_subdomain
            ), {LOG_CHANGED}
            SELECT count(*) FROM logged
            """,
            {"rows": document, "now": now, "deadline": self.db.write_deadline(conn)},
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
                    RETURNING {COLUMNS}
                ), confirmed AS (
                    DELETE FROM certificate_unconfirmed_writes
                    WHERE subject = %(device)s AND EXISTS (SELECT 1 FROM changed)
                ), {LOG_CHANGED}
                SELECT changed.*, logged.id FROM changed, logged
                """,
                {
                    **certificate.params(),
                    "now": now,
                    "device": device_id,
                    "request_id": request_id,
                    "old_serial": serial_number,
                    "deadline": self.db.write_deadline(conn),
                },
                binary=True,
            )
            return await changed_row(cur)

    async def get_by_device(self, device_id: str) -> CertificateRecord | None:
        async with self.connection() as conn:
            cur = await conn.execute(
                f"SELECT {COLUMNS} FROM device_certificates WHERE device_id = %s",
                (device_id,),
                binary=True,
            )
            row = await cur.fetchone()
        return None if row is None else to_record(row)

    async def get_by_subdomain(self, uuid_subdomain: str) -> CertificateRecord | None:
        async with self.connection() as conn:
            cur = await conn.execute(
                f"SELECT {COLUMNS} FROM device_certificates WHERE uuid_subdomain = %s",
                (uuid_subdomain,),
                binary=True,
            )
            row = await cur.fetchone()
        return None if row is None else to_record(row)

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
        ).format(columns=sql.SQL(COLUMNS), where=where)
        params.append(query.limit)
        async with self.connection() as conn:
            cur = await conn.execute(statement, params, binary=True)
            rows = await cur.fetchall()
        return [to_record(row) for row in rows]

    async def renewal_source(self, device_id: str) -> RenewalSource | None:
        async with self.connection() as conn:
            cur = await conn.execute(
                f"""
                SELECT {RENEWAL_COLUMNS} FROM device_certificates WHERE device_id = %s
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
            return await changed_row(cur)

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
                        renewal_count = renewal_count + 1, updated_at = %(now)s,
                        certificate_type = %(certificate_type)s
                    WHERE device_id = %(device)s AND serial_number = %(old_serial)s
                      AND status = %(status)s AND {WRITE_GUARD}
                    RETURNING {COLUMNS}
                ), requested AS (
                    INSERT INTO certificate_requests
                        (request_id, method, request_hash, device_id, created_at, serial_number)
                    SELECT %(request_id)s::uuid, 'renew', %(request_hash)s::bytea, device_id,
                           %(now)s, serial_number
                    FROM changed WHERE %(request_id)s::uuid IS NOT NULL
                ), {LOG_CHANGED}
                SELECT changed.*, logged.id FROM changed, logged
                """,
            {
                **certificate.params(),
                "now": now,
                "certificate_type": source.certificate_type,
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
                    RETURNING {COLUMNS}
                ), requested AS (
                    INSERT INTO certificate_requests
                        (request_id, method, request_hash, device_id, created_at, serial_number)
                    SELECT %(request_id)s::uuid, 'revoke', %(request_hash)s::bytea, device_id,
                           %(now)s, serial_number
                    FROM changed WHERE %(request_id)s::uuid IS NOT NULL
                    ON CONFLICT DO NOTHING
                ), {LOG_CHANGED}
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
                return to_record(row[:-1]), row[-1]
            cur = await conn.execute(
                f"SELECT {COLUMNS} FROM device_certificates WHERE device_id = %s",
                (device_id,),
                binary=True,
            )
            row = await cur.fetchone()
        return (None if row is None else to_record(row)), None

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
