"""Two replicas of each service on one database and one Redis: every background job does its
work exactly once (lifecycle renewals, the delete cascade, counters, invalidations), and a
retried request lands once whichever replica it reaches."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import grpc
import psycopg

from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from myl.key.v1 import key_pb2
from shared.config import ServerConfig
from tests.fixtures import internal_tls
from tests.fixtures.cert import RunningCertService, StartCertService
from tests.fixtures.clock import FakeClock
from tests.fixtures.key import RunningKeyService, start_key_service

Conn = psycopg.AsyncConnection[tuple[object, ...]]


def cert_stub(service: RunningCertService) -> tuple[grpc.aio.Channel, Any]:
    channel = internal_tls.channel(service.address)
    return channel, cert_pb2_grpc.CertificateServiceStub(channel)


async def test_two_lifecycle_workers_renew_each_certificate_once(
    start_cert_service: StartCertService, db_conn: Conn
) -> None:
    clock = FakeClock(datetime.now(UTC), frozen=False)
    first = await start_cert_service(clock)
    second = await start_cert_service(clock)
    channel, stub = cert_stub(first)
    async with channel:
        for n in range(40):
            await stub.ProvisionCertificate(
                cert_pb2.ProvisionCertificateRequest(device_id=f"fleet-{n}", validity_days=30)
            )
    clock.advance(days=25)
    results = await asyncio.gather(first.app.lifecycle.run_once(), second.app.lifecycle.run_once())
    assert sum(r.renewed for r in results) == 40
    cur = await db_conn.execute(
        "SELECT renewal_count, count(*) FROM device_certificates GROUP BY 1"
    )
    assert await cur.fetchall() == [(1, 40)]


async def test_two_outbox_relays_deliver_each_cascade_once(
    start_cert_service: StartCertService,
    make_config: Callable[..., ServerConfig],
    db_conn: Conn,
) -> None:
    first = await start_cert_service()
    # A second replica, whose relay calls the same key_service: the one listening where the
    # first was told (KEY_SERVICE_ADDRESS).
    await start_cert_service(KEY_SERVICE_ADDRESS=first.key_service_address)
    keys = await start_key_service(
        make_config("key_service", PORT=str(first.key_service_port)),
        FakeClock(datetime.now(UTC).replace(microsecond=0), frozen=True),
        cert_address=first.address,
    )
    try:
        channel, stub = cert_stub(first)
        async with channel:
            plaintexts = []
            for n in range(10):
                await stub.ProvisionCertificate(
                    cert_pb2.ProvisionCertificateRequest(device_id=f"gone-{n}")
                )
                reply = await keys.stub.GenerateApiKey(
                    key_pb2.GenerateApiKeyRequest(device_id=f"gone-{n}")
                )
                plaintexts.append(reply.api_key)
            await keys.stop()  # key_service away: the cascades wait in the outbox
            for n in range(10):
                await stub.DeleteDevice(cert_pb2.DeleteDeviceRequest(device_id=f"gone-{n}"))
        cur = await db_conn.execute("SELECT count(*) FROM device_events_outbox")
        assert await cur.fetchone() == (10,)

        keys = await start_key_service(
            make_config("key_service", PORT=str(first.key_service_port)),
            FakeClock(datetime.now(UTC).replace(microsecond=0), frozen=True),
            cert_address=first.address,
        )
        for _ in range(100):  # both relays poll every 0.1 s
            cur = await db_conn.execute("SELECT count(*) FROM device_events_outbox")
            if await cur.fetchone() == (0,):
                break
            await asyncio.sleep(0.05)
        cur = await db_conn.execute(
            "SELECT count(*), count(DISTINCT key_id) FROM api_key_audit_events "
            "WHERE action = 'cascade_revoke'"
        )
        assert await cur.fetchone() == (10, 10)  # each key revoked by one cascade, once
        for plaintext in plaintexts:
            verified = await keys.stub.VerifyApiKey(key_pb2.VerifyApiKeyRequest(api_key=plaintext))
            assert verified.result == key_pb2.VERIFY_RESULT_REVOKED
    finally:
        await keys.stop()


async def test_counters_of_two_replicas_add_up(
    start_cert_service: StartCertService,
    make_config: Callable[..., ServerConfig],
    db_conn: Conn,
) -> None:
    replicas = [await start_cert_service(), await start_cert_service()]
    channel, stub = cert_stub(replicas[0])
    async with channel:
        await stub.ProvisionCertificate(cert_pb2.ProvisionCertificateRequest(device_id="counted"))
    for cert_replica in replicas:
        async with internal_tls.channel(cert_replica.address) as channel:
            stub = cert_pb2_grpc.CertificateServiceStub(channel)
            for _ in range(25):
                await stub.GetCertificate(cert_pb2.GetCertificateRequest(device_id="counted"))
    await asyncio.gather(*(r.app.access.flush() for r in replicas))
    cur = await db_conn.execute(
        "SELECT access_count FROM device_certificates WHERE device_id = 'counted'"
    )
    assert await cur.fetchone() == (50,)

    key_clock = FakeClock(datetime.now(UTC).replace(microsecond=0), frozen=True)
    key_replicas = [
        await start_key_service(make_config("key_service"), key_clock),
        await start_key_service(make_config("key_service"), key_clock),
    ]
    try:
        plaintext, row = await key_replicas[0].issue_device_key()
        for replica in key_replicas:
            for _ in range(30):
                verified = await replica.stub.VerifyApiKey(
                    key_pb2.VerifyApiKeyRequest(api_key=plaintext)
                )
                assert verified.result == key_pb2.VERIFY_RESULT_VALID
    finally:
        for replica in key_replicas:
            await replica.stop()  # a graceful stop flushes
    cur = await db_conn.execute("SELECT usage_count FROM device_api_keys WHERE id = %s", (row.id,))
    assert await cur.fetchone() == (60,)


async def test_a_revocation_on_one_replica_holds_on_the_other_and_a_retry_lands_once(
    cert_service: RunningCertService,
    make_config: Callable[..., ServerConfig],
    db_conn: Conn,
) -> None:
    clock = FakeClock(datetime.now(UTC).replace(microsecond=0), frozen=True)
    config = make_config("key_service", PORT="0")
    replicas: list[RunningKeyService] = [
        await start_key_service(config, clock, cert_address=cert_service.address),
        await start_key_service(config, clock, cert_address=cert_service.address),
    ]
    try:
        channel, stub = cert_stub(cert_service)
        async with channel:
            await stub.ProvisionCertificate(cert_pb2.ProvisionCertificateRequest(device_id="twin"))
        # The same retried GenerateApiKey reaches both replicas at once.
        request = key_pb2.GenerateApiKeyRequest(device_id="twin", request_id=str(uuid.uuid4()))
        outcomes = await asyncio.gather(
            *(r.stub.GenerateApiKey(request) for r in replicas), return_exceptions=True
        )
        codes = sorted(
            o.code().name if isinstance(o, grpc.aio.AioRpcError) else "OK" for o in outcomes
        )
        assert codes in (["OK", "OK"], ["ABORTED", "OK"])
        cur = await db_conn.execute(
            "SELECT count(*) FROM device_api_keys WHERE device_id = 'twin' AND revoked_at IS NULL"
        )
        assert await cur.fetchone() == (1,)  # one request id, one working key

        plaintext, row = await replicas[0].issue_device_key("twin")
        verify = key_pb2.VerifyApiKeyRequest(api_key=plaintext)
        for replica in replicas:  # cached as VALID in the shared Redis
            assert (await replica.stub.VerifyApiKey(verify)).result == key_pb2.VERIFY_RESULT_VALID
        await replicas[0].stub.RevokeApiKey(key_pb2.RevokeApiKeyRequest(key_id=str(row.id)))
        for replica in replicas:
            assert (await replica.stub.VerifyApiKey(verify)).result == (
                key_pb2.VERIFY_RESULT_REVOKED
            )
    finally:
        for replica in replicas:
            await replica.stop()
