from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from google.protobuf import timestamp_pb2
from prometheus_client import REGISTRY
from redis.asyncio.client import Pipeline

from deploy.devstack.servers import RedisServer
from shared.cache import Cache, CircuitBreaker, cache_key
from shared.config import RedisConfig


class FakeMonotonic:
    """The circuit breaker's seconds counter (not a wall clock), set by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _short_circuits() -> float:
    value = REGISTRY.get_sample_value("myl_redis_errors_total", {"kind": "short_circuit"})
    return value or 0.0


def _cache(server: RedisServer, clock: FakeMonotonic | None = None) -> Cache:
    config = RedisConfig(host=server.host, port=server.port, socket_timeout=0.25)
    cache = Cache.from_config(config)
    cache.breaker = CircuitBreaker(3, 5.0, clock or FakeMonotonic())
    return cache


async def test_get_set_delete_with_ttl(clean_redis: RedisServer) -> None:
    cache = _cache(clean_redis)
    key = cache_key("test", "device-1", ":cert")
    assert key == "myl:test:{device-1}:cert"
    assert await cache.get(key) is None
    assert await cache.set(key, b"value", ttl=30)
    assert await cache.get(key) == b"value"
    assert cache.client is not None
    ttl_ms = await cache.client.pttl(key)
    assert 29_000 < ttl_ms <= 30_000
    assert await cache.delete(key)
    assert await cache.get(key) is None
    await cache.close()


async def test_protobuf_values_and_pipelines(clean_redis: RedisServer) -> None:
    cache = _cache(clean_redis)
    stamp = timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=5)
    await cache.set_message("myl:test:{a}", stamp, ttl=10)
    assert await cache.get_message("myl:test:{a}", timestamp_pb2.Timestamp) == stamp
    await cache.set("myl:test:{b}", b"\xff not a protobuf", ttl=10)
    assert await cache.get_message("myl:test:{b}", timestamp_pb2.Timestamp) is None

    def queue(pipe: Pipeline) -> None:
        pipe.set("myl:test:{c}", b"1")
        pipe.incrby("myl:test:{c}", 41)
        pipe.get("myl:test:{c}")

    results = await cache.pipeline(queue, default=[])
    assert list(results) == [True, 42, b"42"]

    script = cache.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    assert await script(["myl:test:{d}"], [5], default=None) == 5
    assert await script(["myl:test:{d}"], [5], default=None) == 10
    await cache.close()


async def test_redis_down_answers_misses_fast_and_recovers(clean_redis: RedisServer) -> None:
    clock = FakeMonotonic()
    cache = _cache(clean_redis, clock)
    await cache.set("myl:test:{x}", b"1", ttl=60)
    assert await cache.get("myl:test:{x}") == b"1"

    clean_redis.stop()
    # The first few calls fail on the socket and open the circuit...
    for _ in range(3):
        assert await cache.get("myl:test:{x}") is None
    assert cache.breaker.is_open
    # ...after which calls never touch the network: each is short-circuited
    # (answered from the breaker) instead of waiting for a socket timeout.
    before = _short_circuits()
    for _ in range(500):
        assert await cache.get("myl:test:{x}") is None
        assert await cache.set("myl:test:{x}", b"2", ttl=60) is False
    assert _short_circuits() - before == 1000
    # An invalidation while Redis is away is remembered.
    assert await cache.delete("myl:test:{stale}") is False

    clean_redis.start()
    stale_writer = aioredis.Redis(host=clean_redis.host, port=clean_redis.port)
    await stale_writer.set("myl:test:{stale}", b"old")
    assert await cache.get("myl:test:{y}") is None  # still open: no probe yet
    clock.now += 5.0  # the reset period passes
    assert await cache.set("myl:test:{y}", b"back", ttl=60)
    assert not cache.breaker.is_open
    assert await cache.get("myl:test:{y}") == b"back"
    assert await stale_writer.get("myl:test:{stale}") is None  # replayed invalidation
    await stale_writer.aclose()
    await cache.close()


async def test_disabled_cache_is_a_permanent_miss() -> None:
    cache = Cache.from_config(RedisConfig(enabled=False))
    assert await cache.set("k", b"v", ttl=1) is False
    assert await cache.get("k") is None
    assert await cache.delete("k") is False


@pytest.mark.parametrize("threshold", [1, 3])
def test_breaker_opens_after_threshold_and_half_opens(threshold: int) -> None:
    clock = FakeMonotonic()
    breaker = CircuitBreaker(threshold, 2.0, clock)
    for _ in range(threshold):
        assert breaker.allow()
        breaker.failure()
    assert not breaker.allow()
    clock.now += 2.0
    assert breaker.allow()  # one probe
    breaker.failure()
    assert not breaker.allow()  # failed probe re-opens at once
    clock.now += 2.0
    assert breaker.allow()
    breaker.success()
    assert breaker.allow()
    assert not breaker.is_open


def test_half_open_lets_exactly_one_probe_through_and_the_gauge_follows() -> None:
    clock = FakeMonotonic()
    breaker = CircuitBreaker(1, 2.0, clock)
    gauge = "myl_redis_circuit_open"
    breaker.failure()
    assert REGISTRY.get_sample_value(gauge) == 1.0
    clock.now += 2.0
    # Half-open: the first caller probes, every other caller is answered without Redis
    # until the probe ends.
    assert [breaker.allow() for _ in range(50)] == [True] + [False] * 49
    breaker.abandon()  # the probe's caller went away without an answer
    assert breaker.allow()
    breaker.success()
    assert REGISTRY.get_sample_value(gauge) == 0.0
    assert all(breaker.allow() for _ in range(10))
