"""VerifyApiKey against real PostgreSQL and Redis: results, cache, rate limits, usage."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis

from deploy.devstack.servers import RedisServer
from key_service import keyformat
from key_service.ratelimit import (
    POPULATE_SCRIPT,
    VERIFY_SCRIPT,
    Decision,
    LocalLimiter,
    per_minute,
)
from key_service.verify import VERIFY, rate_key, record_key
from myl.key.v1 import key_pb2
from shared.config import ServerConfig
from shared.limits import fallback_seed
from tests.conftest import all_keys, standalone_only
from tests.fixtures.clock import FakeClock
from tests.fixtures.key import RunningKeyService, start_key_service
from tests.fixtures.wait import eventually
from tests.unit.test_key_ratelimit import gcra

R = key_pb2.VerifyApiKeyRequest


REDIS_BACKENDS = ("standalone", "cluster")


def _redis(server: RedisServer) -> aioredis.Redis:
    return aioredis.Redis(host=server.host, port=server.port)


class CountingReads:
    """Counts PostgreSQL lookups by key hash (wraps the real store method)."""

    def __init__(self, service: RunningKeyService, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        store = service.app.store
        real = store.find_by_hash

        async def counted(key_hash: bytes) -> Any:
            self.calls += 1
            return await real(key_hash)

        monkeypatch.setattr(store, "find_by_hash", counted)


async def test_valid_key_reports_device_permissions_and_limit(
    key_service: RunningKeyService,
) -> None:
    plaintext, row = await key_service.issue_device_key("dev-a", rate_limit=600)
    reply = await key_service.stub.VerifyApiKey(
        R(api_key=plaintext, required_permissions=["ssl:read"])
    )
    assert reply.result == key_pb2.VERIFY_RESULT_VALID
    assert reply.key_id == str(row.id)
    assert reply.device_id == "dev-a"
    assert list(reply.permissions) == ["ssl:read", "device:read", "api:access"]
    assert not reply.operator
    assert reply.rate_limit == 600
    assert reply.rate_limit_remaining == 599
    assert reply.rate_limit_reset.ToMilliseconds() == 100  # one emission interval
    assert reply.expire_time.ToDatetime().timestamp() == pytest.approx(row.expires_at.timestamp())
    assert not reply.HasField("retry_after")


async def test_malformed_keys_are_not_found_without_io(
    key_service: RunningKeyService, monkeypatch: pytest.MonkeyPatch, redis_inspect: aioredis.Redis
) -> None:
    plaintext, _ = await key_service.issue_device_key()
    reads = CountingReads(key_service, monkeypatch)
    client = redis_inspect
    await client.config_resetstat()
    typo = plaintext[:10] + ("A" if plaintext[10] != "A" else "B") + plaintext[11:]
    for bad in [typo, plaintext[:-1], plaintext + "x", "myl_" + "0" * 49, "not a key", "x" * 5000]:
        reply = await key_service.stub.VerifyApiKey(R(api_key=bad))
        assert reply.result == key_pb2.VERIFY_RESULT_NOT_FOUND
        assert reply.key_id == ""
    stats = await client.info("commandstats")
    assert not any(name.startswith("cmdstat_eval") for name in stats)
    assert reads.calls == 0
    await client.aclose()


async def test_cache_hit_is_one_redis_round_trip_and_no_database_read(
    key_service: RunningKeyService,
    monkeypatch: pytest.MonkeyPatch,
    redis_inspect: aioredis.Redis,
    redis_backend: str,
) -> None:
    standalone_only(redis_backend)  # reads one server's command statistics
    plaintext, _ = await key_service.issue_device_key()
    reads = CountingReads(key_service, monkeypatch)
    first = await key_service.stub.VerifyApiKey(R(api_key=plaintext))  # miss: reads PG once
    assert first.result == key_pb2.VERIFY_RESULT_VALID
    assert reads.calls == 1

    sent: list[bytes] = []
    scripts = key_service.app.verifier.scripts
    real_run = scripts.run

    async def counted(script: Any, keys: Any, args: Any) -> Any:
        sent.append(script.sha)
        return await real_run(script, keys, args)

    monkeypatch.setattr(scripts, "run", counted)
    redis_py = key_service.app.cache.client
    assert redis_py is not None
    monkeypatch.setattr(redis_py, "execute_command", None)  # nothing else may talk to Redis
    client = redis_inspect
    await client.config_resetstat()
    for _ in range(5):
        reply = await key_service.stub.VerifyApiKey(R(api_key=plaintext))
        assert reply.result == key_pb2.VERIFY_RESULT_VALID
    assert sent == [VERIFY.sha] * 5  # one script call, one round trip, per verify
    stats = await client.info("commandstats")
    calls = {name: value["calls"] for name, value in stats.items()}
    # Inside the script: GET record, GET rate state, SET rate state.
    assert calls["cmdstat_evalsha"] == 5
    assert calls["cmdstat_get"] == 10
    assert calls["cmdstat_set"] == 5
    assert reads.calls == 1
    await client.aclose()


async def test_both_redis_keys_share_one_hash_tag(
    key_service: RunningKeyService, redis_inspect: aioredis.Redis
) -> None:
    # One request per minute: the rate state lives a minute (at 1000/min it lives 60 ms and
    # may be gone before we look).
    plaintext, _ = await key_service.issue_device_key(rate_limit=1)
    await key_service.stub.VerifyApiKey(R(api_key=plaintext))
    client = redis_inspect
    keys = await all_keys(client)
    key_hash = keyformat.hash_key(plaintext)
    assert keys == sorted([record_key(key_hash), rate_key(key_hash)])
    tags = {k[k.index("{") + 1 : k.index("}")] for k in keys}
    assert tags == {key_hash.hex()}
    await client.aclose()


async def test_unknown_key_is_cached_as_unknown(
    key_service: RunningKeyService, monkeypatch: pytest.MonkeyPatch, redis_inspect: aioredis.Redis
) -> None:
    reads = CountingReads(key_service, monkeypatch)
    unknown = keyformat.generate().plaintext
    for _ in range(3):
        reply = await key_service.stub.VerifyApiKey(R(api_key=unknown))
        assert reply.result == key_pb2.VERIFY_RESULT_NOT_FOUND
    assert reads.calls == 1
    client = redis_inspect
    ttl = await client.pttl(record_key(keyformat.hash_key(unknown)))
    assert 0 < ttl <= key_service.config.negative_cache_ttl * 1000
    await client.aclose()


async def test_expired_key_by_the_clock(
    key_service: RunningKeyService, key_clock: FakeClock
) -> None:
    plaintext, _ = await key_service.issue_device_key(expires_in=timedelta(hours=1))
    assert (await key_service.stub.VerifyApiKey(R(api_key=plaintext))).result == (
        key_pb2.VERIFY_RESULT_VALID
    )
    key_clock.advance(hours=1)
    reply = await key_service.stub.VerifyApiKey(R(api_key=plaintext))
    assert reply.result == key_pb2.VERIFY_RESULT_EXPIRED
    assert reply.key_id  # known key: identity is reported


async def test_insufficient_permissions_and_admin_passes(key_service: RunningKeyService) -> None:
    device_key, _ = await key_service.issue_device_key(permissions=["ssl:read"])
    reply = await key_service.stub.VerifyApiKey(
        R(api_key=device_key, required_permissions=["ssl:read", "ssl:write"])
    )
    assert reply.result == key_pb2.VERIFY_RESULT_INSUFFICIENT_PERMISSIONS
    operator_key, _ = await key_service.issue_device_key(None, permissions=["admin"])
    reply = await key_service.stub.VerifyApiKey(
        R(api_key=operator_key, required_permissions=["ssl:write", "device:write"])
    )
    assert reply.result == key_pb2.VERIFY_RESULT_VALID
    assert reply.operator
    assert reply.device_id == ""


async def test_concurrent_verifies_admit_exactly_the_limit(key_service: RunningKeyService) -> None:
    limit, attempts = 20, 60
    plaintext, _ = await key_service.issue_device_key(rate_limit=limit)
    replies = await asyncio.gather(
        *(key_service.stub.VerifyApiKey(R(api_key=plaintext)) for _ in range(attempts))
    )
    admitted = [r for r in replies if r.result == key_pb2.VERIFY_RESULT_VALID]
    refused = [r for r in replies if r.result == key_pb2.VERIFY_RESULT_RATE_LIMITED]
    assert len(admitted) == limit
    assert len(refused) == attempts - limit
    for reply in refused:
        assert reply.retry_after.ToMilliseconds() == 3000  # 60 s / 20: the next slot
        assert reply.rate_limit_remaining == 0
    assert sorted(r.rate_limit_remaining for r in admitted) == list(range(limit))


async def test_rate_limit_recovers_with_time(
    key_service: RunningKeyService, key_clock: FakeClock
) -> None:
    plaintext, _ = await key_service.issue_device_key(rate_limit=2)
    results = [(await key_service.stub.VerifyApiKey(R(api_key=plaintext))).result for _ in range(3)]
    assert results[-1] == key_pb2.VERIFY_RESULT_RATE_LIMITED
    key_clock.advance(seconds=30)  # one emission interval
    reply = await key_service.stub.VerifyApiKey(R(api_key=plaintext))
    assert reply.result == key_pb2.VERIFY_RESULT_VALID
    assert reply.rate_limit_remaining == 0
    key_clock.advance(seconds=60)
    reply = await key_service.stub.VerifyApiKey(R(api_key=plaintext, dry_run=True))
    assert reply.rate_limit_remaining == 2  # fully restored; the dry run did not count
    assert reply.rate_limit_reset.ToNanoseconds() == 0


async def test_dry_run_counts_nothing(key_service: RunningKeyService, db_conn: Any) -> None:
    plaintext, row = await key_service.issue_device_key(rate_limit=1)
    for _ in range(3):
        reply = await key_service.stub.VerifyApiKey(R(api_key=plaintext, dry_run=True))
        assert reply.result == key_pb2.VERIFY_RESULT_VALID
        assert reply.rate_limit_remaining == 1
    assert (await key_service.stub.VerifyApiKey(R(api_key=plaintext))).result == (
        key_pb2.VERIFY_RESULT_VALID
    )
    await key_service.app.usage.flush()
    cur = await db_conn.execute("SELECT usage_count FROM device_api_keys WHERE id = %s", (row.id,))
    assert (await cur.fetchone())[0] == 1


def script_reply(decision: Decision) -> list[int]:
    """What the verify scripts answer after the record for `decision`."""
    return [
        int(decision.allowed),
        decision.remaining,
        decision.reset_us,
        decision.retry_after_us,
    ]


async def test_lua_and_python_gcra_agree(clean_redis: RedisServer) -> None:
    """The scripts and the Python step (`per_minute`, `gcra_step`, `step_decision`) from a
    fresh key."""
    client = _redis(clean_redis)
    verify = client.register_script(VERIFY_SCRIPT)
    populate = client.register_script(POPULATE_SCRIPT)
    limit = 7
    record = f"{10**16}|{limit}|{10**16}|0|payload".encode()
    keys = ["myl:key:{t}:rec", "myl:key:{t}:rl"]
    now = 1_700_000_000_000_000
    first = await populate(keys=keys, args=[now, 1, record, 60_000])
    tat, decision = gcra(None, now, limit, True)
    assert first[1:] == [1, decision.remaining, decision.reset_us, 0]
    steps = [0, 0, 1, 5, 0, 0, 0, 0, 8_571_428, 1, 60_000_000, 0, 0]
    for i, step in enumerate(steps):
        now += step
        apply = i % 4 != 3
        reply = await verify(keys=keys, args=[now, 1 if apply else 0])
        new_tat, expected = gcra(tat, now, limit, apply)
        if new_tat is not None:
            tat = new_tat
        assert reply[0] == record
        assert reply[1:] == script_reply(expected), f"step {i}"
    await client.aclose()


@pytest.mark.parametrize("limit", [1, 7, 20])
async def test_lua_and_the_local_limiter_agree(clean_redis: RedisServer, limit: int) -> None:
    """The scripts and `LocalLimiter.check`, the runtime's Python step, on the same TAT: the
    Redis bucket starts where the limiter seeds an unseen key."""
    client = _redis(clean_redis)
    verify = client.register_script(VERIFY_SCRIPT)
    populate = client.register_script(POPULATE_SCRIPT)
    record = f"{10**16}|{limit}|{10**16}|0|payload".encode()
    keys = ["myl:key:{s}:rec", "myl:key:{s}:rl"]
    now = 1_700_000_000_000_000
    await client.set(keys[1], fallback_seed(per_minute(limit), now))
    limiter = LocalLimiter()
    interval = per_minute(limit).interval_us
    steps = [0, 0, 1, interval - 1, 0, interval, 0, 5 * interval, 0, 0, 60_000_000, 0, 0, 0]
    for i, step in enumerate(steps):
        now += step
        apply = i % 4 != 3
        if i == 0:
            reply = await populate(keys=keys, args=[now, 1 if apply else 0, record, 60_000])
        else:
            reply = await verify(keys=keys, args=[now, 1 if apply else 0])
        expected = limiter.check(b"k", limit, now, apply)
        assert reply[0] == record
        assert reply[1:] == script_reply(expected), f"step {i}"
    await client.aclose()


async def test_redis_down_falls_back_to_postgres_and_local_limiter(
    make_config: Callable[..., ServerConfig],
    key_clock: FakeClock,
    clean_redis: RedisServer,
    redis_backend: str,
) -> None:
    standalone_only(redis_backend)
    service = await start_key_service(
        make_config("key_service", REDIS_BREAKER_RESET="0.05"), key_clock
    )
    try:
        plaintext, _ = await service.issue_device_key(rate_limit=3)
        assert (await service.stub.VerifyApiKey(R(api_key=plaintext))).rate_limit_remaining == 2
        clean_redis.stop()
        replies = [await service.stub.VerifyApiKey(R(api_key=plaintext)) for _ in range(3)]
        # The in-process limiter seeds the key as if its burst were spent (Redis may still
        # hold that state): one request now, then the steady rate of one per 20 s.
        assert [r.result for r in replies] == [key_pb2.VERIFY_RESULT_VALID] + [
            key_pb2.VERIFY_RESULT_RATE_LIMITED
        ] * 2
        assert replies[-1].retry_after.ToMilliseconds() == 20_000
        unknown = keyformat.generate().plaintext
        assert (await service.stub.VerifyApiKey(R(api_key=unknown))).result == (
            key_pb2.VERIFY_RESULT_NOT_FOUND
        )
        clean_redis.start()
        # The cache is guarded: its circuit lets no request probe Redis, and only the cache
        # guard closes it, after a pass that reaches the restarted Redis and applies the
        # invalidation log. Untrusted, the guard tries again every REDIS_BREAKER_RESET.
        await eventually(
            lambda: not service.app.cache.breaker.is_open, "the cache guard closes the circuit"
        )
        for _ in range(5):  # served through Redis again: the key's record is cached there
            await service.stub.VerifyApiKey(R(api_key=plaintext, dry_run=True))
        assert not service.app.cache.breaker.is_open
        client = _redis(clean_redis)
        assert await client.exists(record_key(keyformat.hash_key(plaintext)))
        await client.aclose()
    finally:
        await service.stop()


async def test_revoked_key_is_refused_by_every_replica(
    make_config: Callable[..., ServerConfig], key_clock: FakeClock
) -> None:
    config = make_config("key_service")
    first = await start_key_service(config, key_clock)
    second = await start_key_service(config, key_clock)
    try:
        plaintext, row = await first.issue_device_key()
        for replica in (first, second):
            reply = await replica.stub.VerifyApiKey(R(api_key=plaintext))
            assert reply.result == key_pb2.VERIFY_RESULT_VALID
        await first.stub.RevokeApiKey(key_pb2.RevokeApiKeyRequest(key_id=str(row.id)))
        for replica in (second, first):
            reply = await replica.stub.VerifyApiKey(R(api_key=plaintext))
            assert reply.result == key_pb2.VERIFY_RESULT_REVOKED
    finally:
        await first.stop()
        await second.stop()


async def test_usage_is_flushed_in_batches_and_on_stop(
    make_config: Callable[..., ServerConfig], key_clock: FakeClock, db_conn: Any
) -> None:
    service = await start_key_service(
        make_config("key_service"), key_clock, KEY_SERVICE_USAGE_FLUSH_INTERVAL="3600"
    )
    plaintext, row = await service.issue_device_key()
    other, other_row = await service.issue_device_key("device-2")
    for _ in range(7):
        await service.stub.VerifyApiKey(R(api_key=plaintext))
    key_clock.advance(seconds=5)
    await service.stub.VerifyApiKey(R(api_key=other))
    cur = await db_conn.execute("SELECT sum(usage_count) FROM device_api_keys")
    assert (await cur.fetchone())[0] == 0  # nothing written per verify
    await service.stop()  # graceful stop flushes
    cur = await db_conn.execute(
        "SELECT id, usage_count, last_used_at FROM device_api_keys ORDER BY usage_count DESC"
    )
    rows = await cur.fetchall()
    assert [(r[0], r[1]) for r in rows] == [(row.id, 7), (other_row.id, 1)]
    assert rows[1][2] == key_clock.now()
    assert rows[0][2] < rows[1][2]
