"""A Redis that may evict keys is reported: at start, and again when Redis comes back.

Limiter state lives only in Redis (`shared.limits`); under an evicting `maxmemory-policy` it
can vanish and a limit forgets what was spent. That is unsupported, and an operator must hear
of it: a warning in the log, `myl_redis_evicting_policy`, and the `MylRedisEvictingPolicy`
alert (deploy/prometheus/alerts.yml). The test stacks run Redis with `noeviction`.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Callable, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from deploy.devstack.servers import RedisServer, free_port
from shared.cache import Cache
from shared.config import DatabaseConfig, RedisConfig
from shared.db import Database, open_database
from shared.monitoring import ResourceSampler

SERVICE = "policy_test"
WARNING = "redis may evict keys"


@pytest.fixture
async def db(db_config: Callable[..., DatabaseConfig]) -> AsyncIterator[Database]:
    opened = await open_database(db_config(), SERVICE)
    try:
        yield opened
    finally:
        await opened.close()


def evicting() -> float | None:
    return REGISTRY.get_sample_value("myl_redis_evicting_policy", {"service": SERVICE})


def warnings(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if str(entry["event"]).startswith(WARNING)]


async def test_an_evicting_policy_is_reported_at_start_and_after_redis_comes_back(
    db: Database,
) -> None:
    server = RedisServer(Path(tempfile.mkdtemp(prefix="myl-test-redis-policy-")), free_port())
    server.start()
    cache = Cache.from_config(RedisConfig(host=server.host, port=server.port))
    assert cache.client is not None
    sampler = ResourceSampler(SERVICE, db, cache)
    try:
        with capture_logs() as logs:
            await sampler.sample()  # the test stacks' Redis: noeviction
            assert evicting() == 0
            assert warnings(logs) == []

            await cache.client.config_set("maxmemory-policy", "allkeys-lru")
            await sampler.sample()
            await sampler.sample()
            assert evicting() == 1
            [warned] = warnings(logs)  # once, not at every sample
            assert warned["maxmemory_policy"] == ["allkeys-lru"]
            assert warned["log_level"] == "warning"

            # Redis restarts (or another one takes its place) with the same policy.
            server.stop()
            await sampler.sample()
            server.start()
            await cache.client.config_set("maxmemory-policy", "allkeys-lru")
            await sampler.sample()
            assert evicting() == 1
            assert len(warnings(logs)) == 2  # said again for the Redis that came back

            await cache.client.config_set("maxmemory-policy", "noeviction")
            await sampler.sample()
            assert evicting() == 0
            assert len(warnings(logs)) == 2
    finally:
        await cache.close()
        server.stop()
