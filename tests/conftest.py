"""Test harness: a throwaway PostgreSQL and Redis for the whole session.

Each test that asks for `database` gets an empty, migrated database (the worker's
own, emptied before the test: `WorkerDatabase`), and `redis_server` users get a
flushed Redis. Both servers stop when the session ends.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest
import redis
import redis.asyncio as aioredis
from psycopg import sql
from redis.asyncio.cluster import RedisCluster

from deploy.devstack.servers import (
    PostgresServer,
    RedisClusterServers,
    RedisServer,
    free_cluster_ports,
    free_port,
)
from shared.config import DatabaseConfig, ServerConfig
from shared.migrations import MigrationRunner, load_migrations
from tests.fixtures import internal_tls

pytest_plugins = ["tests.fixtures.cert", "tests.fixtures.key"]

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = {
    "cert_service": ROOT / "cert_service" / "migrations",
    "key_service": ROOT / "key_service" / "migrations",
}
TEMPLATE_DB = "myl_template"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    directory = Path(tempfile.mkdtemp(prefix="myl-test-pg-"))
    server = PostgresServer(directory, free_port(), durable=False)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
async def template_db(pg_server: PostgresServer) -> str:
    pg_server.create_database(TEMPLATE_DB)
    for service, directory in MIGRATIONS.items():
        runner = MigrationRunner(
            pg_server.conninfo(TEMPLATE_DB), service, load_migrations(directory)
        )
        await runner.up()
    return TEMPLATE_DB


# What a test may change in its database beyond its rows: relations and their columns,
# constraints, triggers, functions, rules, policies, grants, migrations.
_SHAPE = """
SELECT (SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace),
       (SELECT coalesce(sum(relnatts), 0) FROM pg_class
         WHERE relnamespace = 'public'::regnamespace),
       (SELECT string_agg(coalesce(relacl::text, ''), ',' ORDER BY oid) FROM pg_class
         WHERE relnamespace = 'public'::regnamespace),
       (SELECT count(*) FROM pg_constraint WHERE connamespace = 'public'::regnamespace),
       (SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
         WHERE c.relnamespace = 'public'::regnamespace),
       (SELECT string_agg(tgenabled::text, '' ORDER BY t.oid) FROM pg_trigger t
         JOIN pg_class c ON c.oid = t.tgrelid WHERE c.relnamespace = 'public'::regnamespace),
       (SELECT count(*) FROM pg_proc WHERE pronamespace = 'public'::regnamespace),
       (SELECT count(*) FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class
         WHERE c.relnamespace = 'public'::regnamespace),
       (SELECT count(*) FROM pg_policy),
       (SELECT count(*) FROM pg_db_role_setting),
       (SELECT count(*) FROM migration_history)
"""


class WorkerDatabase:
    """This worker's migrated database, emptied before each test instead of cloned afresh.

    A clone of the template costs PostgreSQL about 0.2 s of CPU; emptying every table costs
    about 0.01 s. Emptied means as a fresh clone is: every row gone (the migration history
    kept), every sequence restarted, no session of an earlier test left connected. A test
    that changed the shape (rolled a migration back, added a column) gets a fresh clone.
    """

    def __init__(self, server: PostgresServer, template: str) -> None:
        self.server = server
        self.template = template
        self.name = f"t_{uuid.uuid4().hex[:12]}"
        self.server.create_database(self.name, template=template)
        with psycopg.connect(self.server.conninfo(self.name), autocommit=True) as conn:
            self.shape = self._shape(conn)
            tables = conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                "AND tablename <> 'migration_history' ORDER BY 1"
            ).fetchall()
            sequences = conn.execute(
                "SELECT sequencename FROM pg_sequences WHERE schemaname = 'public' ORDER BY 1"
            ).fetchall()
        # One round trip. Replica mode: the audit trail's append-only triggers do not fire.
        self.empty = sql.SQL("; ").join(
            [
                sql.SQL("SET LOCAL session_replication_role = replica"),
                sql.SQL("SET LOCAL lock_timeout = '5s'"),
                *(sql.SQL("DELETE FROM {}").format(sql.Identifier(t)) for (t,) in tables),
                *(
                    sql.SQL("ALTER SEQUENCE {} RESTART").format(sql.Identifier(q))
                    for (q,) in sequences
                ),
            ]
        )

    @staticmethod
    def _shape(conn: psycopg.Connection[tuple[object, ...]]) -> tuple[object, ...]:
        row = conn.execute(_SHAPE).fetchone()
        assert row is not None
        return tuple(row)

    def _recreate(self) -> None:
        self.server.drop_database(self.name)
        self.server.create_database(self.name, template=self.template)

    def reset(self) -> str:
        try:
            with psycopg.connect(self.server.conninfo(self.name)) as conn:
                # Gone, not only signalled: a test may count the sessions (migrate's rollback
                # refuses while services are connected).
                conn.execute(
                    "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
                if self._shape(conn) != self.shape:
                    conn.rollback()
                    conn.close()
                    self._recreate()
                    return self.name
                conn.execute(self.empty)
        except psycopg.Error:
            self._recreate()
        return self.name


@pytest.fixture(scope="session")
def worker_database(pg_server: PostgresServer, template_db: str) -> WorkerDatabase:
    return WorkerDatabase(pg_server, template_db)


@pytest.fixture
def database(worker_database: WorkerDatabase) -> str:
    """A migrated database with nothing in it, for this test alone."""
    return worker_database.reset()


@pytest.fixture
def db_config(pg_server: PostgresServer, database: str) -> Callable[..., DatabaseConfig]:
    """`db_config(**settings)`: a `DatabaseConfig` for this test's database, as the server's
    superuser unless `settings` say otherwise."""

    def make(**settings: Any) -> DatabaseConfig:
        where: dict[str, Any] = {
            "host": pg_server.host,
            "port": pg_server.port,
            "name": database,
            "user": pg_server.user,
        }
        return DatabaseConfig(**(where | settings))

    return make


@pytest.fixture
def empty_database(pg_server: PostgresServer) -> Iterator[str]:
    """A fresh database with no tables."""
    name = f"e_{uuid.uuid4().hex[:12]}"
    pg_server.create_database(name)
    try:
        yield name
    finally:
        pg_server.drop_database(name)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    directory = Path(tempfile.mkdtemp(prefix="myl-test-redis-"))
    server = RedisServer(directory, free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def clean_redis(redis_server: RedisServer) -> RedisServer:
    """The session's Redis, running and empty."""
    if redis_server.process is None or redis_server.process.poll() is not None:
        redis_server.start()
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    client.flushall()
    client.close()
    return redis_server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    """A Redis Cluster of 3 masters with a replica each, for the session."""
    directory = Path(tempfile.mkdtemp(prefix="myl-test-cluster-"))
    cluster = RedisClusterServers(directory, free_cluster_ports(6))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Modules that set `REDIS_BACKENDS = ("standalone", "cluster")` run every test that
    builds a service config (`make_config`) once against each."""
    backends = getattr(metafunc.module, "REDIS_BACKENDS", None)
    if backends and "redis_backend" in metafunc.fixturenames:
        metafunc.parametrize("redis_backend", backends, indirect=True)


@pytest.fixture
def redis_backend(request: pytest.FixtureRequest) -> str:
    """ "standalone" (the session's Redis) or "cluster" (the session's Redis Cluster)."""
    return str(getattr(request, "param", "standalone"))


@pytest.fixture
async def redis_inspect(
    request: pytest.FixtureRequest, clean_redis: RedisServer, redis_backend: str
) -> AsyncIterator[aioredis.Redis]:
    """A client of the backend this test's services use, to look at what they stored."""
    client: aioredis.Redis
    if redis_backend == "cluster":
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        first = cluster.nodes[0]
        client = cast(aioredis.Redis, RedisCluster(host=first.host, port=first.port))
    else:
        client = aioredis.Redis(host=clean_redis.host, port=clean_redis.port)
    try:
        yield client
    finally:
        await client.aclose()


async def all_keys(client: aioredis.Redis) -> list[str]:
    """Every key, from every master of a cluster."""
    if isinstance(client, RedisCluster):
        found = await client.keys("*", target_nodes=RedisCluster.PRIMARIES)
    else:
        found = await client.keys("*")
    return sorted(k.decode() if isinstance(k, bytes) else str(k) for k in found)


def standalone_only(redis_backend: str) -> None:
    """Skip a test that stops or inspects the single Redis server itself."""
    if redis_backend != "standalone":
        pytest.skip("stops the standalone Redis; the cluster's failover has its own test")


ConfigFactory = Callable[..., ServerConfig]


@pytest.fixture
def make_config(
    request: pytest.FixtureRequest,
    pg_server: PostgresServer,
    database: str,
    clean_redis: RedisServer,
    redis_backend: str,
) -> ConfigFactory:
    """Build a service's ServerConfig pointing at this test's database and Redis.

    Extra keyword arguments are environment variables (unprefixed).
    """

    cluster_env: dict[str, str] = {}
    if redis_backend == "cluster":
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        cluster.flush()
        cluster_env["REDIS_CLUSTER_NODES"] = cluster.addresses

    def build(service: str, **env: str) -> ServerConfig:
        environ = {
            "DB_HOST": pg_server.host,
            "DB_PORT": str(pg_server.port),
            "DB_NAME": database,
            "DB_USER": pg_server.user,
            "DB_SSLMODE": "disable",
            "REDIS_HOST": clean_redis.host,
            "REDIS_PORT": str(clean_redis.port),
            "PORT": "0",
            "METRICS_PORT": "0",
            "ENVIRONMENT": "test",
            "SHUTDOWN_GRACE": "1",
            **cluster_env,
            **internal_tls.service_env(service),
            **env,
        }
        return ServerConfig.from_env(service, 0, 0, environ)

    return build


@pytest.fixture
async def db_conn(
    pg_server: PostgresServer, database: str
) -> AsyncIterator[psycopg.AsyncConnection[tuple[object, ...]]]:
    """A direct connection to this test's database, for assertions."""
    conn = await psycopg.AsyncConnection.connect(pg_server.conninfo(database), autocommit=True)
    try:
        yield conn
    finally:
        await conn.close()


def _dump_asyncio_tasks(signum: int, frame: object) -> None:
    """SIGUSR1: write every asyncio task's stack (what a hung test is waiting for) to
    $TMPDIR/myl-asyncio-tasks.txt (pytest captures the process's own output)."""
    import asyncio

    with open(Path(tempfile.gettempdir()) / "myl-asyncio-tasks.txt", "w") as out:
        loop = asyncio._get_running_loop()
        if loop is None:
            out.write("no running event loop\n")
            return
        for task in asyncio.all_tasks(loop):
            out.write(f"--- {task!r}\n")
            task.print_stack(file=out)


signal.signal(signal.SIGUSR1, _dump_asyncio_tasks)
