"""`python -m key_service migrate ...`, the command behind `make migrate*`, for real."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg

from deploy.devstack.servers import PostgresServer, free_port

ROOT = Path(__file__).resolve().parents[2]


def migrate(
    pg: PostgresServer, database: str, *args: str, port: int | None = None
) -> tuple[int, str, str]:
    env = {
        **os.environ,
        "DB_HOST": pg.host,
        "DB_PORT": str(port or pg.port),
        "DB_NAME": database,
        "DB_USER": pg.user,
        "DB_SSLMODE": "disable",
        "DB_CONNECT_TIMEOUT": "2",
    }
    done = subprocess.run(
        [sys.executable, "-m", "key_service", "migrate", *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, done.stdout, done.stderr


def tables(pg: PostgresServer, database: str) -> set[str]:
    with psycopg.connect(pg.conninfo(database)) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
    return {str(r[0]) for r in rows}


def wait_until_nobody_is_connected(pg: PostgresServer, database: str) -> None:
    """A closed session's server process leaves shortly after its client: wait until
    `database` has no session, so the next command does not count one that is leaving."""
    deadline = time.monotonic() + 10
    with psycopg.connect(pg.conninfo("postgres"), autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,)
            ).fetchone()
            if row is not None and row[0] == 0:
                return
            assert time.monotonic() < deadline, f"sessions still connected to {database}"
            time.sleep(0.02)


def test_rollback_needs_confirmation_and_never_silently_drops_the_audit_trail(
    pg_server: PostgresServer, database: str
) -> None:
    # Back to before the audit trail: every migration after the first.
    steps = ["--steps", str(len(list((ROOT / "key_service" / "migrations").glob("*.up.sql"))) - 1)]
    # Not confirmed (no terminal, no --yes): nothing happens.
    code, out, err = migrate(pg_server, database, "down", *steps)
    assert code == 1
    assert "0002_api_key_audit_events" in out
    assert "pass --yes" in err
    assert "api_key_audit_events" in tables(pg_server, database)

    # A service (any other session) connected: refused.
    with psycopg.connect(pg_server.conninfo(database), autocommit=True) as live:
        live.execute(
            "INSERT INTO api_key_audit_events (event_id, action, key_id, actor, display_prefix,"
            " created_at) VALUES (%s, 'create', %s, 'test', 'myl_test', now())",
            (uuid.uuid4(), uuid.uuid4()),
        )
        code, _, err = migrate(pg_server, database, "down", "--yes", *steps)
        assert code == 1
        assert "other session(s) are connected" in err, err

    # Confirmed, nobody connected, but the audit trail holds a row: refused, and
    # nothing rolled back, not even the later migrations.
    before = tables(pg_server, database)
    wait_until_nobody_is_connected(pg_server, database)
    code, _, err = migrate(pg_server, database, "down", "--yes", *steps)
    assert code == 1
    assert "would drop api_key_audit_events, which holds rows" in err, err
    assert tables(pg_server, database) == before
    code, out, _ = migrate(pg_server, database, "status")
    assert "pending" not in out

    wait_until_nobody_is_connected(pg_server, database)
    code, out, err = migrate(pg_server, database, "down", "--yes", "--discard-data", *steps)
    assert code == 0, err
    assert "rolled back 0002_api_key_audit_events" in out
    assert "api_key_audit_events" not in tables(pg_server, database)
    assert "device_api_keys" in tables(pg_server, database)


def test_an_unreachable_database_is_one_line(pg_server: PostgresServer, database: str) -> None:
    port = free_port()
    for action in ("up", "status", "down"):
        code, _, err = migrate(pg_server, database, action, port=port)
        assert code == 1
        assert "Traceback" not in err
        assert err.strip().count("\n") == 0, err
        assert f"127.0.0.1:{port}" in err
