"""The ACME issuance queue: the issuance columns of device_certificates (migration 0007).

A row with `issuance_csr` set wants a certificate for that CSR. Workers of every replica claim
due rows (`FOR UPDATE SKIP LOCKED`, then a lease: `issuance_lease` is a fresh UUID and
`issuance_lease_until` its end), work on the order without holding a connection, and write the
outcome only while their lease is still the row's: a completion or failure whose lease was
taken over, or whose request was cancelled (a revocation, a new request, a deletion), changes
nothing. A worker renews its lease while it works, so a lease expires only when the replica
holding it is gone; the replica taking over resumes the order whose URL was recorded.

The orders-per-period budget is a GCRA bucket (`acme_order_budget`), one row per ACME
directory, that every replica shares exactly: `shared.limits.gcra_step` decides each spend on
the TAT it read, and a compare-and-set stores the new TAT only if the row still holds that one
(`spend_order`).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, LiteralString

from psycopg import AsyncConnection
from psycopg.rows import TupleRow

from cert_service.storage.base import (
    CANCEL_ISSUANCE,
    COLUMNS,
    LOG_CHANGED,
    CertificateRecord,
    NewCertificate,
    StoreBase,
    changed_row,
)
from shared.db import WRITE_GUARD
from shared.limits import Limit, gcra_step

# A new request starts afresh: no attempts, error, lease or order of an earlier one.
_REQUEST: Final = """issuance_attempts = 0, issuance_error = NULL, issuance_lease = NULL,
    issuance_lease_until = NULL, acme_order_url = NULL"""
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
# How many times one spend of the order budget reads, decides and compare-and-sets before it
# waits one interval: each lost CAS is an order admitted elsewhere meanwhile.
_ORDER_SPEND_ATTEMPTS: Final = 8


@dataclass(frozen=True)
class IssuanceJob:
    """A claimed order for one device, valid while `lease` is the row's."""

    device_id: str
    uuid_subdomain: str
    csr_pem: str
    occasion: str
    lease: uuid.UUID
    order_url: str | None
    attempts: int
    requested_at: datetime


class IssuanceQueue(StoreBase):
    """SQL for the issuance columns of device_certificates, acme_revocations, acme_accounts
    and acme_order_budget."""

    async def request(
        self, device_id: str, csr_pem: str, occasion: str, now: datetime, serial_number: str
    ) -> tuple[CertificateRecord, int] | None:
        """Queue an order for `csr_pem` (a renewal, or a provision's retry with a fresh key),
        replacing any earlier one; None when the row changed since `serial_number` was read.
        Returns the record and the logged cache invalidation's id."""
        async with self.connection() as conn:
            cur = await conn.execute(
                f"""
                WITH changed AS (
                    UPDATE device_certificates SET {_REQUEST},
                        issuance_csr = %(csr)s, issuance_occasion = %(occasion)s,
                        issuance_requested_at = %(now)s, issuance_due_at = %(now)s,
                        updated_at = %(now)s
                    WHERE device_id = %(device)s AND serial_number = %(serial)s
                      AND {WRITE_GUARD}
                    RETURNING {COLUMNS}
                ), {LOG_CHANGED}
                SELECT changed.*, logged.id FROM changed, logged
                """,
                {
                    "csr": csr_pem,
                    "occasion": occasion,
                    "now": now,
                    "device": device_id,
                    "serial": serial_number,
                    "deadline": self.db.write_deadline(conn),
                },
                binary=True,
            )
            return await changed_row(cur)

    async def claim(self, now: datetime, limit: int, lease: timedelta) -> list[IssuanceJob]:
        """Lease up to `limit` due orders, oldest due first; each claim counts an attempt."""
        async with self.connection() as conn:
            cur = await conn.execute(
                """
                UPDATE device_certificates SET
                    issuance_lease = gen_random_uuid(), issuance_lease_until = %s,
                    issuance_attempts = issuance_attempts + 1
                WHERE device_id IN (
                    SELECT device_id FROM device_certificates
                    WHERE issuance_csr IS NOT NULL AND issuance_due_at <= %s
                      AND (issuance_lease_until IS NULL OR issuance_lease_until <= %s)
                    ORDER BY issuance_due_at LIMIT %s
                    FOR UPDATE SKIP LOCKED)
                  AND issuance_csr IS NOT NULL AND issuance_due_at <= %s
                  AND (issuance_lease_until IS NULL OR issuance_lease_until <= %s)
                RETURNING device_id, uuid_subdomain, issuance_csr, issuance_occasion,
                          issuance_lease, acme_order_url, issuance_attempts,
                          issuance_requested_at
                """,
                (now + lease, now, now, limit, now, now),
            )
            rows = await cur.fetchall()
        return [IssuanceJob(*row) for row in rows]

    async def _while_leased(
        self, job: IssuanceJob, assignments: LiteralString, *values: object
    ) -> bool:
        """Set `assignments` (their parameters: `values`) on the job's row while its lease is
        still the job's; False when it is not (the worker should stop)."""
        async with self.connection() as conn:
            cur = await conn.execute(
                "UPDATE device_certificates SET " + assignments + " "
                "WHERE device_id = %s AND issuance_lease = %s",
                (*values, job.device_id, job.lease),
            )
            return cur.rowcount == 1

    async def extend(self, job: IssuanceJob, until: datetime) -> bool:
        """Keep the lease; False when it is no longer ours (the worker should stop)."""
        return await self._while_leased(job, "issuance_lease_until = %s", until)

    async def record_order(self, job: IssuanceJob, order_url: str) -> bool:
        """Remember the placed order, so a takeover resumes it instead of placing another."""
        return await self._while_leased(job, "acme_order_url = %s", order_url)

    async def fail(
        self,
        job: IssuanceJob,
        error: str,
        due_at: datetime | None,
        *,
        keep_order: bool,
        count_attempt: bool = True,
    ) -> bool:
        """Give the job back with its error, due again at `due_at` (None: only a new request
        helps). `keep_order=False` forgets the order (it is invalid: the next attempt places
        another); `count_attempt=False` for a job that was not tried (the budget deferred it)."""
        return await self._while_leased(
            job,
            """issuance_error = %s, issuance_due_at = %s,
                issuance_lease = NULL, issuance_lease_until = NULL,
                acme_order_url = CASE WHEN %s THEN acme_order_url END,
                issuance_attempts = issuance_attempts - CASE WHEN %s THEN 0 ELSE 1 END""",
            error[:2000],
            due_at,
            keep_order,
            count_attempt,
        )

    async def complete(
        self, job: IssuanceJob, certificate: NewCertificate, now: datetime, directory_url: str
    ) -> tuple[CertificateRecord, int] | None:
        """Store the CA's certificate, ACTIVE, and end the job; None when the lease is no
        longer ours (the request was cancelled or replaced: the certificate is not used)."""
        async with self.connection() as conn:
            cur = await conn.execute(
                f"""
                WITH changed AS (
                    UPDATE device_certificates SET
                        certificate_data = jsonb_build_object(
                            'csr_pem', issuance_csr, 'acme_directory', %(directory)s::text)
                            || %(data)s,
                        serial_number = %(serial)s, fingerprint_sha256 = %(fingerprint)s,
                        issued_at = %(not_before)s, expires_at = %(not_after)s,
                        status = 'active', revoked_at = NULL, revocation_reason = NULL,
                        renewal_count = renewal_count
                            + CASE WHEN status = 'pending' THEN 0 ELSE 1 END,
                        updated_at = %(now)s, {CANCEL_ISSUANCE}
                    WHERE device_id = %(device)s AND issuance_lease = %(lease)s
                    RETURNING {COLUMNS}
                ), {LOG_CHANGED}
                SELECT changed.*, logged.id FROM changed, logged
                """,
                {
                    "directory": directory_url,
                    **certificate.params(),
                    "now": now,
                    "device": job.device_id,
                    "lease": job.lease,
                },
                binary=True,
            )
            return await changed_row(cur)

    @staticmethod
    async def queue_renewals(
        conn: AsyncConnection[TupleRow], device_ids: Sequence[str], now: datetime
    ) -> tuple[list[tuple[str, str]], list[str]]:
        """The lifecycle's renewals, on the connection whose transaction locked the rows: queue
        an order with the stored CSR for each device. Returns the queued (device, name) pairs
        and the devices without a stored CSR (their key was generated by us and never stored:
        nothing can be submitted for them)."""
        if not device_ids:
            return [], []
        cur = await conn.execute(
            f"""
            UPDATE device_certificates SET {_REQUEST},
                issuance_csr = certificate_data->>'csr_pem',
                issuance_occasion = 'auto_renew', issuance_requested_at = %s,
                issuance_due_at = %s
            WHERE device_id = ANY(%s::text[]) AND issuance_csr IS NULL
              AND certificate_data->>'csr_pem' IS NOT NULL
            RETURNING device_id, uuid_subdomain
            """,
            (now, now, list(device_ids)),
        )
        queued = [(device, name) for device, name in await cur.fetchall()]
        done = {device for device, _ in queued}
        return queued, [device for device in device_ids if device not in done]

    async def set_renewal_time(self, device_id: str, serial_number: str, when: datetime) -> None:
        """Record the CA's suggested renewal time (ARI) for the device's current certificate;
        the lifecycle renews by it instead of RENEW_AT_FRACTION."""
        async with self.connection() as conn:
            await conn.execute(
                "UPDATE device_certificates SET certificate_data = certificate_data "
                "|| jsonb_build_object('ari_renew_at', %s::timestamptz) "
                "WHERE device_id = %s AND serial_number = %s",
                (when, device_id, serial_number),
            )

    async def renewal_time(self, device_id: str, serial_number: str) -> datetime | None:
        """The CA's suggested renewal time recorded for this certificate, if any."""
        async with self.connection() as conn:
            cur = await conn.execute(
                "SELECT (certificate_data->>'ari_renew_at')::timestamptz "
                "FROM device_certificates WHERE device_id = %s AND serial_number = %s",
                (device_id, serial_number),
            )
            row = await cur.fetchone()
        return None if row is None else row[0]

    # -- revocations to send to the CA (acme_revocations, written by triggers) ----------------

    async def claim_revocations(
        self, now: datetime, limit: int, lease: timedelta
    ) -> list[tuple[str, str, str, int]]:
        """Due revocations as (serial, certificate PEM, reason, attempts), each pushed back by
        `lease` so no other replica sends it meanwhile."""
        async with self.connection() as conn:
            cur = await conn.execute(
                """
                UPDATE acme_revocations SET due_at = %s, attempts = attempts + 1
                WHERE serial_number IN (
                    SELECT serial_number FROM acme_revocations WHERE due_at <= %s
                    ORDER BY due_at LIMIT %s FOR UPDATE SKIP LOCKED)
                RETURNING serial_number, certificate_pem, reason, attempts
                """,
                (now + lease, now, limit),
            )
            return [(str(a), str(b), str(c), int(d)) for a, b, c, d in await cur.fetchall()]

    async def revocation_sent(self, serial_number: str) -> None:
        async with self.connection() as conn:
            await conn.execute(
                "DELETE FROM acme_revocations WHERE serial_number = %s", (serial_number,)
            )

    async def revocation_failed(self, serial_number: str, error: str, due_at: datetime) -> None:
        async with self.connection() as conn:
            await conn.execute(
                "UPDATE acme_revocations SET last_error = %s, due_at = %s WHERE serial_number = %s",
                (error[:2000], due_at, serial_number),
            )

    # -- the account and the order budget ------------------------------------------------------

    async def account_url(self, directory_url: str, thumbprint: str) -> str | None:
        async with self.connection() as conn:
            cur = await conn.execute(
                "SELECT account_url FROM acme_accounts "
                "WHERE directory_url = %s AND key_thumbprint = %s",
                (directory_url, thumbprint),
            )
            row = await cur.fetchone()
        return None if row is None else str(row[0])

    async def save_account(
        self, directory_url: str, thumbprint: str, account_url: str, now: datetime
    ) -> str:
        """Record the account (the first replica's wins, or a re-registration replaces a
        lost one); returns the account URL every replica uses from now on."""
        async with self.connection() as conn:
            cur = await conn.execute(
                """
                INSERT INTO acme_accounts (directory_url, key_thumbprint, account_url, created_at)
                VALUES (%s, %s, %s, %s)
                ON CONFLICT (directory_url, key_thumbprint)
                DO UPDATE SET account_url = EXCLUDED.account_url, created_at = EXCLUDED.created_at
                RETURNING account_url
                """,
                (directory_url, thumbprint, account_url, now),
            )
            row = await cur.fetchone()
        return account_url if row is None else str(row[0])

    async def spend_order(self, directory_url: str, now: datetime, budget: Limit) -> timedelta:
        """Spend one order from the budget; zero when admitted, else how long until an order
        would be.

        The decision is `shared.limits.gcra_step`'s, the one GCRA arithmetic of every limit,
        with `budget`'s emission interval and tolerance: read the bucket's TAT (its row is
        created at `now`, a full bucket, the first time), take the step in Python, and when
        it admits, store the step's new TAT with a compare-and-set, an UPDATE that writes only
        if the row still holds the TAT that was read. Every step moves the TAT forward, so a
        CAS that changes no row means another replica spent in between: the spend reads and
        decides again, up to `_ORDER_SPEND_ATTEMPTS` times. Every replica thus spends from
        one bucket, one row per ACME directory, exactly: an order is admitted only by a CAS
        that moved the very TAT its step read, and no two can move the same one. A refusal's
        wait is the step's own. A spend that lost every CAS (an order was admitted elsewhere
        each time) waits one interval: right after an admission, the next order is at most
        one interval away.

        Each statement is its own transaction (the store's connections autocommit): the
        bucket's row is locked only while the server runs the UPDATE, never across a round
        trip, so a replica that stalls between statements cannot hold up the others."""
        now_us = _micros(now)
        params: dict[str, object] = {"url": directory_url, "now": now}
        async with self.connection() as conn:
            for _ in range(_ORDER_SPEND_ATTEMPTS):
                read = await _order_tat(conn, params)
                step = gcra_step(_micros(read), now_us, budget.interval_us, budget.tolerance_us, 1)
                if not step.allowed:
                    return timedelta(microseconds=step.retry_after_us)
                new = _EPOCH + timedelta(microseconds=step.new_tat_us)
                cur = await conn.execute(
                    "UPDATE acme_order_budget SET tat = %(new)s "
                    "WHERE directory_url = %(url)s AND tat = %(read)s",
                    {**params, "new": new, "read": read},
                )
                if cur.rowcount == 1:
                    return timedelta(0)
        return timedelta(microseconds=budget.interval_us)


async def _order_tat(conn: AsyncConnection[TupleRow], params: dict[str, object]) -> datetime:
    """The order budget's TAT for `params["url"]`, its row inserted at `params["now"]` (a
    full bucket) when there is none yet."""
    select = "SELECT tat FROM acme_order_budget WHERE directory_url = %(url)s"
    row = await (await conn.execute(select, params)).fetchone()
    if row is None:
        await conn.execute(
            "INSERT INTO acme_order_budget (directory_url, tat) VALUES (%(url)s, %(now)s) "
            "ON CONFLICT DO NOTHING",
            params,
        )
        row = await (await conn.execute(select, params)).fetchone()
    assert row is not None  # the row, once inserted, is never deleted
    tat: datetime = row[0]
    return tat


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)
