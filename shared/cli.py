"""Command-line pieces both services share: `migrate up|status|down`.

`down` destroys tables, so it asks first: it lists what it will roll back and
needs `--yes` (or, at a terminal, the service's name typed back). It refuses
while other sessions are connected to the database (the services are running)
unless `--force`, and a table holding rows (the audit trail above all) is
dropped only with `--discard-data`. A database that cannot be reached is one
line naming host and port, not a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import psycopg

from shared.config import ConfigError, DatabaseConfig, EnvReader
from shared.migrations import MigrationError, MigrationRunner, load_migrations, load_privileges


def add_migrate_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    migrate = commands.add_parser("migrate", help="apply, inspect or roll back migrations")
    migrate.add_argument("action", choices=["up", "status", "down"])
    migrate.add_argument("--steps", type=int, default=1, help="migrations to roll back (down)")
    migrate.add_argument(
        "--yes", action="store_true", help="down: roll back without asking for confirmation"
    )
    migrate.add_argument(
        "--force", action="store_true", help="down: even while other sessions use the database"
    )
    migrate.add_argument(
        "--discard-data",
        action="store_true",
        help="down: drop tables even when they hold rows (the audit trail too)",
    )


def migration_runner(service: str, migrations_dir: Path, config: DatabaseConfig) -> MigrationRunner:
    return MigrationRunner(
        config.conninfo(),
        service,
        load_migrations(migrations_dir),
        load_privileges(migrations_dir),
    )


async def _confirm_down(runner: MigrationRunner, args: argparse.Namespace) -> bool:
    """Print what `down` would do; True when the operator confirmed it."""
    pending = await runner.to_roll_back(args.steps)
    if not pending:
        return True
    labels = ", ".join(m.label for m in pending)
    print(f"{runner.service}: would roll back {labels} (its tables and their rows are dropped)")
    in_use = await runner.sessions_in_use()
    if in_use and not args.force:
        raise MigrationError(
            f"{runner.service}: {in_use} other session(s) are connected to the database; "
            "stop the services first (or pass --force)"
        )
    if args.yes:
        return True
    if not sys.stdin.isatty():
        raise MigrationError(f"{runner.service}: rolling back needs confirmation: pass --yes")
    answer = await asyncio.to_thread(input, f"Type {runner.service} to confirm: ")
    return answer.strip() == runner.service


async def _migrate(runner: MigrationRunner, args: argparse.Namespace, role: str = "") -> None:
    action, steps = args.action, args.steps
    if action == "up":
        applied = await runner.up()
        for m in applied:
            print(f"{runner.service}: applied {m.label}")
        if not applied:
            print(f"{runner.service}: up to date")
        if role:
            await runner.grant(role)
            print(f"{runner.service}: {role} may use its tables (privileges.toml)")
    elif action == "down":
        if not await _confirm_down(runner, args):
            raise MigrationError(f"{runner.service}: not confirmed, nothing rolled back")
        rolled = await runner.down(steps, discard_data=args.discard_data)
        for m in rolled:
            print(f"{runner.service}: rolled back {m.label}")
        if not rolled:
            print(f"{runner.service}: nothing to roll back")
    else:
        for s in await runner.status():
            when = s.applied_at.isoformat(timespec="seconds") if s.applied_at else "-"
            print(f"{runner.service}  {s.migration.label:<40} {s.state:<9} {when}")


def run_migrate(service: str, migrations_dir: Path, args: argparse.Namespace) -> int:
    config: DatabaseConfig | None = None
    try:
        config = DatabaseConfig.from_env(EnvReader(service.upper()), production=False)
        runner = migration_runner(service, migrations_dir, config)
        # The service's own role (DB_SERVICE_ROLE): granted its tables after `up`.
        role = EnvReader(service.upper()).text("DB_SERVICE_ROLE", "")
        asyncio.run(_migrate(runner, args, role))
    except (ConfigError, MigrationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (OSError, psycopg.OperationalError) as exc:
        where = f"{config.host}:{config.port}" if config else "the database"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {service}: cannot reach the database at {where}: {reason}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, EOFError):
        print(f"\n{service}: not confirmed, nothing rolled back", file=sys.stderr)
        return 1
    return 0
