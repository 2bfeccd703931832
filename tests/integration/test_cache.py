from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis.asyncio as aioredis
from google.protobuf import timestamp_pb2
from prometheus_client import REGISTRY
from redis.asyncio.client import Pipeline

from deploy.devstack.servers import RedisServer
from shared.cache import Cache, CircuitBreaker, cache_key
from shared.config import RedisConfig
from shared.invalidation import CacheGuard, CacheTrust


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
    return Cache.from_config(config, CircuitBreaker(3, 5.0, clock or FakeMonotonic()))


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


async def test_connections_broken_by_a_redis_restart_cost_no_request_a_miss(
    clean_redis: RedisServer,
) -> None:
    """Every pooled connection dies with the server; the next use of each must not turn a
    cached read into a miss (it would go to PostgreSQL, and fail while that is away too)."""
    cache = _cache(clean_redis)
    keys = [f"myl:test:{{pooled-{n}}}" for n in range(8)]
    # Eight reads at once: eight pooled connections.
    await asyncio.gather(*(cache.set(key, b"v", ttl=60) for key in keys))
    assert cache.client is not None
    pool = cache.client.connection_pool
    assert len(pool._available_connections) >= 8

    clean_redis.stop()
    clean_redis.start()
    refill = aioredis.Redis(host=clean_redis.host, port=clean_redis.port)
    await asyncio.gather(*(refill.set(key, b"v") for key in keys))
    await refill.aclose()

    failures = cache.breaker.setbacks
    broken: list[None] = []
    cache.breaker.on_broken = lambda: broken.append(None)
    assert await asyncio.gather(*(cache.get(key) for key in keys)) == [b"v"] * len(keys)
    assert cache.breaker.setbacks == failures
    # ... but each broken connection is told (a guard looks for a restarted Redis at once).
    assert len(broken) >= 8
    await cache.close()


async def test_a_guard_is_woken_when_a_request_finds_redis_restarted(
    clean_redis: RedisServer,
) -> None:
    config = RedisConfig(host=clean_redis.host, port=clean_redis.port, socket_timeout=0.25)
    trust = CacheTrust(config)
    cache = Cache.from_config(config, trust.breaker)
    trust.breaker.success()
    await cache.set("myl:test:{woken}", b"v", ttl=60)
    trust.wake.clear()
    clean_redis.stop()
    clean_redis.start()
    assert await cache.get("myl:test:{woken}") is None  # a new, empty Redis, reached
    assert trust.wake.is_set()
    assert not trust.breaker.is_open
    await cache.close()


@contextmanager
def hung(server: RedisServer) -> Iterator[None]:
    """Redis stops answering (its process is stopped) but keeps its connections open."""
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


async def test_a_hung_redis_gets_one_probe_per_reset_period_and_the_one_after_it_closes(
    clean_redis: RedisServer,
) -> None:
    clock = FakeMonotonic()
    cache = _cache(clean_redis, clock)
    key = "myl:test:{probe}"
    assert await cache.set(key, b"1", ttl=60)
    with hung(clean_redis):
        assert await asyncio.gather(*(cache.get(key) for _ in range(3))) == [None] * 3
        assert cache.breaker.is_open
        clock.now += 5.0  # the reset period passes
        # Half-open: one caller waits on the hung Redis, every other is answered at once.
        before = _short_circuits()
        assert await asyncio.gather(*(cache.get(key) for _ in range(20))) == [None] * 20
        assert _short_circuits() - before == 19
        assert cache.breaker.is_open  # the probe failed: open for another period
    # Redis answers again, but nothing asks it before the next period.
    before = _short_circuits()
    assert await cache.get(key) is None
    assert _short_circuits() - before == 1
    clock.now += 5.0
    results = await asyncio.gather(*(cache.get(key) for _ in range(20)))
    assert sorted(results, key=lambda r: r or b"") == [None] * 19 + [b"1"]  # the probe's
    assert not cache.breaker.is_open
    assert await cache.get(key) == b"1"
    await cache.close()


async def test_a_guarded_cache_is_read_only_after_its_guard_applied_the_log(
    clean_redis: RedisServer,
) -> None:
    """No request probes a guarded cache, however long its circuit has been open (here the
    reset period is zero): the guard closes it after a drain, a change Redis did not take
    opens it and wakes the guard, and a hung Redis keeps it open until a drain succeeds."""
    config = RedisConfig(
        host=clean_redis.host, port=clean_redis.port, socket_timeout=0.25, breaker_reset=0.0
    )
    trust = CacheTrust(config)
    with pytest.raises(ValueError, match="breaker"):
        CacheGuard(trust, Cache.from_config(config), _no_rows, interval=60, retry_interval=60)
    cache = Cache.from_config(config, trust.breaker)
    replays: list[bool] = []

    async def drain(replay: bool) -> int:
        replays.append(replay)
        return 0

    guard = CacheGuard(trust, cache, drain, interval=60, retry_interval=60)
    key = "myl:test:{guarded}"
    writer = aioredis.Redis(host=clean_redis.host, port=clean_redis.port)
    await writer.set(key, b"cached")
    # A fresh process: Redis answers, but is not read before the log is applied.
    before = _short_circuits()
    assert [await cache.get(key) for _ in range(5)] == [None] * 5
    assert _short_circuits() - before == 5
    assert await guard.sync()
    assert replays == [True]  # it may have missed anything: every recent row is re-applied
    assert await cache.get(key) == b"cached"

    trust.wake.clear()
    trust.distrust()  # a change Redis did not take
    assert trust.wake.is_set()
    assert await cache.get(key) is None
    with hung(clean_redis):
        assert not await guard.sync()
        before = _short_circuits()
        assert [await cache.get(key) for _ in range(5)] == [None] * 5
        assert _short_circuits() - before == 5  # none of them waited on the hung Redis
    assert await guard.sync()
    assert replays == [True, True]  # the drain under the hang never reached the log
    assert await cache.get(key) == b"cached"
    await writer.aclose()
    await cache.close()


async def _no_rows(replay: bool) -> int:
    return 0


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


async def test_a_request_answered_after_the_circuit_opened_does_not_close_a_guarded_one(
    clean_redis: RedisServer,
) -> None:
    """Only the guard closes a guarded circuit: a request that Redis answered but whose caller
    resumed after other requests had opened the circuit (Redis hung meanwhile, or failed over
    to a copy that may have lost writes) says nothing about Redis now, nor about the
    invalidation log."""
    config = RedisConfig(host=clean_redis.host, port=clean_redis.port, socket_timeout=0.25)
    trust = CacheTrust(config)
    cache = Cache.from_config(config, trust.breaker)
    trust.breaker.success()  # the guard's first pass
    await cache.set("myl:test:{late}", b"v", ttl=60)
    answered = asyncio.Event()
    resume = asyncio.Event()

    async def late_get(client: aioredis.Redis) -> bytes | str | None:
        value = await client.get("myl:test:{late}")
        answered.set()
        await resume.wait()  # its caller runs again only after the circuit has opened
        return value

    late = asyncio.create_task(cache.run(late_get, None))
    await answered.wait()
    with hung(clean_redis):
        for _ in range(config.breaker_threshold):
            assert await cache.get("myl:test:{late}") is None  # timed out: counted
        assert trust.breaker.is_open
        resume.set()
        assert await late == b"v"
        assert trust.breaker.is_open, "a request answered before the hang closed the circuit"
        assert await cache.get("myl:test:{late}") is None  # still answered without Redis
    trust.breaker.success()  # the guard, once it has applied the log
    assert await cache.get("myl:test:{late}") == b"v"
    await cache.close()


def test_a_half_open_circuit_is_closed_by_its_probe_not_by_an_earlier_request() -> None:
    clock = FakeMonotonic()
    breaker = CircuitBreaker(1, 2.0, clock)
    breaker.failure()
    breaker.answered()  # a request that began before the circuit opened
    assert breaker.is_open
    clock.now += 2.0
    assert breaker.allow()  # the probe
    breaker.answered()
    assert not breaker.is_open
