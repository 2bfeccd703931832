"""All SQL of key_service: raw parameterized statements and row models.

Tables: `device_api_keys` (migration 0001), the append-only
`api_key_audit_events` (0002), the invalidation log (0003), the request ids of
device-wide revocations (0005) and the markers of keys whose callers have not been told of
them yet (0007; its statements are `shared/outcomes.py`'s, the undo of each kind is here).
Every change to a key writes its audit row in the same transaction.

A key is only ever inserted, under a device, while holding that device's advisory lock
in shared mode; RevokeDeviceApiKeys takes it exclusively before it reads the device's
keys. Without it, a key committed while the revocation's UPDATE ran (a rotation, a
GenerateApiKey retry) would be missing from that statement's snapshot and survive the
revocation. A database that cannot be reached becomes UNAVAILABLE,
never INTERNAL (`shared.db.Database`).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import TupleRow, class_row

from myl.key.v1 import key_pb2
from shared import idempotency
from shared.clock import Clock
from shared.db import WRITE_GUARD, Database
from shared.idempotency import RequestKey
from shared.outcomes import Unconfirmed, UnconfirmedWrites
from shared.seal import load_secret

Connection = AsyncConnection[TupleRow]

KEY_COLUMNS: Final = (
    "id, device_id, key_hash, key_prefix, device_name, user_initials, uuid_subdomain, "
    "permissions, rate_limit, expires_at, revoked_at, revocation_reason, rotated_from, "
    "usage_count, last_used_at, created_at, version"
)
AUDIT_COLUMNS: Final = (
    "seq, event_id, action, key_id, device_id, actor, reason, display_prefix, created_at"
)

ACTION_CREATE: Final = "create"
ACTION_ROTATE: Final = "rotate"
ACTION_REVOKE: Final = "revoke"
ACTION_CASCADE_REVOKE: Final = "cascade_revoke"

_ACTION_PB: Final = {
    ACTION_CREATE: key_pb2.AUDIT_ACTION_CREATE,
    ACTION_ROTATE: key_pb2.AUDIT_ACTION_ROTATE,
    ACTION_REVOKE: key_pb2.AUDIT_ACTION_REVOKE,
    ACTION_CASCADE_REVOKE: key_pb2.AUDIT_ACTION_CASCADE_REVOKE,
}


@dataclass(slots=True)
class ApiKeyRow:
    id: uuid.UUID
    device_id: str | None
    key_hash: bytes
    key_prefix: str
    device_name: str
    user_initials: str
    uuid_subdomain: str
    permissions: list[str]
    rate_limit: int
    expires_at: datetime
    revoked_at: datetime | None
    revocation_reason: str | None
    rotated_from: uuid.UUID | None
    usage_count: int
    last_used_at: datetime | None
    created_at: datetime
    # A new one for each change of what the key may do (migration 0008): the cache keeps
    # the newest (key_service/verify.py).
    version: int

    @property
    def operator(self) -> bool:
        return self.device_id is None

    def status(self, now: datetime) -> key_pb2.ApiKeyStatus.ValueType:
        if self.revoked_at is not None and self.revoked_at <= now:
            return key_pb2.API_KEY_STATUS_REVOKED
        if self.expires_at <= now:
            return key_pb2.API_KEY_STATUS_EXPIRED
        return key_pb2.API_KEY_STATUS_ACTIVE

    def replay_refusal(self, now: datetime) -> str | None:
        """Why a retry of the request that created this key may not hand out a replacement
        (shared/idempotency.py): it was revoked, rotated or expired since. None: it is live."""
        if self.revoked_at is not None:
            if self.revoked_at <= now:
                return "the key it created was revoked"
            return "the key it created was rotated"
        if self.expires_at <= now:
            return "the key it created expired"
        return None

    def usable_until(self) -> datetime:
        """When the key stops verifying: expiry or (scheduled) revocation."""
        if self.revoked_at is not None and self.revoked_at < self.expires_at:
            return self.revoked_at
        return self.expires_at

    def to_pb(self, now: datetime) -> key_pb2.ApiKey:
        message = key_pb2.ApiKey(
            key_id=str(self.id),
            device_id=self.device_id or "",
            device_name=self.device_name,
            user_initials=self.user_initials,
            uuid_subdomain=self.uuid_subdomain,
            display_prefix=self.key_prefix,
            permissions=self.permissions,
            rate_limit=self.rate_limit,
            status=self.status(now),
            revocation_reason=self.revocation_reason or "",
            usage_count=self.usage_count,
            rotated_from_key_id=str(self.rotated_from) if self.rotated_from else "",
            operator=self.operator,
        )
        message.create_time.FromDatetime(self.created_at)
        message.expire_time.FromDatetime(self.expires_at)
        if self.revoked_at is not None:
            message.revoke_time.FromDatetime(self.revoked_at)
        if self.last_used_at is not None:
            message.last_used_time.FromDatetime(self.last_used_at)
        return message


@dataclass(slots=True)
class AuditRow:
    seq: int
    event_id: uuid.UUID
    action: str
    key_id: uuid.UUID
    device_id: str | None
    actor: str
    reason: str
    display_prefix: str
    created_at: datetime

    def to_pb(self) -> key_pb2.AuditEvent:
        message = key_pb2.AuditEvent(
            event_id=str(self.event_id),
            action=_ACTION_PB[self.action],
            key_id=str(self.key_id),
            device_id=self.device_id or "",
            actor=self.actor,
            reason=self.reason,
            display_prefix=self.display_prefix,
        )
        message.create_time.FromDatetime(self.created_at)
        return message


@dataclass(frozen=True)
class NewKeyRow:
    """What a new key is inserted with."""

    id: uuid.UUID
    device_id: str | None
    key_hash: bytes
    key_prefix: str
    device_name: str
    user_initials: str
    uuid_subdomain: str
    permissions: Sequence[str]
    rate_limit: int
    expires_at: datetime
    rotated_from: uuid.UUID | None = None


@dataclass(frozen=True)
class KeyChange:
    """Keys a change touched, and the invalidations it logged for them."""

    rows: list[ApiKeyRow]
    invalidations: list[int]
    changed: bool = True


@dataclass(frozen=True)
class AuditEntry:
    action: str
    actor: str
    reason: str


@dataclass(frozen=True)
class UsageDelta:
    key_id: uuid.UUID
    count: int
    last_used_at: datetime


# Revoking one key or all of a device's keys: the same change, different rows.
# A key retiring at a future time (rotation grace) counts as not yet revoked.
_REVOKE = (
    "UPDATE device_api_keys SET revoked_at = %(now)s, revocation_reason = %(reason)s, "
    "is_active = false, updated_at = %(now)s"
)
_NOT_YET_REVOKED = "(revoked_at IS NULL OR revoked_at > %(now)s)"
# Two-key advisory locks: (this namespace, hashtext(device_id)); see the module docstring.
_DEVICE_LOCK: Final = "hashtext('myl.key.device'), hashtext(%(device)s)"


# The kinds of write whose callers must hear of them (shared/outcomes.py): a new key, and a
# rotation (its successor, and the rotated key's retirement).
WRITE_CREATE: Final = "create"
WRITE_ROTATION: Final = "rotation"


class KeyStore:
    """device_api_keys and api_key_audit_events; and api_key_unconfirmed_writes, the keys
    created whose callers have not been told of them yet (shared/outcomes.py)."""

    def __init__(self, db: Database, clock: Clock | None = None) -> None:
        self.db = db
        self.unconfirmed = UnconfirmedWrites(
            db,
            "api_key_unconfirmed_writes",
            {WRITE_CREATE: self._undo_creates, WRITE_ROTATION: self._undo_rotations},
            clock,
        )

    @asynccontextmanager
    async def _transaction(
        self, *, watched: bool = True, budget: float | None = None, write: bool = False
    ) -> AsyncIterator[Connection]:
        """One transaction; UNAVAILABLE (never INTERNAL) when the database is unreachable.

        `write`: committed only while its caller can still hear of it (`Database.check_commit`);
        its statements carry the deadline themselves (`WRITE_GUARD`)."""
        async with self.db.connection(watched=watched, budget=budget) as conn, conn.transaction():
            yield conn
            if write:
                self.db.check_commit(conn)

    # -- reads ---------------------------------------------------------------

    async def find_by_hash(self, key_hash: bytes) -> ApiKeyRow | None:
        async with self._transaction() as conn:
            cur = conn.cursor(row_factory=class_row(ApiKeyRow))
            await cur.execute(
                f"SELECT {KEY_COLUMNS} FROM device_api_keys WHERE key_hash = %s", (key_hash,)
            )
            return await cur.fetchone()

    async def get(self, key_id: uuid.UUID) -> ApiKeyRow | None:
        async with self._transaction() as conn:
            cur = conn.cursor(row_factory=class_row(ApiKeyRow))
            await cur.execute(f"SELECT {KEY_COLUMNS} FROM device_api_keys WHERE id = %s", (key_id,))
            return await cur.fetchone()

    async def list_device_keys(
        self,
        device_id: str,
        *,
        now: datetime,
        show_inactive: bool,
        after: tuple[datetime, uuid.UUID] | None,
        limit: int,
    ) -> list[ApiKeyRow]:
        """Newest first, keyset-paginated on (created_at DESC, id)."""
        conditions = ["device_id = %(device)s"]
        if not show_inactive:
            conditions.append("(revoked_at IS NULL OR revoked_at > %(now)s)")
            conditions.append("expires_at > %(now)s")
        if after is not None:
            conditions.append(
                "(created_at < %(after_t)s OR (created_at = %(after_t)s AND id > %(after_id)s))"
            )
        params: dict[str, object] = {"device": device_id, "now": now, "limit": limit}
        if after is not None:
            params["after_t"], params["after_id"] = after
        query = (
            f"SELECT {KEY_COLUMNS} FROM device_api_keys WHERE {' AND '.join(conditions)} "
            "ORDER BY created_at DESC, id LIMIT %(limit)s"
        )
        async with self._transaction() as conn:
            cur = conn.cursor(row_factory=class_row(ApiKeyRow))
            await cur.execute(query.encode(), params)
            return await cur.fetchall()

    async def list_audit(
        self, *, device_id: str | None, key_id: uuid.UUID | None, before: int | None, limit: int
    ) -> list[AuditRow]:
        conditions = ["TRUE"]
        params: dict[str, object] = {"limit": limit}
        if device_id is not None:
            conditions.append("device_id = %(device)s")
            params["device"] = device_id
        if key_id is not None:
            conditions.append("key_id = %(key)s")
            params["key"] = key_id
        if before is not None:
            conditions.append("seq < %(before)s")
            params["before"] = before
        query = (
            f"SELECT {AUDIT_COLUMNS} FROM api_key_audit_events "
            f"WHERE {' AND '.join(conditions)} ORDER BY seq DESC LIMIT %(limit)s"
        )
        async with self._transaction() as conn:
            cur = conn.cursor(row_factory=class_row(AuditRow))
            await cur.execute(query.encode(), params)
            return await cur.fetchall()

    # -- changes (each with its audit rows, in one transaction) ---------------

    async def create(
        self,
        key: NewKeyRow,
        audit: AuditEntry,
        now: datetime,
        *,
        request: RequestKey | None = None,
        supersedes: ApiKeyRow | None = None,
    ) -> tuple[ApiKeyRow, KeyChange]:
        """Insert a key (with its AIP-155 request id, if any) and audit it.

        With a request id, the transaction holds it (`_claim`): `supersedes` is the key an
        earlier attempt of the same request created, as the caller read it (None: no
        attempt had succeeded). In the same transaction that key is revoked and gives up the
        request id, if it is still live. Returns the new key and the change to the
        superseded one (to publish)."""
        async with self._transaction(write=True) as conn:
            await self._lock_device(conn, key.device_id)
            change = KeyChange([], [], changed=False)
            if request is not None:
                expected = supersedes.id if supersedes is not None else None
                holder = await self._claim(conn, request, expected, now)
                if holder is not None:
                    change = await self._supersede(conn, holder, request, now)
            row = await self._insert(conn, key, now, request)
            await self._audit(conn, [row], audit, now)
            await self.unconfirmed.mark(
                conn,
                Unconfirmed(WRITE_CREATE, str(row.id), {"request_id": _text(request)}),
            )
            return row, change

    async def _supersede(
        self, conn: Connection, earlier: ApiKeyRow, request: RequestKey | None, now: datetime
    ) -> KeyChange:
        reason = f"superseded by a retry of request {request.request_id if request else ''}"
        deadline = self.db.write_deadline(conn)
        await conn.execute(
            "UPDATE device_api_keys SET request_id = NULL, request_hash = NULL "
            f"WHERE id = %(id)s AND {WRITE_GUARD}",
            {"id": earlier.id, "deadline": deadline},
        )
        cur = conn.cursor(row_factory=class_row(ApiKeyRow))
        await cur.execute(
            f"{_REVOKE} WHERE id = %(id)s AND {_NOT_YET_REVOKED} AND {WRITE_GUARD} "
            f"RETURNING {KEY_COLUMNS}",
            {"id": earlier.id, "now": now, "reason": reason, "deadline": deadline},
        )
        revoked = await cur.fetchall()
        await self._audit(conn, revoked, AuditEntry(ACTION_REVOKE, "key_service", reason), now)
        # This retry has claimed the earlier attempt: nothing of it is left to undo.
        await self.unconfirmed.forget(conn, [str(earlier.id)])
        return KeyChange(revoked, await self._log_invalidations(conn, revoked, now))

    async def _claim(
        self, conn: Connection, request: RequestKey, expected: uuid.UUID | None, now: datetime
    ) -> ApiKeyRow | None:
        """Hold `request`'s id for this transaction; return the key it names, locked.

        ABORTED (`idempotency.in_progress`) without waiting when another attempt holds the
        id, or when the key the id names is not `expected` (what the caller read before:
        another attempt finished in between; its retry sees the outcome). A key that took
        the id longer ago than the window gives it up. FAILED_PRECONDITION
        `REQUEST_SUPERSEDED` when the key is no longer live: a retry never revives it."""
        cur = await conn.execute(
            "SELECT pg_try_advisory_xact_lock(%s)", (idempotency.claim_lock_id(request.request_id),)
        )
        locked = await cur.fetchone()
        if not (locked and locked[0]):
            raise idempotency.in_progress(request.request_id)
        deadline = self.db.write_deadline(conn)
        keys = conn.cursor(row_factory=class_row(ApiKeyRow))
        await keys.execute(
            f"SELECT {KEY_COLUMNS} FROM device_api_keys "
            f"WHERE request_id = %(request_id)s AND {WRITE_GUARD} FOR UPDATE",
            {"request_id": request.request_id, "deadline": deadline},
        )
        holder = await keys.fetchone()
        if holder is not None and not idempotency.recent(holder.created_at, now):
            await conn.execute(
                "UPDATE device_api_keys SET request_id = NULL, request_hash = NULL "
                f"WHERE id = %(id)s AND {WRITE_GUARD}",
                {"id": holder.id, "deadline": deadline},
            )
            holder = None
        if (holder.id if holder is not None else None) != expected:
            raise idempotency.in_progress(request.request_id)
        if holder is not None:
            refusal = holder.replay_refusal(now)
            if refusal is not None:
                raise idempotency.superseded(request.request_id, refusal, key_id=str(holder.id))
        return holder

    async def _lock_device(
        self, conn: Connection, device_id: str | None, *, shared: bool = True
    ) -> None:
        """The device's advisory lock for this transaction (see the module docstring); a wait
        for it ends at the caller's deadline like a row lock's (`WRITE_GUARD`)."""
        if device_id is None:
            return  # an operator key: no device-wide revocation covers it
        function = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
        await conn.execute(
            f"SELECT {function}({_DEVICE_LOCK}) WHERE {WRITE_GUARD}",
            {"device": device_id, "deadline": self.db.write_deadline(conn)},
        )

    async def find_by_request_id(self, request_id: uuid.UUID) -> tuple[ApiKeyRow, bytes] | None:
        """The key a GenerateApiKey or RotateApiKey request created, and its fingerprint."""
        async with self._transaction() as conn:
            cur = await conn.execute(
                f"SELECT request_hash, {KEY_COLUMNS} FROM device_api_keys WHERE request_id = %s",
                (request_id,),
            )
            row = await cur.fetchone()
        return None if row is None else (ApiKeyRow(*row[1:]), bytes(row[0]))

    async def revoke(self, key_id: uuid.UUID, audit: AuditEntry, now: datetime) -> KeyChange:
        """Revoke one key now. `changed` is False if it was revoked already; `rows` is
        empty when there is no such key."""
        async with self._transaction(write=True) as conn:
            cur = conn.cursor(row_factory=class_row(ApiKeyRow))
            await cur.execute(
                f"{_REVOKE} WHERE id = %(id)s AND {_NOT_YET_REVOKED} AND {WRITE_GUARD} "
                f"RETURNING {KEY_COLUMNS}",
                {
                    "id": key_id,
                    "now": now,
                    "reason": audit.reason,
                    "deadline": self.db.write_deadline(conn),
                },
            )
            row = await cur.fetchone()
            if row is not None:
                await self._audit(conn, [row], audit, now)
                return KeyChange([row], await self._log_invalidations(conn, [row], now))
            await cur.execute(f"SELECT {KEY_COLUMNS} FROM device_api_keys WHERE id = %s", (key_id,))
            current = await cur.fetchone()
            return KeyChange([] if current is None else [current], [], changed=False)

    async def lock_for_rotation(self, conn: Connection, key_id: uuid.UUID) -> ApiKeyRow | None:
        cur = conn.cursor(row_factory=class_row(ApiKeyRow))
        await cur.execute(
            f"SELECT {KEY_COLUMNS} FROM device_api_keys WHERE id = %(id)s AND {WRITE_GUARD} "
            "FOR UPDATE",
            {"id": key_id, "deadline": self.db.write_deadline(conn)},
        )
        return await cur.fetchone()

    @asynccontextmanager
    async def rotation(
        self, device_id: str | None, request: RequestKey | None, now: datetime
    ) -> AsyncIterator[Connection]:
        """A transaction for `lock_for_rotation` + `finish_rotation`, holding the device's
        lock and the request id (`_claim`; no earlier attempt may have succeeded)."""
        async with self._transaction(write=True) as conn:
            await self._lock_device(conn, device_id)
            if request is not None:
                await self._claim(conn, request, None, now)
            yield conn

    async def finish_rotation(
        self,
        conn: Connection,
        old: ApiKeyRow,
        new: NewKeyRow,
        *,
        retire_at: datetime,
        actor: str,
        now: datetime,
        request: RequestKey | None = None,
    ) -> tuple[ApiKeyRow, ApiKeyRow, list[int]]:
        """Insert the new key, schedule (or do) the old key's revocation, audit both; returns
        the retired and the new key and the invalidation logged for the retired one."""
        cur = conn.cursor(row_factory=class_row(ApiKeyRow))
        await cur.execute(
            "UPDATE device_api_keys SET revoked_at = %(at)s, "
            "expires_at = LEAST(expires_at, %(at)s), revocation_reason = %(reason)s, "
            "is_active = false, updated_at = %(now)s "
            f"WHERE id = %(id)s AND {WRITE_GUARD} RETURNING {KEY_COLUMNS}",
            {
                "id": old.id,
                "at": retire_at,
                "now": now,
                "reason": f"rotated to {new.id}",
                "deadline": self.db.write_deadline(conn),
            },
        )
        retired = await cur.fetchone()
        assert retired is not None  # locked by lock_for_rotation
        created = await self._insert(conn, new, now, request)
        await self.unconfirmed.mark(
            conn,
            Unconfirmed(
                WRITE_ROTATION,
                str(created.id),
                {
                    "request_id": _text(request),
                    "rotated": str(old.id),
                    # What the rotated key had, to give back, and what the rotation made of
                    # it (an undo leaves a key that changed since alone).
                    "revoked_at": _iso(old.revoked_at),
                    "expires_at": _iso(old.expires_at),
                    "revocation_reason": old.revocation_reason,
                    "retired_at": _iso(retired.revoked_at),
                    "retired_reason": retired.revocation_reason,
                },
            ),
        )
        grace = (retire_at - now).total_seconds()
        await self._audit(
            conn,
            [retired],
            AuditEntry(ACTION_ROTATE, actor, f"rotated to {new.id}; old key valid for {grace:g}s"),
            now,
        )
        await self._audit(
            conn, [created], AuditEntry(ACTION_CREATE, actor, f"rotation of {old.id}"), now
        )
        return retired, created, await self._log_invalidations(conn, [retired], now)

    async def revoke_device(
        self,
        device_id: str,
        audit: AuditEntry,
        now: datetime,
        request: RequestKey | None = None,
    ) -> tuple[KeyChange, int]:
        """Revoke every key of the device that is not revoked yet; returns them and how many
        the request revoked.

        With a request id, the first attempt records its count in the same transaction; a
        retry within the window revokes nothing and returns that count (a concurrent one
        waits for the first to commit). The same id used for another request is
        INVALID_ARGUMENT."""
        async with self._transaction(write=True) as conn:
            if request is not None:
                recorded = await self._record_revoke_request(conn, request, device_id, now)
                if recorded is not None:
                    return KeyChange([], [], changed=False), recorded
            await self._lock_device(conn, device_id, shared=False)
            cur = conn.cursor(row_factory=class_row(ApiKeyRow))
            await cur.execute(
                f"{_REVOKE} WHERE device_id = %(device)s AND {_NOT_YET_REVOKED} "
                f"AND {WRITE_GUARD} RETURNING {KEY_COLUMNS}",
                {
                    "device": device_id,
                    "now": now,
                    "reason": audit.reason,
                    "deadline": self.db.write_deadline(conn),
                },
            )
            rows = await cur.fetchall()
            await self._audit(conn, rows, audit, now)
            if request is not None:
                await conn.execute(
                    "UPDATE api_key_requests SET revoked_count = %s WHERE request_id = %s",
                    (len(rows), request.request_id),
                )
            return KeyChange(rows, await self._log_invalidations(conn, rows, now)), len(rows)

    async def _record_revoke_request(
        self, conn: Connection, request: RequestKey, device_id: str, now: datetime
    ) -> int | None:
        """Take the request id for this transaction (None), or return the count an earlier
        attempt recorded. The INSERT waits for a concurrent attempt's transaction (up to the
        caller's deadline, `WRITE_GUARD`): if that one commits, this is its retry."""
        cur = await conn.execute(
            "INSERT INTO api_key_requests "
            "(request_id, method, request_hash, device_id, revoked_count, created_at) "
            "SELECT %(id)s, 'revoke_device', %(hash)s, %(device)s, 0, %(now)s "
            f"WHERE {WRITE_GUARD} "
            "ON CONFLICT (request_id) DO UPDATE SET method = EXCLUDED.method, "
            "request_hash = EXCLUDED.request_hash, device_id = EXCLUDED.device_id, "
            "revoked_count = 0, created_at = EXCLUDED.created_at "
            "WHERE api_key_requests.created_at <= %(stale)s RETURNING 1",
            {
                "id": request.request_id,
                "hash": request.fingerprint,
                "device": device_id,
                "now": now,
                "stale": now - idempotency.WINDOW,
                "deadline": self.db.write_deadline(conn),
            },
        )
        if await cur.fetchone() is not None:
            return None
        cur = await conn.execute(
            "SELECT request_hash, revoked_count FROM api_key_requests WHERE request_id = %s",
            (request.request_id,),
        )
        row = await cur.fetchone()
        assert row is not None  # the conflict was with this row
        request.matches(bytes(row[0]))
        return int(row[1])

    # -- writes whose callers were never told of them (shared/outcomes.py) -----------------

    async def _undo_creates(
        self, conn: Connection, writes: Sequence[Unconfirmed], now: datetime
    ) -> None:
        """Keys whose callers were never told of them (answered OUTCOME_UNKNOWN, or their
        process died first): their plaintext reached nobody. Revoke each that was stored and
        release its request id, so that the caller's retry with that id creates a key it
        receives. A retry that got there first has claimed the id (the key no longer holds
        it) and decided for itself."""
        for write in writes:
            await self._revoke_unheld(conn, write, now)

    async def _undo_rotations(
        self, conn: Connection, writes: Sequence[Unconfirmed], now: datetime
    ) -> None:
        """Rotations whose callers were never told of them: if one was stored, its successor
        reached nobody and the device would lose the key it has. Revoke the successor
        (releasing its request id) and give the rotated key back the validity it had, unless a
        retry claimed the successor first or the rotated key changed since."""
        for write in writes:
            if not await self._revoke_unheld(conn, write, now):
                continue
            args = write.args
            cur = conn.cursor(row_factory=class_row(ApiKeyRow))
            await cur.execute(
                "UPDATE device_api_keys SET revoked_at = %(revoked_at)s, "
                "expires_at = %(expires_at)s, revocation_reason = %(reason)s, "
                "is_active = %(revoked_at)s::timestamptz IS NULL, updated_at = %(now)s "
                "WHERE id = %(id)s AND revoked_at IS NOT DISTINCT FROM %(retired_at)s "
                f"AND revocation_reason IS NOT DISTINCT FROM %(retired_reason)s "
                f"AND {WRITE_GUARD} RETURNING {KEY_COLUMNS}",
                {
                    "id": uuid.UUID(args["rotated"]),
                    "revoked_at": _moment(args["revoked_at"]),
                    "expires_at": _moment(args["expires_at"]),
                    "reason": args["revocation_reason"],
                    "now": now,
                    "retired_at": _moment(args["retired_at"]),
                    "retired_reason": args["retired_reason"],
                    "deadline": self.db.write_deadline(conn),
                },
            )
            restored = await cur.fetchall()
            reason = f"rotation to {write.subject} undone: its caller never received the new key"
            await self._audit(conn, restored, AuditEntry(ACTION_ROTATE, "key_service", reason), now)
            await self._log_invalidations(conn, restored, now)

    async def _revoke_unheld(self, conn: Connection, write: Unconfirmed, now: datetime) -> bool:
        """Revoke the key `write` created, whose plaintext reached nobody, and release its
        request id; False when it is not there as it was created (never stored, revoked, or
        claimed)."""
        reason = "its creation was answered OUTCOME_UNKNOWN; nobody received it"
        cur = conn.cursor(row_factory=class_row(ApiKeyRow))
        await cur.execute(
            f"{_REVOKE}, request_id = NULL, request_hash = NULL "
            f"WHERE id = %(id)s AND {_NOT_YET_REVOKED} "
            "AND request_id IS NOT DISTINCT FROM %(request_id)s::uuid "
            f"AND {WRITE_GUARD} RETURNING {KEY_COLUMNS}",
            {
                "id": uuid.UUID(write.subject),
                "now": now,
                "reason": reason,
                "request_id": write.args["request_id"],
                "deadline": self.db.write_deadline(conn),
            },
        )
        revoked = await cur.fetchall()
        await self._audit(conn, revoked, AuditEntry(ACTION_REVOKE, "key_service", reason), now)
        await self._log_invalidations(conn, revoked, now)
        return bool(revoked)

    # -- the durable invalidation log (shared/invalidation.py) -----------------------------

    async def _log_invalidations(
        self, conn: Connection, rows: Sequence[ApiKeyRow], now: datetime
    ) -> list[int]:
        if not rows:
            return []
        cur = await conn.execute(
            "INSERT INTO api_key_cache_invalidations (key_hash, created_at) "
            "SELECT h, %s FROM unnest(%s::bytea[]) AS u(h) RETURNING id",
            (now, [r.key_hash for r in rows]),
        )
        return [row[0] for row in await cur.fetchall()]

    async def pending_invalidations(
        self, limit: int, *, after: int = 0, applied_since: datetime | None = None
    ) -> list[tuple[int, ApiKeyRow]]:
        """Logged invalidations with ids above `after`, oldest first, each with the key's
        current row: the pending ones, and with `applied_since` also those applied since."""
        condition = "i.applied_at IS NULL"
        if applied_since is not None:
            condition = "(i.applied_at IS NULL OR i.applied_at >= %(since)s)"
        async with self._transaction() as conn:
            cur = await conn.execute(
                f"SELECT i.id, {', '.join('k.' + c for c in KEY_COLUMNS.split(', '))} "
                "FROM api_key_cache_invalidations AS i "
                "JOIN device_api_keys AS k ON k.key_hash = i.key_hash "
                f"WHERE {condition} AND i.id > %(after)s ORDER BY i.id LIMIT %(limit)s",
                {"since": applied_since, "after": after, "limit": limit},
            )
            rows = await cur.fetchall()
        return [(row[0], ApiKeyRow(*row[1:])) for row in rows]

    async def acknowledge_invalidations(self, ids: Sequence[int], now: datetime) -> None:
        """Mark invalidations that Redis has applied."""
        if not ids:
            return
        async with self._transaction() as conn:
            await conn.execute(
                "UPDATE api_key_cache_invalidations SET applied_at = %s "
                "WHERE id = ANY(%s::bigint[]) AND applied_at IS NULL",
                (now, list(ids)),
            )

    async def forget_invalidations(self, applied_before: datetime) -> None:
        """Drop invalidations applied before `applied_before` (older than any cache entry)."""
        async with self._transaction() as conn:
            await conn.execute(
                "DELETE FROM api_key_cache_invalidations WHERE applied_at < %s",
                (applied_before,),
            )

    async def cache_secret(self) -> bytes:
        """The secret that seals cached key records (`shared.seal`)."""
        async with self._transaction() as conn:
            return await load_secret(conn, "api_key_cache_secret")

    async def add_usage(self, deltas: Sequence[UsageDelta]) -> None:
        """One statement for the whole batch (a large batch may take a while: it gets ten
        seconds; a failure merely leaves the counts for the next flush)."""
        if not deltas:
            return
        async with self._transaction(budget=10.0) as conn:
            await conn.execute(
                "UPDATE device_api_keys AS k SET usage_count = k.usage_count + u.n, "
                "last_used_at = GREATEST(k.last_used_at, u.t) "
                "FROM unnest(%s::uuid[], %s::bigint[], %s::timestamptz[]) AS u(id, n, t) "
                "WHERE k.id = u.id",
                (
                    [d.key_id for d in deltas],
                    [d.count for d in deltas],
                    [d.last_used_at for d in deltas],
                ),
            )

    async def bulk_load(self, rows: Sequence[NewKeyRow], now: datetime) -> None:
        """COPY many keys at once (benchmark and test setup)."""
        async with self._transaction(watched=False) as conn:
            cur = conn.cursor()
            async with cur.copy(
                "COPY device_api_keys (id, device_id, key_hash, key_prefix, device_name, "
                "user_initials, uuid_subdomain, permissions, rate_limit, expires_at, "
                "created_at, updated_at) FROM STDIN"
            ) as copy:
                for r in rows:
                    await copy.write_row(
                        (
                            r.id, r.device_id, r.key_hash, r.key_prefix, r.device_name,
                            r.user_initials, r.uuid_subdomain, list(r.permissions),
                            r.rate_limit, r.expires_at, now, now,
                        )
                    )  # fmt: skip

    # -- helpers -------------------------------------------------------------

    async def _insert(
        self, conn: Connection, key: NewKeyRow, now: datetime, request: RequestKey | None = None
    ) -> ApiKeyRow:
        """Insert a key, guarded by its caller's deadline (`WRITE_GUARD`): a server that waits
        past it (on another transaction's row with the same request id) or runs the statement
        only after it (it hung) inserts nothing, and the transaction is rolled back with
        UNAVAILABLE."""
        cur = conn.cursor(row_factory=class_row(ApiKeyRow))
        try:
            await cur.execute(
                "INSERT INTO device_api_keys (id, device_id, key_hash, key_prefix, device_name, "
                "user_initials, uuid_subdomain, permissions, rate_limit, expires_at, "
                "rotated_from, created_at, updated_at, request_id, request_hash) "
                "SELECT %(id)s, %(device)s, %(hash)s, %(prefix)s, %(name)s, %(initials)s, "
                "%(subdomain)s, %(permissions)s, %(rate)s, %(expires)s, %(from)s, %(now)s, "
                "%(now)s, %(request_id)s, %(request_hash)s "
                f"WHERE {WRITE_GUARD} RETURNING {KEY_COLUMNS}",
                {
                    "id": key.id,
                    "device": key.device_id,
                    "hash": key.key_hash,
                    "prefix": key.key_prefix,
                    "name": key.device_name,
                    "initials": key.user_initials,
                    "subdomain": key.uuid_subdomain,
                    "permissions": list(key.permissions),
                    "rate": key.rate_limit,
                    "expires": key.expires_at,
                    "from": key.rotated_from,
                    "now": now,
                    "request_id": request.request_id if request else None,
                    "request_hash": request.fingerprint if request else None,
                    "deadline": self.db.write_deadline(conn),
                },
            )
        except psycopg.errors.UniqueViolation as exc:
            if exc.diag.constraint_name != "device_api_keys_request_id_key":
                raise
            assert request is not None  # the constraint is on request_id
            raise idempotency.in_progress(request.request_id) from exc
        row = await cur.fetchone()
        assert row is not None  # the guard raises rather than skip the row
        return row

    async def _audit(
        self, conn: Connection, rows: Sequence[ApiKeyRow], audit: AuditEntry, now: datetime
    ) -> None:
        if not rows:
            return
        await conn.execute(
            "INSERT INTO api_key_audit_events (event_id, action, key_id, device_id, actor, "
            "reason, display_prefix, created_at) "
            "SELECT e, %s, k, d, %s, %s, p, %s "
            "FROM unnest(%s::uuid[], %s::uuid[], %s::text[], %s::text[]) AS u(e, k, d, p)",
            (
                audit.action,
                audit.actor,
                audit.reason,
                now,
                [uuid.uuid4() for _ in rows],
                [r.id for r in rows],
                [r.device_id for r in rows],
                [r.key_prefix for r in rows],
            ),
        )


def _text(request: RequestKey | None) -> str | None:
    return str(request.request_id) if request is not None else None


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _moment(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text is not None else None
