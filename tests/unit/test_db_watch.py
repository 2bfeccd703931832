"""`shared.db.Database`'s watch, one state change at a time, against a fake pool.

The fake connection's socket is one end of a socket pair: the other end stands for the
server, so "the answer arrived" is a byte sent from it, and "cut" is the end-of-file it sees.
The fake server answers fresh connections (the confirming probe) or not, refuses fresh pools
a number of times, and keeps the server processes that ran writes until told to end them.
What these rules are for is argued in the module docstring; the real server's side of them is
in tests/integration/test_database.py, test_write_deadlines.py and test_unknown_outcomes.py.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import cast

import psycopg
import pytest
from psycopg import pq
from psycopg_pool import PoolTimeout
from structlog.testing import capture_logs

from shared.config import DatabaseConfig
from shared.db import Connection, Database, DatabaseUnavailable, Pool
from shared.errors import DomainError, ErrorKind

BUDGET = 0.05  # a request's deadline after it got its connection


class FakeServer:
    def __init__(self) -> None:
        self.answers = True  # a fresh connection works
        self.pool_refusals = 0  # fresh pools refused before one opens
        self.reopens = 0
        self.probes: asyncio.Queue[bool] = asyncio.Queue()
        self.running: set[int] = set()  # server processes alive
        self.terminated: list[int] = []
        self._pids = itertools.count(1000)

    def new_backend(self) -> int:
        pid = next(self._pids)
        self.running.add(pid)
        return pid

    async def probe(self) -> None:
        self.probes.put_nowait(self.answers)
        if not self.answers:
            raise psycopg.OperationalError("connection refused")

    async def reopen(self) -> Pool:
        self.reopens += 1
        if self.pool_refusals:
            self.pool_refusals -= 1
            raise DatabaseUnavailable("too many connections for role")
        return cast(Pool, FakePool(self))


class FakeCursor:
    def __init__(self, rows: list[tuple[object, ...]]) -> None:
        self.rows = rows

    async def fetchone(self) -> tuple[object, ...] | None:
        return self.rows[0] if self.rows else None

    async def fetchall(self) -> list[tuple[object, ...]]:
        return self.rows


class FakePgConn:
    def __init__(self, sock: socket.socket, pid: int) -> None:
        self._sock = sock
        self.backend_pid = pid
        self.transaction_status = pq.TransactionStatus.IDLE

    @property
    def socket(self) -> int:
        return self._sock.fileno()


class FakeConnection:
    autocommit = False

    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.ours, self.theirs = socket.socketpair()
        self.theirs.setblocking(False)
        self.pgconn = FakePgConn(self.ours, server.new_backend())

    def send(self) -> None:
        """A statement goes to the server, which now owes an answer."""
        self.pgconn.transaction_status = pq.TransactionStatus.ACTIVE

    def answer(self) -> None:
        """The server's answer arrives; nobody has read it yet."""
        self.theirs.send(b"A")

    async def cut_seen(self) -> bool:
        return await asyncio.get_running_loop().sock_recv(self.theirs, 1) == b""

    def was_cut(self) -> bool:
        try:
            return self.theirs.recv(1) == b""
        except BlockingIOError:
            return False

    async def execute(self, query: str, params: tuple[object, ...] = ()) -> FakeCursor:
        if "pg_terminate_backend" in query:
            pid = cast(int, params[0])
            if pid not in self.server.running:
                return FakeCursor([])
            self.server.running.discard(pid)
            self.server.terminated.append(pid)
            return FakeCursor([(True,)])
        return FakeCursor([(datetime.now(UTC),)])

    async def rollback(self) -> None:
        pass

    def close(self) -> None:
        self.ours.close()
        self.theirs.close()


class FakePool:
    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.timeouts = 0  # getconn calls to time out
        self.handed: list[FakeConnection] = []
        self.returned: list[FakeConnection] = []
        self.closed = False

    async def getconn(self, timeout: float | None = None) -> FakeConnection:  # noqa: ASYNC109
        if self.timeouts:
            self.timeouts -= 1
            raise PoolTimeout("couldn't get a connection")
        conn = FakeConnection(self.server)
        self.handed.append(conn)
        return conn

    async def putconn(self, conn: FakeConnection) -> None:
        self.returned.append(conn)

    async def close(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        self.closed = True


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


@pytest.fixture
async def db(server: FakeServer) -> AsyncIterator[Database]:
    pool = FakePool(server)
    opened = Database(
        cast(Pool, pool),
        DatabaseConfig(),
        "unit",
        operation_timeout=1.0,
        probe_interval=0.01,
        probe=server.probe,
        reopen=server.reopen,
    )
    try:
        yield opened
    finally:
        await opened.close()
        for conn in pool.handed:
            conn.close()


def fake(conn: Connection) -> FakeConnection:
    return cast(FakeConnection, conn)


def pool_of(db: Database) -> FakePool:
    return cast(FakePool, db.pool)


async def cut_while_owed(db: Database, budget: float) -> DomainError:
    """What a request is told whose statement the server still owes past its deadline."""

    async def request() -> None:
        async with db.connection(budget=budget) as conn:
            fake(conn).send()
            assert await fake(conn).cut_seen()
            # What psycopg raises in the request whose socket was shut down.
            raise psycopg.OperationalError("server closed the connection unexpectedly")

    with pytest.raises(DomainError) as failed:
        await request()
    return failed.value


async def settled(db: Database) -> None:
    """Wait for the prober, if one runs, to end."""
    if db._prober is not None:
        await asyncio.wait_for(db._prober, 5)


async def test_a_connection_is_handed_out_watched_and_returned(db: Database) -> None:
    deadline = time.monotonic() + 10
    async with db.connection(deadline=deadline) as conn:
        assert fake(conn) in pool_of(db).handed
        # A write sent now may write its rows until the deadline less the answer's margin.
        left = (db.write_deadline(conn) - db.clock_offset - datetime.now(UTC)).total_seconds()
        assert 9 < left < 10
    assert pool_of(db).returned == [fake(conn)]
    assert db.up


async def test_a_request_too_close_to_its_deadline_gets_no_connection(db: Database) -> None:
    with pytest.raises(DomainError) as refused:
        async with db.connection(deadline=time.monotonic() + 0.01):
            pass
    assert refused.value.reason == "WRITE_NOT_COMPLETED"
    assert pool_of(db).handed == []


async def test_a_pool_timeout_is_down_only_if_a_fresh_connection_fails_too(
    db: Database, server: FakeServer
) -> None:
    pool_of(db).timeouts = 1
    with pytest.raises(DomainError) as refused:
        async with db.connection():
            pass
    assert refused.value.reason == "DATABASE_UNAVAILABLE"
    await settled(db)
    assert db.up
    assert server.probes.qsize() == 1


async def test_a_connection_released_before_its_deadline_is_never_cut(db: Database) -> None:
    async with db.connection(budget=BUDGET) as early:
        fake(early).send()
    # A later one the server owes an answer is cut past its own, later deadline: by then the
    # watchdog has had every chance to cut the first, had it still been watched.
    await cut_while_owed(db, 2 * BUDGET)
    assert not fake(early).was_cut()
    assert len(pool_of(db).returned) == 2
    assert pool_of(db).returned[0] is fake(early)


async def test_a_statement_the_server_owes_past_its_deadline_is_cut_and_the_live_database_stays_up(
    db: Database, server: FakeServer
) -> None:
    failed = await cut_while_owed(db, BUDGET)
    assert failed.kind is ErrorKind.UNAVAILABLE
    assert failed.reason == "DATABASE_UNAVAILABLE"
    await settled(db)
    assert db.up  # a fresh connection answered: only that statement was slow
    assert server.probes.qsize() == 1  # the cut started one confirmation, the error none


async def test_an_answer_that_arrived_before_the_deadline_passed_is_not_cut(
    db: Database,
) -> None:
    async with db.connection(budget=BUDGET) as answered:
        fake(answered).send()
        fake(answered).answer()
        await cut_while_owed(db, 2 * BUDGET)
        assert not fake(answered).was_cut()
        assert fake(answered).ours.recv(1) == b"A"  # its request reads the answer
        fake(answered).pgconn.transaction_status = pq.TransactionStatus.INTRANS
    await settled(db)
    assert db.up


async def test_a_cut_whose_fresh_connection_fails_marks_the_database_down_until_a_probe_works(
    db: Database, server: FakeServer
) -> None:
    server.answers = False
    await cut_while_owed(db, BUDGET)
    assert await server.probes.get() is False  # the confirmation
    assert await server.probes.get() is False  # the prober, now that it is down
    assert not db.up
    old = pool_of(db)
    with pytest.raises(DomainError) as refused:
        async with db.connection():
            pass
    assert refused.value.reason == "DATABASE_UNAVAILABLE"
    assert len(old.handed) == 1  # refused without asking the pool
    server.answers = True
    await settled(db)
    assert db.up
    assert db.pool is not cast(Pool, old)


async def test_going_down_cuts_at_once_only_what_is_past_its_deadline_or_unwatched(
    db: Database, server: FakeServer
) -> None:
    server.answers = False
    async with (
        db.connection(watched=False) as background,
        db.connection(deadline=time.monotonic() + 10) as writing,
    ):
        fake(background).send()
        fake(writing).send()
        db.suspect(psycopg.OperationalError("the connection was lost"))
        assert await fake(background).cut_seen()
        # A write still within its deadline may yet take effect: it is cut when due.
        assert not fake(writing).was_cut()
        fake(writing).pgconn.transaction_status = pq.TransactionStatus.INTRANS
    assert not db.up


async def test_an_unknown_outcome_is_said_and_resolved_once_the_write_has_settled(
    db: Database, server: FakeServer
) -> None:
    server.answers = False
    resolved = asyncio.Event()
    settled_first: list[bool] = []
    pids: list[int] = []

    async def resolve() -> None:
        settled_first.append(pids[0] not in server.running)
        resolved.set()

    async def write_and_lose_the_commit() -> None:
        async with db.connection() as conn:
            pids.append(conn.pgconn.backend_pid)
            db.on_unknown_outcome(conn, resolve)
            db.check_commit(conn)  # the COMMIT goes out
            raise psycopg.OperationalError("server closed the connection unexpectedly")

    with pytest.raises(DomainError) as failed:
        await write_and_lose_the_commit()
    assert failed.value.kind is ErrorKind.UNAVAILABLE
    assert failed.value.reason == "OUTCOME_UNKNOWN"
    assert await server.probes.get() is False
    assert not resolved.is_set()  # nobody can ask the database yet
    server.answers = True
    await asyncio.wait_for(resolved.wait(), 5)
    assert server.terminated == pids  # the process that ran the write was ended first
    assert settled_first == [True]


async def test_a_write_whose_confirmation_fails_is_answered_outcome_unknown_and_resolved(
    db: Database, server: FakeServer
) -> None:
    """The write committed (the server answered), its confirmation did not take: nothing is
    left to settle, so it is resolved at once, and no server process is ended for it."""
    resolved = asyncio.Event()
    confirmed: list[bool] = []

    async def resolve() -> None:
        resolved.set()

    async def refuse(conn: Connection) -> bool:
        confirmed.append(False)
        return False

    async def write_then_fail_to_confirm() -> None:
        async with db.connection() as conn:
            db.on_unknown_outcome(conn, resolve)
            db.on_committed(conn, refuse)
            db.check_commit(conn)  # and the COMMIT is answered

    with pytest.raises(DomainError) as failed:
        await write_then_fail_to_confirm()
    assert failed.value.reason == "OUTCOME_UNKNOWN"
    assert confirmed == [False]
    await asyncio.wait_for(resolved.wait(), 5)
    assert server.terminated == []
    assert db.up


async def test_a_confirmed_write_is_answered_and_never_resolved(db: Database) -> None:
    resolved: list[bool] = []

    async def resolve() -> None:
        resolved.append(True)

    async def accept(conn: Connection) -> bool:
        return True

    async def failing_write() -> None:
        async with db.connection() as conn:
            db.on_unknown_outcome(conn, resolve)
            db.on_committed(conn, accept)
            raise DomainError(ErrorKind.ALREADY_EXISTS, "taken", "TAKEN")

    async with db.connection() as conn:
        db.on_unknown_outcome(conn, resolve)
        db.on_committed(conn, accept)
        db.check_commit(conn)
    # A block that fails (its transaction rolled back) confirms nothing either.
    with pytest.raises(DomainError):
        await failing_write()
    await settled(db)
    assert resolved == []


async def test_a_failure_without_a_commit_in_flight_is_not_an_unknown_outcome(
    db: Database,
) -> None:
    resolved: list[bool] = []

    async def resolve() -> None:
        resolved.append(True)

    async def lose_the_connection_before_commit() -> None:
        async with db.connection() as conn:
            db.on_unknown_outcome(conn, resolve)
            raise psycopg.OperationalError("server closed the connection unexpectedly")

    with pytest.raises(DomainError) as failed:
        await lose_the_connection_before_commit()
    assert failed.value.reason == "DATABASE_UNAVAILABLE"
    await settled(db)
    assert db.up
    assert resolved == []


async def test_a_pool_that_cannot_reopen_is_retried_until_it_does(
    db: Database, server: FakeServer
) -> None:
    server.pool_refusals = 2
    old = db.pool
    with capture_logs() as logs:
        db.suspect(psycopg.OperationalError("the connection was lost"))
        assert not db.up
        await settled(db)
    assert db.up
    assert server.reopens == 3
    refusals = [e for e in logs if e["event"] == "database answers but the pool cannot open"]
    assert len(refusals) == 2
    assert db.pool is not old
    async with db.connection() as conn:
        assert fake(conn) in pool_of(db).handed
    await db.close()
    assert cast(FakePool, old).closed
