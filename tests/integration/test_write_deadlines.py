"""The database enforces a write's deadline: UNAVAILABLE means nothing was written.

A write that waits at the server (on another transaction's uncommitted row with the same
device, name or request id, or on a table lock) is answered UNAVAILABLE by its deadline, and
when the other transaction then rolls back, the write the caller was told failed does not
happen after all: the server ended its wait (`shared.db.WRITE_GUARD`) or refuses it once it
runs.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import grpc
import psycopg
import pytest

from deploy.devstack.servers import PostgresServer
from key_service.storage import ACTION_CREATE, AuditEntry, KeyStore, NewKeyRow
from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from shared.config import DatabaseConfig
from shared.db import open_database
from shared.errors import DomainError, ErrorKind
from shared.idempotency import RequestKey
from tests.fixtures.cert import RunningCertService, error_reason

P = cert_pb2.ProvisionCertificateRequest
# The services' default (DB_OPERATION_TIMEOUT).
OPERATION_TIMEOUT = 0.5


def hold_uncommitted_row(
    holder: psycopg.Connection[tuple[object, ...]], device: str, name: str
) -> None:
    """Another session inserts a row for `device`/`name` and keeps its transaction open."""
    holder.execute(
        "INSERT INTO device_certificates (device_id, uuid_subdomain, certificate_data, "
        "serial_number, fingerprint_sha256, issued_at, expires_at) "
        "VALUES (%s, %s, '{}', 'held', 'held', now(), now() + interval '1 day')",
        (device, name),
    )


async def settled(conn: psycopg.AsyncConnection[tuple[object, ...]], database: str) -> None:
    """Wait until no statement of the services is running any more in `database` (one the
    server kept running for a caller that was answered ends now, one way or the other)."""
    while True:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
            "AND application_name = 'myl' AND state = 'active'",
            (database,),
        )
        if await cur.fetchone() == (0,):
            return
        await asyncio.sleep(0.02)


async def rows_of(conn: psycopg.AsyncConnection[tuple[object, ...]], device: str) -> int:
    cur = await conn.execute(
        "SELECT count(*) FROM device_certificates WHERE device_id = %s", (device,)
    )
    row = await cur.fetchone()
    assert row is not None
    return int(str(row[0]))


@pytest.mark.parametrize("conflict", ["device", "name"])
async def test_a_provision_answered_unavailable_while_waiting_on_a_row_is_never_committed(
    conflict: str,
    cert_service: RunningCertService,
    cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub,
    pg_server: PostgresServer,
    database: str,
    db_conn: psycopg.AsyncConnection[tuple[object, ...]],
) -> None:
    for attempt in range(5):
        device = f"waiting-{conflict}-{attempt}"
        name = f"{device}.myl.zip"
        held_device = device if conflict == "device" else f"other-{device}"
        held_name = name if conflict == "name" else f"other-{name}"
        with psycopg.connect(pg_server.conninfo(database)) as holder:
            hold_uncommitted_row(holder, held_device, held_name)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await cert_stub.ProvisionCertificate(
                    P(device_id=device, uuid_subdomain=name, request_id=str(uuid.uuid4())),
                    timeout=10,
                )
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            # Not written; or, when the watchdog had to cut the connection on a busy
            # machine, "outcome unknown", which the service resolves itself within seconds.
            reason = error_reason(caught.value)
            assert reason in ("WRITE_NOT_COMPLETED", "OUTCOME_UNKNOWN"), reason
            holder.rollback()
        await settled(db_conn, database)
        deadline = time.monotonic() + (5 if reason == "OUTCOME_UNKNOWN" else 0)
        for _ in range(200):  # resolution is polled: it happens in the service
            if not await rows_of(db_conn, device) or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        assert await rows_of(db_conn, device) == 0
    # The device can be provisioned now, and the service never thought the database down.
    done = await cert_stub.ProvisionCertificate(P(device_id="waiting-after"), timeout=10)
    assert done.certificate.device_id == "waiting-after"
    assert cert_service.app.db.up


async def test_provisions_queued_behind_a_table_lock_are_answered_by_their_deadline(
    cert_service: RunningCertService,
    cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub,
    pg_server: PostgresServer,
    database: str,
    db_conn: psycopg.AsyncConnection[tuple[object, ...]],
) -> None:
    count = 40
    latencies: list[float] = []

    async def provision(index: int) -> grpc.StatusCode:
        started = time.monotonic()
        try:
            await cert_stub.ProvisionCertificate(
                P(device_id=f"locked-{index}", request_id=str(uuid.uuid4())), timeout=10
            )
        except grpc.aio.AioRpcError as error:
            return error.code()
        finally:
            latencies.append(time.monotonic() - started)
        return grpc.StatusCode.OK

    with psycopg.connect(pg_server.conninfo(database)) as holder:
        holder.execute("LOCK TABLE device_certificates IN SHARE ROW EXCLUSIVE MODE")
        codes = await asyncio.gather(*(provision(i) for i in range(count)))
        holder.rollback()
    assert set(codes) == {grpc.StatusCode.UNAVAILABLE}
    latencies.sort()
    print(
        f"\n{count} provisions behind a table lock, answered after: "
        f"p50 {statistics.median(latencies):.3f}s, max {latencies[-1]:.3f}s "
        f"(DB_OPERATION_TIMEOUT {OPERATION_TIMEOUT}s)"
    )
    # Nothing they were told failed happens once the lock is gone.
    await settled(db_conn, database)
    cur = await db_conn.execute(
        "SELECT count(*) FROM device_certificates WHERE device_id LIKE 'locked-%'"
    )
    assert await cur.fetchone() == (0,)
    done = await cert_stub.ProvisionCertificate(P(device_id="locked-after"), timeout=10)
    assert done.certificate.device_id == "locked-after"


async def test_a_key_answered_unavailable_while_waiting_on_its_request_id_is_never_stored(
    pg_server: PostgresServer,
    db_config: Callable[..., DatabaseConfig],
    database: str,
    db_conn: psycopg.AsyncConnection[tuple[object, ...]],
) -> None:
    config = db_config(
        sslmode="disable",
        operation_timeout=OPERATION_TIMEOUT,
    )
    db = await open_database(config, "key_service")
    store = KeyStore(db)
    now = datetime.now(UTC)
    try:
        for attempt in range(5):
            request = RequestKey(uuid.uuid4(), b"fingerprint")
            key = NewKeyRow(
                id=uuid.uuid4(),
                device_id=f"key-device-{attempt}",
                key_hash=os.urandom(32),
                key_prefix="myl_test",
                device_name="",
                user_initials="",
                uuid_subdomain="",
                permissions=["api:access"],
                rate_limit=10,
                expires_at=now + timedelta(days=1),
            )
            with psycopg.connect(pg_server.conninfo(database)) as holder:
                # Another attempt of the same request, not committed yet.
                holder.execute(
                    "INSERT INTO device_api_keys (id, device_id, key_hash, key_prefix, "
                    "expires_at, request_id, request_hash) "
                    "VALUES (gen_random_uuid(), %s, %s, 'myl_held', %s, %s, 'x')",
                    (key.device_id, os.urandom(32), key.expires_at, request.request_id),
                )
                with pytest.raises(DomainError) as caught:
                    await store.create(
                        key, AuditEntry(ACTION_CREATE, "test", ""), now, request=request
                    )
                assert caught.value.kind is ErrorKind.UNAVAILABLE
                assert caught.value.reason == "WRITE_NOT_COMPLETED"
                holder.rollback()
            await settled(db_conn, database)
            cur = await db_conn.execute(
                "SELECT count(*) FROM device_api_keys WHERE id = %s", (key.id,)
            )
            assert await cur.fetchone() == (0,)
        assert db.up
    finally:
        await db.close()
