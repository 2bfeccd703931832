"""`shared.db.Database` against the real PostgreSQL: what is slow is not what is down.

A statement kept waiting by the server for something else (a lock another transaction
holds), or an answer that arrived while this process was busy, must not make the service
answer UNAVAILABLE to everyone: only a server that does not answer a fresh connection is
down. And the ACME order budget, which every replica spends, is exact under contention.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg import sql
from structlog.testing import capture_logs

from cert_service.storage import IssuanceQueue
from deploy.devstack.servers import PostgresServer
from shared.config import DatabaseConfig
from shared.db import WRITE_GUARD, Database, open_database
from shared.errors import DomainError, ErrorKind
from shared.limits import HOUR_US, Limit

OPERATION_TIMEOUT = 0.3


@pytest.fixture
async def db(db_config: Callable[..., DatabaseConfig]) -> AsyncIterator[Database]:
    config = db_config(
        sslmode="disable",
        operation_timeout=OPERATION_TIMEOUT,
    )
    opened = await open_database(config, "test")
    try:
        yield opened
    finally:
        await opened.close()


async def select_one(db: Database) -> int:
    async with db.connection() as conn:
        cur = await conn.execute("SELECT 1")
        row = await cur.fetchone()
        await conn.rollback()
    assert row is not None
    return int(row[0])


async def settle(db: Database) -> None:
    """Let a confirming probe, if one was started, finish."""
    if db._prober is not None:
        await asyncio.wait([db._prober], timeout=5)


async def test_a_statement_waiting_on_a_lock_fails_alone_and_the_database_stays_up(
    db: Database, pg_server: PostgresServer, database: str
) -> None:
    with psycopg.connect(pg_server.conninfo(database), autocommit=True) as holder:
        holder.execute("CREATE TABLE locked_row (id int PRIMARY KEY)")
        holder.execute("INSERT INTO locked_row VALUES (1)")
        with holder.transaction():
            holder.execute("SELECT id FROM locked_row WHERE id = 1 FOR UPDATE")
            started = time.monotonic()
            with pytest.raises(DomainError) as failed:
                async with db.connection() as conn:
                    await conn.execute("UPDATE locked_row SET id = 1 WHERE id = 1")
            waited = time.monotonic() - started
            # Meanwhile, other requests are served: the server is alive.
            assert await select_one(db) == 1
    assert failed.value.kind is ErrorKind.UNAVAILABLE
    assert OPERATION_TIMEOUT <= waited < OPERATION_TIMEOUT + 1.0
    await settle(db)
    assert db.up
    assert await select_one(db) == 1


async def test_an_answer_that_arrived_while_the_process_was_busy_is_not_cut(
    db_config: Callable[..., DatabaseConfig],
) -> None:
    # A budget the server's answer to SELECT 42 surely beats, even on a busy machine:
    # the point is an answer that arrived and was not read, not a slow server.
    timeout = 1.0
    config = db_config(
        sslmode="disable",
        operation_timeout=timeout,
    )
    db = await open_database(config, "test")
    try:
        await _read_late(db, timeout)
    finally:
        await db.close()


async def _read_late(db: Database, budget: float) -> None:
    async with db.connection() as conn:
        # The statement is sent and answered, but nothing reads the answer for longer than
        # the operation timeout: the event loop runs (the watchdog looks), this request not.
        pgconn = conn.pgconn
        pgconn.send_query(b"SELECT 42")
        assert pgconn.flush() == 0  # a few bytes: all sent at once
        await asyncio.sleep(budget * 2.5)
        pgconn.consume_input()
        assert not pgconn.is_busy()
        results = []
        while (result := pgconn.get_result()) is not None:
            results.append(result)
        assert results[0].get_value(0, 0) == b"42"
        cur = await conn.execute("SELECT 43")
        assert await cur.fetchone() == (43,)
        await conn.rollback()
    assert db.up


async def test_the_order_budget_admits_exactly_its_orders_under_contention(
    db: Database,
    pg_server: PostgresServer,
    database: str,
    db_conn: psycopg.AsyncConnection[tuple[object, ...]],
) -> None:
    queues = [IssuanceQueue(db) for _ in range(2)]
    now = datetime.now(UTC)
    interval = timedelta(minutes=12)  # 5 per hour
    budget = Limit(5, 5, HOUR_US)
    url = "https://acme.example/directory"

    async def spend(index: int) -> timedelta:
        return await queues[index % 2].spend_order(url, now, budget)

    waits = await asyncio.gather(*(spend(i) for i in range(20)))
    admitted = [w for w in waits if w == timedelta(0)]
    assert len(admitted) == 5
    # Every refusal says when the next order will be: the budget refills one per interval.
    assert all(timedelta(0) < w <= interval for w in waits if w != timedelta(0))
    later = await queues[0].spend_order(url, now + interval, budget)
    assert later == timedelta(0)
    assert await queues[1].spend_order(url, now + interval, budget) > timedelta(0)
    # Each admitted order moved the TAT by one interval: none was written over another.
    cur = await db_conn.execute(
        "SELECT tat FROM acme_order_budget WHERE directory_url = %s", (url,)
    )
    assert await cur.fetchone() == (now + 6 * interval,)


async def test_an_order_spent_elsewhere_between_read_and_write_is_decided_again(
    pg_server: PostgresServer,
    db_config: Callable[..., DatabaseConfig],
    database: str,
    db_conn: psycopg.AsyncConnection[tuple[object, ...]],
) -> None:
    """Another replica spends between this one's read of the budget's TAT and its
    compare-and-set: the CAS writes nothing, and the spend decides again on the TAT the other
    replica left (the budget's second and last order), never over it."""
    config = db_config(
        sslmode="disable",
        operation_timeout=30.0,  # the spend waits for the other replica's commit
    )
    db = await open_database(config, "test")
    queue = IssuanceQueue(db)
    now = datetime.now(UTC)
    interval = timedelta(minutes=30)  # 2 per hour
    budget = Limit(2, 2, HOUR_US)
    url = "https://acme.example/directory"
    await db_conn.execute(
        "INSERT INTO acme_order_budget (directory_url, tat) VALUES (%s, %s)", (url, now)
    )
    try:
        async with await psycopg.AsyncConnection.connect(pg_server.conninfo(database)) as other:
            # The other replica's spend, written and not committed yet: the row stays as it
            # was for readers, and this replica's CAS waits for the other to commit.
            await other.execute(
                "UPDATE acme_order_budget SET tat = %s WHERE directory_url = %s",
                (now + interval, url),
            )
            spend = asyncio.create_task(queue.spend_order(url, now, budget))
            deadline = time.monotonic() + 30
            while not spend.done() and time.monotonic() < deadline:
                cur = await db_conn.execute(
                    "SELECT EXISTS (SELECT 1 FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock')"
                )
                if await cur.fetchone() == (True,):
                    break
                await asyncio.sleep(0.01)
            assert not spend.done(), "the spend did not wait to write the TAT it read"
            await other.commit()
        assert await spend == timedelta(0)
        cur = await db_conn.execute(
            "SELECT tat FROM acme_order_budget WHERE directory_url = %s", (url,)
        )
        assert await cur.fetchone() == (now + 2 * interval,)
        assert await queue.spend_order(url, now, budget) == interval
    finally:
        await db.close()


async def test_a_pool_that_cannot_reopen_after_an_outage_is_retried_until_it_does(
    db_config: Callable[..., DatabaseConfig],
    database: str,
    db_conn: psycopg.AsyncConnection[tuple[object, ...]],
) -> None:
    """The server answers a probe but refuses the pool's connections (it is at its connection
    limit: here a role's, which refuses with the same SQLSTATE 53300 as `max_connections`
    without a test opening hundreds of backends). The service stays down meanwhile, and
    recovers by itself once connections are to be had: it does not wait for a restart."""
    role = f"limited_{uuid.uuid4().hex[:12]}"
    await db_conn.execute(
        sql.SQL("CREATE ROLE {} LOGIN CONNECTION LIMIT 4").format(sql.Identifier(role))
    )
    config = db_config(
        user=role,
        sslmode="disable",
        pool_min=2,
        pool_max=2,
        connect_timeout=0.5,
        operation_timeout=OPERATION_TIMEOUT,
    )
    db = await open_database(config, "limited", probe_interval=0.05)
    holder: psycopg.AsyncConnection[tuple[object, ...]] | None = None
    try:
        # The old pool keeps its two connections; a third is taken elsewhere: one is left,
        # enough for a probe, not for a fresh pool's two.
        holder = await psycopg.AsyncConnection.connect(config.conninfo())
        with capture_logs() as logs:
            db.suspect(psycopg.OperationalError("the connection was lost"))
            async with asyncio.timeout(10):
                while True:  # the prober connected, the fresh pool did not open
                    if any(e["event"] == "database answers but the pool cannot open" for e in logs):
                        break
                    await asyncio.sleep(0.05)
            assert not db.up
            with pytest.raises(DomainError) as refused:
                await select_one(db)
            assert refused.value.kind is ErrorKind.UNAVAILABLE
            await holder.close()
            holder = None
            assert db._prober is not None
            await asyncio.wait_for(db._prober, 10)  # it ends once a fresh pool serves
        assert db.up
        assert await select_one(db) == 1
    finally:
        if holder is not None:
            await holder.close()
        await db.close()
        await db_conn.execute(
            sql.SQL("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s"),
            (role,),
        )
        await db_conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


async def test_a_commit_cut_in_flight_is_answered_outcome_unknown_and_resolved_once_settled(
    db: Database, db_conn: psycopg.AsyncConnection[tuple[object, ...]]
) -> None:
    """The server process running a write stops (SIGSTOP) with the COMMIT sent: its caller is
    told the outcome is unknown, not that nothing was written; the store's resolver runs once
    that process is gone, when the write can no longer change, and not before."""
    await db_conn.execute("CREATE TABLE written (id int PRIMARY KEY)")
    resolved = asyncio.Event()
    seen_at_resolution: list[int] = []
    stopped: list[int] = []

    async def resolve() -> None:
        cur = await db_conn.execute("SELECT count(*) FROM written")
        row = await cur.fetchone()
        assert row is not None
        seen_at_resolution.append(int(str(row[0])))
        resolved.set()

    async def write_and_stop_before_commit() -> None:
        async with db.connection() as conn, conn.transaction():
            await conn.execute(
                f"INSERT INTO written SELECT 1 WHERE {WRITE_GUARD}",
                {"deadline": db.write_deadline(conn)},
            )
            db.on_unknown_outcome(conn, resolve)
            stopped.append(conn.pgconn.backend_pid)
            os.kill(stopped[0], signal.SIGSTOP)
            db.check_commit(conn)  # then the COMMIT goes to the stopped process

    try:
        with pytest.raises(DomainError) as caught:
            await write_and_stop_before_commit()
        assert caught.value.kind is ErrorKind.UNAVAILABLE
        assert caught.value.reason == "OUTCOME_UNKNOWN"
        assert not resolved.is_set()  # the process may still commit: nothing is settled
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    await asyncio.wait_for(resolved.wait(), 5)
    cur = await db_conn.execute("SELECT count(*) FROM written")
    assert await cur.fetchone() == (seen_at_resolution[0],)
