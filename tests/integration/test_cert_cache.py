"""Cache-aside on Get and Lookup: real Redis, real PostgreSQL, the service in-process."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TypeAlias

import grpc
import psycopg
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from cert_service import certcache
from deploy.devstack.servers import RedisServer
from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from tests.conftest import standalone_only
from tests.fixtures import internal_tls
from tests.fixtures.cert import RunningCertService, StartCertService, make_csr

Stub: TypeAlias = "cert_pb2_grpc.CertificateServiceAsyncStub"
Conn = psycopg.AsyncConnection[tuple[object, ...]]
ACTIVE = cert_pb2.CERTIFICATE_STATUS_ACTIVE
EXPIRED = cert_pb2.CERTIFICATE_STATUS_EXPIRED
REVOKED = cert_pb2.CERTIFICATE_STATUS_REVOKED
DEVICE_KEY = certcache.device_key("device-1")
NAME_KEY = certcache.name_key("cached.myl.zip")


REDIS_BACKENDS = ("standalone", "cluster")


@pytest.fixture
def redis_client(redis_inspect: aioredis.Redis) -> aioredis.Redis:
    return redis_inspect


@pytest.fixture
async def cert_service(cert_service: RunningCertService) -> RunningCertService:
    """The service once it trusts Redis. Until its cache guard has applied the invalidation
    log, it answers from PostgreSQL and caches nothing; the pass at its start can fail on a
    busy machine (a budget spent waiting for a core), and the guard's next one comes only
    after its retry interval. These tests are about what it caches: they force passes until
    one has applied the log."""
    for _ in range(250):  # a pass during which anything failed does not count
        if await cert_service.app.guard.sync():
            return cert_service
        await asyncio.sleep(0.02)
    raise AssertionError("the cache guard never trusted Redis")


async def get(stub: Stub, device_id: str = "device-1") -> cert_pb2.Certificate:
    reply = await stub.GetCertificate(cert_pb2.GetCertificateRequest(device_id=device_id))
    return reply.certificate


async def lookup(stub: Stub, name: str = "cached") -> cert_pb2.Certificate:
    reply = await stub.LookupCertificate(cert_pb2.LookupCertificateRequest(uuid_subdomain=name))
    return reply.certificate


async def provision(stub: Stub, device_id: str = "device-1", name: str = "cached") -> None:
    await stub.ProvisionCertificate(
        cert_pb2.ProvisionCertificateRequest(device_id=device_id, uuid_subdomain=name)
    )


async def read_until_cached(
    redis_client: aioredis.Redis, read: Callable[[], Awaitable[object]], *keys: str
) -> None:
    """`read()` (NOT_FOUND counts as an answer) until one has filled `keys`. A read fills the
    cache only when its PostgreSQL read took less than `certcache.FILL_DEADLINE` (a change
    may have been fenced and expired meanwhile): a busy machine can make one read take that
    long, and that read is rightly not cached. The next one is."""
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await read()
        if await redis_client.exists(*keys) == len(keys):
            return
        assert time.monotonic() < deadline, f"no read filled {keys}"


async def test_provision_caches_both_entries_for_an_hour(
    cert_stub: Stub, redis_client: aioredis.Redis, db_conn: Conn
) -> None:
    await provision(cert_stub)
    for key in (DEVICE_KEY, NAME_KEY):
        assert 3_590_000 < await redis_client.pttl(key) <= 3_600_000
    # Reads are answered from Redis: a change made behind the service's back is not seen...
    await db_conn.execute("UPDATE device_certificates SET renewal_count = 41")
    assert (await get(cert_stub)).renewal_count == 0
    assert (await lookup(cert_stub)).renewal_count == 0
    # ...until the entry goes away, when PostgreSQL answers and the entry is filled again.
    await redis_client.delete(DEVICE_KEY)
    assert (await get(cert_stub)).renewal_count == 41
    await read_until_cached(redis_client, lambda: get(cert_stub), DEVICE_KEY)
    assert await redis_client.pttl(DEVICE_KEY) > 3_590_000
    assert (await get(cert_stub)).renewal_count == 41


async def test_every_change_invalidates_before_returning(
    cert_stub: Stub, cert_service: RunningCertService, redis_client: aioredis.Redis
) -> None:
    await provision(cert_stub)
    serial = (await get(cert_stub)).serial_number
    assert (await lookup(cert_stub)).serial_number == serial

    renewed = await cert_stub.RenewCertificate(
        cert_pb2.RenewCertificateRequest(device_id="device-1")
    )
    assert (await get(cert_stub)).serial_number == renewed.certificate.serial_number
    assert (await lookup(cert_stub)).serial_number == renewed.certificate.serial_number

    await cert_stub.RevokeCertificate(cert_pb2.RevokeCertificateRequest(device_id="device-1"))
    assert (await get(cert_stub)).status == REVOKED
    assert (await lookup(cert_stub)).status == REVOKED
    # After a change both keys hold a short-lived fence: reads go to PostgreSQL meanwhile.
    for key in (DEVICE_KEY, NAME_KEY):
        assert 0 < await redis_client.pttl(key) <= certcache.FENCE_TTL * 1000
    # When the fence has expired, the next read caches the new state.
    await redis_client.delete(DEVICE_KEY, NAME_KEY)
    assert (await get(cert_stub)).status == REVOKED
    await read_until_cached(redis_client, lambda: get(cert_stub), DEVICE_KEY)
    assert await redis_client.pttl(DEVICE_KEY) > 3_590_000
    assert (await get(cert_stub)).status == REVOKED

    await cert_stub.DeleteDevice(cert_pb2.DeleteDeviceRequest(device_id="device-1"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await get(cert_stub)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_slow_reader_cannot_put_a_stale_certificate_back(
    cert_stub: Stub, cert_service: RunningCertService, redis_client: aioredis.Redis
) -> None:
    await provision(cert_stub)
    stale = await get(cert_stub)
    cache = cert_service.app.certificates.cache
    read_started = time.monotonic()  # a reader loads the row...
    await cert_stub.RevokeCertificate(cert_pb2.RevokeCertificateRequest(device_id="device-1"))
    await cache.fill(DEVICE_KEY, stale, read_started)  # ...and fills after the revoke
    assert (await get(cert_stub)).status == REVOKED
    # A fill whose read started too long ago is not trusted at all.
    await redis_client.delete(DEVICE_KEY)
    await cache.fill(DEVICE_KEY, stale, time.monotonic() - certcache.FILL_DEADLINE - 1)
    assert await redis_client.get(DEVICE_KEY) is None


async def test_not_found_is_cached_briefly_and_provisioning_clears_it(
    cert_stub: Stub, redis_client: aioredis.Redis
) -> None:
    for call in (get(cert_stub), lookup(cert_stub)):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    await read_until_cached(redis_client, lambda: get(cert_stub), DEVICE_KEY)
    await read_until_cached(redis_client, lambda: lookup(cert_stub), NAME_KEY)
    for key in (DEVICE_KEY, NAME_KEY):
        assert 0 < await redis_client.pttl(key) <= 30_000
    await provision(cert_stub)
    assert (await get(cert_stub)).status == ACTIVE
    assert (await lookup(cert_stub)).device_id == "device-1"


async def test_cached_certificate_reads_expired_once_its_time_is_up(
    cert_stub: Stub, cert_service: RunningCertService, redis_client: aioredis.Redis
) -> None:
    await cert_stub.ProvisionCertificate(
        cert_pb2.ProvisionCertificateRequest(
            device_id="device-1", uuid_subdomain="cached", validity_days=1, auto_renewal=False
        )
    )
    assert (await get(cert_stub)).status == ACTIVE
    cert_service.clock.advance(days=1, seconds=1)
    assert await redis_client.exists(DEVICE_KEY)  # still the cached ACTIVE copy...
    assert (await get(cert_stub)).status == EXPIRED  # ...but it is served truthfully
    assert (await lookup(cert_stub)).status == EXPIRED


async def test_access_is_counted_in_batches_and_flushed_on_shutdown(
    cert_stub: Stub, cert_service: RunningCertService, db_conn: Conn
) -> None:
    await provision(cert_stub)
    await provision(cert_stub, "device-2", "other")
    for _ in range(5):
        await get(cert_stub)
    await lookup(cert_stub)
    await lookup(cert_stub, "api.cached.myl.zip")
    await get(cert_stub, "device-2")

    async def counts() -> dict[str, tuple[object, object]]:
        cur = await db_conn.execute(
            "SELECT device_id, access_count, last_accessed_at FROM device_certificates"
        )
        return {str(d): (n, t) for d, n, t in await cur.fetchall()}

    assert (await counts())["device-1"] == (0, None)  # no write per look-up
    assert await cert_service.app.access.flush() == 2  # one statement for both devices
    after_flush = await counts()
    assert after_flush["device-1"][0] == 7
    assert after_flush["device-2"][0] == 1
    assert after_flush["device-1"][1] is not None

    await get(cert_stub)
    await cert_service.stop()  # graceful shutdown writes what is buffered
    assert (await counts())["device-1"][0] == 8


async def test_every_rpc_works_from_postgresql_while_redis_is_down(
    start_cert_service: StartCertService,
    clean_redis: RedisServer,
    db_conn: Conn,
    redis_backend: str,
) -> None:
    standalone_only(redis_backend)
    service = await start_cert_service(REDIS_BREAKER_RESET="0.05")
    async with internal_tls.channel(service.address) as channel:
        stub = cert_pb2_grpc.CertificateServiceStub(channel)
        await provision(stub)
        await get(stub)  # cached
        clean_redis.stop()

        await provision(stub, "device-2", "no-redis")
        assert (await get(stub, "device-2")).uuid_subdomain == "no-redis.myl.zip"
        assert (await lookup(stub, "no-redis")).device_id == "device-2"
        listed = await stub.ListCertificates(cert_pb2.ListCertificatesRequest())
        assert len(listed.certificates) == 2
        await stub.RenewCertificate(
            cert_pb2.RenewCertificateRequest(
                device_id="device-1", csr_pem=make_csr(["cached.myl.zip"])
            )
        )
        revoked = await stub.RevokeCertificate(
            cert_pb2.RevokeCertificateRequest(device_id="device-1")
        )
        assert revoked.certificate.status == REVOKED
        assert (await get(stub)).status == REVOKED
        await stub.DeleteDevice(cert_pb2.DeleteDeviceRequest(device_id="device-2"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await get(stub, "device-2")
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        chain = await stub.GetCaChain(cert_pb2.GetCaChainRequest())
        assert "BEGIN CERTIFICATE" in chain.ca_chain_pem
        assert service.app.cache.breaker.is_open
        # With the circuit open, gets are served without trying Redis at all.
        before = (
            REGISTRY.get_sample_value("myl_redis_errors_total", {"kind": "short_circuit"}) or 0.0
        )
        for _ in range(50):
            await get(stub)
        after = REGISTRY.get_sample_value("myl_redis_errors_total", {"kind": "short_circuit"})
        assert (after or 0.0) - before >= 50

        # Redis returns: the service uses it again.
        clean_redis.start()
        client = aioredis.Redis(host=clean_redis.host, port=clean_redis.port)
        try:
            deadline = time.monotonic() + 5
            while not await client.exists(DEVICE_KEY):
                assert time.monotonic() < deadline, "the cache was not used again"
                await asyncio.sleep(0.06)
                await get(stub)
        finally:
            await client.aclose()
        assert (await get(stub)).status == REVOKED


async def test_a_generated_name_is_cached_once_looked_up(
    cert_stub: Stub, redis_client: aioredis.Redis
) -> None:
    reply = await cert_stub.ProvisionCertificate(
        cert_pb2.ProvisionCertificateRequest(device_id="device-1")
    )
    fqdn = reply.certificate.uuid_subdomain
    assert await redis_client.exists(DEVICE_KEY)
    assert not await redis_client.exists(certcache.name_key(fqdn))  # nobody can have asked yet
    assert (await lookup(cert_stub, fqdn)).device_id == "device-1"
    await read_until_cached(redis_client, lambda: lookup(cert_stub, fqdn), certcache.name_key(fqdn))
    assert await redis_client.pttl(certcache.name_key(fqdn)) > 3_590_000
