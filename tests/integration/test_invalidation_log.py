"""The durable invalidation log against real Redis and PostgreSQL (shared/invalidation.py).

Each test makes Redis contradict PostgreSQL the way a real outage can, and checks that the
service never answers from the stale entry once the change was acknowledged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis.asyncio as aioredis

from deploy.devstack.servers import RedisServer
from key_service import keyformat
from key_service.verify import record_key
from myl.key.v1 import key_pb2
from shared.config import ServerConfig
from tests.fixtures.clock import FakeClock
from tests.fixtures.key import RunningKeyService, start_key_service

R = key_pb2.VerifyApiKeyRequest
VALID = key_pb2.VERIFY_RESULT_VALID
REVOKED = key_pb2.VERIFY_RESULT_REVOKED
FAST = {"REDIS_BREAKER_RESET": "0.05", "REDIS_INVALIDATION_INTERVAL": "0.05"}


async def verify(service: RunningKeyService, plaintext: str) -> int:
    return (await service.stub.VerifyApiKey(R(api_key=plaintext, dry_run=True))).result


async def pending_rows(service: RunningKeyService) -> int:
    async with service.app.db.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM api_key_cache_invalidations WHERE applied_at IS NULL"
        )
        row = await cur.fetchone()
        await conn.rollback()
    assert row is not None
    return int(row[0])


async def wait_trusted(service: RunningKeyService) -> None:
    for _ in range(200):
        if not service.app.cache.breaker.is_open:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the cache guard never trusted Redis again")


async def test_a_revocation_redis_missed_survives_a_restart_of_the_service(
    make_config: Callable[..., ServerConfig], key_clock: FakeClock, clean_redis: RedisServer
) -> None:
    config = make_config("key_service", **FAST)
    service = await start_key_service(config, key_clock)
    plaintext, row = await service.issue_device_key()
    assert await verify(service, plaintext) == VALID  # cached in Redis as VALID
    stale = await aioredis.Redis(host=clean_redis.host, port=clean_redis.port).get(
        record_key(keyformat.hash_key(plaintext))
    )
    assert stale is not None

    clean_redis.stop()
    await service.stub.RevokeApiKey(key_pb2.RevokeApiKeyRequest(key_id=str(row.id)))
    assert await pending_rows(service) == 1  # Redis missed it; PostgreSQL remembers
    await service.stop()  # the process that knew about it goes away

    # Redis comes back holding the old, VALID record (as a replica that missed the write
    # would), and a new process starts.
    clean_redis.start()
    writer = aioredis.Redis(host=clean_redis.host, port=clean_redis.port)
    await writer.set(record_key(keyformat.hash_key(plaintext)), stale, px=300_000)
    service = await start_key_service(config, key_clock)
    try:
        answers = [await verify(service, plaintext) for _ in range(20)]
        assert VALID not in answers
        await wait_trusted(service)
        assert [await verify(service, plaintext) for _ in range(20)] == [REVOKED] * 20
        assert await pending_rows(service) == 0
        cached = await writer.get(record_key(keyformat.hash_key(plaintext)))
        assert cached is not None
        assert cached != stale
    finally:
        await writer.aclose()
        await service.stop()


async def test_an_acknowledged_revocation_lost_by_redis_is_applied_again(
    make_config: Callable[..., ServerConfig], key_clock: FakeClock, clean_redis: RedisServer
) -> None:
    service = await start_key_service(make_config("key_service", **FAST), key_clock)
    writer = aioredis.Redis(host=clean_redis.host, port=clean_redis.port)
    try:
        plaintext, row = await service.issue_device_key()
        key = record_key(keyformat.hash_key(plaintext))
        assert await verify(service, plaintext) == VALID
        stale = await writer.get(key)
        await service.stub.RevokeApiKey(key_pb2.RevokeApiKeyRequest(key_id=str(row.id)))
        assert await pending_rows(service) == 0  # Redis took it
        assert await verify(service, plaintext) == REVOKED

        # Redis fails over to a copy that never received the revocation: it goes away
        # (requests fail, the circuit opens) and comes back with the old record.
        clean_redis.stop()
        assert await verify(service, plaintext) == REVOKED  # from PostgreSQL meanwhile
        clean_redis.start()
        await writer.aclose()
        writer = aioredis.Redis(host=clean_redis.host, port=clean_redis.port)
        assert stale is not None
        await writer.set(key, stale, px=300_000)
        await wait_trusted(service)
        # The guard's next pass (within REDIS_INVALIDATION_INTERVAL) sees the new server and
        # replays the log; one failed request alone does not open the circuit, so a verify
        # before that pass may read the older copy (shared/invalidation.py, point 4).
        for _ in range(250):  # a pass during which anything failed does not count
            if await service.app.guard.sync():
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the guard never applied the log to the new Redis")
        assert [await verify(service, plaintext) for _ in range(20)] == [REVOKED] * 20
    finally:
        await writer.aclose()
        await service.stop()
