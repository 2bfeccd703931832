from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from deploy.devstack.servers import PostgresServer
from shared.migrations import MigrationError, MigrationRunner, load_migrations
from tests.conftest import MIGRATIONS, ROOT


async def _tables(conninfo: str) -> set[str]:
    async with await psycopg.AsyncConnection.connect(conninfo) as conn:
        cur = await conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {str(row[0]) for row in await cur.fetchall()}


@pytest.mark.parametrize(
    ("service", "table"),
    [("cert_service", "device_certificates"), ("key_service", "device_api_keys")],
)
async def test_up_status_down(
    pg_server: PostgresServer, empty_database: str, service: str, table: str
) -> None:
    conninfo = pg_server.conninfo(empty_database)
    runner = MigrationRunner(conninfo, service, load_migrations(MIGRATIONS[service]))

    assert {s.state for s in await runner.status()} == {"pending"}
    applied = await runner.up()
    assert applied[0].label.startswith("0001_")
    assert table in await _tables(conninfo)
    assert {s.state for s in await runner.status()} == {"applied"}
    assert await runner.up() == []

    rolled = await runner.down(steps=len(applied))
    assert [m.version for m in rolled] == sorted((m.version for m in applied), reverse=True)
    assert table not in await _tables(conninfo)
    assert {s.state for s in await runner.status()} == {"pending"}


async def test_edited_migration_is_refused(
    pg_server: PostgresServer, empty_database: str, tmp_path: Path
) -> None:
    directory = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS["cert_service"], directory)
    conninfo = pg_server.conninfo(empty_database)
    await MigrationRunner(conninfo, "cert_service", load_migrations(directory)).up()

    first = sorted(directory.glob("0001_*.up.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited afterwards\n")
    runner = MigrationRunner(conninfo, "cert_service", load_migrations(directory))
    assert {s.state for s in await runner.status()} >= {"modified"}
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await runner.up()


async def test_failed_migration_leaves_nothing_behind(
    pg_server: PostgresServer, empty_database: str, tmp_path: Path
) -> None:
    directory = tmp_path / "migrations"
    directory.mkdir()
    (directory / "0001_first.up.sql").write_text("CREATE TABLE first (id int);")
    (directory / "0002_broken.up.sql").write_text(
        "CREATE TABLE second (id int); SELECT no_such_function();"
    )
    conninfo = pg_server.conninfo(empty_database)
    runner = MigrationRunner(conninfo, "demo", load_migrations(directory))
    with pytest.raises(MigrationError, match="0002_broken"):
        await runner.up()
    assert "first" in await _tables(conninfo)
    assert "second" not in await _tables(conninfo)
    assert [s.state for s in await runner.status()] == ["applied", "pending"]


async def test_racing_runners_apply_each_migration_once(
    pg_server: PostgresServer, empty_database: str
) -> None:
    conninfo = pg_server.conninfo(empty_database)
    migrations = load_migrations(MIGRATIONS["key_service"])
    runners = [MigrationRunner(conninfo, "key_service", migrations) for _ in range(4)]
    results = await asyncio.gather(*(r.up() for r in runners))
    assert sorted(len(r) for r in results) == [0, 0, 0, len(migrations)]
    async with await psycopg.AsyncConnection.connect(conninfo) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM migration_history WHERE service = 'key_service'"
        )
        assert (await cur.fetchone()) == (len(migrations),)


def test_migrate_commands(pg_server: PostgresServer, empty_database: str) -> None:
    env = {
        **os.environ,
        "DB_HOST": pg_server.host,
        "DB_PORT": str(pg_server.port),
        "DB_NAME": empty_database,
        "DB_SSLMODE": "disable",
    }

    def run(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "cert_service", "migrate", *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "applied 0001_device_certificates" in run("up")
    assert "applied" in run("status")
    steps = len(list((ROOT / "cert_service" / "migrations").glob("*.up.sql")))
    rolled = run("down", "--steps", str(steps), "--yes")
    assert "rolled back 0002_device_events_outbox" in rolled
    assert "rolled back 0001_device_certificates" in rolled
    assert "pending" in run("status")

    bad = subprocess.run(
        [sys.executable, "-m", "cert_service", "migrate", "up"],
        env={**env, "DB_PORT": "not-a-port"}, cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode != 0
    assert "DB_PORT" in bad.stderr
