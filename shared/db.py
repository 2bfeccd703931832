"""PostgreSQL access for both services: a psycopg 3 pool that fails fast and recovers fast.

`open_database` opens the pool so that a wrong DSN fails at start-up. After that, every
request-path statement runs inside `Database.connection()`, which gives three guarantees
while PostgreSQL is unreachable (stopped, restarting, or hung):

* **Fast, retryable failure.** Once the database is known to be down, `connection()` raises
  UNAVAILABLE (`DATABASE_UNAVAILABLE`, with a retry delay) at once, without touching the
  network. It learns that from a connection error, or from a fresh connection that fails
  after a request could not get a pooled one within `operation_timeout` or was cut by the
  watchdog. The watchdog cuts a connection held past its request's deadline whose
  statement is at the server with no answer yet (a hung server never answers, and TCP never
  says so): its socket is shut down, which makes psycopg raise at once in the waiting
  request instead of waiting for its own cancellation round trips to a server that does not
  answer. A connection whose answer has arrived but not yet been read, or with nothing in
  flight, is never cut: the delay is this process's (a busy CPU), not the server's. Every
  such failure reaches the client as UNAVAILABLE, never INTERNAL; a statement that was only
  slow (a lock wait) fails alone, because the confirming connection succeeds.
* **Fast recovery.** While down, a prober connects every `probe_interval` seconds. As soon
  as one connection works and a fresh pool opens, the new pool replaces the old one (whose
  connections are all dead, and whose own reconnect back-off can grow to many seconds), and
  requests flow again. A probe that connects while the pool cannot open (the server is at
  `max_connections`, say) keeps the database down and is tried again until the pool opens.
* **The database enforces the caller's deadline.** A request's deadline is a moment
  (`connection(deadline=...)`, by default `operation_timeout` after it got its connection);
  the watchdog answers the caller then at the latest. Each write statement carries the same
  moment on the server's clock, a margin earlier (`write_deadline`), in `WRITE_GUARD`: for
  every row it is about to write, the server sets `lock_timeout` to the time left, so a wait
  on a row lock or on a unique index entry (another transaction's uncommitted row) ends at
  the deadline with an error, and it refuses to write at all once the deadline has passed.
  (That is `SET LOCAL lock_timeout` from the remaining deadline, done per row inside the
  statement: no extra round trip, and exact where a per-transaction setting would restart
  with every statement.) A statement that wrote its rows in time has only its own work and
  its commit left, which the margin covers. A lock the statement waits for before it runs
  (a table lock) is not covered by that; such a statement refuses its rows once it runs,
  and since the watchdog has cut its connection by then, the server ends it within
  `client_connection_check_interval` (`DatabaseConfig.conninfo`) wherever it waits. Either
  way the error is UNAVAILABLE with `WRITE_NOT_COMPLETED`: nothing was written. A
  multi-statement transaction is committed only while the margin is left (`check_commit`).
* **An unknown outcome is said, and resolved.** A write whose commit was in flight when the
  connection was cut or broke (the server froze mid-COMMIT, say) may or may not take effect
  when the server runs again. Its caller gets UNAVAILABLE with `OUTCOME_UNKNOWN` (retry
  with the same request_id), never `WRITE_NOT_COMPLETED`; and whatever the store registered
  for it (`on_unknown_outcome`: undo it unless a retry claimed it) runs as soon as the
  database answers again, once the server process that ran the write is gone (it is
  terminated first), so that the write is settled, applied or not, before it is undone.
  That list is in memory; what makes the undo outlive the process is a marker the write
  commits with itself and deletes before its caller is answered (`on_committed`,
  `shared/outcomes.py`): a replica that dies meanwhile leaves the marker, and any replica
  undoes the write once the marker is older than a grace period.

Background jobs that legitimately hold a connection for long (a lifecycle batch signing
certificates, bulk loads) pass `watched=False` and are not watched.

Everything known of a handed-out connection is one record (`_Held`: its deadline, its timer,
whether it was cut, the write it may be committing and that write's resolvers), kept from
`connection()`'s entry to its exit, so no two collections can disagree about it. The watchdog
is that record's timer: it fires at the deadline, cuts the connection if the server owes an
answer, and otherwise looks again every `_WATCH_PERIOD` until the connection is released
(its answer may be read by then, or its next statement sent to a server that hangs).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Final

import psycopg
from psycopg import AsyncConnection, pq
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from shared.config import DatabaseConfig
from shared.errors import DomainError, ErrorKind
from shared.logging import get_logger
from shared.metrics import DB_QUERY_LATENCY, DB_UP, POOL_SIZE

log = get_logger(__name__)

Pool = AsyncConnectionPool[AsyncConnection[TupleRow]]
Connection = AsyncConnection[TupleRow]

DEFAULT_OPERATION_TIMEOUT: Final = 0.5
DEFAULT_PROBE_INTERVAL: Final = 0.2
_WATCH_PERIOD: Final = 0.05
_RETRY_AFTER: Final = 1.0
_ERRORS: Final = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)
# How long before its caller's deadline a write must have written its rows: the time its
# statement's own work, its commit and the answer's way back may take.
_ANSWER_MARGIN: Final = 0.05
_PAST_DEADLINE: Final = "write deadline passed"
# The ErrorInfo reason of a write that may or may not have taken effect.
OUTCOME_UNKNOWN: Final = "OUTCOME_UNKNOWN"

# A condition for each row a write statement is about to write (see the module docstring):
# the server's `lock_timeout` becomes the time left before `%(deadline)s` (from
# `Database.write_deadline`), and past it the statement fails without writing anything (the
# setting refuses the value, which names the reason).
WRITE_GUARD: Final = f"""set_config('lock_timeout',
    CASE WHEN clock_timestamp() < %(deadline)s::timestamptz
         THEN greatest(1, ceil(1000 * extract(epoch FROM
                  %(deadline)s::timestamptz - clock_timestamp())))::bigint || 'ms'
         ELSE '{_PAST_DEADLINE}' END, true) IS NOT NULL"""


def is_connection_error(exc: BaseException) -> bool:
    """The server, or the way to it, is gone (as opposed to "this statement failed").

    No SQLSTATE (the socket broke), class 08 (connection exception) or 57P (the server is
    shutting down or starting up); a deadlock or a cancelled statement is not one."""
    if isinstance(exc, (psycopg.InterfaceError, PoolTimeout)):
        return True
    if not isinstance(exc, psycopg.OperationalError):
        return False
    state = exc.sqlstate
    return state is None or state.startswith(("08", "57P"))


class DatabaseUnavailable(Exception):
    """The database could not be reached at start-up."""


def is_deadline_error(exc: BaseException) -> bool:
    """The server ended a statement for its caller's deadline (`WRITE_GUARD`): a lock wait
    ran out, the deadline had passed, or the statement was cancelled. Nothing was written."""
    if isinstance(exc, (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled)):
        return True
    return isinstance(exc, psycopg.errors.InvalidParameterValue) and _PAST_DEADLINE in str(exc)


Resolver = Callable[[], Awaitable[None]]
# Confirms a committed write on its own connection before the caller is answered; False (or
# an error) when it could not (`Database.on_committed`).
Confirm = Callable[[AsyncConnection[TupleRow]], Awaitable[bool]]


def outcome_unknown(service: str) -> DomainError:
    return DomainError(
        ErrorKind.UNAVAILABLE,
        f"the {service} database stopped answering while the write was being committed: it "
        "may or may not have been applied; retry with the same request_id to learn which "
        "(an applied write nobody was told of is undone within seconds)",
        OUTCOME_UNKNOWN,
        retry_after=_RETRY_AFTER,
    )


def write_not_completed(service: str) -> DomainError:
    return DomainError(
        ErrorKind.UNAVAILABLE,
        f"the {service} database could not complete the write in time; nothing was written; retry",
        "WRITE_NOT_COMPLETED",
        retry_after=_RETRY_AFTER,
    )


def database_unavailable(service: str) -> DomainError:
    return DomainError(
        ErrorKind.UNAVAILABLE,
        f"the {service} database is unavailable; retry shortly",
        "DATABASE_UNAVAILABLE",
        retry_after=_RETRY_AFTER,
    )


def _new_pool(config: DatabaseConfig, service: str) -> Pool:
    return AsyncConnectionPool(
        config.conninfo(),
        min_size=max(1, config.pool_min),
        max_size=config.pool_max,
        max_idle=config.idle_timeout,
        timeout=config.connect_timeout * 2,
        open=False,
        name=service,
        kwargs={"autocommit": False},
    )


async def open_pool(config: DatabaseConfig, service: str) -> Pool:
    """Open a pool and wait for its first connections.

    Raises `DatabaseUnavailable` (naming the server, never the password) when
    no connection is made within the connect timeout.
    """
    pool = _new_pool(config, service)
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


async def open_database(
    config: DatabaseConfig, service: str, *, probe_interval: float = DEFAULT_PROBE_INTERVAL
) -> Database:
    pool = await open_pool(config, service)
    db = Database(
        pool,
        config,
        service,
        operation_timeout=config.operation_timeout,
        probe_interval=probe_interval,
    )
    await db.measure_clock()
    return db


def _shut_down_socket(conn: Connection) -> None:
    """Make every read and write on `conn` fail now, without closing its descriptor (which
    psycopg still owns): a request waiting on a hung server is released at once."""
    try:
        fd = conn.pgconn.socket
    except psycopg.OperationalError:
        return
    with contextlib.suppress(OSError):
        duplicate = socket.socket(fileno=os.dup(fd))
        try:
            duplicate.shutdown(socket.SHUT_RDWR)
        finally:
            duplicate.close()


def _awaits_server(conn: Connection) -> bool:
    """`conn` has a statement at the server and nothing of its answer has arrived.

    Only then is a connection held past its budget the server's fault. One whose answer is
    waiting in the socket, or that has nothing in flight, is slow on our side (a busy
    process: the event loop has not run its request yet); cutting it would fail a request
    the database served in time, and declaring the database down for it would fail all."""
    try:
        if conn.pgconn.transaction_status != pq.TransactionStatus.ACTIVE:
            return False
        fd = conn.pgconn.socket
    except psycopg.OperationalError:
        return False  # closed: its request fails by itself
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    try:
        return not poller.poll(0)
    except OSError:
        return False


Probe = Callable[[], Awaitable[None]]
Reopen = Callable[[], Awaitable[Pool]]


async def _connect_fresh(config: DatabaseConfig) -> None:
    """One new connection that answers a statement, outside the pool; raises if none."""
    conn = await psycopg.AsyncConnection.connect(config.conninfo(), autocommit=True)
    try:
        await conn.execute("SELECT 1")
    finally:
        await conn.close()


@dataclass(eq=False)
class _Held:
    """A connection handed out by `Database.connection()`, and all the watch knows of it."""

    conn: Connection
    # When its caller is answered at the latest, on `time.monotonic()`'s clock; infinite for
    # background work, which is not watched.
    deadline: float
    # The watchdog's next look at it (`Database._check`); none before it is armed or once
    # it is cut.
    timer: asyncio.TimerHandle | None = None
    cut: bool = False  # the watchdog shut its socket down
    # The server process running its write while that write may be taking effect, and what
    # to do should the write's outcome become unknown (`Database.on_unknown_outcome`).
    committing: int | None = None
    resolvers: list[Resolver] = field(default_factory=list)
    # What confirms its write once committed, before it is released (`on_committed`).
    confirmations: list[Confirm] = field(default_factory=list)

    @property
    def watched(self) -> bool:
        return self.deadline != float("inf")


class Database:
    """The service's pool, behind fast failure and fast recovery (see the module docstring)."""

    def __init__(
        self,
        pool: Pool,
        config: DatabaseConfig,
        service: str,
        *,
        operation_timeout: float = DEFAULT_OPERATION_TIMEOUT,
        probe_interval: float = DEFAULT_PROBE_INTERVAL,
        probe: Probe | None = None,
        reopen: Reopen | None = None,
    ) -> None:
        """`probe` makes one fresh connection outside the pool (raising if it cannot) and
        `reopen` opens a fresh pool (raising `DatabaseUnavailable`); by default both reach
        the server `config` names."""
        self.pool = pool
        self.config = config
        self.service = service
        self.operation_timeout = operation_timeout
        self.probe_interval = probe_interval
        self.down_since: float | None = None
        self._probe_once: Probe = probe or partial(_connect_fresh, config)
        self._reopen: Reopen = reopen or partial(open_pool, config, service)
        # Every handed-out connection, by `id()`: one record each.
        self._held: dict[int, _Held] = {}
        # Writes whose outcome became unknown, by the server process that ran them (None:
        # known to have committed), with what resolves each once it has settled.
        self._unresolved: list[tuple[int | None, Resolver]] = []
        self._resolver: asyncio.Task[None] | None = None
        self._prober: asyncio.Task[None] | None = None
        self._retired: set[asyncio.Task[None]] = set()
        self._closed = False
        self._up = DB_UP.labels(service)
        self._up.set(1)
        self._query_latency = DB_QUERY_LATENCY.labels(service)
        # The database server's clock minus ours (see `write_deadline`).
        self.clock_offset = timedelta(0)

    @property
    def up(self) -> bool:
        return self.down_since is None

    @asynccontextmanager
    async def connection(
        self,
        *,
        watched: bool = True,
        budget: float | None = None,
        deadline: float | None = None,
    ) -> AsyncIterator[Connection]:
        """A pooled connection; UNAVAILABLE at once while the database is down.

        `deadline` (on `time.monotonic()`'s clock): when the request's caller is answered at
        the latest; by default `budget` (default `operation_timeout`) after the connection is
        handed out. The watchdog cuts the connection then if the server still owes an
        answer, and writes may not take effect after it (`write_deadline`). Background jobs
        that hold a connection for long pass `watched=False`. When the database is found
        unreachable, the connections that cannot still commit a write are cut at once
        (unwatched ones, and watched ones past their deadline); the watchdog cuts each
        other one at its deadline."""
        if self.down_since is not None or self._closed:
            raise database_unavailable(self.service)
        pool = self.pool
        wait = self.operation_timeout
        if deadline is not None:
            wait = min(wait, deadline - time.monotonic())
            if wait <= _ANSWER_MARGIN:
                raise write_not_completed(self.service)
        try:
            conn = await pool.getconn(timeout=wait)
        except _ERRORS as exc:
            self.suspect(exc)
            raise database_unavailable(self.service) from exc
        token = id(conn)
        if not watched:
            watch = float("inf")
        elif deadline is not None:
            watch = deadline
        else:
            watch = time.monotonic() + (budget if budget is not None else self.operation_timeout)
        held = self._held[token] = _Held(conn, watch)
        started = time.perf_counter()
        if watched:
            self._arm(held, watch)
        try:
            yield conn
            if held.confirmations:
                await self._confirm(held)
        except psycopg.Error as exc:
            if is_deadline_error(exc):
                raise write_not_completed(self.service) from exc
            if not isinstance(exc, _ERRORS) or not is_connection_error(exc):
                raise
            if not held.cut:  # a cut one: the watchdog started the confirmation
                self.suspect(exc)
            if held.committing is not None:
                self._unknown_outcome(held)
                raise outcome_unknown(self.service) from exc
            raise database_unavailable(self.service) from exc
        except asyncio.CancelledError:
            # The caller went away (its deadline passed) with a commit in flight.
            if held.committing is not None:
                self._unknown_outcome(held)
            raise
        finally:
            del self._held[token]
            if held.timer is not None:
                held.timer.cancel()
            if watched:  # request-path work; background batches would drown it
                self._query_latency.observe(time.perf_counter() - started)
            await pool.putconn(conn)

    async def measure_clock(self) -> None:
        """Learn how far the server's clock is from ours (to within half a round trip)."""
        async with self.connection() as conn:
            before = datetime.now(UTC)
            cur = await conn.execute("SELECT clock_timestamp()")
            after = datetime.now(UTC)
            row = await cur.fetchone()
            if not conn.autocommit:
                await conn.rollback()
        if row is not None:
            self.clock_offset = row[0] - (before + (after - before) / 2)

    def write_deadline(self, conn: Connection) -> datetime:
        """The latest moment, on the server's clock, at which a write sent now on `conn` may
        still write its rows (`WRITE_GUARD`): its caller's deadline, less the margin that its
        commit and answer take. UNAVAILABLE (`WRITE_NOT_COMPLETED`) without sending anything
        when that moment has passed already."""
        deadline = self.confirm_deadline(conn)
        if deadline is None:
            raise write_not_completed(self.service)
        if conn.autocommit:
            self._mark_committing(conn)  # the statement is its own commit
        return deadline

    def confirm_deadline(self, conn: Connection) -> datetime | None:
        """`write_deadline` for a statement that confirms a committed write (`on_committed`):
        None, rather than an error, when it has passed."""
        left = self._time_left(conn)
        if left <= 0:
            return None
        return datetime.now(UTC) + self.clock_offset + timedelta(seconds=left)

    def check_commit(self, conn: Connection) -> None:
        """Before a COMMIT: UNAVAILABLE (`WRITE_NOT_COMPLETED`, and the transaction rolls back)
        unless there is time for the COMMIT to be answered before its caller is. A COMMIT
        sent later could take effect after the caller was told UNAVAILABLE."""
        if self._time_left(conn) <= 0:
            raise write_not_completed(self.service)
        self._mark_committing(conn)

    def on_unknown_outcome(self, conn: Connection, resolve: Resolver) -> None:
        """Should the write on `conn` end with an unknown outcome (`OUTCOME_UNKNOWN`), run
        `resolve` once the database answers again and the write has settled. It must be
        right whether the write was applied or not, and leave alone what a retry of the
        same request has claimed meanwhile."""
        held = self._held.get(id(conn))
        if held is not None:
            held.resolvers.append(resolve)

    def on_committed(self, conn: Connection, confirm: Confirm) -> None:
        """Once the block using `conn` has ended without an error (its write committed), run
        `confirm(conn)` before the connection is released, and so before the write's caller
        is answered. If it returns False or fails, the write stands committed but its caller
        is answered OUTCOME_UNKNOWN and its resolvers run (`on_unknown_outcome`): at once
        when the server answered, once the server process has settled when the connection
        broke (the confirmation itself may have taken effect)."""
        held = self._held.get(id(conn))
        if held is not None:
            held.confirmations.append(confirm)

    async def _confirm(self, held: _Held) -> None:
        confirmations, held.confirmations = held.confirmations, []
        confirmed = True
        try:
            for confirm in confirmations:
                confirmed = await confirm(held.conn) and confirmed
        except psycopg.Error as exc:
            if isinstance(exc, _ERRORS) and is_connection_error(exc):
                raise  # the outcome is unknown until the server process has settled
            log.warning("write not confirmed", service=self.service, error=str(exc))
            confirmed = False
        if not confirmed:
            self._unknown_outcome(held, settled=True)
            raise outcome_unknown(self.service)

    def _mark_committing(self, conn: Connection) -> None:
        held = self._held.get(id(conn))
        if held is not None and held.committing is None:
            with contextlib.suppress(psycopg.Error):
                held.committing = conn.pgconn.backend_pid

    def _unknown_outcome(self, held: _Held, *, settled: bool = False) -> None:
        """Resolve `held`'s write once it has settled: at once when `settled` (it is known to
        have committed), else once the server process that ran it is gone."""
        pid, resolvers = held.committing, held.resolvers
        assert settled or pid is not None
        held.committing, held.resolvers, held.confirmations = None, [], []
        log.warning(
            "write outcome unknown", service=self.service, backend=pid, resolvers=len(resolvers)
        )
        self._unresolved.extend((None if settled else pid, resolve) for resolve in resolvers)
        if self._unresolved and (self._resolver is None or self._resolver.done()):
            self._resolver = asyncio.get_running_loop().create_task(
                self._resolve(), name=f"{self.service} unknown outcomes"
            )

    async def _resolve(self) -> None:
        """Settle, then resolve, every unknown outcome; again every `probe_interval` while
        the database cannot be asked."""
        while self._unresolved and not self._closed:
            if self.down_since is None:
                pending, self._unresolved = self._unresolved, []
                for pid, resolve in pending:
                    try:
                        if pid is None or await self._settled(pid):
                            await resolve()
                            log.info("unknown outcome resolved", service=self.service)
                            continue
                    except (DomainError, psycopg.Error) as exc:
                        log.info("unknown outcome not resolved yet", error=str(exc))
                    self._unresolved.append((pid, resolve))
            if self._unresolved:
                await asyncio.sleep(self.probe_interval)

    async def _settled(self, pid: int) -> bool:
        """The server process that ran a write is gone (told to go if it is not): whatever
        it was committing has been committed, or never will be."""
        async with self.connection() as conn:
            cur = await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = %s", (pid,)
            )
            alive = await cur.fetchall()
            if not conn.autocommit:
                await conn.rollback()
        return not alive

    def _time_left(self, conn: Connection) -> float:
        held = self._held.get(id(conn))
        watch = held.deadline if held is not None else time.monotonic() + self.operation_timeout
        if watch == float("inf"):
            return self.operation_timeout  # background work: nobody waits on an answer
        return watch - _ANSWER_MARGIN - time.monotonic()

    # -- detection -------------------------------------------------------------------------

    def suspect(self, error: BaseException | None = None) -> None:
        """Something failed on the way to the database: find out whether it is down."""
        if self._closed:
            return
        if isinstance(error, PoolTimeout) and self.down_since is None:
            # Perhaps only busy: down only if a fresh connection fails too.
            self._start_prober(confirm_first=True)
            return
        self._mark_down(error)

    def _mark_down(self, error: BaseException | None) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            self._up.set(0)
            log.warning(
                "database unreachable",
                service=self.service,
                error=type(error).__name__ if error else "timeout",
            )
            # Release every request still waiting on the old connections; one whose write
            # may still take effect (`write_deadline`) is cut by the watchdog once it cannot.
            now = time.monotonic()
            for held in self._held.values():
                if not held.watched or now > held.deadline:
                    _shut_down_socket(held.conn)
        self._start_prober(confirm_first=False)

    def _arm(self, held: _Held, at: float) -> None:
        """Have the watchdog look at `held` at `at` (on `time.monotonic()`'s clock)."""
        delay = max(0.0, at - time.monotonic())
        held.timer = asyncio.get_running_loop().call_later(delay, self._check, held)

    def _check(self, held: _Held) -> None:
        """`held` is past its deadline: cut it if the server owes an answer, else look again
        shortly, for as long as it is held (see the module docstring)."""
        held.timer = None
        if self._closed or self._held.get(id(held.conn)) is not held:
            return
        if not _awaits_server(held.conn):
            self._arm(held, time.monotonic() + _WATCH_PERIOD)
            return
        held.cut = True
        _shut_down_socket(held.conn)
        # A server that answers a fresh connection is alive, and only that statement was
        # slow (waiting on a lock, say): it is not a reason to fail every request.
        self._start_prober(confirm_first=True)

    # -- recovery --------------------------------------------------------------------------

    def _start_prober(self, *, confirm_first: bool) -> None:
        if self._prober is None or self._prober.done():
            self._prober = asyncio.get_running_loop().create_task(
                self._probe(confirm_first), name=f"{self.service} db prober"
            )

    async def _probe(self, confirm_first: bool) -> None:
        if confirm_first:
            if await self._reachable():
                return
            self._mark_down(None)
        while self.down_since is not None and not self._closed:
            if await self._reachable() and await self._replace_pool():
                return
            await asyncio.sleep(self.probe_interval)

    async def _reachable(self) -> bool:
        budget = max(1.0, self.config.connect_timeout)
        try:
            async with asyncio.timeout(budget):
                await self._probe_once()
        except (TimeoutError, psycopg.Error, OSError):
            return False
        return True

    async def _replace_pool(self) -> bool:
        """The database answers again: serve from a fresh pool, retire the old one. False
        when the pool cannot open although a probe connected (the server refuses more
        connections, say): the database stays down, and the prober tries again."""
        try:
            pool = await self._reopen()
        except DatabaseUnavailable:
            log.warning("database answers but the pool cannot open", service=self.service)
            return False
        old, self.pool = self.pool, pool
        down_for = time.monotonic() - (self.down_since or time.monotonic())
        self.down_since = None
        self._up.set(1)
        log.info("database reachable again", service=self.service, down_for=round(down_for, 3))
        task = asyncio.get_running_loop().create_task(old.close(timeout=5.0))
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)
        with contextlib.suppress(DomainError):
            await self.measure_clock()
        return True

    # -- lifecycle -------------------------------------------------------------------------

    def record_stats(self) -> None:
        stats = self.pool.get_stats()
        POOL_SIZE.labels(self.service, "size").set(stats.get("pool_size", 0))
        POOL_SIZE.labels(self.service, "available").set(stats.get("pool_available", 0))
        POOL_SIZE.labels(self.service, "waiting").set(stats.get("requests_waiting", 0))

    async def close(self) -> None:
        self._closed = True
        for held in self._held.values():
            if held.timer is not None:
                held.timer.cancel()
        for task in (self._prober, self._resolver):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._retired:
            await asyncio.gather(*self._retired, return_exceptions=True)
        await self.pool.close()
