"""Writes whose process died before telling their callers are undone by another replica.

Both services' replicas (the stack's own) take a burst of writes: GenerateApiKey, a
RotateApiKey and ProvisionCertificate, each with a request_id. Their COMMITs are held at the
server (a deferred trigger waits for a lock the test holds) until every one is there; the
test lets them go and freezes PostgreSQL (SIGSTOP of the postmaster and every backend) while
they wait for their WAL flush (`commit_delay`), so each COMMIT is in flight at the freeze and
completes when PostgreSQL runs again. The replicas answer OUTCOME_UNKNOWN at their deadline,
and are SIGKILLed before PostgreSQL runs again: nobody remembers those writes but their
markers (shared/outcomes.py). A second replica of each service, started by the test with a
short grace, must then undo every write its caller was not told of, while a write a retry
with the same request_id claimed first is kept. The bound is the grace plus the sweep
interval after PostgreSQL answers; the test prints the time it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass

import grpc
import psycopg
import pytest
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg.rows import TupleRow

from deploy.devstack.servers import free_port
from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from myl.key.v1 import key_pb2, key_pb2_grpc
from tests.faults.stack import CHANNEL_OPTIONS, FaultStack, ServiceProcess, unique
from tests.fixtures import internal_tls
from tests.fixtures.cert import error_reason

pytestmark = pytest.mark.slow

GRACE = 4.0  # the second replicas' DB_UNCONFIRMED_GRACE
SWEEP_INTERVAL = 0.5
TABLES = ("device_api_keys", "device_certificates")
CALL_DEADLINE = 5.0
Session = psycopg.AsyncConnection[TupleRow]


@dataclass
class Replicas:
    cert: cert_pb2_grpc.CertificateServiceAsyncStub
    keys: key_pb2_grpc.ApiKeyServiceAsyncStub


async def wait_serving(process: ServiceProcess, address: str, limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    service = process.name.rsplit("-", 1)[0]
    async with internal_tls.channel(address, service=service, options=CHANNEL_OPTIONS) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            assert process.running, process.log_tail()
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            assert time.monotonic() < deadline, process.log_tail()
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def second_replicas(stack: FaultStack) -> AsyncIterator[Replicas]:
    """Another replica of each service, sweeping markers older than GRACE seconds."""
    cert_address, key_address = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {
        **stack.env,
        "CERT_SERVICE_PORT": cert_address.rsplit(":", 1)[1],
        "KEY_SERVICE_PORT": key_address.rsplit(":", 1)[1],
        "CERT_SERVICE_METRICS_PORT": str(free_port()),
        "KEY_SERVICE_METRICS_PORT": str(free_port()),
        "CERT_SERVICE_ADDRESS": cert_address,
        "DB_UNCONFIRMED_GRACE": str(GRACE),
        "DB_UNCONFIRMED_SWEEP_INTERVAL": str(SWEEP_INTERVAL),
    }
    processes = [
        ServiceProcess(
            f"{service}-2",
            [sys.executable, "-m", service, "serve"],
            env,
            stack.directory / f"{service}-2.log",
        )
        for service in ("cert_service", "key_service")
    ]
    try:
        for process in processes:
            process.start()
        await asyncio.gather(
            *(
                wait_serving(process, address)
                for process, address in zip(processes, (cert_address, key_address), strict=True)
            )
        )
        yield Replicas(
            cert_pb2_grpc.CertificateServiceStub(stack.channel(cert_address, "cert_service")),
            key_pb2_grpc.ApiKeyServiceStub(stack.channel(key_address, "key_service")),
        )
    finally:
        for process in processes:
            process.signal(signal.SIGKILL)
            await process.wait_exit(10)


@contextlib.asynccontextmanager
async def commits_held(stack: FaultStack, prefix: str) -> AsyncIterator[Session]:
    """While this lasts, the COMMIT of a write of a key or a certificate of a device named
    `prefix...` waits at the server after its commit record is on disk (for a synchronous
    standby that does not exist: `synchronous_standby_names`, with every other transaction
    committing `local`), until `let_commits_go`: it is in flight, and will take effect."""
    conn = await psycopg.AsyncConnection.connect(stack.conninfo, autocommit=True)
    try:
        await conn.execute(
            """
            CREATE OR REPLACE FUNCTION myl_test_hold_commit() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM set_config('synchronous_commit', 'on', true);
                RETURN NULL;
            END $$
            """
        )
        for table in TABLES:
            await conn.execute(
                f"CREATE CONSTRAINT TRIGGER myl_test_hold_commit AFTER INSERT ON {table} "
                "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
                f"WHEN (NEW.device_id LIKE '{prefix}%') "
                "EXECUTE FUNCTION myl_test_hold_commit()".encode()
            )
        await conn.execute("ALTER SYSTEM SET synchronous_commit = 'local'")
        await conn.execute("ALTER SYSTEM SET synchronous_standby_names = 'myl_test_nobody'")
        await conn.execute("SELECT pg_reload_conf()")
        # The reload is asynchronous: once a new session sees the setting, the postmaster has
        # read it and signalled every backend (the services' pooled ones too), which apply it
        # before their next command.
        deadline = time.monotonic() + 10
        while True:
            async with await psycopg.AsyncConnection.connect(stack.conninfo) as probe:
                cursor = await probe.execute("SHOW synchronous_standby_names")
                if (await cursor.fetchone()) == ("myl_test_nobody",):
                    break
            assert time.monotonic() < deadline, "the configuration was not reloaded"
            await asyncio.sleep(0.02)
        yield conn
    finally:
        with contextlib.suppress(psycopg.Error):
            await let_commits_go(conn)
            await conn.execute("ALTER SYSTEM RESET synchronous_commit")
            await conn.execute("SELECT pg_reload_conf()")
            for table in TABLES:
                await conn.execute(f"DROP TRIGGER myl_test_hold_commit ON {table}".encode())
        await conn.close()


async def let_commits_go(conn: Session) -> None:
    """The held COMMITs complete (their transactions become visible)."""
    await conn.execute("ALTER SYSTEM RESET synchronous_standby_names")
    await conn.execute("SELECT pg_reload_conf()")
    deadline = time.monotonic() + 10
    while await held_commits(conn):
        assert time.monotonic() < deadline, "held COMMITs did not complete"
        await asyncio.sleep(0.02)


async def held_commits(conn: Session) -> int:
    cur = await conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'")
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def answer(call: Awaitable[object]) -> tuple[str, object | None]:
    """The ErrorInfo reason of a failed call ("OK" and the reply when it succeeded)."""
    try:
        return "OK", await call
    except grpc.aio.AioRpcError as error:
        return error_reason(error) or error.code().name, None


async def test_writes_a_killed_replica_left_unconfirmed_are_undone_by_another_unless_claimed(
    stack: FaultStack,
) -> None:
    prefix = unique("unconfirmed")
    generated = [f"{prefix}-key{index}" for index in range(3)]
    provisioned = [f"{prefix}-cert{index}" for index in range(2)]
    rotated_device = f"{prefix}-rot"
    for device in [*generated, rotated_device]:
        await stack.provision(device)
    _, rotated_id = await stack.device_key(rotated_device)
    request_ids = {name: str(uuid.uuid4()) for name in [*generated, *provisioned, "rotate"]}

    def generate(stub: key_pb2_grpc.ApiKeyServiceAsyncStub, device: str) -> Awaitable[object]:
        return stub.GenerateApiKey(
            key_pb2.GenerateApiKeyRequest(
                device_id=device, device_name="unconfirmed", request_id=request_ids[device]
            ),
            timeout=CALL_DEADLINE,
        )

    def provision(
        stub: cert_pb2_grpc.CertificateServiceAsyncStub, device: str
    ) -> Awaitable[object]:
        return stub.ProvisionCertificate(
            cert_pb2.ProvisionCertificateRequest(device_id=device, request_id=request_ids[device]),
            timeout=CALL_DEADLINE,
        )

    async with second_replicas(stack) as others, commits_held(stack, prefix) as gate:
        calls = [
            *(answer(generate(stack.keys, device)) for device in generated),
            *(answer(provision(stack.cert, device)) for device in provisioned),
            answer(
                stack.keys.RotateApiKey(
                    key_pb2.RotateApiKeyRequest(
                        key_id=rotated_id,
                        grace_period=duration_pb2.Duration(seconds=0),
                        request_id=request_ids["rotate"],
                    ),
                    timeout=CALL_DEADLINE,
                )
            ),
        ]
        running = asyncio.gather(*calls)
        # Every key write's COMMIT and the first provision statement's (the next one waits
        # for it: `_INSERTS_IN_FLIGHT`), or what is there 0.3 s after the first: the callers'
        # deadlines are 0.5 s.
        first_held = None
        while (held := await held_commits(gate)) < len(generated) + 2:
            first_held = first_held or (time.monotonic() if held else None)
            if first_held is not None and time.monotonic() - first_held > 0.3:
                break
            await asyncio.sleep(0.01)
        stack.hang("postgres")
        try:
            answers = await asyncio.wait_for(running, CALL_DEADLINE + 1)
            for service in ("cert_service", "key_service"):
                await stack.stop_service(service, signal.SIGKILL)
        finally:
            stack.resume("postgres")
        resumed = time.monotonic()
        await let_commits_go(gate)
        names = [*generated, *provisioned, "rotate"]
        reasons = dict(zip(names, [reason for reason, _ in answers], strict=True))
        # What committed although its caller was not told: nobody but its marker knows it.
        applied_keys = [
            device
            for device in generated
            if await stack.count(
                "SELECT count(*) FROM device_api_keys WHERE request_id = %s::uuid",
                request_ids[device],
            )
        ]
        applied_certs = [
            device
            for device in provisioned
            if await stack.count(
                "SELECT count(*) FROM device_certificates WHERE device_id = %s", device
            )
        ]
        rotation_applied = bool(
            await stack.count(
                "SELECT count(*) FROM device_api_keys WHERE id = %s::uuid "
                "AND revoked_at IS NOT NULL",
                rotated_id,
            )
        )
        print(
            f"\n[unconfirmed] {held} COMMITs held at the freeze; answers {reasons}; committed: "
            f"keys {len(applied_keys)}, certificates {len(applied_certs)}, "
            f"rotation {rotation_applied}"
        )
        # The fault happened: writes committed whose callers were not told so, and each of
        # those was answered OUTCOME_UNKNOWN, never anything that says it was not applied.
        applied = [*applied_keys, *applied_certs, *(["rotate"] if rotation_applied else [])]
        assert applied_keys, "no key was in flight"
        assert applied_certs, "no certificate was in flight"
        assert len(applied) >= 3
        assert {reasons[name] for name in applied} == {"OUTCOME_UNKNOWN"}, reasons
        assert "OK" not in reasons.values()

        # A retry with the same request_id claims its write before the sweep.
        claimed_device, claimed_cert_device = applied_keys[0], applied_certs[0]
        claimed_key = await generate(others.keys, claimed_device)
        claimed_cert = await provision(others.cert, claimed_cert_device)

        async def unconfirmed() -> int:
            return await stack.count(
                "SELECT (SELECT count(*) FROM api_key_unconfirmed_writes AS u "
                "JOIN device_api_keys AS k ON k.id::text = u.subject "
                "WHERE k.device_id LIKE %s) + (SELECT count(*) FROM "
                "certificate_unconfirmed_writes WHERE args->>'device_id' LIKE %s)",
                f"{prefix}%",
                f"{prefix}%",
            )

        bound = GRACE + SWEEP_INTERVAL
        while await unconfirmed():
            assert time.monotonic() - resumed < bound + 10, "the sweep did not undo them"
            await asyncio.sleep(0.1)
        print(
            f"[unconfirmed] {len(applied) - 2} writes nobody was told of undone "
            f"{time.monotonic() - resumed:.1f} s after PostgreSQL ran again (bound {bound:g} s)"
        )

        # Unclaimed: no live key on its device, no certificate; the rotation undone.
        live_keys = await stack.count(
            "SELECT count(*) FROM device_api_keys WHERE device_id = ANY(%s) "
            "AND (revoked_at IS NULL OR revoked_at > now())",
            [device for device in generated if device != claimed_device],
        )
        ghosts = await stack.count(
            "SELECT count(*) FROM device_certificates WHERE device_id = ANY(%s)",
            [device for device in provisioned if device != claimed_cert_device],
        )
        assert (live_keys, ghosts) == (0, 0)
        # The rotated key is live again and its successor revoked. (A verify may still say
        # REVOKED until CACHE_TTL: the guard published the retirement when the rotation
        # committed, and PUBLISH_SCRIPT never moves a cached record's usable_until later.)
        restored = await stack.count(
            "SELECT count(*) FROM device_api_keys WHERE id = %s::uuid AND revoked_at IS NULL",
            rotated_id,
        )
        assert restored == 1
        assert (
            await stack.count(
                "SELECT count(*) FROM device_api_keys WHERE device_id = %s "
                "AND (revoked_at IS NULL OR revoked_at > now())",
                rotated_device,
            )
            == 1
        )
        # Claimed: kept, and the earlier attempt was superseded by the retry, not swept.
        assert isinstance(claimed_key, key_pb2.GenerateApiKeyResponse)
        reply = await others.keys.VerifyApiKey(
            key_pb2.VerifyApiKeyRequest(api_key=claimed_key.api_key), timeout=5
        )
        assert reply.result == key_pb2.VERIFY_RESULT_VALID
        superseded = await stack.count(
            "SELECT count(*) FROM api_key_audit_events WHERE device_id = %s "
            "AND action = 'revoke' AND reason LIKE 'superseded by a retry%%'",
            claimed_device,
        )
        assert superseded == 1
        assert isinstance(claimed_cert, cert_pb2.ProvisionCertificateResponse)
        current = await others.cert.GetCertificate(
            cert_pb2.GetCertificateRequest(device_id=claimed_cert_device), timeout=5
        )
        assert current.certificate.serial_number == claimed_cert.certificate.serial_number
