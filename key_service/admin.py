"""Operator keys from the command line: `python -m key_service admin create-key`.

An operator key has no device (device_id NULL) and acts on any device, so a
fresh install can provision its first device through the public API. The
command writes straight to PostgreSQL (with its audit event, actor
`operator-cli`) and prints the key once on stdout; details go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import uuid
from datetime import timedelta

from key_service import keyformat, validation
from key_service.config import SERVICE, KeyServiceConfig
from key_service.storage import ACTION_CREATE, ApiKeyRow, AuditEntry, KeyStore, NewKeyRow
from shared.clock import Clock, SystemClock
from shared.config import ConfigError
from shared.db import DatabaseUnavailable, open_database
from shared.errors import DomainError, invalid_argument

ACTOR = "operator-cli"


ADMIN_DB_TIMEOUT = 10.0


def add_admin_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    admin = commands.add_parser("admin", help="operator tasks")
    tasks = admin.add_subparsers(dest="task", required=True)
    create = tasks.add_parser("create-key", help="create an operator key and print it once")
    create.add_argument(
        "--permissions",
        required=True,
        help="comma- or space-separated, e.g. 'admin' or 'ssl:write,device:write,api:access'",
        nargs="+",
    )
    create.add_argument("--rate-limit", type=int, default=0, help="requests per minute")
    create.add_argument("--expires-days", type=int, default=0, help="lifetime in days")
    create.add_argument("--name", default="", help="a label for people (stored as device_name)")


async def create_operator_key(
    store: KeyStore,
    config: KeyServiceConfig,
    *,
    permissions: list[str],
    rate_limit: int = 0,
    expires_days: int = 0,
    name: str = "",
    clock: Clock | None = None,
) -> tuple[str, ApiKeyRow]:
    """Validate, store (with the audit event) and return the plaintext key and its row."""
    granted = validation.permissions(permissions, "--permissions")
    if not granted:
        raise invalid_argument("--permissions", "name at least one permission")
    limit = validation.rate_limit(
        rate_limit, config.default_rate_limit, config.max_rate_limit, "--rate-limit"
    )
    days = expires_days or config.default_key_ttl_days
    if not 1 <= days <= config.max_key_ttl_days:
        raise invalid_argument("--expires-days", f"must be from 1 to {config.max_key_ttl_days}")
    label = validation.text(name, "--name", validation.MAX_DEVICE_NAME)
    now = (clock or SystemClock()).now()
    new_key = keyformat.generate()
    row, _ = await store.create(
        NewKeyRow(
            id=uuid.uuid4(),
            device_id=None,
            key_hash=new_key.key_hash,
            key_prefix=new_key.display_prefix,
            device_name=label,
            user_initials="",
            uuid_subdomain="",
            permissions=granted,
            rate_limit=limit,
            expires_at=now + timedelta(days=days),
        ),
        AuditEntry(ACTION_CREATE, ACTOR, "operator key created from the command line"),
        now,
    )
    return new_key.plaintext, row


async def _create(args: argparse.Namespace, config: KeyServiceConfig) -> str:
    permissions = [p for arg in args.permissions for p in arg.replace(",", " ").split() if p]
    # A one-off operator command, not a request with a caller waiting: it may wait for the
    # database as long as a person would (the services' budget is for requests).
    database = dataclasses.replace(
        config.server.database,
        operation_timeout=max(config.server.database.operation_timeout, ADMIN_DB_TIMEOUT),
    )
    db = await open_database(database, SERVICE)
    try:
        plaintext, row = await create_operator_key(
            KeyStore(db),
            config,
            permissions=permissions,
            rate_limit=args.rate_limit,
            expires_days=args.expires_days,
            name=args.name,
        )
    finally:
        await db.close()
    print(
        f"created operator key {row.id} ({row.key_prefix}...), permissions "
        f"{','.join(row.permissions)}, {row.rate_limit}/min, expires "
        f"{row.expires_at.isoformat(timespec='seconds')}. It is shown only once:",
        file=sys.stderr,
    )
    return plaintext


def run_admin(args: argparse.Namespace) -> int:
    try:
        config = KeyServiceConfig.from_env()
        plaintext = asyncio.run(_create(args, config))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DomainError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except (DatabaseUnavailable, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(plaintext)
    return 0
