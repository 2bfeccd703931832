"""The Redis cache layer shared by both services.

Redis is a cache, never the source of truth. Every call goes through a circuit
breaker: after `breaker_threshold` consecutive failures the circuit opens and
calls answer at once (a miss for reads, nothing for writes) for
`breaker_reset` seconds; then exactly one call probes Redis again. A down
Redis thus costs microseconds per call instead of a timeout.

Invalidations that security depends on are not kept here but in PostgreSQL,
in the same transaction as the change (`shared.invalidation`): a guarded cache
is built with its guard's breaker (`CacheTrust.breaker`), which no request
probes: the cache is trusted only while that log has been applied, and its
circuit is closed by the guard, never by a request. Other failed deletes are remembered in memory
and replayed when Redis answers again; every entry has a TTL.

Keys are `myl:<namespace>:{<tag>}<suffix>`: the hash tag keeps all keys of one
entity in one Redis Cluster slot, so pipelines and scripts run unchanged on a
cluster.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError, Message
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from shared.config import RedisConfig
from shared.logging import get_logger
from shared.metrics import CIRCUIT_OPEN, REDIS_ERRORS, REDIS_LATENCY

M = TypeVar("M", bound=Message)
T = TypeVar("T")

log = get_logger(__name__)


def cache_key(namespace: str, tag: str, suffix: str = "") -> str:
    """`myl:<namespace>:{<tag>}<suffix>`; `tag` decides the cluster slot."""
    return f"myl:{namespace}:{{{tag}}}{suffix}"


class CircuitBreaker:
    """Closed, open, or half-open with exactly one probe in flight.

    Closed: every call goes to Redis; `threshold` consecutive failures open it (`trip` opens
    it at once). Open: calls are answered without Redis. After `reset_after` seconds one call,
    and only one, is let through as a probe (half-open): its success closes the circuit, its
    failure re-opens it for another `reset_after`. The `myl_redis_circuit_open` gauge follows
    the state exactly.

    A guarded breaker (`half_open=False`, built by `shared.invalidation.CacheTrust`) lets no
    call probe: only its guard closes it (`success`), once the invalidation log is applied.
    `on_trip` is told whenever the circuit opens (the guard drains the log then), and
    `on_broken` whenever a connection to Redis is found broken, which a request then retries
    on a new one without counting a failure: Redis may have restarted from an older copy
    (the guard looks at once).
    """

    def __init__(
        self,
        threshold: int,
        reset_after: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        half_open: bool = True,
        on_trip: Callable[[], None] = lambda: None,
        on_broken: Callable[[], None] = lambda: None,
    ) -> None:
        self.threshold = threshold
        self.reset_after = reset_after
        self.clock = clock
        self.half_open = half_open
        self.on_trip = on_trip
        self.on_broken = on_broken
        self.failures = 0
        self.opened_at: float | None = None
        # Every failure and trip, open or not: whoever closes the circuit after work of its
        # own (the cache guard's drain) closes it only if none happened meanwhile.
        self.setbacks = 0
        self.probing = False

    def allow(self) -> bool:
        if self.opened_at is None:
            return True
        if not self.half_open:
            return False
        if self.probing or self.clock() - self.opened_at < self.reset_after:
            return False
        self.probing = True
        return True

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def answered(self) -> None:
        """A request that Redis answered. The failure count starts again; an open circuit is
        closed by its probe (half-open) and by nothing else here: a request that began before
        the circuit opened and was answered then says nothing about Redis since. A guarded
        circuit is closed only by its guard (`success`)."""
        if self.opened_at is None:
            self.failures = 0
        elif self.probing:
            self.success()

    def success(self) -> None:
        """Close the circuit: the probe succeeded, or the guard has applied the log."""
        self.failures = 0
        self.probing = False
        if self.opened_at is not None:
            self.opened_at = None
            CIRCUIT_OPEN.set(0)
            log.info("redis circuit closed")

    def failure(self) -> None:
        self.setbacks += 1
        if self.probing:
            self.probing = False
            self.opened_at = self.clock()
            return
        self.failures += 1
        if self.failures >= self.threshold:
            self.trip()

    def abandon(self) -> None:
        """The probe ended without an answer (its caller was cancelled): allow another."""
        self.probing = False

    def trip(self, reason: str = "", *, warn: bool = True) -> None:
        """Open now, whatever the count, saying why (`reason`, else the failure count). A
        fresh process opens it before it has applied the invalidation log: nothing has
        failed then, so `warn=False` logs it as information."""
        self.setbacks += 1
        self.probing = False
        if self.opened_at is None:
            self.opened_at = self.clock()
            CIRCUIT_OPEN.set(1)
            why = {"reason": reason} if reason else {"failures": self.failures}
            (log.warning if warn else log.info)("redis circuit opened", **why)
            self.on_trip()


class _RetryBrokenOnce(Retry):
    """One immediate retry of a call whose connection was broken (nothing else), each broken
    connection told to the breaker (`CircuitBreaker.on_broken`)."""

    def __init__(self, breaker: CircuitBreaker) -> None:
        super().__init__(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
        self._breaker = breaker

    def __deepcopy__(self, memo: dict[int, object]) -> _RetryBrokenOnce:
        # redis-py copies the retry into each connection: the copies tell the same breaker.
        return _RetryBrokenOnce(self._breaker)

    async def call_with_retry(
        self,
        do: Callable[[], Awaitable[T]],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        async def failed(error: Exception, *count: int) -> Any:
            self._breaker.on_broken()
            return await fail(error, *count)

        return await super().call_with_retry(do, failed, is_retryable, with_failure_count)


class CacheUnavailable(Exception):
    """Redis did not do what `Cache.apply` asked."""


async def _delete_each(client: aioredis.Redis, keys: Sequence[str]) -> None:
    """DEL per key in one pipelined round trip: keys with different hash tags
    live in different cluster slots, where one multi-key DEL would fail."""
    if len(keys) == 1:
        await client.delete(keys[0])
        return
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.delete(key)
    await pipe.execute()


class Cache:
    """get/set/delete with TTL, protobuf values, pipelines and scripts."""

    def __init__(self, client: aioredis.Redis | None, breaker: CircuitBreaker) -> None:
        self.client = client
        self.breaker = breaker
        self._pending_deletes: set[str] = set()

    @classmethod
    def from_config(cls, config: RedisConfig, breaker: CircuitBreaker | None = None) -> Cache:
        """A cache behind `breaker`: a guard's (`shared.invalidation.CacheTrust`) for a
        guarded cache, by default one of its own from `config`."""
        if breaker is None:
            breaker = CircuitBreaker(config.breaker_threshold, config.breaker_reset)
        if not config.enabled:
            return cls(None, breaker)
        if config.cluster_nodes:
            # redis-py's cluster client: routes by slot, follows MOVED/ASK, re-reads the slot
            # map after errors. Every key carries a hash tag, so each call and each script
            # touches one slot.
            cluster = RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in config.cluster_nodes],
                username=config.username or None,
                password=config.password or None,
                socket_timeout=config.socket_timeout,
                socket_connect_timeout=config.socket_timeout,
                max_connections=256,
                retry=Retry(NoBackoff(), 0),
            )
            return cls(cast(aioredis.Redis, cluster), breaker)
        client = aioredis.Redis(
            host=config.host,
            port=config.port,
            username=config.username or None,
            password=config.password or None,
            db=config.db,
            socket_timeout=config.socket_timeout,
            socket_connect_timeout=config.socket_timeout,
            health_check_interval=0,
            max_connections=256,
            # One immediate retry, on a broken connection only: after Redis restarted, each
            # pooled connection fails once when next used (the old socket is gone), and the
            # request would go to PostgreSQL for nothing, or fail while PostgreSQL is away.
            # Nothing else is retried (not a timeout): the circuit breaker decides when to
            # try again, and a retry loop would hold every call while Redis is down.
            retry=_RetryBrokenOnce(breaker),
        )
        return cls(client, breaker)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    @property
    def available(self) -> bool:
        return self.client is not None and not self.breaker.is_open

    async def run(self, operation: Callable[[aioredis.Redis], Awaitable[T]], default: T) -> T:
        """Run one Redis operation behind the breaker; `default` when Redis is away."""
        client = self.client
        breaker = self.breaker
        if client is None:
            return default
        if breaker.opened_at is not None and not breaker.allow():
            REDIS_ERRORS.labels("short_circuit").inc()
            return default
        started = time.perf_counter()
        try:
            if self._pending_deletes:
                await self._replay_deletes(client)
            result = await operation(client)
        except (RedisError, OSError) as exc:
            breaker.failure()
            REDIS_ERRORS.labels(type(exc).__name__).inc()
            return default
        except BaseException:
            breaker.abandon()
            raise
        REDIS_LATENCY.observe(time.perf_counter() - started)
        if breaker.failures or breaker.probing:
            breaker.answered()
        return result

    async def apply(self, operation: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """Run `operation` whatever the circuit says; raise `CacheUnavailable` on failure.

        For the invalidation guard, which must know whether Redis really did it."""
        client = self.client
        if client is None:
            raise CacheUnavailable("no Redis configured")
        try:
            return await operation(client)
        except (RedisError, OSError) as exc:
            REDIS_ERRORS.labels(type(exc).__name__).inc()
            raise CacheUnavailable(str(exc)) from exc

    async def _replay_deletes(self, client: aioredis.Redis) -> None:
        keys = list(self._pending_deletes)
        await _delete_each(client, keys)
        self._pending_deletes.difference_update(keys)
        log.info("replayed cache invalidations", count=len(keys))

    async def get(self, key: str) -> bytes | None:
        async def op(client: aioredis.Redis) -> bytes | None:
            value = await client.get(key)
            return value if isinstance(value, bytes) else None

        return await self.run(op, None)

    async def set(self, key: str, value: bytes, ttl: float) -> bool:
        async def op(client: aioredis.Redis) -> bool:
            return bool(await client.set(key, value, px=max(1, int(ttl * 1000))))

        return await self.run(op, False)

    async def delete(self, *keys: str) -> bool:
        """Invalidate; when Redis is away the keys are deleted once it is back."""

        async def op(client: aioredis.Redis) -> bool:
            await _delete_each(client, keys)
            return True

        done = await self.run(op, False)
        if not done and self.client is not None:
            self._pending_deletes.update(keys)
        return done

    async def get_message(self, key: str, message_type: type[M]) -> M | None:
        raw = await self.get(key)
        if raw is None:
            return None
        message = message_type()
        try:
            message.ParseFromString(raw)
        except DecodeError:
            return None
        return message

    async def set_message(self, key: str, message: Message, ttl: float) -> bool:
        return await self.set(key, message.SerializeToString(), ttl)

    async def pipeline(
        self, build: Callable[[Pipeline], None], default: Sequence[Any]
    ) -> Sequence[Any]:
        """Run the commands `build` queues in one round trip (no MULTI)."""

        async def op(client: aioredis.Redis) -> Sequence[Any]:
            pipe = client.pipeline(transaction=False)
            build(pipe)
            result: list[Any] = await pipe.execute()
            return result

        return await self.run(op, default)

    def register_script(self, source: str) -> Script:
        return Script(self, source)


class Script:
    """A Lua script run with EVALSHA (loading it on first use) behind the breaker."""

    def __init__(self, cache: Cache, source: str) -> None:
        self.cache = cache
        self.source = source
        self._script = cache.client.register_script(source) if cache.client is not None else None

    async def __call__(self, keys: Sequence[str], args: Sequence[Any], default: T) -> Any | T:
        script = self._script
        if script is None:
            return default

        async def op(_: aioredis.Redis) -> Any:
            return await script(keys=list(keys), args=list(args))

        return await self.cache.run(op, default)
