"""Prometheus metrics both services record (the seed's monitoring list).

Only what both fill lives here: importing this module registers every metric in it, and a
metric without labels is exported (as 0) by every process that imports it. A metric one
service alone can fill lives in that service (`cert_service/metrics.py`,
`key_service/metrics.py`), so the other never exports a constant 0 a rule would read as a
fact.
"""

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
CACHE_REFUSED = Counter(
    "myl_cache_records_refused_total",
    "Cached records ignored: a seal this service did not make (forged) or too old (stale)",
    ["cache", "reason"],
)
REDIS_LATENCY = Histogram(
    "myl_redis_duration_seconds",
    "Redis command latency",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25),
)
REDIS_ERRORS = Counter("myl_redis_errors_total", "Redis errors and short-circuited calls", ["kind"])
CIRCUIT_OPEN = Gauge("myl_redis_circuit_open", "1 while the Redis circuit breaker is open")
POOL_SIZE = Gauge("myl_db_pool_connections", "PostgreSQL pool connections", ["service", "state"])
DB_UP = Gauge("myl_db_up", "1 while PostgreSQL answers, 0 while it is unreachable", ["service"])

# -- recorded since the monitoring work (README, "Monitoring"): what makes each move is noted.

# Every request-path use of a PostgreSQL connection: from checkout to return (its queries).
DB_QUERY_LATENCY = Histogram(
    "myl_db_query_duration_seconds",
    "Time a request held a PostgreSQL connection (its statements and commit)",
    ["service"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
# Sampled every few seconds by `shared.monitoring.ResourceSampler`.
REDIS_UP = Gauge("myl_redis_up", "1 while Redis answers INFO, 0 otherwise", ["service"])
REDIS_MEMORY = Gauge("myl_redis_memory_used_bytes", "Redis used_memory (INFO memory)", ["service"])
REDIS_CLIENTS = Gauge(
    "myl_redis_connected_clients", "Redis connected_clients (INFO clients)", ["service"]
)
# 1 while Redis's maxmemory-policy lets it evict keys (anything but noeviction): unsupported,
# since limiter state lives only in Redis (shared/monitoring.py).
REDIS_EVICTING_POLICY = Gauge(
    "myl_redis_evicting_policy",
    "1 while Redis's maxmemory-policy may evict keys (unsupported; noeviction expected)",
    ["service"],
)
# shared.limits: every check-and-spend, by limit and result (allowed, refused).
LIMIT_DECISIONS = Counter(
    "myl_limit_decisions_total",
    "Provisioning and registration limit decisions",
    ["limit", "result"],
)
# shared.tasks: a pass of a background loop (sampler, flusher, relay, lifecycle, CRL, cache
# guard) that raised; the loop goes on, so a failure shows here and in the log, not as a stop.
BACKGROUND_FAILURES = Counter(
    "myl_background_failures_total", "Background passes that failed, by task", ["task"]
)
UNCONFIRMED_WRITES_UNDONE = Counter(
    "myl_unconfirmed_writes_undone_total",
    "Committed writes undone because their callers were never told of them (shared/outcomes.py), "
    "by the process that made them (owner) or a replica's sweep (sweep)",
    ["service", "kind", "by"],
)
