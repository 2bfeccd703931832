"""Key verification: the hot path behind VerifyApiKey and the gateway's Check.

1. Shape and checksum (`keyformat.is_well_formed`): a malformed key is
   NOT_FOUND with no I/O.
2. One Redis round trip: a Lua script GETs the cached key record and applies
   GCRA to the key's rate-limit state atomically (`ratelimit.VERIFY_SCRIPT`).
3. On a cache miss, one PostgreSQL read by key hash, then one script call that
   stores the record and applies GCRA. Unknown keys are cached as unknown for
   `negative_cache_ttl` seconds.
4. With Redis away (the shared circuit breaker returns our default), the key
   is read from PostgreSQL and limited by the in-process `LocalLimiter`.

Results, in order: NOT_FOUND, REVOKED, EXPIRED, RATE_LIMITED,
INSUFFICIENT_PERMISSIONS, VALID. Every non-dry-run verify of a live key
counts against its rate limit, whether or not it then lacks a permission.
Usage (count, last use) is counted for VALID results only.

The cached record is `usable_until_us|rate_limit|expires_us|revoked_us|version|`
followed by a serialized VerifyApiKeyResponse carrying the key's identity. It
holds neither the key nor anything derived from it beyond what the Redis key
name (the SHA-256 hash) already says.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Final

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from key_service import keyformat
from key_service.permissions import ADMIN
from key_service.ratelimit import POPULATE_SCRIPT, VERIFY_SCRIPT, Decision, LocalLimiter
from key_service.scriptclient import Script, ScriptRunner
from key_service.storage import ApiKeyRow, KeyChange, KeyStore
from key_service.usage import UsageBuffer
from myl.key.v1 import key_pb2
from shared.cache import Cache
from shared.clock import Clock, micros_source, to_micros
from shared.errors import DomainError
from shared.invalidation import CacheTrust, drain_log
from shared.metrics import CACHE_RESULTS
from shared.seal import Seal

VALID: Final = key_pb2.VERIFY_RESULT_VALID
NOT_FOUND: Final = key_pb2.VERIFY_RESULT_NOT_FOUND
EXPIRED: Final = key_pb2.VERIFY_RESULT_EXPIRED
REVOKED: Final = key_pb2.VERIFY_RESULT_REVOKED
RATE_LIMITED: Final = key_pb2.VERIFY_RESULT_RATE_LIMITED
INSUFFICIENT_PERMISSIONS: Final = key_pb2.VERIFY_RESULT_INSUFFICIENT_PERMISSIONS

NEGATIVE_RECORD: Final = b"-"
VERIFY: Final = Script(VERIFY_SCRIPT)
POPULATE: Final = Script(POPULATE_SCRIPT)
_NAMESPACE: Final = "myl:key:{"
_MEMO_LIMIT: Final = 50_000

# Publishes a changed key's record. KEYS[1]: the record; ARGV[1]: the new record, ARGV[2]:
# its TTL in ms. The newer version of the row wins (a version is taken in the order changes
# commit, migration 0008), so replicas publishing out of order cannot bring back an older
# state, and a revocation undone reaches the cache. For the same version (a record published
# twice), the one usable for less time stays.
PUBLISH_SCRIPT: Final = """
local function header(record)
  local fields, start = {}, 1
  for i = 1, 5 do
    local stop = string.find(record, '|', start, true)
    if not stop then return nil end
    fields[i] = tonumber(string.sub(record, start, stop - 1))
    if not fields[i] then return nil end
    start = stop + 1
  end
  return fields
end
local new = ARGV[1]
local current = redis.call('GET', KEYS[1])
if current then
  local c, n = header(current), header(new)
  if c and n and (c[5] > n[5] or (c[5] == n[5] and c[1] < n[1])) then return 0 end
end
redis.call('SET', KEYS[1], new, 'PX', ARGV[2])
return 1
"""


class _RedisAway:
    """The default the cache layer returns when Redis cannot answer."""


REDIS_AWAY: Final = _RedisAway()


def record_key(key_hash: bytes) -> str:
    """Redis key of the cached record; `{hash}` is the Cluster hash tag."""
    return f"{_NAMESPACE}{key_hash.hex()}}}:rec"


def rate_key(key_hash: bytes) -> str:
    """Redis key of the GCRA state; same hash tag as `record_key`."""
    return f"{_NAMESPACE}{key_hash.hex()}}}:rl"


class KeyRecord:
    """What verification needs about one key, parsed once per cached record."""

    __slots__ = (
        "device_id",
        "expires_us",
        "key_id",
        "operator",
        "permissions",
        "permissions_header",
        "rate_limit",
        "revoked_us",
        "template",
        "usable_until_us",
        "version",
    )

    def __init__(self, header: Sequence[bytes], template: key_pb2.VerifyApiKeyResponse) -> None:
        self.usable_until_us = int(header[0])
        self.rate_limit = int(header[1])
        self.expires_us = int(header[2])
        self.revoked_us = int(header[3])
        self.version = int(header[4])
        self.template = template
        self.key_id = template.key_id
        self.device_id = template.device_id
        self.operator = template.operator
        self.permissions = frozenset(template.permissions)
        self.permissions_header = ",".join(template.permissions)

    @classmethod
    def from_body(cls, body: bytes) -> KeyRecord:
        """Parse `encode_record`'s bytes."""
        parts = body.split(b"|", 5)
        return cls(parts, key_pb2.VerifyApiKeyResponse.FromString(parts[5]))

    def unusable_result(self, now_us: int) -> int:
        if self.revoked_us and now_us >= self.revoked_us:
            return REVOKED
        return EXPIRED


def encode_record(row: ApiKeyRow) -> bytes:
    expires_us = to_micros(row.expires_at)
    revoked_us = to_micros(row.revoked_at) if row.revoked_at is not None else 0
    usable_us = to_micros(row.usable_until())
    template = key_pb2.VerifyApiKeyResponse(
        key_id=str(row.id),
        device_id=row.device_id or "",
        permissions=row.permissions,
        operator=row.operator,
        rate_limit=row.rate_limit,
    )
    template.expire_time.FromDatetime(row.expires_at)
    header = f"{usable_us}|{row.rate_limit}|{expires_us}|{revoked_us}|{row.version}|".encode()
    return header + template.SerializeToString()


class Verdict:
    """The outcome of one verification."""

    __slots__ = ("decision", "record", "result")

    def __init__(self, result: int, record: KeyRecord | None, decision: Decision | None) -> None:
        self.result = result
        self.record = record
        self.decision = decision


UNKNOWN_KEY: Final = Verdict(NOT_FOUND, None, None)


class Refused:
    """A cached record that is not to be trusted (`shared.seal`)."""


REFUSED: Final = Refused()


class Verifier:
    def __init__(
        self,
        *,
        store: KeyStore,
        cache: Cache,
        trust: CacheTrust,
        usage: UsageBuffer,
        clock: Clock,
        cache_ttl: float,
        negative_cache_ttl: float,
        local_limiter: LocalLimiter,
        scripts: ScriptRunner,
        seal: Seal,
    ) -> None:
        self.store = store
        self.cache = cache
        self.trust = trust  # told when a change could not be written to Redis
        self.usage = usage
        self.clock = clock
        self._now_us = micros_source(clock)
        self.cache_ttl_ms = max(1, int(cache_ttl * 1000))
        self.negative_cache_ttl = negative_cache_ttl
        self.local_limiter = local_limiter
        self.scripts = scripts
        self.seal = seal  # loaded by the guard's first drain, before Redis is trusted
        # Opened records by their bytes: (record, the key hash it was sealed for, when).
        self._memo: dict[bytes, tuple[KeyRecord, bytes, int] | None] = {}
        self._hits = CACHE_RESULTS.labels("api_key", "hit")
        self._misses = CACHE_RESULTS.labels("api_key", "miss")
        self._negative_hits = CACHE_RESULTS.labels("api_key", "negative_hit")
        self._bypass = CACHE_RESULTS.labels("api_key", "bypass")

    async def verify(self, api_key: str, required: Sequence[str], dry_run: bool) -> Verdict:
        if not keyformat.is_well_formed(api_key):
            return UNKNOWN_KEY
        key_hash = hashlib.sha256(api_key.encode()).digest()
        now_us = self._now_us()
        tag = key_hash.hex()
        keys = (f"{_NAMESPACE}{tag}}}:rec", f"{_NAMESPACE}{tag}}}:rl")
        args = (b"%d" % now_us, b"0" if dry_run else b"1")
        reply = await self.cache.run(lambda _: self.scripts.run(VERIFY, keys, args), REDIS_AWAY)
        if reply is None:
            self._misses.inc()
            return await self._verify_from_database(key_hash, keys, now_us, required, dry_run)
        if isinstance(reply, _RedisAway):
            self._bypass.inc()
            return await self._verify_from_database(key_hash, None, now_us, required, dry_run)
        record = self._open(reply[0], key_hash, now_us)
        if record is None:
            self._negative_hits.inc()
            return UNKNOWN_KEY
        if isinstance(record, Refused):
            # Not a record this service sealed for this key (`shared.seal`): as good as
            # absent. It goes, and the truth takes its place.
            self._misses.inc()
            await self.cache.delete(keys[0])
            return await self._verify_from_database(key_hash, keys, now_us, required, dry_run)
        self._hits.inc()
        if len(reply) == 1:
            return Verdict(record.unusable_result(now_us), record, None)
        decision = Decision(reply[1] == 1, reply[2], reply[3], reply[4])
        return self._judge(record, decision, required, now_us, dry_run)

    def _judge(
        self,
        record: KeyRecord,
        decision: Decision,
        required: Sequence[str],
        now_us: int,
        dry_run: bool,
    ) -> Verdict:
        if not decision.allowed:
            return Verdict(RATE_LIMITED, record, decision)
        granted = record.permissions
        if required and ADMIN not in granted:
            for permission in required:
                if permission not in granted:
                    return Verdict(INSUFFICIENT_PERMISSIONS, record, decision)
        if not dry_run:
            self.usage.record(record.key_id, now_us)
        return Verdict(VALID, record, decision)

    async def _verify_from_database(
        self,
        key_hash: bytes,
        keys: tuple[str, str] | None,
        now_us: int,
        required: Sequence[str],
        dry_run: bool,
    ) -> Verdict:
        row = await self.store.find_by_hash(key_hash)
        if row is None:
            if keys is not None:
                await self.cache.set(keys[0], NEGATIVE_RECORD, self.negative_cache_ttl)
            return UNKNOWN_KEY
        record = KeyRecord.from_body(encode_record(row))
        if keys is not None and self.seal.ready:
            raw = self._sealed(row, now_us)
            args = (b"%d" % now_us, b"0" if dry_run else b"1", raw, b"%d" % self.cache_ttl_ms)
            reply = await self.cache.run(
                lambda _: self.scripts.run(POPULATE, keys, args), REDIS_AWAY
            )
            if reply is not None and not isinstance(reply, _RedisAway):
                cached = self._open(reply[0], key_hash, now_us)
                if cached is None:
                    return UNKNOWN_KEY
                if not isinstance(cached, Refused):
                    record = cached
                elif now_us < record.usable_until_us:
                    # Redis kept a record that is not ours: judge by the database's, with
                    # the local limiter.
                    decision = self.local_limiter.check(
                        key_hash, record.rate_limit, now_us, not dry_run
                    )
                    return self._judge(record, decision, required, now_us, dry_run)
                else:
                    return Verdict(record.unusable_result(now_us), record, None)
                if len(reply) == 1:
                    return Verdict(record.unusable_result(now_us), record, None)
                decision = Decision(reply[1] == 1, reply[2], reply[3], reply[4])
                return self._judge(record, decision, required, now_us, dry_run)
        if now_us >= record.usable_until_us:
            return Verdict(record.unusable_result(now_us), record, None)
        decision = self.local_limiter.check(key_hash, record.rate_limit, now_us, not dry_run)
        return self._judge(record, decision, required, now_us, dry_run)

    def _sealed(self, row: ApiKeyRow, now_us: int) -> bytes:
        return self.seal.seal(record_key(row.key_hash), encode_record(row), now_us)

    def _open(self, raw: bytes, key_hash: bytes, now_us: int) -> KeyRecord | Refused | None:
        """A cached record of the key `key_hash`: the record, None for a negative entry, or
        REFUSED when this service did not seal it for that key, or too long ago
        (`shared.seal`). Memoized by its bytes, since a key's record rarely changes; a hit
        still checks the key and the age."""
        if raw == NEGATIVE_RECORD:
            return None
        memo = self._memo
        opened = memo.get(raw)
        if opened is not None:
            record, sealed_for, sealed_us = opened
            if sealed_for != key_hash:
                self.seal.forged()  # another key's record, copied into this key's entry
            elif self.seal.fresh(sealed_us, now_us):
                return record
            return REFUSED
        body = self.seal.open(record_key(key_hash), raw, now_us)
        if body is None:
            return REFUSED
        record = KeyRecord.from_body(body)
        if len(memo) >= _MEMO_LIMIT:
            memo.clear()
        memo[raw] = (record, key_hash, self.seal.sealed_at(raw))
        return record

    async def publish(self, change: KeyChange) -> None:
        """Write the records of changed keys (revocation, rotation) to Redis, then forget
        their logged invalidations.

        Called before the change is reported, so every replica sees it on its next verify.
        Writing the new record (rather than deleting) keeps a verify that read the old row
        from putting it back (it stores with NX), and `PUBLISH_SCRIPT` never replaces a
        record with one that is usable for longer, so the order in which replicas publish
        does not matter. If Redis does not take it, the invalidation stays in the log, the
        cache is distrusted at once, and the guard applies the log when Redis answers.
        """
        if not change.rows:
            return
        if not self.seal.ready:  # no drain has run: Redis is not trusted, the log applies
            return
        done = await self.cache.pipeline(self._queue_records(change.rows), default=())
        if not done:
            self.trust.distrust()
            return
        # Applied already: should marking the rows applied fail, a guard's pass marks them.
        with contextlib.suppress(DomainError):
            await self.store.acknowledge_invalidations(change.invalidations, self.clock.now())

    def _queue_records(self, rows: Sequence[ApiKeyRow]) -> Callable[[Pipeline], None]:
        ttl_ms, now_us = self.cache_ttl_ms, self._now_us()
        records = [(record_key(row.key_hash), self._sealed(row, now_us)) for row in rows]

        def queue(pipe: Pipeline) -> None:
            for key, record in records:
                pipe.eval(PUBLISH_SCRIPT, 1, key, record, ttl_ms)

        return queue

    def _writer(self, rows: Sequence[ApiKeyRow]) -> Callable[[aioredis.Redis], Awaitable[None]]:
        queue = self._queue_records(rows)

        async def write(client: aioredis.Redis) -> None:
            pipe = client.pipeline(transaction=False)
            queue(pipe)
            await pipe.execute()

        return write

    async def drain_invalidations(self, replay: bool = False) -> int:
        """Write every key with a pending logged invalidation to Redis as it is now
        (`shared.invalidation.drain_log`), once the seal's secret is loaded."""
        if not self.seal.ready:
            self.seal.load(await self.store.cache_secret())

        async def apply(rows: Sequence[ApiKeyRow]) -> None:
            await self.cache.apply(self._writer(rows))

        return await drain_log(
            self.store,
            apply,
            now=self.clock.now(),
            ttl=timedelta(milliseconds=self.cache_ttl_ms),
            replay=replay,
        )
