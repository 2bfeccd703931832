"""Command-line pieces both services share: `migrate up|status|down`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from shared.config import ConfigError, DatabaseConfig, EnvReader
from shared.migrations import MigrationError, MigrationRunner, load_migrations


def add_migrate_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    migrate = commands.add_parser("migrate", help="apply, inspect or roll back migrations")
    migrate.add_argument("action", choices=["up", "status", "down"])
    migrate.add_argument("--steps", type=int, default=1, help="migrations to roll back (down)")


def migration_runner(service: str, migrations_dir: Path, config: DatabaseConfig) -> MigrationRunner:
    return MigrationRunner(config.conninfo(), service, load_migrations(migrations_dir))


async def _migrate(runner: MigrationRunner, action: str, steps: int) -> None:
    if action == "up":
        applied = await runner.up()
        for m in applied:
            print(f"{runner.service}: applied {m.label}")
        if not applied:
            print(f"{runner.service}: up to date")
    elif action == "down":
        rolled = await runner.down(steps)
        for m in rolled:
            print(f"{runner.service}: rolled back {m.label}")
        if not rolled:
            print(f"{runner.service}: nothing to roll back")
    else:
        for s in await runner.status():
            when = s.applied_at.isoformat(timespec="seconds") if s.applied_at else "-"
            print(f"{runner.service}  {s.migration.label:<40} {s.state:<9} {when}")


def run_migrate(service: str, migrations_dir: Path, args: argparse.Namespace) -> int:
    try:
        config = DatabaseConfig.from_env(EnvReader(service.upper()), production=False)
        runner = migration_runner(service, migrations_dir, config)
        asyncio.run(_migrate(runner, args.action, args.steps))
    except (ConfigError, MigrationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot reach the database: {exc}", file=sys.stderr)
        return 1
    return 0
