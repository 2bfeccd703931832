"""Benchmark: Redis clients side by side on the verify hot path.

Run with `python -m tests.bench.bench_redis_clients` (`make bench` runs it). It prints
numbers and asserts nothing about time.

What key verification sends per request on a cache hit is one script call: EVALSHA of
`key_service.ratelimit.VERIFY_SCRIPT` over the key's record and its GCRA state (two keys, one
hash tag), with `now` and "count it". This module runs exactly that call, over 1,000 keys
whose records are cached with a limit that admits everything, through each client:

- `scriptclient`: key_service's own pipelined client (`key_service.scriptclient`);
- `redis-py`: redis-py's asyncio client (hiredis parser) as `shared.cache.Cache.from_config`
  builds it (`Redis`, or `RedisCluster` given cluster nodes), running the script with
  `register_script` (EVALSHA, EVAL after NOSCRIPT);
- `valkey-glide`: valkey-glide's asyncio client (`invoke_script`), when it is installed;

on a standalone Redis and on a 3-master Redis Cluster (deploy.devstack.servers), each with 1 caller
(latency of one call alone) and with 200 concurrent callers (the server's load under
traffic). ops/s counts the calls answered over the run; p50/p99 are per call, from the
caller's side.
"""

from __future__ import annotations

import asyncio
import importlib
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import redis
from redis.cluster import RedisCluster as SyncRedisCluster

from deploy.devstack.servers import RedisClusterServers, RedisServer, free_cluster_ports, free_port
from key_service.ratelimit import VERIFY_SCRIPT
from key_service.scriptclient import script_client
from key_service.verify import VERIFY, rate_key, record_key
from shared.cache import Cache
from shared.config import RedisConfig
from tests.bench.harness import percentile

KEYS = 1_000
RECORD = b"99999999999999999|60000000|99999999999999999|0|"  # usable, never limited
DURATION = 3.0
WARMUP = 0.5
CONCURRENCY = (1, 200)

Call = Callable[[tuple[str, str], tuple[bytes, bytes]], Awaitable[Any]]


def key_pairs() -> list[tuple[str, str]]:
    hashes = [n.to_bytes(32, "big") for n in range(KEYS)]
    return [(record_key(h), rate_key(h)) for h in hashes]


async def redis_py(config: RedisConfig) -> tuple[Call, Callable[[], Awaitable[None]]]:
    cache = Cache.from_config(config)
    assert cache.client is not None
    script = cache.client.register_script(VERIFY_SCRIPT)

    async def call(keys: tuple[str, str], args: tuple[bytes, bytes]) -> Any:
        return await script(keys=list(keys), args=list(args))

    return call, cache.close


async def valkey_glide(config: RedisConfig) -> tuple[Call, Callable[[], Awaitable[None]]] | None:
    try:
        glide: Any = importlib.import_module("glide")
    except ImportError:
        return None
    client: Any
    if config.cluster_nodes:
        nodes = [glide.NodeAddress(host, port) for host, port in config.cluster_nodes]
        client = await glide.GlideClusterClient.create(
            glide.GlideClusterClientConfiguration(nodes, request_timeout=500)
        )
    else:
        client = await glide.GlideClient.create(
            glide.GlideClientConfiguration(
                [glide.NodeAddress(config.host, config.port)], request_timeout=500
            )
        )
    script = glide.Script(VERIFY_SCRIPT)

    async def call(keys: tuple[str, str], args: tuple[bytes, bytes]) -> Any:
        return await client.invoke_script(script, keys=list(keys), args=list(args))

    async def close() -> None:
        await client.close()

    return call, close


async def custom(config: RedisConfig) -> tuple[Call, Callable[[], Awaitable[None]]]:
    client = script_client(config)

    async def call(keys: tuple[str, str], args: tuple[bytes, bytes]) -> Any:
        return await client.run(VERIFY, keys, args)

    return call, client.close


CLIENTS: dict[
    str, Callable[[RedisConfig], Awaitable[tuple[Call, Callable[[], Awaitable[None]]] | None]]
] = {
    "scriptclient": custom,
    "redis-py": redis_py,
    "valkey-glide": valkey_glide,
}


async def measure(call: Call, pairs: Sequence[tuple[str, str]], callers: int) -> dict[str, float]:
    latencies: list[float] = []
    stop_at = 0.0
    recording = False

    async def caller(offset: int) -> None:
        n = offset
        while True:
            keys = pairs[n % len(pairs)]
            n += callers
            started = time.perf_counter()
            reply = await call(keys, (b"%d" % (time.time_ns() // 1000), b"1"))
            done = time.perf_counter()
            if int(reply[1]) != 1:
                raise AssertionError(f"unexpected reply {reply!r}")
            if done >= stop_at:
                return
            if recording:
                latencies.append(done - started)

    stop_at = time.perf_counter() + WARMUP
    await asyncio.gather(*(caller(i) for i in range(callers)))
    recording = True
    began = time.perf_counter()
    stop_at = began + DURATION
    await asyncio.gather(*(caller(i) for i in range(callers)))
    elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "ops": len(latencies) / elapsed,
        "p50": percentile(latencies, 50) * 1e6,
        "p99": percentile(latencies, 99) * 1e6,
    }


def seed(client: redis.Redis | SyncRedisCluster, pairs: Sequence[tuple[str, str]]) -> None:
    for record, _ in pairs:
        client.set(record, RECORD)


async def run_topology(name: str, config: RedisConfig, rows: list[list[str]]) -> None:
    pairs = key_pairs()
    for client_name, make in CLIENTS.items():
        made = await make(config)
        if made is None:
            rows.append([name, client_name, "-", "not installed", "", ""])
            continue
        call, close = made
        try:
            for callers in CONCURRENCY:
                result = await measure(call, pairs, callers)
                rows.append(
                    [
                        name,
                        client_name,
                        str(callers),
                        f"{result['ops']:,.0f}",
                        f"{result['p50']:,.0f}",
                        f"{result['p99']:,.0f}",
                    ]
                )
                print("  ".join(rows[-1]), flush=True)
        finally:
            await close()


def print_table(rows: list[list[str]]) -> None:
    header = ["redis", "client", "callers", "ops/s", "p50 µs", "p99 µs"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print()
    for row in [header, *rows]:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))


def main() -> int:
    directory = Path(tempfile.mkdtemp(prefix="myl-bench-redis-"))
    standalone = RedisServer(directory / "standalone", free_port())
    cluster = RedisClusterServers(directory / "cluster", free_cluster_ports(3), replicas=0)
    rows: list[list[str]] = []
    try:
        standalone.start()
        cluster.start()
        pairs = key_pairs()
        with redis.Redis(host=standalone.host, port=standalone.port) as client:
            seed(client, pairs)
        first = cluster.nodes[0]
        with SyncRedisCluster(host=first.host, port=first.port) as cluster_client:
            seed(cluster_client, pairs)
        print(
            f"EVALSHA of the verify script, {KEYS:,} keys, {DURATION:g} s per run "
            f"(after {WARMUP:g} s of warm-up), one process",
            flush=True,
        )
        asyncio.run(
            run_topology(
                "standalone",
                RedisConfig(host=standalone.host, port=standalone.port, socket_timeout=2),
                rows,
            )
        )
        nodes = tuple((node.host, node.port) for node in cluster.nodes)
        asyncio.run(
            run_topology("cluster", RedisConfig(cluster_nodes=nodes, socket_timeout=2), rows)
        )
        print_table(rows)
    finally:
        cluster.stop()
        standalone.stop()
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
