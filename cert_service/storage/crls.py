"""The CRL tables' SQL (migrations 0005 and 0008): the revocation log, the queue of
revocations not yet in a CRL, and the stored CRLs. Why the order of `take_entries`' two
statements keeps every committed revocation in a CRL: `cert_service.crl`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime

from psycopg import AsyncConnection
from psycopg.rows import TupleRow

from cert_service.storage.base import StoreBase


@dataclass(frozen=True)
class RevokedEntry:
    serial_hex: str
    revoked_at: datetime
    reason: str


@dataclass(frozen=True)
class PublishedCrl:
    shard: int
    crl_number: int
    this_update: datetime
    next_update: datetime
    entries: int
    der: bytes


class CrlStore(StoreBase):
    """SQL for revoked_certificates, crl_pending and crls (migrations 0005 and 0008)."""

    async def shards_due(
        self, issuer_key_id: str, shard_count: int, refresh_before: datetime
    ) -> list[int]:
        """Shards with unpublished revocations, without a CRL, or whose CRL's nextUpdate is
        before `refresh_before`; also shards beyond `shard_count` that still have a CRL (the
        count went down: their certificates still point at them)."""
        async with self.connection() as conn:
            cur = await conn.execute(
                """
                SELECT s FROM generate_series(0, %(count)s - 1) AS s
                WHERE NOT EXISTS (SELECT 1 FROM crls c
                                  WHERE c.issuer_key_id = %(issuer)s AND c.crl_shard = s)
                UNION
                SELECT crl_shard FROM crl_pending WHERE issuer_key_id = %(issuer)s
                UNION
                SELECT crl_shard FROM crls
                WHERE issuer_key_id = %(issuer)s AND next_update <= %(refresh)s
                ORDER BY 1
                """,
                {"count": shard_count, "issuer": issuer_key_id, "refresh": refresh_before},
            )
            return [int(row[0]) for row in await cur.fetchall()]

    @asynccontextmanager
    async def shard_lock(
        self, issuer_key_id: str, shard: int, refresh_before: datetime
    ) -> AsyncIterator[tuple[AsyncConnection[TupleRow], PublishedCrl | None] | None]:
        """Inside one transaction: the shard's advisory lock, then whether it still needs
        signing. Yields None when another replica holds the shard or it is no longer due;
        otherwise the connection and the current CRL (None: the first one)."""
        async with self.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "SELECT pg_try_advisory_xact_lock(hashtext('myl.crl:' || %s), %s)",
                (issuer_key_id, shard),
            )
            row = await cur.fetchone()
            if row is None or not row[0]:
                yield None
                return
            cur = await conn.execute(
                """
                SELECT crl_number, this_update, next_update, entries,
                       EXISTS (SELECT 1 FROM crl_pending p
                               WHERE p.issuer_key_id = %(issuer)s AND p.crl_shard = %(shard)s)
                FROM crls WHERE issuer_key_id = %(issuer)s AND crl_shard = %(shard)s
                """,
                {"issuer": issuer_key_id, "shard": shard},
            )
            current = await cur.fetchone()
            if current is not None and not current[4] and current[2] > refresh_before:
                yield None  # another replica has just signed it
                return
            previous = (
                None
                if current is None
                else PublishedCrl(shard, current[0], current[1], current[2], current[3], b"")
            )
            yield conn, previous

    @staticmethod
    async def take_entries(
        conn: AsyncConnection[TupleRow], issuer_key_id: str, shard: int, now: datetime
    ) -> list[RevokedEntry]:
        """Take the shard's queued revocations off the queue, then read what its CRL lists.

        In this order, as two statements of the caller's transaction (see the module
        docstring): the DELETE removes only rows committed before it began, so the SELECT,
        which begins later, reads every revocation it took. A revocation still open keeps its
        row for the next pass."""
        await conn.execute(
            "DELETE FROM crl_pending WHERE issuer_key_id = %s AND crl_shard = %s",
            (issuer_key_id, shard),
        )
        cur = await conn.execute(
            """
            SELECT serial_number, revoked_at, reason FROM revoked_certificates
            WHERE issuer_key_id = %s AND crl_shard = %s AND not_after > %s
            ORDER BY revoked_at, serial_number
            """,
            (issuer_key_id, shard, now),
            binary=True,
        )
        return [RevokedEntry(*row) for row in await cur.fetchall()]

    @staticmethod
    async def save(conn: AsyncConnection[TupleRow], issuer_key_id: str, crl: PublishedCrl) -> None:
        """Store `crl` as its shard's current CRL; raises (so the caller's transaction, which
        took revocations off the queue, rolls back) when a CRL with a number as high is
        already stored."""
        cur = await conn.execute(
            """
            INSERT INTO crls (issuer_key_id, crl_shard, crl_number, this_update, next_update,
                              entries, der)
            VALUES (%s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT (issuer_key_id, crl_shard) DO UPDATE SET
                crl_number = EXCLUDED.crl_number, this_update = EXCLUDED.this_update,
                next_update = EXCLUDED.next_update, entries = EXCLUDED.entries,
                der = EXCLUDED.der
            WHERE crls.crl_number < EXCLUDED.crl_number
            """,
            (
                issuer_key_id,
                crl.shard,
                crl.crl_number,
                crl.this_update,
                crl.next_update,
                crl.entries,
                crl.der,
            ),
        )
        if cur.rowcount != 1:
            raise RuntimeError(
                f"shard {crl.shard}: a CRL numbered {crl.crl_number} or higher is stored already"
            )

    async def forget_expired(self, issuer_key_id: str, before: datetime) -> int:
        async with self.connection() as conn:
            cur = await conn.execute(
                "DELETE FROM revoked_certificates WHERE issuer_key_id = %s AND not_after < %s",
                (issuer_key_id, before),
            )
            return cur.rowcount

    async def get(self, issuer_key_id: str, shard: int) -> PublishedCrl | None:
        async with self.connection() as conn:
            cur = await conn.execute(
                """
                SELECT crl_shard, crl_number, this_update, next_update, entries, der FROM crls
                WHERE issuer_key_id = %s AND crl_shard = %s
                """,
                (issuer_key_id, shard),
                binary=True,
            )
            row = await cur.fetchone()
        return None if row is None else PublishedCrl(*row)
