"""Writes whose callers were never told of them are undone (shared/outcomes.py).

A write is confirmed (its marker deleted) before it is answered. These tests make the
confirmation fail (a trigger refuses the DELETE that carries the caller's deadline: the
confirmation, never a claim, an undo or a sweep), so the write stands committed but is
answered OUTCOME_UNKNOWN; then either the process that made it undoes it, or that process is
gone (its Database closed before it could) and another replica's sweep does, unless the
caller's retry with the same request_id claimed it first. `tests/faults/test_unconfirmed.py`
shows the same with real processes, SIGKILL and a frozen PostgreSQL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

import grpc
import psycopg
import pytest
import redis.asyncio as aioredis
from psycopg import sql

from cert_service.storage import CertificateStore, NewCertificate, NewRow
from key_service import keyformat
from key_service.storage import ACTION_CREATE, AuditEntry, KeyChange, KeyStore, NewKeyRow
from key_service.verify import record_key
from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from myl.key.v1 import key_pb2
from shared.config import DatabaseConfig
from shared.db import Database, open_database
from shared.errors import DomainError
from shared.idempotency import RequestKey
from tests.fixtures.cert import RunningCertService, error_reason
from tests.fixtures.key import RunningKeyService

AUDIT = AuditEntry(ACTION_CREATE, "test", "")
KEY_MARKERS = "api_key_unconfirmed_writes"
CERT_MARKERS = "certificate_unconfirmed_writes"
Conn = psycopg.AsyncConnection[tuple[object, ...]]


@pytest.fixture
def config(db_config: Callable[..., DatabaseConfig]) -> DatabaseConfig:
    return db_config()


@pytest.fixture
async def db(config: DatabaseConfig) -> AsyncIterator[Database]:
    opened = await open_database(config, "test")
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def sweeper(config: DatabaseConfig) -> AsyncIterator[Database]:
    """Another replica's database, whose sweep takes every marker, however young."""
    opened = await open_database(dataclasses.replace(config, unconfirmed_grace=0.0), "test")
    try:
        yield opened
    finally:
        await opened.close()


async def refuse_confirmations(conn: Conn, table: str, *, undo_too: bool = False) -> None:
    """Make the confirmation of writes fail; with `undo_too`, their owner's undo as well (it
    is retried until the owner "dies": its Database is closed)."""
    # The confirmation is the one DELETE of markers that carries its caller's deadline.
    condition = "TRUE" if undo_too else "current_query() LIKE 'DELETE%%lock_timeout%%'"
    await conn.execute(
        f"""
        CREATE OR REPLACE FUNCTION refuse_confirmation() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF {condition} THEN
                RAISE EXCEPTION 'confirmation refused by the test';
            END IF;
            RETURN OLD;
        END $$
        """.encode()
    )
    await conn.execute(
        sql.SQL(
            "CREATE TRIGGER refuse_confirmation BEFORE DELETE ON {} "
            "FOR EACH ROW EXECUTE FUNCTION refuse_confirmation()"
        ).format(sql.Identifier(table))
    )


async def markers(conn: Conn, table: str) -> list[str]:
    cur = await conn.execute(
        sql.SQL("SELECT subject FROM {} ORDER BY 1").format(sql.Identifier(table))
    )
    return [str(row[0]) for row in await cur.fetchall()]


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.05)


async def outcome_unknown(write: Awaitable[object]) -> None:
    with pytest.raises(DomainError) as caught:
        await write
    assert caught.value.reason == "OUTCOME_UNKNOWN"


def new_key(device: str, now: datetime, **fields: object) -> NewKeyRow:
    values: dict[str, object] = {
        "id": uuid.uuid4(),
        "device_id": device,
        "key_hash": os.urandom(32),
        "key_prefix": "myl_test",
        "device_name": "",
        "user_initials": "",
        "uuid_subdomain": "",
        "permissions": ["api:access"],
        "rate_limit": 10,
        "expires_at": now + timedelta(days=30),
        **fields,
    }
    return NewKeyRow(**values)  # type: ignore[arg-type]


async def key_state(conn: Conn, key_id: uuid.UUID) -> tuple[object, ...]:
    cur = await conn.execute(
        "SELECT revoked_at IS NOT NULL, request_id, expires_at FROM device_api_keys WHERE id = %s",
        (key_id,),
    )
    row = await cur.fetchone()
    assert row is not None
    return row


async def revoked(conn: Conn, key_id: uuid.UUID) -> bool:
    return (await key_state(conn, key_id))[0] is True


def new_row(device: str, now: datetime, request_id: uuid.UUID | None = None) -> NewRow:
    serial = uuid.uuid4().hex
    certificate = NewCertificate(
        serial_number=serial,
        fingerprint_sha256=serial,
        not_before=now,
        not_after=now + timedelta(days=90),
        data={"public_key_sha256": serial, "dns_names": [f"{device}.myl.zip"]},
    )
    return NewRow(
        device,
        f"{device}.myl.zip",
        "single",
        True,
        certificate,
        now,
        request_id,
        b"fingerprint" if request_id else None,
    )


async def devices(conn: Conn, *names: str) -> list[object]:
    cur = await conn.execute(
        "SELECT device_id FROM device_certificates WHERE device_id = ANY(%s) ORDER BY 1",
        (list(names),),
    )
    return [row[0] for row in await cur.fetchall()]


async def test_a_write_answered_with_success_was_confirmed(db: Database, db_conn: Conn) -> None:
    now = datetime.now(UTC)
    await KeyStore(db).create(new_key("confirmed", now), AUDIT, now)
    await CertificateStore(db).insert_batch(
        [new_row("confirmed-a", now), new_row("confirmed-b", now)]
    )
    assert await markers(db_conn, KEY_MARKERS) == []
    assert await markers(db_conn, CERT_MARKERS) == []


async def test_a_key_whose_confirmation_failed_is_answered_outcome_unknown_and_revoked(
    db: Database, db_conn: Conn
) -> None:
    await refuse_confirmations(db_conn, KEY_MARKERS)
    store = KeyStore(db)
    now = datetime.now(UTC)
    request = RequestKey(uuid.uuid4(), b"fingerprint")
    key = new_key("unconfirmed", now)
    await outcome_unknown(store.create(key, AUDIT, now, request=request))
    # Committed, and undone by the process that made it as soon as it knew.
    await eventually(lambda: revoked(db_conn, key.id))
    assert (await key_state(db_conn, key.id))[1] is None  # the retry creates a key it receives
    assert await markers(db_conn, KEY_MARKERS) == []
    cur = await db_conn.execute(
        "SELECT count(*) FROM api_key_audit_events WHERE key_id = %s AND action = 'revoke'",
        (key.id,),
    )
    assert await cur.fetchone() == (1,)


async def test_keys_a_dead_replica_left_are_revoked_by_a_sweep_unless_a_retry_claimed_them(
    db: Database, sweeper: Database, db_conn: Conn
) -> None:
    await refuse_confirmations(db_conn, KEY_MARKERS, undo_too=True)
    owner = KeyStore(db)
    now = datetime.now(UTC)
    unclaimed, claimed = new_key("left", now), new_key("left", now)
    request = RequestKey(uuid.uuid4(), b"fingerprint")
    await outcome_unknown(owner.create(unclaimed, AUDIT, now))
    await outcome_unknown(owner.create(claimed, AUDIT, now, request=request))
    await db.close()  # the replica dies before it could undo them (its undo was refused)
    assert sorted(await markers(db_conn, KEY_MARKERS)) == sorted(
        [str(unclaimed.id), str(claimed.id)]
    )
    await db_conn.execute("DROP TRIGGER refuse_confirmation ON api_key_unconfirmed_writes")

    other = KeyStore(sweeper)
    earlier = await other.get(claimed.id)
    retried, _ = await other.create(
        new_key("left", now), AUDIT, now, request=request, supersedes=earlier
    )
    assert await other.unconfirmed.sweep() == 1
    assert await revoked(db_conn, unclaimed.id)
    assert await revoked(db_conn, claimed.id)  # by the retry that claimed it
    assert (await key_state(db_conn, retried.id))[:2] == (False, request.request_id)
    assert await markers(db_conn, KEY_MARKERS) == []


async def test_a_rotation_a_dead_replica_left_gives_the_device_its_key_back(
    db: Database, sweeper: Database, db_conn: Conn
) -> None:
    owner = KeyStore(db)
    now = datetime.now(UTC)
    original, _ = await owner.create(new_key("rotated", now), AUDIT, now)
    await refuse_confirmations(db_conn, KEY_MARKERS, undo_too=True)
    request = RequestKey(uuid.uuid4(), b"fingerprint")

    async def rotate() -> None:
        async with owner.rotation("rotated", request, now) as conn:
            old = await owner.lock_for_rotation(conn, original.id)
            assert old is not None
            await owner.finish_rotation(
                conn,
                old,
                new_key("rotated", now, rotated_from=old.id),
                retire_at=now,
                actor="test",
                now=now,
                request=request,
            )

    await outcome_unknown(rotate())
    await db.close()
    assert await revoked(db_conn, original.id)
    await db_conn.execute("DROP TRIGGER refuse_confirmation ON api_key_unconfirmed_writes")
    sweep = KeyStore(sweeper).unconfirmed.sweep
    assert await sweep() == 1
    assert await key_state(db_conn, original.id) == (False, None, original.expires_at)
    assert await sweep() == 0  # nothing is undone twice


async def test_provisions_a_dead_replica_left_are_deleted_by_a_sweep_unless_a_retry_claimed_them(
    db: Database, sweeper: Database, db_conn: Conn
) -> None:
    await refuse_confirmations(db_conn, CERT_MARKERS, undo_too=True)
    now = datetime.now(UTC)
    request_id = uuid.uuid4()
    unclaimed, claimed = new_row("left-cert", now), new_row("claimed-cert", now, request_id)
    await outcome_unknown(CertificateStore(db).insert_batch([unclaimed, claimed]))
    await db.close()
    assert await devices(db_conn, "left-cert", "claimed-cert") == ["claimed-cert", "left-cert"]
    await db_conn.execute("DROP TRIGGER refuse_confirmation ON certificate_unconfirmed_writes")

    other = CertificateStore(sweeper)
    serial = claimed.certificate.serial_number
    assert await other.claim_provision("claimed-cert", request_id, serial, now) is not None
    assert await other.unconfirmed.sweep() == 1
    assert await devices(db_conn, "left-cert", "claimed-cert") == ["claimed-cert"]
    cur = await db_conn.execute(
        "SELECT count(*) FROM certificate_cache_invalidations WHERE device_id = 'left-cert'"
    )
    assert await cur.fetchone() == (1,)
    assert await markers(db_conn, CERT_MARKERS) == []


async def test_a_provision_whose_confirmation_failed_is_undone_and_its_retry_provisions(
    cert_service: RunningCertService,
    cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub,
    db_conn: Conn,
) -> None:
    """Through the service: the caller hears OUTCOME_UNKNOWN, the service deletes the
    certificate it stored, and the retry with the same request_id gets one that is kept."""
    await refuse_confirmations(db_conn, CERT_MARKERS)
    request = cert_pb2.ProvisionCertificateRequest(
        device_id="refused", request_id=str(uuid.uuid4())
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cert_stub.ProvisionCertificate(request)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_reason(caught.value) == "OUTCOME_UNKNOWN"

    async def gone() -> bool:
        return await devices(db_conn, "refused") == []

    await eventually(gone)
    await db_conn.execute("DROP TRIGGER refuse_confirmation ON certificate_unconfirmed_writes")
    retried = await cert_stub.ProvisionCertificate(request)
    got = await cert_stub.GetCertificate(cert_pb2.GetCertificateRequest(device_id="refused"))
    assert got.certificate.serial_number == retried.certificate.serial_number
    assert await markers(db_conn, CERT_MARKERS) == []


async def test_a_marker_no_undo_knows_waits_and_does_not_hold_up_the_others(
    sweeper: Database, db_conn: Conn
) -> None:
    """A kind this replica cannot undo (a newer replica's, during an upgrade) keeps its
    marker for one that can; the sweep goes on with the rest."""
    store = KeyStore(sweeper)
    now = datetime.now(UTC)
    left, _ = await store.create(new_key("leftover", now), AUDIT, now)
    await db_conn.execute(
        "INSERT INTO api_key_unconfirmed_writes (subject, kind, args, created_at) VALUES "
        "('from-a-newer-replica', 'renewal', '{}', now() - interval '1 hour'), "
        "(%s, 'create', '{\"request_id\": null}', now())",
        (str(left.id),),
    )
    assert await store.unconfirmed.sweep() == 1
    assert await revoked(db_conn, left.id)
    assert await markers(db_conn, KEY_MARKERS) == ["from-a-newer-replica"]


async def test_a_rotation_nobody_heard_of_gives_the_device_its_key_back_through_the_cache(
    key_service: RunningKeyService, db_conn: Conn, redis_inspect: aioredis.Redis
) -> None:
    """Undoing a rotation makes the old key usable again, which the cache must take although
    the rotation's record (revoked) is usable for less time: the restored row is a newer
    version (migration 0008), and a record only gives way to a newer version of its row
    (key_service/verify.py). Published in the other order, the older state stays out."""
    plaintext, row = await key_service.issue_device_key("rotated-cached")
    verify = key_pb2.VerifyApiKeyRequest(api_key=plaintext)
    assert (await key_service.stub.VerifyApiKey(verify)).result == key_pb2.VERIFY_RESULT_VALID
    await refuse_confirmations(db_conn, KEY_MARKERS)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await key_service.stub.RotateApiKey(key_pb2.RotateApiKeyRequest(key_id=str(row.id)))
    assert error_reason(caught.value) == "OUTCOME_UNKNOWN"
    store, verifier = key_service.app.store, key_service.app.verifier

    async def restored() -> bool:  # the owner's undo has committed
        current = await store.get(row.id)
        return current is not None and current.revoked_at is None

    async def applied() -> bool:  # the guard has applied every logged invalidation
        cur = await db_conn.execute(
            "SELECT count(*) FROM api_key_cache_invalidations WHERE applied_at IS NULL"
        )
        return await cur.fetchone() == (0,)

    await eventually(restored)
    await eventually(applied)
    current = await store.get(row.id)
    assert current is not None
    # The rotation's state (revoked, the version before the undo) is what Redis holds...
    rotated = dataclasses.replace(
        current, revoked_at=key_service.clock.now(), version=current.version - 1
    )
    cached = record_key(keyformat.hash_key(plaintext))
    await redis_inspect.delete(cached)
    await verifier.publish(KeyChange([rotated], []))
    assert (await key_service.stub.VerifyApiKey(verify)).result == key_pb2.VERIFY_RESULT_REVOKED
    # ...until the undo's invalidation is applied: the key verifies again, from the cache.
    await verifier.drain_invalidations(replay=True)
    assert (await key_service.stub.VerifyApiKey(verify)).result == key_pb2.VERIFY_RESULT_VALID
    record = await redis_inspect.get(cached)
    assert isinstance(record, bytes)
    assert record.split(b"|")[4] == str(current.version).encode()
    # A replica publishing the rotation late does not bring the revoked state back.
    await verifier.publish(KeyChange([rotated], []))
    assert (await key_service.stub.VerifyApiKey(verify)).result == key_pb2.VERIFY_RESULT_VALID
