"""PostgreSQL as `make run` sets it up (deploy/devstack: `PostgresServer(secure=True)`, the
roles of `Stack.database_roles`): passwords over TCP, migrations as an owner role, and each
service as a role of its own that reaches only its own tables (privileges.toml), the audit
trail append-only. The migrations run through the real command, `python -m <service>
migrate up` with `DB_SERVICE_ROLE`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
import pytest

from deploy.devstack.servers import PostgresServer, free_port, stored_password
from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from myl.key.v1 import key_pb2
from shared.config import ServerConfig
from shared.migrations import load_privileges
from tests.fixtures import gateway_identity
from tests.fixtures.cert import StartCertService
from tests.fixtures.clock import FakeClock
from tests.fixtures.key import start_key_service

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("cert_service", "key_service")
OWNER = "myl_owner"
ALL_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")


@dataclass
class Secured:
    server: PostgresServer
    passwords: dict[str, str]

    def connect(
        self, role: str, password: str | None = None
    ) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(
            host="127.0.0.1", port=self.server.port, dbname="myl", user=role,
            password=self.passwords.get(role) if password is None else password,
            sslmode="disable", connect_timeout=5, autocommit=True,
        )  # fmt: skip

    def env(self, role: str) -> dict[str, str]:
        return {
            "DB_HOST": "127.0.0.1", "DB_PORT": str(self.server.port), "DB_NAME": "myl",
            "DB_USER": role, "DB_PASSWORD": self.passwords[role], "DB_SSLMODE": "disable",
        }  # fmt: skip


@pytest.fixture(scope="module")
def secured() -> Iterator[Secured]:
    # Not under pytest's own temporary directory: the postgres user must be able to enter it.
    directory = Path(tempfile.mkdtemp(prefix="myl-test-pg-roles-"))
    directory.chmod(0o755)
    server = PostgresServer(directory / "pg", free_port(), durable=False, secure=True)
    server.start()
    try:
        passwords = {
            role: stored_password(directory / "users", role) for role in (OWNER, *SERVICES)
        }
        for role, password in passwords.items():
            server.ensure_role(role, password)
        server.create_database("myl", owner=OWNER)
        secured = Secured(server, passwords)
        for service in SERVICES:
            prefix = service.upper()
            env = {
                **os.environ, **secured.env(OWNER),
                f"{prefix}_DB_USER": OWNER, f"{prefix}_DB_PASSWORD": passwords[OWNER],
                f"{prefix}_DB_SERVICE_ROLE": service,
            }  # fmt: skip
            done = subprocess.run(
                [sys.executable, "-m", service, "migrate", "up"],
                env=env, cwd=ROOT, capture_output=True, text=True, check=False,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert f"{service} may use its tables" in done.stdout
        yield secured
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def test_nobody_gets_in_over_tcp_without_their_password(secured: Secured) -> None:
    for role, password in (("postgres", ""), ("key_service", ""), ("key_service", "guess")):
        with pytest.raises(psycopg.OperationalError, match="password"):
            secured.connect(role, password).close()
    secured.connect("key_service").close()


def test_every_table_is_granted_exactly_as_privileges_toml_says(secured: Secured) -> None:
    granted = {service: load_privileges(ROOT / service / "migrations") for service in SERVICES}
    with secured.connect(OWNER) as conn:
        tables = {
            str(name)
            for (name,) in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            ).fetchall()
        }
        assert tables - {"migration_history"} == set(granted["cert_service"]) | set(
            granted["key_service"]
        ), "every table a migration creates is listed in its service's privileges.toml"
        for service in SERVICES:
            for table in sorted(tables):
                allowed = set(granted[service].get(table, ()))
                for privilege in ALL_PRIVILEGES:
                    row = conn.execute(
                        "SELECT has_table_privilege(%s, %s, %s)", (service, table, privilege)
                    ).fetchone()
                    assert row is not None
                    assert row[0] == (privilege in allowed), (service, table, privilege)


@pytest.mark.parametrize(
    ("role", "statement"),
    [
        ("cert_service", "SELECT count(*) FROM device_api_keys"),
        ("cert_service", "SELECT count(*) FROM api_key_audit_events"),
        ("key_service", "SELECT count(*) FROM device_certificates"),
        ("key_service", "DELETE FROM api_key_audit_events"),
        ("key_service", "UPDATE api_key_audit_events SET actor = 'someone else'"),
        ("key_service", "TRUNCATE api_key_audit_events"),
        ("key_service", "DROP TABLE api_key_audit_events"),
        ("key_service", "CREATE TABLE mine (id int)"),
        ("cert_service", "ALTER TABLE device_certificates ADD COLUMN x int"),
        ("key_service", "SELECT count(*) FROM migration_history"),
    ],
)
def test_a_service_role_cannot_reach_what_is_not_its_own(
    secured: Secured, role: str, statement: str
) -> None:
    with secured.connect(role) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(statement)


async def test_both_services_work_as_their_own_roles(
    secured: Secured,
    make_config: Callable[..., ServerConfig],
    key_clock: FakeClock,
    start_cert_service: StartCertService,
) -> None:
    keys = await start_key_service(
        make_config("key_service", **secured.env("key_service")), key_clock
    )
    try:
        plaintext, row = await keys.issue_device_key()
        verify = key_pb2.VerifyApiKeyRequest(api_key=plaintext)
        assert (await keys.stub.VerifyApiKey(verify)).result == key_pb2.VERIFY_RESULT_VALID
        await keys.stub.RevokeApiKey(key_pb2.RevokeApiKeyRequest(key_id=str(row.id)))
        assert (await keys.stub.VerifyApiKey(verify)).result == key_pb2.VERIFY_RESULT_REVOKED
        audit = await keys.stub.ListAuditEvents(key_pb2.ListAuditEventsRequest(key_id=str(row.id)))
        assert len(audit.events) >= 2  # created and revoked, appended by the service's role
        await keys.app.store.unconfirmed.sweep()  # locks markers FOR UPDATE, as the role
    finally:
        await keys.stop()

    certs = await start_cert_service(**secured.env("cert_service"))
    async with gateway_identity.channel(certs.address) as channel:
        stub = cert_pb2_grpc.CertificateServiceStub(channel)
        provision = cert_pb2.ProvisionCertificateRequest(
            device_id="role-device", uuid_subdomain="role"
        )
        await stub.ProvisionCertificate(provision)
        revoke = cert_pb2.RevokeCertificateRequest(device_id="role-device")
        assert (await stub.RevokeCertificate(revoke)).certificate.status == (
            cert_pb2.CERTIFICATE_STATUS_REVOKED
        )
        publisher = certs.app.crl_publisher
        assert publisher is not None
        await publisher.run_once()  # the CRL tables, as the service's role
        await certs.app.store.unconfirmed.sweep()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ProvisionCertificate(provision)
        assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
