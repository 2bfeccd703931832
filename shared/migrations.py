"""Schema migrations: up, status and rollback.

Each service keeps numbered SQL files in its own `migrations/` folder:
`0001_device_certificates.up.sql` and `0001_device_certificates.down.sql`.
Applied migrations are recorded in `migration_history` (one row per service
and version, with the SHA-256 of the up file). Runners take a PostgreSQL
advisory lock per service, so two racing runners apply each migration once;
every migration runs in its own transaction together with its history row, so
a failing migration leaves nothing half-applied. A migration whose file changed
after it was applied is refused (checksum mismatch).

Rolling back never destroys data silently: a down migration that would drop a
table holding rows (the audit trail, certificates, keys) is refused unless the
caller passes `discard_data=True`, and `sessions_in_use` tells a command-line
caller whether services are still connected to the database.

Privileges: migrations run as an owner role; each service runs as a role of its own that may
do only what its `migrations/privileges.toml` lists, on its own tables (the audit trail
append-only). `grant(role)` (`migrate up` with `DB_SERVICE_ROLE` set) revokes what the role
held on those tables and grants exactly that, with the sequences of those tables.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psycopg
from psycopg import sql

_DROPPED_TABLE = re.compile(r"DROP\s+TABLE\s+(?:IF\s+EXISTS\s+)?([a-z_][a-z0-9_]*)", re.I)
_PRIVILEGES = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE"})
_FILE = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.(?P<direction>up|down)\.sql$")

HISTORY_DDL = """
CREATE TABLE IF NOT EXISTS migration_history (
    service     text        NOT NULL,
    version     integer     NOT NULL,
    name        text        NOT NULL,
    checksum    text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (service, version)
)
"""


class MigrationError(Exception):
    """A migration cannot be applied, rolled back or trusted."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    up_sql: str
    down_sql: str | None

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.up_sql.encode()).hexdigest()

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"


@dataclass(frozen=True)
class MigrationState:
    migration: Migration
    applied_at: datetime | None
    recorded_checksum: str | None

    @property
    def state(self) -> str:
        if self.applied_at is None:
            return "pending"
        if self.recorded_checksum != self.migration.checksum:
            return "modified"
        return "applied"


def load_migrations(directory: Path) -> list[Migration]:
    ups: dict[int, tuple[str, str]] = {}
    downs: dict[int, str] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE.match(path.name)
        if match is None:
            raise MigrationError(f"unexpected file name {path.name} in {directory}")
        version = int(match["version"])
        text = path.read_text()
        if match["direction"] == "up":
            if version in ups:
                raise MigrationError(f"two up migrations with version {version:04d}")
            ups[version] = (match["name"], text)
        else:
            downs[version] = text
    stray = set(downs) - set(ups)
    if stray:
        raise MigrationError(f"down migration without up: {sorted(stray)}")
    return [
        Migration(version, name, up, downs.get(version))
        for version, (name, up) in sorted(ups.items())
    ]


def _lock_id(service: str) -> int:
    digest = hashlib.sha256(f"myl-migrations:{service}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def load_privileges(directory: Path) -> dict[str, tuple[str, ...]]:
    """`privileges.toml` of a migrations folder: table -> what the service's role may do."""
    path = directory / "privileges.toml"
    if not path.exists():
        return {}
    tables = tomllib.loads(path.read_text()).get("tables", {})
    found: dict[str, tuple[str, ...]] = {}
    for table, privileges in tables.items():
        unknown = set(privileges) - _PRIVILEGES
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", table) or unknown or not privileges:
            raise MigrationError(f"{path}: {table} = {privileges} is not a table and privileges")
        found[table] = tuple(privileges)
    return found


class MigrationRunner:
    def __init__(
        self,
        conninfo: str,
        service: str,
        migrations: list[Migration],
        privileges: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.conninfo = conninfo
        self.service = service
        self.migrations = migrations
        self.privileges = privileges or {}

    async def grant(self, role: str) -> None:
        """Give `role` exactly what privileges.toml lists on this service's tables (and the
        use of their sequences), in one transaction."""
        async with await self._connect() as conn, conn.transaction():
            for table, privileges in self.privileges.items():
                target = sql.Identifier(table)
                await conn.execute(
                    sql.SQL("REVOKE ALL ON TABLE {} FROM {}").format(target, sql.Identifier(role))
                )
                await conn.execute(
                    sql.SQL("GRANT {} ON TABLE {} TO {}").format(
                        sql.SQL(", ").join(sql.SQL(p) for p in privileges),
                        target,
                        sql.Identifier(role),
                    )
                )
                cur = await conn.execute(
                    "SELECT n.nspname, s.relname FROM pg_class s "
                    "JOIN pg_namespace n ON n.oid = s.relnamespace "
                    "JOIN pg_depend d ON d.objid = s.oid AND d.classid = 'pg_class'::regclass "
                    "WHERE s.relkind = 'S' AND d.refobjid = %s::regclass",
                    (table,),
                )
                for schema, sequence in await cur.fetchall():
                    await conn.execute(
                        sql.SQL("GRANT USAGE, SELECT ON SEQUENCE {} TO {}").format(
                            sql.Identifier(str(schema), str(sequence)), sql.Identifier(role)
                        )
                    )

    async def _connect(self) -> psycopg.AsyncConnection[tuple[object, ...]]:
        conn = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)
        await conn.execute("SELECT pg_advisory_lock(%s)", (_lock_id(self.service),))
        # Every service's runner creates the shared history table if it is missing: two
        # creating it at once would collide in the catalog, so they take turns for that.
        await conn.execute("SELECT pg_advisory_lock(%s)", (_lock_id("migration_history"),))
        try:
            await conn.execute(HISTORY_DDL)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (_lock_id("migration_history"),))
        return conn

    async def _states(
        self, conn: psycopg.AsyncConnection[tuple[object, ...]]
    ) -> list[MigrationState]:
        cur = await conn.execute(
            "SELECT version, checksum, applied_at FROM migration_history WHERE service = %s",
            (self.service,),
        )
        recorded = {int(str(v)): (str(c), a) for v, c, a in await cur.fetchall()}
        known = {m.version for m in self.migrations}
        unknown = sorted(set(recorded) - known)
        if unknown:
            raise MigrationError(
                f"{self.service}: database has migrations this code does not know: {unknown}"
            )
        states = []
        for m in self.migrations:
            checksum, applied_at = recorded.get(m.version, (None, None))
            assert applied_at is None or isinstance(applied_at, datetime)
            states.append(MigrationState(m, applied_at, checksum))
        return states

    async def status(self) -> list[MigrationState]:
        async with await self._connect() as conn:
            return await self._states(conn)

    async def up(self) -> list[Migration]:
        """Apply every pending migration, in order; returns what was applied."""
        async with await self._connect() as conn:
            states = await self._states(conn)
            for s in states:
                if s.state == "modified":
                    raise MigrationError(
                        f"{self.service}: migration {s.migration.label} was changed after it was "
                        f"applied (checksum {s.recorded_checksum} in migration_history, "
                        f"{s.migration.checksum} on disk); add a new migration instead"
                    )
            applied = []
            for s in states:
                if s.state != "pending":
                    continue
                m = s.migration
                try:
                    async with conn.transaction():
                        await conn.execute(sql.SQL(m.up_sql))
                        await conn.execute(
                            "INSERT INTO migration_history (service, version, name, checksum) "
                            "VALUES (%s, %s, %s, %s)",
                            (self.service, m.version, m.name, m.checksum),
                        )
                except psycopg.Error as exc:
                    raise MigrationError(
                        f"{self.service}: migration {m.label} failed: {exc}"
                    ) from exc
                applied.append(m)
            return applied

    async def sessions_in_use(self) -> int:
        """Other client sessions connected to this database (running services, psql...)."""
        async with await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
            )
            row = await cur.fetchone()
            return int(str(row[0])) if row else 0

    async def to_roll_back(self, steps: int = 1) -> list[Migration]:
        """The migrations `down(steps)` would roll back, last applied first."""
        async with await self._connect() as conn:
            states = [s for s in await self._states(conn) if s.applied_at is not None]
            return [s.migration for s in reversed(states[-steps:] if steps > 0 else [])]

    async def _tables_with_rows(
        self, conn: psycopg.AsyncConnection[tuple[object, ...]], down_sql: str
    ) -> list[str]:
        found = []
        for table in dict.fromkeys(t.lower() for t in _DROPPED_TABLE.findall(down_sql)):
            cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,))
            exists = await cur.fetchone()
            if not exists or not exists[0]:
                continue
            query = sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(sql.Identifier(table))
            row = await (await conn.execute(query)).fetchone()
            if row and row[0]:
                found.append(table)
        return found

    async def down(self, steps: int = 1, *, discard_data: bool = False) -> list[Migration]:
        """Roll back the last `steps` applied migrations; returns them.

        A migration that would drop a table holding rows is refused (MigrationError,
        nothing rolled back by it) unless `discard_data` is true.
        """
        async with await self._connect() as conn:
            states = [s for s in await self._states(conn) if s.applied_at is not None]
            chosen = [s.migration for s in reversed(states[-steps:] if steps > 0 else [])]
            # Every check before the first rollback: refused means nothing rolled back.
            for m in chosen:
                if m.down_sql is None:
                    raise MigrationError(f"{self.service}: {m.label} has no down migration")
                holding = [] if discard_data else await self._tables_with_rows(conn, m.down_sql)
                if holding:
                    raise MigrationError(
                        f"{self.service}: rolling back {m.label} would drop "
                        f"{', '.join(holding)}, which holds rows; export them first, "
                        "or confirm that they may be destroyed (--discard-data)"
                    )
            rolled = []
            for m in chosen:
                assert m.down_sql is not None
                try:
                    async with conn.transaction():
                        await conn.execute(sql.SQL(m.down_sql))
                        await conn.execute(
                            "DELETE FROM migration_history WHERE service = %s AND version = %s",
                            (self.service, m.version),
                        )
                except psycopg.Error as exc:
                    raise MigrationError(
                        f"{self.service}: rollback of {m.label} failed: {exc}"
                    ) from exc
                rolled.append(m)
            return rolled
