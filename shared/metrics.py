"""Prometheus metrics shared by both services (the seed's monitoring list)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RPC_LATENCY = Histogram(
    "myl_rpc_duration_seconds",
    "gRPC handler latency",
    ["service", "method"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
RPC_RESULTS = Counter("myl_rpc_total", "gRPC calls by status code", ["service", "method", "code"])
CACHE_RESULTS = Counter("myl_cache_total", "Cache lookups", ["namespace", "result"])
REDIS_LATENCY = Histogram(
    "myl_redis_duration_seconds",
    "Redis command latency",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25),
)
REDIS_ERRORS = Counter("myl_redis_errors_total", "Redis errors and short-circuited calls", ["kind"])
CIRCUIT_OPEN = Gauge("myl_redis_circuit_open", "1 while the Redis circuit breaker is open")
POOL_SIZE = Gauge("myl_db_pool_connections", "PostgreSQL pool connections", ["service", "state"])
DB_UP = Gauge("myl_db_up", "1 while PostgreSQL answers, 0 while it is unreachable", ["service"])
