"""The SQL of the RFC 8555 server devices use (`cert_service.acme_server`): EAB keys, accounts,
nonces and orders (migration 0011)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb

from cert_service.storage.base import StoreBase


@dataclass(frozen=True)
class EabKey:
    kid: str
    device_id: str
    device_created_at: datetime
    expires_at: datetime
    used_at: datetime | None


@dataclass(frozen=True)
class DeviceAccount:
    account_id: str
    key_thumbprint: str
    jwk: dict[str, Any]
    device_id: str
    device_created_at: datetime
    status: str
    contact: list[str]
    created_at: datetime
    # Whether the device row it was bound to still exists (read with the account).
    device_alive: bool = True


@dataclass(frozen=True)
class DeviceOrder:
    order_id: str
    account_id: str
    device_id: str
    identifiers: list[str]
    certificate_type: str
    status: str
    created_at: datetime
    expires_at: datetime
    previous_serial: str | None
    serial_number: str | None
    certificate_pem: str | None
    error: dict[str, Any] | None


_ACCOUNT = """account_id, key_thumbprint, jwk, device_id, device_created_at, status, contact,
    created_at"""
_ORDER = """order_id, account_id, device_id, identifiers, certificate_type, status, created_at,
    expires_at, previous_serial, serial_number, certificate_pem, error"""


class AcmeServerStore(StoreBase):
    """acme_eab_keys, acme_device_accounts, acme_nonces and acme_device_orders."""

    # -- nonces ---------------------------------------------------------------------------------

    async def spend_nonce(self, nonce: str, expires_at: datetime, now: datetime) -> bool:
        """Record a nonce's use: False when it was used before (on any replica). Expired
        records go in the same statement, so the table holds only nonces that could still be
        replayed (migration 0013)."""
        async with self.connection() as conn:
            cur = await conn.execute(
                """
                WITH swept AS (
                    DELETE FROM acme_nonces WHERE nonce IN (
                        SELECT nonce FROM acme_nonces WHERE expires_at < %(now)s LIMIT 16
                        FOR UPDATE SKIP LOCKED)
                )
                INSERT INTO acme_nonces (nonce, expires_at) VALUES (%(nonce)s, %(expires)s)
                ON CONFLICT (nonce) DO NOTHING
                RETURNING 1
                """,
                {"nonce": nonce, "expires": expires_at, "now": now},
            )
            return await cur.fetchone() is not None

    # -- EAB keys -------------------------------------------------------------------------------

    async def add_eab_key(
        self,
        kid: str,
        device_id: str,
        device_created_at: datetime,
        now: datetime,
        expires_at: datetime,
    ) -> None:
        async with self.connection() as conn:
            await conn.execute(
                "INSERT INTO acme_eab_keys (kid, device_id, device_created_at, created_at, "
                "expires_at) VALUES (%s, %s, %s, %s, %s)",
                (kid, device_id, device_created_at, now, expires_at),
            )

    async def eab_key(self, kid: str) -> EabKey | None:
        async with self.connection() as conn:
            cur = await conn.execute(
                "SELECT kid, device_id, device_created_at, expires_at, used_at "
                "FROM acme_eab_keys WHERE kid = %s",
                (kid,),
            )
            row = await cur.fetchone()
        return None if row is None else EabKey(*row)

    # -- accounts -------------------------------------------------------------------------------

    async def create_account(
        self,
        account_id: str,
        thumbprint: str,
        jwk: dict[str, Any],
        eab: EabKey,
        contact: list[str],
        now: datetime,
    ) -> bool:
        """Use the EAB key and create the account bound to its device, in one statement: False
        when the key was used (or expired) meanwhile, or the device's row is no longer the
        one the key was made for."""
        async with self.connection() as conn:
            cur = await conn.execute(
                """
                WITH used AS (
                    UPDATE acme_eab_keys SET used_at = %(now)s, account_id = %(account)s
                    WHERE kid = %(kid)s AND used_at IS NULL AND expires_at > %(now)s
                      AND NOT EXISTS (SELECT 1 FROM acme_device_accounts
                                      WHERE key_thumbprint = %(thumbprint)s)
                      AND EXISTS (SELECT 1 FROM device_certificates d
                                  WHERE d.device_id = acme_eab_keys.device_id
                                    AND d.created_at = acme_eab_keys.device_created_at)
                    RETURNING device_id, device_created_at
                )
                INSERT INTO acme_device_accounts (account_id, key_thumbprint, jwk, device_id,
                    device_created_at, eab_kid, contact, created_at)
                SELECT %(account)s, %(thumbprint)s, %(jwk)s, device_id, device_created_at,
                       %(kid)s, %(contact)s, %(now)s
                FROM used
                RETURNING account_id
                """,
                {
                    "now": now,
                    "account": account_id,
                    "kid": eab.kid,
                    "thumbprint": thumbprint,
                    "jwk": Jsonb(jwk),
                    "contact": Jsonb(contact),
                },
            )
            return await cur.fetchone() is not None

    async def account(self, account_id: str) -> DeviceAccount | None:
        """The account, and whether its device row still exists (one round trip: every
        request signed with a kid reads it)."""
        async with self.connection() as conn:
            cur = await conn.execute(
                f"""
                SELECT {_ACCOUNT}, EXISTS (
                    SELECT 1 FROM device_certificates d
                    WHERE d.device_id = a.device_id AND d.created_at = a.device_created_at)
                FROM acme_device_accounts a WHERE account_id = %s
                """,
                (account_id,),
            )
            row = await cur.fetchone()
        return None if row is None else DeviceAccount(*row)

    async def account_by_key(self, thumbprint: str) -> DeviceAccount | None:
        async with self.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_ACCOUNT} FROM acme_device_accounts WHERE key_thumbprint = %s",
                (thumbprint,),
            )
            row = await cur.fetchone()
        return None if row is None else DeviceAccount(*row)

    async def deactivate_accounts(self, device_id: str, created_at: datetime) -> int:
        """Deactivate every account bound to this device row; returns how many were valid."""
        async with self.connection() as conn:
            cur = await conn.execute(
                "UPDATE acme_device_accounts SET status = 'deactivated' "
                "WHERE device_id = %s AND device_created_at = %s AND status = 'valid'",
                (device_id, created_at),
            )
            return cur.rowcount

    async def update_account(
        self, account_id: str, *, status: str | None = None, contact: list[str] | None = None
    ) -> DeviceAccount | None:
        """Change a valid account's status or contact; None when it is not valid (any more)."""
        async with self.connection() as conn:
            cur = await conn.execute(
                f"""
                UPDATE acme_device_accounts SET status = COALESCE(%(status)s, status),
                    contact = COALESCE(%(contact)s, contact)
                WHERE account_id = %(account)s AND status = 'valid'
                RETURNING {_ACCOUNT}
                """,
                {
                    "status": status,
                    "contact": None if contact is None else Jsonb(contact),
                    "account": account_id,
                },
            )
            row = await cur.fetchone()
        return None if row is None else DeviceAccount(*row)

    async def change_key(
        self, account_id: str, old_thumbprint: str, thumbprint: str, jwk: dict[str, Any]
    ) -> bool:
        """Replace a valid account's key, if it is still `old_thumbprint`; False when another
        account has the new key already, or the account changed."""
        async with self.connection() as conn:
            cur = await conn.execute(
                """
                UPDATE acme_device_accounts SET key_thumbprint = %s, jwk = %s
                WHERE account_id = %s AND key_thumbprint = %s AND status = 'valid'
                  AND NOT EXISTS (SELECT 1 FROM acme_device_accounts WHERE key_thumbprint = %s)
                """,
                (thumbprint, Jsonb(jwk), account_id, old_thumbprint, thumbprint),
            )
            return cur.rowcount == 1

    # -- orders ---------------------------------------------------------------------------------

    async def add_order(
        self,
        order_id: str,
        account: DeviceAccount,
        identifiers: list[str],
        certificate_type: str,
        now: datetime,
        expires_at: datetime,
    ) -> DeviceOrder:
        async with self.connection() as conn:
            cur = await conn.execute(
                f"""
                INSERT INTO acme_device_orders (order_id, account_id, device_id, identifiers,
                    certificate_type, status, created_at, expires_at)
                VALUES (%s, %s, %s, %s, %s, 'ready', %s, %s)
                RETURNING {_ORDER}
                """,
                (
                    order_id,
                    account.account_id,
                    account.device_id,
                    Jsonb(identifiers),
                    certificate_type,
                    now,
                    expires_at,
                ),
            )
            row = await cur.fetchone()
        assert row is not None
        return DeviceOrder(*row)

    async def order(self, order_id: str) -> DeviceOrder | None:
        async with self.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_ORDER} FROM acme_device_orders WHERE order_id = %s", (order_id,)
            )
            row = await cur.fetchone()
        return None if row is None else DeviceOrder(*row)

    async def orders_of(self, account_id: str, limit: int) -> list[str]:
        async with self.connection() as conn:
            cur = await conn.execute(
                "SELECT order_id FROM acme_device_orders WHERE account_id = %s "
                "ORDER BY created_at DESC LIMIT %s",
                (account_id, limit),
            )
            return [row[0] for row in await cur.fetchall()]

    async def start_order(self, order_id: str, previous_serial: str) -> bool:
        """ready -> processing, once: a second finalize of the order finds it taken."""
        async with self.connection() as conn:
            cur = await conn.execute(
                "UPDATE acme_device_orders SET status = 'processing', previous_serial = %s "
                "WHERE order_id = %s AND status = 'ready'",
                (previous_serial, order_id),
            )
            return cur.rowcount == 1

    async def finish_order(
        self,
        order_id: str,
        *,
        serial_number: str | None = None,
        certificate_pem: str | None = None,
        error: dict[str, Any] | None = None,
    ) -> DeviceOrder | None:
        """processing -> valid (with the certificate) or invalid (with the error)."""
        status = "invalid" if error is not None else "valid"
        async with self.connection() as conn:
            cur = await conn.execute(
                f"""
                UPDATE acme_device_orders SET status = %s, serial_number = %s,
                    certificate_pem = %s, error = %s
                WHERE order_id = %s AND status = 'processing'
                RETURNING {_ORDER}
                """,
                (
                    status,
                    serial_number,
                    certificate_pem,
                    None if error is None else Jsonb(error),
                    order_id,
                ),
            )
            row = await cur.fetchone()
        return None if row is None else DeviceOrder(*row)

    async def order_by_serial(self, serial_number: str) -> DeviceOrder | None:
        """The order a certificate was issued for (only certificates issued through ACME)."""
        async with self.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_ORDER} FROM acme_device_orders WHERE serial_number = %s LIMIT 1",
                (serial_number,),
            )
            row = await cur.fetchone()
        return None if row is None else DeviceOrder(*row)
