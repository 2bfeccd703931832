"""Sealed cache records: Redis stores them, only the service can make them.

Redis is a cache, not an authority, yet a cached record grants something: a key record says a
key is valid with these permissions, a cached certificate says it is active. Anyone who can
write to Redis could otherwise plant a VALID record for a revoked or made-up key. So every
record that grants something is sealed: the service appends the time it sealed it and an
HMAC-SHA256 (truncated to 128 bits) over the Redis key it is stored under, that time and the
record, with a secret Redis never sees. A reader opens the record before trusting it:

* a wrong or missing seal (written by anyone but a replica of the service, or copied from
  another key's entry) is ignored as if the entry were absent (the caller reads PostgreSQL),
  and counted in `myl_cache_records_refused_total{reason="forged"}` (alert
  `MylCacheRecordForged`);
* a seal older than the cache TTL (plus a minute for clocks) is ignored too (`stale`): no
  genuine entry lives that long, so an old record replayed into Redis is refused. What a
  seal cannot tell apart is a genuine record replayed within its TTL: the residual window of
  someone who can write to Redis with a service's credentials (`shared.config.RedisConfig`'s
  user and password) is the cache TTL.

The secret is 32 random bytes in the service's own PostgreSQL table (created by a migration,
filled by the first replica that asks, `INSERT ... ON CONFLICT DO NOTHING`, then read by
every replica), so replicas agree without configuration and Redis never holds it. It is
loaded by the cache guard's first pass, before which the cache is not trusted anyway
(`shared.invalidation`). Markers that only deny (a negative entry, a fence) are not sealed:
planting one can only send reads to PostgreSQL or refuse a key, which anyone able to write to
Redis could do by deleting entries.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Final

from psycopg import sql

from shared.db import Connection
from shared.metrics import CACHE_REFUSED

SECRET_BYTES: Final = 32
_MAC_BYTES: Final = 16
_STAMP_BYTES: Final = 8
_TRAILER: Final = _STAMP_BYTES + _MAC_BYTES
_CLOCK_SLACK_US: Final = 60_000_000


class Seal:
    """Seals and opens one cache's records; usable once `load` has given it the secret."""

    def __init__(self, cache: str, ttl_us: int) -> None:
        self.cache = cache
        self.max_age_us = ttl_us + _CLOCK_SLACK_US
        self._secret: bytes | None = None
        self._forged = CACHE_REFUSED.labels(cache, "forged")
        self._stale = CACHE_REFUSED.labels(cache, "stale")

    @property
    def ready(self) -> bool:
        return self._secret is not None

    def load(self, secret: bytes) -> None:
        if len(secret) != SECRET_BYTES:
            raise ValueError(f"a cache secret has {SECRET_BYTES} bytes")
        self._secret = secret

    def _mac(self, name: bytes, stamp: bytes, body: bytes) -> bytes:
        assert self._secret is not None, "the cache is used before its secret was loaded"
        return hmac.digest(self._secret, name + b"\0" + stamp + body, hashlib.sha256)[:_MAC_BYTES]

    def seal(self, name: str | bytes, body: bytes, now_us: int) -> bytes:
        """`body` as stored under the Redis key `name`, sealed at `now_us`."""
        key = name.encode() if isinstance(name, str) else name
        stamp = now_us.to_bytes(_STAMP_BYTES, "big", signed=True)
        return body + stamp + self._mac(key, stamp, body)

    def sealed_at(self, raw: bytes) -> int:
        """When a record was sealed (meaningful only for a record `open` accepted)."""
        return int.from_bytes(raw[-_TRAILER:-_MAC_BYTES], "big", signed=True)

    def fresh(self, sealed_us: int, now_us: int) -> bool:
        """A seal no genuine entry outlives is refused (and counted)."""
        if now_us - sealed_us <= self.max_age_us:
            return True
        self._stale.inc()
        return False

    def forged(self) -> None:
        """Count a record refused as forged elsewhere (a memoized record read under another
        key than it was sealed for)."""
        self._forged.inc()

    def open(self, name: str | bytes, raw: bytes, now_us: int) -> bytes | None:
        """The body of a record stored under `name`, or None (counted) when it was not
        sealed by this service for that key, or is older than any genuine entry."""
        if self._secret is None:
            return None
        key = name.encode() if isinstance(name, str) else name
        if len(raw) < _TRAILER:
            self._forged.inc()
            return None
        body, stamp, mac = raw[:-_TRAILER], raw[-_TRAILER:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(key, stamp, body)):
            self._forged.inc()
            return None
        if not self.fresh(int.from_bytes(stamp, "big", signed=True), now_us):
            return None
        return body


async def load_secret(conn: Connection, table: str) -> bytes:
    """The service's cache secret from `table` (one row), made by the first caller."""
    await conn.execute(
        sql.SQL("INSERT INTO {} (secret) VALUES (%s) ON CONFLICT DO NOTHING").format(
            sql.Identifier(table)
        ),
        (os.urandom(SECRET_BYTES),),
    )
    cur = await conn.execute(sql.SQL("SELECT secret FROM {}").format(sql.Identifier(table)))
    row = await cur.fetchone()
    if row is None or not isinstance(row[0], bytes):
        raise RuntimeError(f"{table} holds no secret")
    return row[0]
