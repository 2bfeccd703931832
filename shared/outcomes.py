"""Writes nobody heard of are undone, even when the process that made them dies.

A write that hands out a credential (a new API key, a rotation's successor, a provisioned
certificate with its generated private key) must reach its caller or not stand: a live key
whose plaintext nobody received, or a certificate that refuses the plain retry of its own
provision, is a lie the platform tells later. `shared/db.py` answers such a write
OUTCOME_UNKNOWN when its COMMIT was in flight as the connection was lost, and undoes it once
the database answers again; but it remembers that in memory, and a process that dies first
(SIGKILL, OOM, a node lost) would leave the write standing for ever. So the duty to undo is
kept in PostgreSQL, beside the write:

* **A write is confirmed before it is answered.** In the write's own transaction (its own
  statement, for a provision batch) a marker row names it: its kind, its subject (the key id,
  the provisioned device) and what undoing it needs (ids, request ids; never a
  secret). Once the COMMIT has returned, and before the connection goes back to the pool (so
  before the caller is answered), one autocommit DELETE removes the markers of that
  transaction or batch (`Database.on_committed`). Only if it removed every one is the caller
  answered with success. Otherwise (the DELETE failed, ran past the caller's deadline,
  which it refuses on the server's clock like every write, or found a marker gone) the
  write stands committed but is answered OUTCOME_UNKNOWN and undone, unless the caller's
  retry with the same request_id claims it first. A credential whose caller was told of it
  is never undone later; one whose caller was not told is never left standing.
* **Both commits wait for the disk.** The write's, so that the marker of a write that
  committed survives a crash with it; the confirmation's, so that a write its caller was
  told of is never undone after one. That is one WAL flush more per write (per provision
  batch; `python -m tests.bench bench_writes` counts them). The write's own commit could
  skip its flush, since the confirmation's flush covers it: measured, that saved little
  (the WAL writer then flushes the write's commit while the confirmation waits for it), and
  it would leave more writes confirmed but unanswered when a process dies in a stall.
* **A retry that claims a write deletes its marker in the claiming transaction** (the
  retry revokes the earlier key and hands out another, or takes the certificate over):
  nothing is left to undo. The undo statements also check the rows themselves (the key still
  holds its request id and is not revoked; the certificate is untouched since its insert),
  so an undo that races a claim is harmless.
* **The owner undoes at once; any replica undoes what a dead one left.** The process that
  answered OUTCOME_UNKNOWN undoes the write as soon as the database answers again and the
  write has settled (`Database.on_unknown_outcome`, within seconds), through the same
  function as the sweep; its undo also deletes the marker. Every replica sweeps: markers
  older than `grace` are locked `FOR UPDATE SKIP LOCKED` (so replicas never work on the same
  one), undone, and deleted in one transaction, every `interval` seconds. A write whose
  process died before confirming it is thus undone within `grace + interval` of the
  database answering again (30 + 5 s by default, `DB_UNCONFIRMED_GRACE` and
  `DB_UNCONFIRMED_SWEEP_INTERVAL`).

The grace is not what keeps answers true (the confirmation is: a marker the sweep took
first is not found, and the caller hears OUTCOME_UNKNOWN); it keeps the sweep away from
writes that can still be confirmed, so it is longer than any caller's deadline plus a
commit (0.5 s for requests, 10 s for the admin command). Its age is measured on the
database's clock (`clock_timestamp()`), which also judges the deadlines, so neither the
replicas' clocks nor an injected test clock can make a marker old early.

What remains: a process that dies after the confirmation and before its answer is written
to the socket leaves the write standing, as any server that dies after committing does; the
caller's retry with the same request_id then claims it. Each service keeps its markers in
its own table (`api_key_unconfirmed_writes`, `certificate_unconfirmed_writes`) and registers
one undo function per kind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, Final

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from shared.clock import Clock, SystemClock
from shared.db import WRITE_GUARD, Connection, Database, is_connection_error
from shared.errors import DomainError
from shared.logging import get_logger
from shared.metrics import UNCONFIRMED_WRITES_UNDONE
from shared.tasks import BackgroundTask, run_periodically

log = get_logger(__name__)

# The most markers one sweep transaction takes; a pass goes on while it finds that many.
SWEEP_BATCH: Final = 50
# A sweep's transaction may take this long (the undo of a batch is a few statements each).
_SWEEP_BUDGET: Final = 5.0


@dataclass(frozen=True)
class Unconfirmed:
    """A committed write whose caller has not been told of it yet: what its marker says."""

    kind: str
    subject: str  # what the write created: a key id; a provision: its device (one row each)
    args: Mapping[str, Any]  # what undoing it needs, as JSON (no secrets)


# Undo writes of one kind inside the caller's transaction, at `now`; each must be harmless
# when the write was never applied, was undone already, or was claimed by a retry.
Undo = Callable[[Connection, Sequence[Unconfirmed], datetime], Awaitable[None]]


class UnconfirmedWrites:
    """One service's markers (see the module docstring): mark, confirm, undo, sweep."""

    def __init__(
        self,
        db: Database,
        table: str,
        undo: Mapping[str, Undo],
        clock: Clock | None = None,
        *,
        grace: float | None = None,
        interval: float | None = None,
    ) -> None:
        self.db = db
        self.table = table
        self.clock: Clock = clock or SystemClock()
        self.grace = db.config.unconfirmed_grace if grace is None else grace
        self.interval = db.config.unconfirmed_sweep_interval if interval is None else interval
        self._undo = dict(undo)
        self._name = sql.Identifier(table)
        self._task = BackgroundTask(f"{db.service} unconfirmed writes", self.run)

    # -- the write's side --------------------------------------------------------------------

    async def mark(self, conn: Connection, write: Unconfirmed) -> None:
        """Record `write` in its own transaction on `conn`, undo it should its outcome become
        unknown, and confirm it once it has committed."""
        await conn.execute(
            sql.SQL("INSERT INTO {} (subject, kind, args) VALUES (%s, %s, %s)").format(self._name),
            (write.subject, write.kind, Jsonb(dict(write.args))),
        )
        self.undo_if_unknown(conn, [write])
        self.confirm_on_commit(conn, [write.subject])

    def undo_if_unknown(self, conn: Connection, writes: Sequence[Unconfirmed]) -> None:
        """Should the outcome of the write on `conn` become unknown, undo `writes` (those of
        them that were applied) once it has settled. For a statement that writes its own
        markers: registered before it is sent."""
        self.db.on_unknown_outcome(conn, partial(self.undo, writes))

    def confirm_on_commit(self, conn: Connection, subjects: Sequence[str]) -> None:
        """Once the write on `conn` has committed, delete the markers of `subjects` before the
        connection is released; the caller is answered OUTCOME_UNKNOWN unless every one of
        them was deleted then."""
        if subjects:
            self.db.on_committed(conn, partial(self._confirm, list(subjects)))

    async def _confirm(self, subjects: list[str], conn: Connection) -> bool:
        deadline = self.db.confirm_deadline(conn)
        if deadline is None:
            return False
        autocommit = conn.autocommit
        if not autocommit:
            await conn.set_autocommit(True)
        try:
            cur = await conn.execute(
                sql.SQL("DELETE FROM {} WHERE subject = ANY(%(subjects)s) AND {}").format(
                    self._name, sql.SQL(WRITE_GUARD)
                ),
                {"subjects": subjects, "deadline": deadline},
            )
        finally:
            if not autocommit:
                with contextlib.suppress(psycopg.Error):
                    await conn.set_autocommit(False)
        return cur.rowcount == len(subjects)

    # -- undoing ------------------------------------------------------------------------------

    async def undo(self, writes: Sequence[Unconfirmed]) -> None:
        """The owner's undo of writes answered OUTCOME_UNKNOWN, once they have settled: each
        is undone (if it was applied and nobody claimed it) and its marker deleted, whether
        or not the marker is still there (a confirmation whose answer was lost may have
        deleted it, and its caller was not told of the write either)."""
        now = self.clock.now()
        async with self.db.connection() as conn, conn.transaction():
            await self.dispatch(conn, writes, now)
            await self.forget(conn, [write.subject for write in writes])
            self.db.check_commit(conn)
        self._count(writes, "owner")

    async def sweep(self) -> int:
        """One pass: undo every write whose marker is older than the grace; returns how many.

        Markers are taken `FOR UPDATE SKIP LOCKED`, so replicas sweeping at once share the
        work; each write is undone under a savepoint, so one that cannot be undone (logged)
        keeps its marker and does not hold up the others."""
        undone = 0
        while True:
            now = self.clock.now()
            async with self.db.connection(budget=_SWEEP_BUDGET) as conn, conn.transaction():
                cur = await conn.execute(
                    sql.SQL(
                        "SELECT subject, kind, args FROM {} "
                        "WHERE created_at < clock_timestamp() - make_interval(secs => %s) "
                        "ORDER BY created_at LIMIT %s FOR UPDATE SKIP LOCKED"
                    ).format(self._name),
                    (self.grace, SWEEP_BATCH),
                )
                found = [
                    Unconfirmed(kind, subject, args) for subject, kind, args in await cur.fetchall()
                ]
                done: list[Unconfirmed] = []
                for write in found:
                    try:
                        async with conn.transaction():
                            await self.dispatch(conn, [write], now)
                    except (psycopg.Error, LookupError) as exc:
                        if is_connection_error(exc):
                            raise
                        log.warning(
                            "unconfirmed write not undone",
                            service=self.db.service,
                            kind=write.kind,
                            subject=write.subject,
                            error=str(exc),
                        )
                        continue
                    done.append(write)
                await self.forget(conn, [write.subject for write in done])
                self.db.check_commit(conn)
            if done:
                log.warning(
                    "writes nobody was told of undone",
                    service=self.db.service,
                    count=len(done),
                    kinds=sorted({write.kind for write in done}),
                )
                self._count(done, "sweep")
            undone += len(done)
            if len(found) < SWEEP_BATCH:
                return undone

    async def dispatch(
        self, conn: Connection, writes: Sequence[Unconfirmed], now: datetime
    ) -> None:
        """Undo `writes` on `conn`: one call of each kind's undo, with that kind's writes in
        their order. LookupError, before anything is undone, for a kind this service has no
        undo for (a newer replica's, during an upgrade): its marker waits for one that has."""
        kinds: dict[str, list[Unconfirmed]] = {}
        for write in writes:
            if write.kind not in self._undo:
                raise LookupError(f"no undo for writes of kind {write.kind!r}")
            kinds.setdefault(write.kind, []).append(write)
        for kind, group in kinds.items():
            await self._undo[kind](conn, group, now)

    async def forget(self, conn: Connection, subjects: Sequence[str]) -> None:
        """Delete the markers of `subjects` in the transaction on `conn`: a retry that claims
        those writes, or their undo. Nothing is left to undo."""
        if subjects:
            await conn.execute(
                sql.SQL("DELETE FROM {} WHERE subject = ANY(%s)").format(self._name),
                (list(subjects),),
            )

    def _count(self, writes: Sequence[Unconfirmed], by: str) -> None:
        for write in writes:
            UNCONFIRMED_WRITES_UNDONE.labels(self.db.service, write.kind, by).inc()

    # -- the sweep's loop ---------------------------------------------------------------------

    async def run(self) -> None:
        """Sweep every `interval` seconds until cancelled (an outage is retried quietly)."""
        await run_periodically(
            "unconfirmed writes",
            self.sweep,
            self.interval,
            quiet=(DomainError,),
        )

    def start(self) -> None:
        self._task.start()

    async def stop(self) -> None:
        await self._task.stop()
