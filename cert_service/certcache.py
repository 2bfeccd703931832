"""Cache-aside for certificate reads, on top of the shared Redis cache layer.

Two entries per certificate, `myl:cert:{<device_id>}:device` and `myl:cert:{<fqdn>}:name`,
each holding the serialized `Certificate` protobuf (TTL `CACHE_TTL`). A miss in PostgreSQL is
cached as well, as a short marker (TTL `NEGATIVE_CACHE_TTL`).

Why a change writes a *fence* instead of deleting: a reader that loaded a row just before a
change committed could otherwise put the old row back into the cache after the writer's delete,
and a revoked certificate would be served as active for an hour. So:

* readers fill the cache with SET NX only, and only when their database read took less than
  `FILL_DEADLINE` seconds;
* a change, after its commit and before its RPC returns, overwrites both keys with a fence
  marker that lives `FENCE_TTL` (> `FILL_DEADLINE`) seconds. While the fence is there, readers go
  to PostgreSQL and their NX fill fails; once it expires, the next reader caches the new row;
* a provision, which creates a row that did not exist, writes the new certificate directly
  (replacing a cached NOT_FOUND), unless a fence is there: a later change of the same device
  already happened, and its fence must stand.

Certificates are stored sealed (`shared.seal`): an entry this service did not seal for its key
is read as a miss and counted, so nobody who can write to Redis can make a revoked certificate
look active.

Every change also logs its invalidation in PostgreSQL, in the same statement
(`shared.invalidation`). When Redis does not take the fence, the cache is distrusted at once
(reads go to PostgreSQL) until a guard has applied the log; the guard fences every logged key.
`CertificateCache.changed` is what every change calls after its commit (the fence, then the
log entry marked applied); `InvalidationLog.drain` is the guard's pass.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Final

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
from redis.asyncio.client import Pipeline

from cert_service.batching import Coalescer
from cert_service.storage import CertificateStore
from myl.cert.v1 import cert_pb2
from shared.cache import Cache, cache_key
from shared.clock import Clock, micros_source
from shared.errors import DomainError
from shared.invalidation import CacheTrust, drain_log
from shared.metrics import CACHE_RESULTS
from shared.seal import Seal

NAMESPACE: Final = "cert"
# Markers start with a zero byte, which no serialized Certificate does (field 0 does not exist).
_NOT_FOUND: Final = b"\x00not-found"
_FENCE: Final = b"\x00fence"
FENCE_TTL: Final = 5.0
_FENCE_MS: Final = int(FENCE_TTL * 1000)
FILL_DEADLINE: Final = 2.0
# Concurrent publishes: at most this many pipelines in flight, each for up to this many
# certificates (see `cert_service.batching`).
_PUBLISH_IN_FLIGHT: Final = 1
_PUBLISH_BATCH: Final = 64
# KEYS[1]: the key; ARGV: value, fence marker, TTL in ms.
_PUBLISH_UNLESS_FENCED: Final = """
if redis.call('GET', KEYS[1]) == ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
"""

_HIT = CACHE_RESULTS.labels(NAMESPACE, "hit")
_NEGATIVE_HIT = CACHE_RESULTS.labels(NAMESPACE, "negative_hit")
_MISS = CACHE_RESULTS.labels(NAMESPACE, "miss")


class NotFound:
    """A cached "this certificate does not exist"."""


NOT_FOUND: Final = NotFound()


def device_key(device_id: str) -> str:
    return cache_key(NAMESPACE, device_id, ":device")


def name_key(fqdn: str) -> str:
    return cache_key(NAMESPACE, fqdn, ":name")


class InvalidationLog:
    """The logged invalidations of certificate changes (`shared.invalidation`): marking one
    applied, and the guard's drain of those not yet applied."""

    def __init__(self, store: CertificateStore, cache: Cache, ttl: float, clock: Clock) -> None:
        self.store = store
        self.cache = cache
        self.ttl = timedelta(milliseconds=_ttl_ms(ttl))
        self.clock = clock
        # Seals the cached certificates (`shared.seal`); the guard's first drain loads it.
        self.seal = Seal("certificate", _ttl_ms(ttl) * 1000)
        self.now_us = micros_source(clock)

    async def acknowledge(self, invalidation: int) -> None:
        """Mark an invalidation whose keys are fenced applied; should that fail, a guard's
        pass marks it."""
        with contextlib.suppress(DomainError):
            await self.store.acknowledge_invalidations([invalidation], self.clock.now())

    async def drain(self, replay: bool = False) -> int:
        """Fence every certificate with a pending logged invalidation
        (`shared.invalidation.drain_log`), once the seal's secret is loaded."""
        if not self.seal.ready:
            self.seal.load(await self.store.cache_secret())

        async def apply(names: Sequence[tuple[str, str]]) -> None:
            await _fence_now(
                self.cache,
                [
                    key
                    for device_id, fqdn in names
                    for key in (device_key(device_id), name_key(fqdn))
                ],
            )

        return await drain_log(self.store, apply, now=self.clock.now(), ttl=self.ttl, replay=replay)


class CertificateCache:
    def __init__(
        self,
        cache: Cache,
        trust: CacheTrust,
        ttl: float,
        negative_ttl: float,
        log: InvalidationLog,
    ) -> None:
        self.cache = cache
        self.trust = trust  # told when a change could not be fenced
        self.ttl_ms = _ttl_ms(ttl)
        self.negative_ttl_ms = int(negative_ttl * 1000)
        self.log = log
        self._publisher: Coalescer[tuple[bytes, Sequence[str]], None] = Coalescer(
            self._publish_batch, max_in_flight=_PUBLISH_IN_FLIGHT, max_batch=_PUBLISH_BATCH
        )

    async def get(self, key: str) -> cert_pb2.Certificate | NotFound | None:
        """A cached certificate, a cached NOT_FOUND, or None (go to the database)."""
        raw = await self.cache.get(key)
        if raw is None or raw == _FENCE:
            _MISS.inc()
            return None
        if raw == _NOT_FOUND:
            _NEGATIVE_HIT.inc()
            return NOT_FOUND
        body = self.log.seal.open(key, raw, self.log.now_us())
        if body is None:  # not sealed by this service for this key: as good as absent
            _MISS.inc()
            return None
        certificate = cert_pb2.Certificate()
        try:
            certificate.ParseFromString(body)
        except DecodeError:
            _MISS.inc()
            return None
        _HIT.inc()
        return certificate

    async def fill(
        self, key: str, certificate: cert_pb2.Certificate | None, read_started: float
    ) -> None:
        """Cache what the database said (None: not found), unless a change fenced the key
        or the read took too long to be trusted. `read_started` is `time.monotonic()` taken
        before the database read."""
        if time.monotonic() - read_started > FILL_DEADLINE or not self.log.seal.ready:
            return
        if certificate is None:
            if self.negative_ttl_ms <= 0:
                return
            value, ttl_ms = _NOT_FOUND, self.negative_ttl_ms
        else:
            value = self.log.seal.seal(key, certificate.SerializeToString(), self.log.now_us())
            ttl_ms = self.ttl_ms

        async def set_if_absent(client: aioredis.Redis) -> object:
            return await client.set(key, value, px=ttl_ms, nx=True)

        await self.cache.run(set_if_absent, None)

    async def publish_new(self, certificate: cert_pb2.Certificate, *keys: str) -> None:
        """Cache a just-provisioned certificate under `keys` (see the module docstring).

        Concurrent provisions share one pipelined round trip (see `cert_service.batching`)."""
        await self._publisher.submit((certificate.SerializeToString(), keys))

    async def _publish_batch(self, items: Sequence[tuple[bytes, Sequence[str]]]) -> list[None]:
        script, fence, ttl_ms = _PUBLISH_UNLESS_FENCED, _FENCE, self.ttl_ms
        seal, now_us = self.log.seal, self.log.now_us()
        if not seal.ready:  # no drain has run: Redis is not trusted yet
            return [None] * len(items)
        sealed = [(key, seal.seal(key, value, now_us)) for value, keys in items for key in keys]

        async def publish_one(client: aioredis.Redis) -> bool:
            key, value = sealed[0]
            await client.eval(script, 1, key, value, fence, ttl_ms)
            return True

        def publish(pipe: Pipeline) -> None:
            for key, value in sealed:
                pipe.eval(script, 1, key, value, fence, ttl_ms)

        if len(sealed) == 1:
            done = await self.cache.run(publish_one, False)
        else:
            done = bool(await self.cache.pipeline(publish, default=()))
        if not done:
            await self.cache.delete(*(key for _, keys in items for key in keys))
        return [None] * len(items)

    async def invalidate(self, *keys: str) -> bool:
        """Fence `keys` after a change (see the module docstring); False when Redis did not
        take it: the cache is then distrusted at once, and the change's logged invalidation
        is applied by the guard when Redis answers (`shared.invalidation`)."""
        if await self.cache.pipeline(_fences(keys), default=()):
            return True
        self.trust.distrust()
        return False

    async def changed(self, device_id: str, fqdn: str, invalidation: int) -> None:
        """Fence a changed certificate's entries, then mark its logged invalidation applied."""
        if await self.invalidate(device_key(device_id), name_key(fqdn)):
            await self.log.acknowledge(invalidation)


def _ttl_ms(ttl: float) -> int:
    return max(1, int(ttl * 1000))


async def _fence_now(cache: Cache, keys: Sequence[str]) -> None:
    """Fence `keys` whatever the circuit says; raises `CacheUnavailable` on failure."""
    queue = _fences(keys)

    async def write(client: aioredis.Redis) -> None:
        pipe = client.pipeline(transaction=False)
        queue(pipe)
        await pipe.execute()

    await cache.apply(write)


def _fences(keys: Sequence[str]) -> Callable[[Pipeline], None]:
    def fence(pipe: Pipeline) -> None:
        for key in keys:
            pipe.set(key, _FENCE, px=_FENCE_MS)

    return fence
