"""What the stores do about a write whose caller was told OUTCOME_UNKNOWN (shared/db.py).

The resolvers run once the write has settled; these tests run them on writes that did take
effect (the case that matters) and on writes a retry has claimed since, which they must leave
alone. `tests/faults/test_freezes.py` shows them at work under real freezes.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from cert_service.storage import CertificateStore, NewCertificate, NewRow
from deploy.devstack.servers import PostgresServer
from key_service.storage import ACTION_CREATE, AuditEntry, KeyStore, NewKeyRow
from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from shared.config import DatabaseConfig
from shared.db import Database, open_database
from shared.idempotency import RequestKey
from tests.fixtures.cert import RunningCertService, make_csr

AUDIT = AuditEntry(ACTION_CREATE, "test", "")


@pytest.fixture
async def db(pg_server: PostgresServer, database: str) -> AsyncIterator[Database]:
    config = DatabaseConfig(
        host=pg_server.host, port=pg_server.port, name=database, user=pg_server.user
    )
    opened = await open_database(config, "test")
    try:
        yield opened
    finally:
        await opened.close()


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


async def key_state(
    conn: psycopg.AsyncConnection[tuple[object, ...]], key_id: uuid.UUID
) -> tuple[object, ...]:
    cur = await conn.execute(
        "SELECT revoked_at IS NOT NULL, request_id, expires_at FROM device_api_keys WHERE id = %s",
        (key_id,),
    )
    row = await cur.fetchone()
    assert row is not None
    return row


async def test_a_key_nobody_received_is_revoked_and_its_request_id_released(
    db: Database, db_conn: psycopg.AsyncConnection[tuple[object, ...]]
) -> None:
    store = KeyStore(db)
    now = datetime.now(UTC)
    request = RequestKey(uuid.uuid4(), b"fingerprint")
    created, _ = await store.create(new_key("unheld", now), AUDIT, now, request=request)
    await store.undo_unknown_create(created, request, now)
    revoked, request_id, _ = await key_state(db_conn, created.id)
    assert revoked is True
    assert request_id is None  # the caller's retry creates a key it receives
    cur = await db_conn.execute(
        "SELECT count(*) FROM api_key_audit_events WHERE key_id = %s AND action = 'revoke'",
        (created.id,),
    )
    assert await cur.fetchone() == (1,)


async def test_a_key_a_retry_claimed_is_left_alone(
    db: Database, db_conn: psycopg.AsyncConnection[tuple[object, ...]]
) -> None:
    store = KeyStore(db)
    now = datetime.now(UTC)
    request = RequestKey(uuid.uuid4(), b"fingerprint")
    first, _ = await store.create(new_key("claimed", now), AUDIT, now, request=request)
    # The retry came first: it superseded the first key and holds the request id now.
    second, _ = await store.create(
        new_key("claimed", now), AUDIT, now, request=request, supersedes=first
    )
    await store.undo_unknown_create(first, request, now)
    await store.undo_unknown_create(second, None, now)  # not as it was created: claimed
    assert (await key_state(db_conn, second.id))[:2] == (False, request.request_id)


async def test_a_rotation_nobody_heard_of_gives_the_device_its_key_back(
    db: Database, db_conn: psycopg.AsyncConnection[tuple[object, ...]]
) -> None:
    store = KeyStore(db)
    now = datetime.now(UTC)
    original, _ = await store.create(new_key("rotated", now), AUDIT, now)
    request = RequestKey(uuid.uuid4(), b"fingerprint")
    async with store.rotation("rotated", request, now) as conn:
        old = await store.lock_for_rotation(conn, original.id)
        assert old is not None
        retired, successor, _ = await store.finish_rotation(
            conn,
            old,
            new_key("rotated", now, rotated_from=old.id),
            retire_at=now,
            actor="test",
            now=now,
            request=request,
        )
    assert (await key_state(db_conn, original.id))[0] is True
    await store.undo_unknown_rotation(old, retired, successor, request, now)
    assert await key_state(db_conn, original.id) == (False, None, original.expires_at)
    assert (await key_state(db_conn, successor.id))[:2] == (True, None)
    # Resolved twice (a second replica, say): nothing more changes.
    await store.undo_unknown_rotation(old, retired, successor, request, now)
    assert await key_state(db_conn, original.id) == (False, None, original.expires_at)


def new_row(device: str, now: datetime) -> NewRow:
    serial = uuid.uuid4().hex
    certificate = NewCertificate(
        serial_number=serial,
        fingerprint_sha256=serial,
        not_before=now,
        not_after=now + timedelta(days=90),
        data={"public_key_sha256": serial, "dns_names": [f"{device}.myl.zip"]},
    )
    return NewRow(device, f"{device}.myl.zip", "single", True, certificate, now)


async def test_a_provision_nobody_heard_of_is_deleted_unless_it_changed_since(
    db: Database, db_conn: psycopg.AsyncConnection[tuple[object, ...]]
) -> None:
    store = CertificateStore(db)
    now = datetime.now(UTC)
    unheard, changed = new_row("unheard", now), new_row("changed", now)
    assert await store.insert(unheard) is not None
    assert await store.insert(changed) is not None
    # A retry replaced the second one's certificate meanwhile (or a renewal, a revocation).
    await db_conn.execute(
        "UPDATE device_certificates SET updated_at = updated_at + interval '1 second' "
        "WHERE device_id = 'changed'"
    )
    await store.undo_unknown_inserts([unheard, changed])
    cur = await db_conn.execute(
        "SELECT device_id FROM device_certificates WHERE device_id IN ('unheard', 'changed')"
    )
    assert await cur.fetchall() == [("changed",)]
    cur = await db_conn.execute(
        "SELECT count(*) FROM certificate_cache_invalidations WHERE device_id = 'unheard'"
    )
    assert await cur.fetchone() == (1,)


async def test_a_provision_its_retry_returned_is_not_deleted_afterwards(
    cert_service: RunningCertService,
    cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub,
    db_conn: psycopg.AsyncConnection[tuple[object, ...]],
) -> None:
    """The caller of a provision with a CSR heard OUTCOME_UNKNOWN and retried at once: the
    retry returned the stored certificate, so the resolver, running after it, keeps it."""
    name = "claimed-csr.myl.zip"
    request = cert_pb2.ProvisionCertificateRequest(
        device_id="claimed-csr",
        uuid_subdomain=name,
        csr_pem=make_csr([name, f"*.{name}"]),
        request_id=str(uuid.uuid4()),
    )
    first = await cert_stub.ProvisionCertificate(request)
    retried = await cert_stub.ProvisionCertificate(request)
    assert retried.certificate.serial_number == first.certificate.serial_number
    row = new_row("claimed-csr", datetime.now(UTC))
    stored = NewRow(
        row.device_id,
        name,
        row.certificate_type,
        row.auto_renewal,
        replace(row.certificate, serial_number=first.certificate.serial_number),
        row.now,
    )
    await cert_service.app.store.undo_unknown_inserts([stored])
    cur = await db_conn.execute(
        "SELECT serial_number FROM device_certificates WHERE device_id = 'claimed-csr'"
    )
    assert await cur.fetchone() == (first.certificate.serial_number,)
