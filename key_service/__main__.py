"""`python -m key_service [serve | migrate up|status|down | admin create-key ...]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.cli import add_migrate_parser, run_migrate

SERVICE = "key_service"
MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def main(argv: list[str] | None = None) -> int:
    from key_service.admin import add_admin_parser, run_admin

    parser = argparse.ArgumentParser(prog="python -m key_service", description=__doc__)
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="run the gRPC server (default)")
    add_migrate_parser(commands)
    add_admin_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "migrate":
        return run_migrate(SERVICE, MIGRATIONS, args)
    if args.command == "admin":
        return run_admin(args)
    from key_service.app import main as serve

    code: int = serve()
    return code


if __name__ == "__main__":
    sys.exit(main())
