"""Gauges sampled in the background: the database pool and Redis, for both services.

Counters and histograms are recorded where things happen; what can only be *looked at*
(pool occupancy, whether Redis answers, how much memory it uses) is sampled here every
`interval` seconds. Redis is asked directly (`Cache.apply`), not through the breaker, so
`myl_redis_up` says whether Redis answers even while a guarded cache is still closed to reads.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from shared.cache import Cache, CacheUnavailable
from shared.db import Database
from shared.logging import get_logger
from shared.metrics import REDIS_CLIENTS, REDIS_MEMORY, REDIS_UP
from shared.tasks import stop_if_cancelled

log = get_logger(__name__)

DEFAULT_INTERVAL = 5.0


async def redis_info(client: aioredis.Redis) -> dict[str, float]:
    """used_memory and connected_clients; on a cluster, summed over its masters."""
    totals = {"used_memory": 0.0, "connected_clients": 0.0}
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
    return totals


class ResourceSampler:
    def __init__(
        self, service: str, db: Database, cache: Cache, interval: float = DEFAULT_INTERVAL
    ) -> None:
        self.service = service
        self.db = db
        self.cache = cache
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._redis_up = REDIS_UP.labels(service)
        self._memory = REDIS_MEMORY.labels(service)
        self._clients = REDIS_CLIENTS.labels(service)

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
            return
        self._redis_up.set(1)
        self._memory.set(info["used_memory"])
        self._clients.set(info["connected_clients"])

    async def run(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception:
                log.exception("sampling failed")
            stop_if_cancelled()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self.run(), name=f"{self.service} resource sampler"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
