"""shared.limits against a real Redis: shared buckets, refunds, one round trip, fallback."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from redis.crc import key_slot

from deploy.devstack.servers import RedisClusterServers, RedisServer
from shared.cache import Cache
from shared.config import RedisConfig
from shared.errors import DomainError, ErrorKind
from shared.limits import (
    SECOND_US,
    Bucket,
    Limit,
    Limiter,
    LimitName,
    LimitSet,
    LocalBuckets,
    gcra,
)
from shared.monitoring import redis_info
from tests.fixtures.clock import FakeClock

NAME = LimitName.CERTIFICATES_PER_DEVICE_NAME
KEYS = LimitName.NEW_API_KEYS_PER_DEVICE


def _limits(**by_name: Limit) -> LimitSet:
    defaults = dict(LimitSet.builtin().defaults)
    defaults.update({LimitName[name]: limit for name, limit in by_name.items()})
    return LimitSet(defaults, {})


@pytest.fixture
async def caches(clean_redis: RedisServer) -> AsyncIterator[tuple[Cache, Cache]]:
    """Two replicas' caches on the same Redis."""
    config = RedisConfig(host=clean_redis.host, port=clean_redis.port, breaker_reset=60)
    first, second = Cache.from_config(config), Cache.from_config(config)
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


async def test_a_bucket_is_shared_by_every_replica(caches: tuple[Cache, Cache]) -> None:
    clock = FakeClock(datetime.now(UTC), frozen=True)
    limits = _limits(CERTIFICATES_PER_DEVICE_NAME=Limit(5, 5, 7 * 24 * 3600 * SECOND_US))
    one, two = (Limiter(cache, limits, clock) for cache in caches)
    bucket = Bucket(NAME, "shared.myl.zip")
    for limiter in (one, two, one, two, one):
        await limiter.spend(bucket)
    with pytest.raises(DomainError) as refused:
        await two.spend(bucket)
    error = refused.value
    assert error.kind is ErrorKind.RESOURCE_EXHAUSTED
    assert error.reason == "CERTIFICATES_PER_DEVICE_NAME_EXCEEDED"
    assert error.metadata == {"limit": "CertificatesPerDeviceName", "id": "shared.myl.zip"}
    assert error.retry_after == pytest.approx(7 * 24 * 3600 / 5)  # the next slot
    clock.advance(timedelta(days=7) / 5)
    await one.spend(bucket)


async def test_a_refund_gives_the_request_back(caches: tuple[Cache, Cache]) -> None:
    clock = FakeClock(datetime.now(UTC), frozen=True)
    limiter = Limiter(
        caches[0], _limits(NEW_API_KEYS_PER_DEVICE=Limit(2, 2, 3600 * SECOND_US)), clock
    )
    bucket = Bucket(KEYS, "device-1")
    await limiter.spend(bucket)
    spend = await limiter.spend(bucket)
    await spend.refund()
    await spend.refund()  # once only
    await limiter.spend(bucket)
    with pytest.raises(DomainError):
        await limiter.spend(bucket)


async def test_one_refusal_refunds_the_other_buckets(caches: tuple[Cache, Cache]) -> None:
    clock = FakeClock(datetime.now(UTC), frozen=True)
    limits = _limits(
        NEW_DEVICES_PER_OPERATOR_KEY=Limit(3, 3, 3600 * SECOND_US),
        CERTIFICATES_PER_DEVICE_NAME=Limit(1, 1, 3600 * SECOND_US),
    )
    limiter = Limiter(caches[0], limits, clock)
    operator = Bucket(LimitName.NEW_DEVICES_PER_OPERATOR_KEY, "key-1")
    await limiter.spend(operator, Bucket(NAME, "a.myl.zip"))
    for _ in range(3):
        with pytest.raises(DomainError, match="CertificatesPerDeviceName"):
            await limiter.spend(operator, Bucket(NAME, "a.myl.zip"))
    # The three refused provisions cost the operator key nothing: two more fit.
    await limiter.spend(operator, Bucket(NAME, "b.myl.zip"))
    await limiter.spend(operator, Bucket(NAME, "c.myl.zip"))
    with pytest.raises(DomainError, match="NewDevicesPerOperatorKey"):
        await limiter.spend(operator, Bucket(NAME, "d.myl.zip"))


async def test_redis_and_python_agree_on_every_decision(caches: tuple[Cache, Cache]) -> None:
    clock = FakeClock(datetime.now(UTC), frozen=True)
    limit = Limit(4, 7, 70 * SECOND_US)
    limiter = Limiter(caches[0], _limits(NEW_API_KEYS_PER_DEVICE=limit), clock)
    bucket = Bucket(KEYS, "agree")
    rng = random.Random(10)
    tat: int | None = None
    for _ in range(200):
        clock.advance(seconds=rng.choice([0, 0, 1, 3, 10, 40]))
        now_us = int(clock.now().timestamp() * 1_000_000)
        new_tat, expected = gcra(tat, now_us, limit, 1, spend=True)
        tat = new_tat if new_tat is not None else tat
        refusal: DomainError | None = None
        try:
            await limiter.spend(bucket)
        except DomainError as refused:
            refusal = refused
        assert (refusal is None) == expected.allowed
        if refusal is not None:
            assert refusal.retry_after == max(1, -(-expected.retry_after_us // SECOND_US))
        dry_run = gcra(tat, now_us, limit, 1, spend=False)[1]
        assert (await limiter.check(bucket)).allowed == dry_run.allowed


async def test_with_redis_away_each_replica_limits_conservatively(
    caches: tuple[Cache, Cache], clean_redis: RedisServer
) -> None:
    clock = FakeClock(datetime.now(UTC), frozen=True)
    limits = _limits(NEW_API_KEYS_PER_DEVICE=Limit(20, 20, 24 * 3600 * SECOND_US))
    limiter = Limiter(caches[0], limits, clock, LocalBuckets())
    bucket = Bucket(KEYS, "offline-device")
    await limiter.spend(bucket)
    clean_redis.stop()
    # Unseen by this replica's fallback: burst spent but one request, then one per 72 minutes.
    spend = await limiter.spend(bucket)
    with pytest.raises(DomainError) as refused:
        await limiter.spend(bucket)
    assert refused.value.retry_after == 72 * 60
    await spend.refund()
    await limiter.spend(bucket)
    clock.advance(minutes=72)
    await limiter.spend(bucket)


async def test_limits_run_unchanged_on_a_cluster(redis_cluster: RedisClusterServers) -> None:
    redis_cluster.flush()
    nodes = tuple((node.host, node.port) for node in redis_cluster.nodes)
    cache = Cache.from_config(RedisConfig(cluster_nodes=nodes, socket_timeout=0.5))
    try:
        clock = FakeClock(datetime.now(UTC), frozen=True)
        limits = _limits(
            NEW_DEVICES_PER_OPERATOR_KEY=Limit(3, 3, 3600 * SECOND_US),
            CERTIFICATES_PER_DEVICE_NAME=Limit(1, 1, 3600 * SECOND_US),
        )
        limiter = Limiter(cache, limits, clock, LocalBuckets())
        operator = Bucket(LimitName.NEW_DEVICES_PER_OPERATOR_KEY, "cluster-key")
        names = [Bucket(NAME, f"n{n}.myl.zip") for n in range(3)]
        assert len({key_slot(b.key.encode()) for b in [operator, *names]}) > 1
        await limiter.spend(operator, names[0])
        with pytest.raises(DomainError, match="CertificatesPerDeviceName"):
            await limiter.spend(operator, names[0])  # refused: the operator's spend refunded
        spend = await limiter.spend(operator, names[1])
        await spend.refund()
        await limiter.spend(operator, names[1])
        await limiter.spend(operator, names[2])
        with pytest.raises(DomainError, match="NewDevicesPerOperatorKey"):
            await limiter.spend(operator, Bucket(NAME, "n3.myl.zip"))
        assert not cache.breaker.is_open
        assert len(limiter.local) == 0  # every decision came from the cluster
        # The resource sampler's INFO works on a cluster too (summed over its nodes).
        info = await cache.apply(redis_info)
        assert info.used_memory > 0
        assert info.connected_clients >= 3
        assert info.policies == {"noeviction"}
    finally:
        await cache.close()
