"""Durable cache invalidation: a revocation is never forgotten, whatever Redis does.

A change that a cached entry could contradict (a key revoked or rotated, a certificate revoked,
renewed or deleted) writes an invalidation row into its service's PostgreSQL log *in the same
transaction* as the change. After the commit the service applies it to Redis and marks the row
applied; if Redis does not answer, the row stays pending. The `CacheGuard` of every replica
drains the log (applies every pending row, then marks it) every `interval` seconds, so a row
left by a replica that crashed, or that could not reach Redis, is applied by any replica that
can. Applied rows are kept for the cache TTL and deleted after it.

Why an entry can never contradict an acknowledged change:

1. The change and its log row commit together, before the RPC answers. A crash at any point
   leaves either neither or both.
2. A replica reads Redis only while its cache is *trusted*: its circuit is closed, and the
   guard closes it only after a drain that applied every row in the log succeeded, and only
   if nothing failed while it ran. A failed invalidation opens the circuit again at once;
   failed requests (a timeout, a refused connection) after `REDIS_BREAKER_THRESHOLD` in a
   row; a fresh process starts with it open. So after Redis hung, crashed or restarted, no
   replica answers from it before the log has been applied, including rows written by others
   while it was away. Reads meanwhile go to PostgreSQL, which is the truth.
3. Applying a row writes what PostgreSQL holds now, and the writes are monotonic (a key's
   cached record only ever moves towards "unusable earlier"; a certificate's entries are
   fenced), so a late or repeated application never undoes a newer one.
4. Redis may lose a write it acknowledged (a restart from an older snapshot, a failover to a
   replica that had not received it). Such an event opens the circuit when requests fail on
   it, wakes the guard when a request finds its pooled connection broken (it is retried on a
   new one, not counted as a failure), and is seen by the guard's next pass in any case (the
   server's run id changes); the drain that follows re-applies every row applied within the
   cache TTL, so no entry older than the lost write survives. A request in between may read
   the older copy: the one window of this kind, from the restart to the guard's replay, at
   most `interval` seconds.

What remains is a replica that reaches Redis while the one that made the change does not (a
partition between them, not an outage): it trusts Redis until its next drain, at most
`interval` seconds after the commit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Protocol, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from shared.cache import Cache, CacheUnavailable, CircuitBreaker
from shared.config import RedisConfig
from shared.errors import DomainError
from shared.logging import get_logger
from shared.tasks import BackgroundTask, run_periodically

log = get_logger(__name__)

# Applies every pending row of the log to Redis and marks it applied; with True, also the rows
# applied within the cache TTL. Returns how many it applied. Raises CacheUnavailable when Redis
# failed, DomainError when PostgreSQL did.
Drain = Callable[[bool], Awaitable[int]]

# What a service's log row carries to Redis: a key's current row, a certificate's names.
Entry = TypeVar("Entry")
Entry_co = TypeVar("Entry_co", covariant=True)
_DRAIN_BATCH = 500


class InvalidationLogStore(Protocol[Entry_co]):
    """A service's invalidation log table, as the drain reads and marks it."""

    async def pending_invalidations(
        self, limit: int, *, after: int = 0, applied_since: datetime | None = None
    ) -> Sequence[tuple[int, Entry_co]]:
        """Rows with ids above `after`, oldest first: the pending ones, and with
        `applied_since` also those applied since."""
        ...

    async def acknowledge_invalidations(self, ids: Sequence[int], now: datetime) -> None: ...

    async def forget_invalidations(self, applied_before: datetime) -> None: ...


async def drain_log(
    store: InvalidationLogStore[Entry],
    apply: Callable[[Sequence[Entry]], Awaitable[None]],
    *,
    now: datetime,
    ttl: timedelta,
    replay: bool = False,
) -> int:
    """Apply every pending row of a log to Redis (`apply`, which raises CacheUnavailable when
    Redis did not take them) and mark it applied, in id order, a batch at a time; `replay`:
    also the rows applied within the cache TTL. Rows applied longer ago than the TTL are
    older than any cache entry and dropped. Returns how many rows it applied."""
    since = now - ttl if replay else None
    applied = after = 0
    while True:
        batch = await store.pending_invalidations(_DRAIN_BATCH, after=after, applied_since=since)
        if batch:
            await apply([entry for _, entry in batch])
            await store.acknowledge_invalidations([ident for ident, _ in batch], now)
            applied += len(batch)
            after = batch[-1][0]
        if len(batch) < _DRAIN_BATCH:
            break
    await store.forget_invalidations(now - ttl)
    return applied


async def _run_ids(client: aioredis.Redis) -> frozenset[str]:
    """Which Redis server processes answer: a new one (a restart, a failover) may have lost
    writes the old one acknowledged."""
    if isinstance(client, RedisCluster):
        info = await client.info("server", target_nodes=RedisCluster.PRIMARIES)
    else:
        info = await client.info("server")
    nodes = info.values() if "run_id" not in info else [info]
    return frozenset(str(node.get("run_id", "")) for node in nodes if isinstance(node, dict))


class CacheTrust:
    """Whether a guarded cache may be read: its circuit breaker, and the signal to drain.

    The breaker opens after REDIS_BREAKER_THRESHOLD failures and lets no request probe Redis
    (`half_open=False`): only the guard closes it, after a drain. Any opening, and any
    change that Redis did not take (`distrust`), wakes the guard at once. The trust is built
    before what needs it, so that no one is wired after construction: the cache is built
    with its breaker, whatever applies changes to Redis (the key verifier, the certificate
    cache) with the trust, and the `CacheGuard`, last, with the trust, the cache and the
    drain those provide.
    """

    def __init__(self, config: RedisConfig) -> None:
        self.wake = asyncio.Event()
        self.breaker = CircuitBreaker(
            config.breaker_threshold,
            config.breaker_reset,
            half_open=False,
            on_trip=self.wake.set,
            on_broken=self.wake.set,
        )
        if config.enabled:
            # Untrusted until the first drain: a fresh process does not know what it missed.
            self.breaker.trip("not trusted before the invalidation log is applied", warn=False)

    def distrust(self) -> None:
        """A change could not be applied to Redis: no reads from it until the guard has
        applied the log, which it starts now."""
        self.breaker.trip()
        self.wake.set()


class CacheGuard:
    """Keeps a cache closed to reads until the durable invalidation log has been applied."""

    def __init__(
        self,
        trust: CacheTrust,
        cache: Cache,
        drain: Drain,
        *,
        interval: float,
        retry_interval: float,
    ) -> None:
        if cache.breaker is not trust.breaker:
            raise ValueError("a guarded cache is built with its trust's breaker")
        self.trust = trust
        self.cache = cache
        self.drain = drain
        self.interval = interval
        self.retry_interval = retry_interval
        self._trusted = False
        self._task = BackgroundTask("cache guard", self._run)
        self._servers: frozenset[str] | None = None

    async def sync(self) -> bool:
        """One drain; True when the log is applied and the cache trusted."""
        if self.cache.client is None:
            return False
        setbacks = self.trust.breaker.setbacks
        try:
            # An empty log proves nothing about Redis: it must answer before it is trusted.
            servers = await self.cache.apply(_run_ids)
            # After a failure, or with a new server process, Redis may have lost writes it
            # acknowledged (a restart from an older snapshot, a failover to a replica that had
            # not received them): re-apply what any live entry could predate.
            replay = self.trust.breaker.is_open or servers != self._servers
            applied = await self.drain(replay)
        except CacheUnavailable as exc:
            self.trust.breaker.trip(f"invalidation log not applied: {exc}")
            log.debug("invalidation log not applied", error=str(exc))
            return False
        except DomainError:
            return False  # PostgreSQL away: nothing new can be written to the log either
        if applied:
            log.info("cache invalidations applied from the log", count=applied, replay=replay)
        if self.trust.breaker.setbacks != setbacks:
            # Redis failed while this pass ran (a request's failure opened the circuit after
            # `replay` was decided): it may since have come back from an older copy. Not
            # trusted; the next pass replays.
            return False
        self._servers = servers
        self.trust.breaker.success()
        return True

    def start(self) -> None:
        if self.cache.client is not None:
            self._task.start()

    async def stop(self) -> None:
        await self._task.stop()

    async def _run(self) -> None:
        await run_periodically("cache guard", self._pass, self._delay, wake=self.trust.wake)

    async def _pass(self) -> None:
        self._trusted = False  # until this pass says otherwise, also when it raises
        self._trusted = await self.sync()

    def _delay(self) -> float:
        return self.interval if self._trusted else self.retry_interval
