"""Gauges sampled in the background: the database pool and Redis, for both services.

Counters and histograms are recorded where things happen; what can only be *looked at*
(pool occupancy, whether Redis answers, how much memory it uses) is sampled here every
`interval` seconds. Redis is asked directly (`Cache.apply`), not through the breaker, so
`myl_redis_up` says whether Redis answers even while a guarded cache is still closed to reads.

Redis's `maxmemory-policy` is read with the same INFO, at start and at every sample after, so
a Redis that was replaced or reconfigured is seen within one interval. Any policy but
`noeviction` is unsupported: Redis may then drop keys it was never told to, and the rate
limiters' and provisioning limits' state lives only there (`shared.limits`), so an evicted
bucket forgets what was spent. An evicting policy is logged (once per change) and shown by
`myl_redis_evicting_policy`, which the `MylRedisEvictingPolicy` alert watches.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from shared.cache import Cache, CacheUnavailable
from shared.db import Database
from shared.logging import get_logger
from shared.metrics import REDIS_CLIENTS, REDIS_EVICTING_POLICY, REDIS_MEMORY, REDIS_UP
from shared.tasks import BackgroundTask, run_periodically

log = get_logger(__name__)

DEFAULT_INTERVAL = 5.0


# The one `maxmemory-policy` under which Redis never drops a key it was not told to.
SUPPORTED_POLICY = "noeviction"


@dataclass(frozen=True)
class RedisInfo:
    used_memory: float
    connected_clients: float
    # Every node's maxmemory-policy (one for a single server).
    policies: frozenset[str]

    @property
    def evicting(self) -> bool:
        return any(policy != SUPPORTED_POLICY for policy in self.policies)


async def redis_info(client: aioredis.Redis) -> RedisInfo:
    """used_memory and connected_clients (on a cluster, summed over its masters), and the
    maxmemory-policy of each."""
    totals = {"used_memory": 0.0, "connected_clients": 0.0}
    policies: set[str] = set()
    for section in ("memory", "clients"):
        if isinstance(client, RedisCluster):
            reply: dict[str, Any] = await client.info(section, target_nodes=RedisCluster.PRIMARIES)
        else:
            reply = await client.info(section)
        per_node = [v for v in reply.values() if isinstance(v, dict)] or [reply]
        for node in per_node:
            for name in totals:
                value = node.get(name)
                if isinstance(value, int | float):
                    totals[name] += value
            policy = node.get("maxmemory_policy")
            if isinstance(policy, str):
                policies.add(policy)
    return RedisInfo(totals["used_memory"], totals["connected_clients"], frozenset(policies))


class ResourceSampler:
    def __init__(
        self, service: str, db: Database, cache: Cache, interval: float = DEFAULT_INTERVAL
    ) -> None:
        self.service = service
        self.db = db
        self.cache = cache
        self.interval = interval
        self._task = BackgroundTask(f"{service} resource sampler", self.run)
        self._redis_up = REDIS_UP.labels(service)
        self._memory = REDIS_MEMORY.labels(service)
        self._clients = REDIS_CLIENTS.labels(service)
        self._evicting = REDIS_EVICTING_POLICY.labels(service)
        # The policies last seen; None until Redis answers (again): then they are reported.
        self._policies: frozenset[str] | None = None

    async def sample(self) -> None:
        self.db.record_stats()
        if self.cache.client is None:
            self._redis_up.set(0)
            return
        try:
            async with asyncio.timeout(max(1.0, self.interval)):
                info = await self.cache.apply(redis_info)
        except (CacheUnavailable, TimeoutError):
            self._redis_up.set(0)
            self._policies = None  # a Redis that comes back may be another one
            return
        self._redis_up.set(1)
        self._memory.set(info.used_memory)
        self._clients.set(info.connected_clients)
        self._evicting.set(1 if info.evicting else 0)
        if info.policies != self._policies:
            self._policies = info.policies
            if info.evicting:
                log.warning(
                    "redis may evict keys: rate limits and provisioning limits can forget "
                    "what was spent; set maxmemory-policy noeviction",
                    service=self.service,
                    maxmemory_policy=sorted(info.policies),
                )

    async def run(self) -> None:
        await run_periodically("resource sampler", self.sample, self.interval)

    def start(self) -> None:
        self._task.start()

    async def stop(self) -> None:
        await self._task.stop()
