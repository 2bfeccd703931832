"""The async PostgreSQL pool (psycopg 3), opened so that a wrong DSN fails fast."""

from __future__ import annotations

from psycopg import AsyncConnection
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from shared.config import DatabaseConfig
from shared.metrics import POOL_SIZE

Pool = AsyncConnectionPool[AsyncConnection[TupleRow]]


class DatabaseUnavailable(Exception):
    """The database could not be reached at start-up."""


async def open_pool(config: DatabaseConfig, service: str) -> Pool:
    """Open the pool and wait for its first connections.

    Raises `DatabaseUnavailable` (naming the server, never the password) when
    no connection is made within the connect timeout.
    """
    pool: Pool = AsyncConnectionPool(
        config.conninfo(),
        min_size=max(1, config.pool_min),
        max_size=config.pool_max,
        max_idle=config.idle_timeout,
        timeout=config.connect_timeout * 2,
        open=False,
        name=service,
        kwargs={"autocommit": False},
    )
    try:
        await pool.open(wait=True, timeout=config.connect_timeout)
    except PoolTimeout as exc:
        await pool.close()
        raise DatabaseUnavailable(
            f"cannot connect to PostgreSQL at {config.describe()} "
            f"within {config.connect_timeout:g}s (check DB_HOST, DB_PORT, DB_NAME, DB_USER, "
            "DB_PASSWORD)"
        ) from exc
    return pool


def record_pool_stats(pool: Pool, service: str) -> None:
    stats = pool.get_stats()
    POOL_SIZE.labels(service, "size").set(stats.get("pool_size", 0))
    POOL_SIZE.labels(service, "available").set(stats.get("pool_available", 0))
    POOL_SIZE.labels(service, "waiting").set(stats.get("requests_waiting", 0))
