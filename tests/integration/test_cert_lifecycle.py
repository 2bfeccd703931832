"""The lifecycle worker, driven by `run_once()` under a fake clock (no sleeping)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import TypeAlias

import psycopg

from cert_service.lifecycle import LifecycleResult
from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from tests.fixtures import internal_tls
from tests.fixtures.cert import RunningCertService, StartCertService
from tests.fixtures.clock import FakeClock

Stub: TypeAlias = "cert_pb2_grpc.CertificateServiceAsyncStub"
Conn = psycopg.AsyncConnection[tuple[object, ...]]
ACTIVE = cert_pb2.CERTIFICATE_STATUS_ACTIVE
EXPIRED = cert_pb2.CERTIFICATE_STATUS_EXPIRED


async def provision(
    stub: Stub, device_id: str, validity_days: int = 0, auto_renewal: bool = True
) -> cert_pb2.Certificate:
    reply = await stub.ProvisionCertificate(
        cert_pb2.ProvisionCertificateRequest(
            device_id=device_id,
            uuid_subdomain=device_id,
            validity_days=validity_days,
            auto_renewal=auto_renewal,
        )
    )
    return reply.certificate


async def get(stub: Stub, device_id: str) -> cert_pb2.Certificate:
    reply = await stub.GetCertificate(cert_pb2.GetCertificateRequest(device_id=device_id))
    return reply.certificate


async def test_renews_at_two_thirds_of_the_lifetime_with_the_same_key(
    cert_stub: Stub, cert_service: RunningCertService
) -> None:
    worker = cert_service.app.lifecycle
    clock = cert_service.clock
    short = await provision(cert_stub, "short", validity_days=30)
    default = await provision(cert_stub, "default")  # 90 days
    manual = await provision(cert_stub, "manual", auto_renewal=False)
    assert await worker.run_once() == LifecycleResult(renewed=0, expired=0, failed=0)

    clock.advance(days=20)  # just short of 0.6667 * 30 days
    assert (await worker.run_once()).renewed == 0
    clock.advance(minutes=2)
    assert await worker.run_once() == LifecycleResult(renewed=1, expired=0, failed=0)
    renewed = await get(cert_stub, "short")  # the cache was invalidated
    assert renewed.serial_number != short.serial_number
    assert renewed.public_key_sha256 == short.public_key_sha256
    assert renewed.renewal_count == 1
    assert renewed.not_after.seconds - renewed.not_before.seconds == 30 * 86400
    assert (await get(cert_stub, "default")).serial_number == default.serial_number

    clock.advance(days=19)  # day 39: nothing is due
    assert (await worker.run_once()).renewed == 0
    clock.advance(days=21, hours=1)  # past day 60: the 90-day one, and the 30-day one again
    assert (await worker.run_once()).renewed == 2
    assert (await get(cert_stub, "default")).serial_number != default.serial_number
    assert (await get(cert_stub, "short")).renewal_count == 2
    assert (await get(cert_stub, "manual")).serial_number == manual.serial_number


async def test_marks_expired_certificates_and_reads_are_truthful_before_that(
    cert_stub: Stub, cert_service: RunningCertService, db_conn: Conn
) -> None:
    await provision(cert_stub, "brief", validity_days=1, auto_renewal=False)
    await provision(cert_stub, "lasting", validity_days=10, auto_renewal=False)
    assert (await get(cert_stub, "brief")).status == ACTIVE

    cert_service.clock.advance(days=1, seconds=1)
    # Expired now, though no pass has run yet.
    assert (await get(cert_stub, "brief")).status == EXPIRED
    cur = await db_conn.execute("SELECT status FROM device_certificates WHERE device_id = 'brief'")
    assert await cur.fetchone() == ("active",)

    result = await cert_service.app.lifecycle.run_once()
    assert result == LifecycleResult(renewed=0, expired=1, failed=0)
    cur = await db_conn.execute("SELECT device_id, status FROM device_certificates ORDER BY 1")
    assert await cur.fetchall() == [("brief", "expired"), ("lasting", "active")]
    assert (await get(cert_stub, "brief")).status == EXPIRED
    assert (await get(cert_stub, "lasting")).status == ACTIVE
    assert (await cert_service.app.lifecycle.run_once()).expired == 0


async def test_an_overdue_auto_renewing_certificate_is_renewed_not_expired(
    cert_stub: Stub, cert_service: RunningCertService
) -> None:
    await provision(cert_stub, "overdue", validity_days=2)
    cert_service.clock.advance(days=3)
    assert (await get(cert_stub, "overdue")).status == EXPIRED
    assert await cert_service.app.lifecycle.run_once() == LifecycleResult(1, 0, 0)
    assert (await get(cert_stub, "overdue")).status == ACTIVE


async def test_a_key_that_cannot_be_re_signed_switches_auto_renewal_off(
    cert_stub: Stub, cert_service: RunningCertService, db_conn: Conn
) -> None:
    await provision(cert_stub, "broken", validity_days=3)
    await provision(cert_stub, "fine", validity_days=3)
    await db_conn.execute(
        "UPDATE device_certificates SET certificate_data = certificate_data || "
        """'{"public_key_pem": "garbage"}' WHERE device_id = 'broken'"""
    )
    cert_service.clock.advance(days=2, hours=1)
    assert await cert_service.app.lifecycle.run_once() == LifecycleResult(1, 0, 1)
    assert (await get(cert_stub, "broken")).auto_renewal is False
    assert (await get(cert_stub, "fine")).renewal_count == 1


async def test_replicas_share_the_work_without_renewing_twice(
    start_cert_service: StartCertService, db_conn: Conn
) -> None:
    clock = FakeClock(datetime.now(UTC), frozen=False)
    replicas = [await start_cert_service(clock=clock, LIFECYCLE_BATCH_SIZE="4") for _ in range(3)]
    async with internal_tls.channel(replicas[0].address) as channel:
        stub = cert_pb2_grpc.CertificateServiceStub(channel)
        await asyncio.gather(*(provision(stub, f"device-{i}", validity_days=3) for i in range(30)))
        await asyncio.gather(
            *(provision(stub, f"lapsing-{i}", 1, auto_renewal=False) for i in range(10))
        )
    clock.advance(timedelta(days=2, hours=1))
    results = await asyncio.gather(*(r.app.lifecycle.run_once() for r in replicas))
    assert sum(r.renewed for r in results) == 30
    assert sum(r.expired for r in results) == 10
    cur = await db_conn.execute(
        "SELECT renewal_count, status, count(*) FROM device_certificates GROUP BY 1, 2 ORDER BY 1"
    )
    assert await cur.fetchall() == [(0, "expired", 10), (1, "active", 30)]
