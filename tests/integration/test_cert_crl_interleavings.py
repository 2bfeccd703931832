"""Every committed revocation reaches its CRL, whatever the order of revoking transactions and
publisher passes (the invariant in `cert_service.crl`).

The interleavings are made deterministic with the real PostgreSQL, never with sleeps:

* a revoking transaction is held open on a connection of its own (the revocation's UPDATE or
  DELETE has run, so its trigger has fired, but it has not committed) and committed when the
  test says so;
* a publisher pass is held between reading the revocation log and committing its CRL: the test
  locks the shard's row in `crls`, so the pass blocks when it stores the new CRL, and the test
  waits until PostgreSQL reports it waiting on that lock (polled: there is no event for it).

Passes are `run_once()` calls (CRL_INTERVAL=0 here), and the CRLs are read back through GetCrl.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import psycopg
import pytest
from cryptography import x509

from cert_service.crl import CrlPublisher
from deploy.devstack.servers import PostgresServer
from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from shared.errors import DomainError
from shared.migrations import MigrationRunner, load_migrations
from tests.conftest import MIGRATIONS
from tests.fixtures import internal_tls
from tests.fixtures.cert import RunningCertService, StartCertService, error_reason
from tests.integration.test_cert_crl import (
    Stub,
    fetch_crl,
    leaf,
    listed,
    provision,
    publisher,
    revoke,
    shard_of,
)
from tests.integration.test_cert_outbox import eventually

# A revocation as any write path makes it: the trigger on device_certificates does the rest.
REVOKE = """
    UPDATE device_certificates
    SET status = 'revoked', revoked_at = now(), revocation_reason = 'key_compromise'
    WHERE device_id = %s
"""
DELETE_ACTIVE = "DELETE FROM device_certificates WHERE device_id = %s"


@pytest.fixture
def conninfo(pg_server: PostgresServer, database: str) -> str:
    return pg_server.conninfo(database)


@pytest.fixture
async def one_shard(start_cert_service: StartCertService) -> RunningCertService:
    """A service whose certificates all share shard 0, so revocations meet in one shard."""
    return await start_cert_service(CRL_SHARDS="1")


@pytest.fixture
async def stub(one_shard: RunningCertService) -> AsyncIterator[Stub]:
    async with internal_tls.channel(one_shard.address) as channel:
        yield cert_pb2_grpc.CertificateServiceStub(channel)


async def begin_revocation(
    conninfo: str, device_id: str, statement: str = REVOKE
) -> psycopg.AsyncConnection[tuple[object, ...]]:
    """A revoking transaction that has written its revocation and not committed."""
    conn = await psycopg.AsyncConnection.connect(conninfo)
    cur = await conn.execute(statement, (device_id,))
    assert cur.rowcount == 1
    return conn


async def commit(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
    await conn.commit()
    await conn.close()


async def waiting_on_a_lock(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> bool:
    cur = await conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock')"
    )
    row = await cur.fetchone()
    return row is not None and bool(row[0])


@asynccontextmanager
async def pass_held_before_commit(
    conninfo: str, replica: CrlPublisher, shard: int = 0
) -> AsyncIterator[asyncio.Task[int]]:
    """A pass of `replica`, started and held after it read the log for `shard` and before it
    stored that shard's CRL; it goes on when the block ends. Yields the pass's task."""
    async with await psycopg.AsyncConnection.connect(conninfo) as blocker:
        await blocker.execute("SELECT 1 FROM crls WHERE crl_shard = %s FOR UPDATE", (shard,))
        task = asyncio.create_task(replica.run_once())

        async def waits_or_ended() -> bool:
            return task.done() or await waiting_on_a_lock(blocker)

        await eventually(waits_or_ended, within=30)
        assert not task.done(), "the pass did not wait to store the CRL"
        try:
            yield task
        finally:
            await blocker.rollback()


async def serials_listed(stub: Stub, shard: int = 0) -> set[int]:
    return set(listed(await fetch_crl(stub, shard)))


@pytest.mark.parametrize("statement", [REVOKE, DELETE_ACTIVE], ids=["revoke", "delete"])
async def test_a_revocation_open_across_a_pass_is_listed_by_the_next_pass(
    stub: Stub, one_shard: RunningCertService, conninfo: str, statement: str
) -> None:
    """The defect's interleaving: the shard already has a revocation waiting to be published
    when a second revoking transaction, not yet committed, spans a whole pass."""
    earlier = await provision(stub, "earlier")
    later = await provision(stub, "later")
    assert await publisher(one_shard).run_once() == 1
    await revoke(stub, "earlier", cert_pb2.REVOCATION_REASON_KEY_COMPROMISE)

    held = await begin_revocation(conninfo, "later", statement)
    assert await publisher(one_shard).run_once() == 1
    assert await serials_listed(stub) == {earlier.serial_number}
    await commit(held)

    assert await publisher(one_shard).run_once() == 1
    assert await serials_listed(stub) == {earlier.serial_number, later.serial_number}


async def test_a_revocation_committed_while_a_pass_signs_is_listed_by_the_next_pass(
    stub: Stub, one_shard: RunningCertService, conninfo: str
) -> None:
    """Written before the pass began, committed after it read the log, before it committed."""
    earlier = await provision(stub, "earlier")
    later = await provision(stub, "later")
    await publisher(one_shard).run_once()
    await revoke(stub, "earlier", cert_pb2.REVOCATION_REASON_KEY_COMPROMISE)

    held = await begin_revocation(conninfo, "later")
    async with pass_held_before_commit(conninfo, publisher(one_shard)) as running:
        await commit(held)
    assert await running == 1
    assert await serials_listed(stub) == {earlier.serial_number}  # it read before the commit

    assert await publisher(one_shard).run_once() == 1
    assert await serials_listed(stub) == {earlier.serial_number, later.serial_number}


async def test_a_revocation_made_while_a_pass_signs_does_not_wait_and_is_listed_next(
    stub: Stub, one_shard: RunningCertService, conninfo: str
) -> None:
    """Written and committed entirely between the pass's read of the log and its commit: the
    RPC returns without waiting for the publisher, and the next pass lists it."""
    earlier = await provision(stub, "earlier")
    later = await provision(stub, "later")
    await publisher(one_shard).run_once()
    await revoke(stub, "earlier", cert_pb2.REVOCATION_REASON_KEY_COMPROMISE)

    async with pass_held_before_commit(conninfo, publisher(one_shard)) as running:
        async with asyncio.timeout(10):
            await revoke(stub, "later", cert_pb2.REVOCATION_REASON_SUPERSEDED)
        assert not running.done()
    assert await running == 1

    assert await publisher(one_shard).run_once() == 1
    assert listed(await fetch_crl(stub, 0)) == {
        earlier.serial_number: x509.ReasonFlags.key_compromise,
        later.serial_number: x509.ReasonFlags.superseded,
    }


async def test_a_replica_skipping_a_shard_another_is_signing_loses_no_revocation(
    start_cert_service: StartCertService, conninfo: str
) -> None:
    """Replica A signs the shard from a read made before the revocation committed; replica B,
    finding the shard locked by A, skips it. B's next pass lists the revocation."""
    a = await start_cert_service(CRL_SHARDS="1")
    b = await start_cert_service(CRL_SHARDS="1")
    async with internal_tls.channel(b.address) as channel:
        stub_b = cert_pb2_grpc.CertificateServiceStub(channel)
        earlier = await provision(stub_b, "earlier")
        later = await provision(stub_b, "later")
        await publisher(a).run_once()
        await revoke(stub_b, "earlier", cert_pb2.REVOCATION_REASON_KEY_COMPROMISE)

        held = await begin_revocation(conninfo, "later")
        async with pass_held_before_commit(conninfo, publisher(a)) as running:
            await commit(held)
            assert await publisher(b).run_once() == 0  # A holds the shard
        assert await running == 1
        assert await serials_listed(stub_b) == {earlier.serial_number}

        assert await publisher(b).run_once() == 1
        assert await serials_listed(stub_b) == {earlier.serial_number, later.serial_number}
        assert await publisher(a).run_once() == 0  # nothing left to publish


async def test_a_rolled_back_revocation_leaves_nothing_to_publish(
    stub: Stub, one_shard: RunningCertService, conninfo: str
) -> None:
    kept = await provision(stub, "kept")
    await publisher(one_shard).run_once()
    held = await begin_revocation(conninfo, "kept")
    assert await publisher(one_shard).run_once() == 0
    await held.rollback()
    await held.close()
    assert await publisher(one_shard).run_once() == 0
    assert kept.serial_number not in await serials_listed(stub)


REVOCATIONS = 1_000


# A client's deadline for each attempt: an attempt that waits longer is tried again.
DEADLINE = 20.0
# UNAVAILABLE and ABORTED: a full pool under the burst, or a retry that met its first attempt
# still running; DEADLINE_EXCEEDED: an attempt the busy service did not answer in time;
# CANCELLED: said by the server's gRPC library, not by the service (no handler of it was
# cancelled), to calls of the burst while the service's process (one event loop, shared with
# this client) works through it on a busy machine. The request id makes every retry safe.
_RETRIED = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
)


async def as_a_client_would(
    call: Callable[[str], Awaitable[Any]], unknown: list[str] | None = None
) -> Any:
    """`call(request_id)`, tried again with the same request id while the service answers
    one of `_RETRIED`, as clients do; each answer that leaves the outcome unknown (the
    attempt may have been applied: OUTCOME_UNKNOWN, past the deadline, cancelled) is noted in
    `unknown`."""
    request_id = str(uuid.uuid4())
    for attempt in range(1, 60):
        try:
            return await call(request_id)
        except grpc.aio.AioRpcError as err:
            if err.code() not in _RETRIED:
                raise
            if unknown is not None and (
                err.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
                or error_reason(err) == "OUTCOME_UNKNOWN"
            ):
                unknown.append(request_id)
            await asyncio.sleep(min(1.0, 0.02 * attempt))
    return await call(request_id)


async def provision_burst(
    stub: Stub, device_id: str, unknown: list[str] | None = None
) -> x509.Certificate:
    reply = await as_a_client_would(
        lambda request_id: stub.ProvisionCertificate(
            cert_pb2.ProvisionCertificateRequest(
                device_id=device_id, uuid_subdomain=device_id, request_id=request_id
            ),
            timeout=DEADLINE,
        ),
        unknown,
    )
    return leaf(reply.certificate)


async def revoke_burst(stub: Stub, device_id: str) -> None:
    await as_a_client_would(
        lambda request_id: stub.RevokeCertificate(
            cert_pb2.RevokeCertificateRequest(
                device_id=device_id,
                reason=cert_pb2.REVOCATION_REASON_KEY_COMPROMISE,
                request_id=request_id,
            ),
            timeout=DEADLINE,
        )
    )


async def test_a_thousand_concurrent_revocations_are_all_listed(
    cert_stub: Stub, cert_service: RunningCertService
) -> None:
    """1,000 RevokeCertificate calls at once while two publishers (two replicas' worth) pass
    back to back over the same shards: one pass after the last call returned, every serial
    is in its shard's CRL with its reason, and nothing else is but what the service revoked
    itself."""
    started = time.perf_counter()
    unknown: list[str] = []
    leaves = await asyncio.gather(
        *(provision_burst(cert_stub, f"burst-{i:04d}", unknown) for i in range(REVOCATIONS))
    )
    provisioned = time.perf_counter()
    first = publisher(cert_service)
    second = CrlPublisher(
        first.crls, first.ca, cert_service.clock, validity=first.validity, interval=0
    )
    await first.run_once()

    revoke_started = time.perf_counter()
    revoking = asyncio.gather(
        *(revoke_burst(cert_stub, f"burst-{i:04d}") for i in range(REVOCATIONS))
    )
    passes = 0

    async def keep_publishing(replica: CrlPublisher) -> None:
        nonlocal passes
        while not revoking.done():
            # A pass that finds the pool taken by the burst (or the database counted down)
            # fails, as the service's own loop's would, and the next one goes on shortly.
            try:
                await replica.run_once()
                passes += 1
            except DomainError:
                await asyncio.sleep(0.05)

    await asyncio.gather(revoking, keep_publishing(first), keep_publishing(second))
    revoked = time.perf_counter()
    final = await first.run_once()

    crls = {shard: listed(await fetch_crl(cert_stub, shard)) for shard in range(4)}
    missing = [
        certificate.serial_number
        for certificate in leaves
        if crls[shard_of(certificate)].get(certificate.serial_number)
        != x509.ReasonFlags.key_compromise
    ]
    assert missing == []
    # A provision whose outcome its client did not learn (its commit cut at its deadline on a
    # busy machine) that had committed is undone, unless its retry took it over first; the retry
    # then issues another certificate. The undone one was signed, so it is listed, as a
    # deleted active certificate always is: cessation of operation.
    reasons = Counter(reason for entries in crls.values() for reason in entries.values())
    assert reasons[x509.ReasonFlags.key_compromise] == REVOCATIONS, reasons
    assert set(reasons) <= {
        x509.ReasonFlags.key_compromise,
        x509.ReasonFlags.cessation_of_operation,
    }, reasons
    assert reasons[x509.ReasonFlags.cessation_of_operation] <= len(unknown), (reasons, unknown)
    print(
        f"\n{REVOCATIONS} provisioned in {provisioned - started:.2f} s, revoked at once in "
        f"{revoked - revoke_started:.2f} s while two publishers made {passes} passes; "
        f"the pass after the last one returned signed {final} shard(s); "
        f"{len(unknown)} provision(s) of unknown outcome"
    )


async def test_upgrading_requeues_every_shard_with_revocations(
    pg_server: PostgresServer, empty_database: str
) -> None:
    """Migration 0008 queues every shard that has a revocation in the log, so the first pass
    re-signs it and lists a revocation the old per-shard marks lost; rolling back keeps the
    queued shards marked."""
    conninfo = pg_server.conninfo(empty_database)
    migrations = load_migrations(MIGRATIONS["cert_service"])
    await MigrationRunner(conninfo, "cert_service", [m for m in migrations if m.version < 8]).up()
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        # Shard 3's revocation lost its mark; shard 5 is marked.
        await conn.execute(
            "INSERT INTO revoked_certificates VALUES"
            " ('issuer', 'aa', 3, 'device', now(), 'unspecified', now() + interval '1 day')"
        )
        await conn.execute("INSERT INTO crl_dirty VALUES ('issuer', 5)")
        runner = MigrationRunner(
            conninfo, "cert_service", [m for m in migrations if m.version <= 8]
        )
        assert [m.version for m in await runner.up()] == [8]
        cur = await conn.execute("SELECT issuer_key_id, crl_shard FROM crl_pending ORDER BY 2")
        assert await cur.fetchall() == [("issuer", 3), ("issuer", 5)]

        await runner.down(1, discard_data=True)
        cur = await conn.execute("SELECT issuer_key_id, crl_shard FROM crl_dirty ORDER BY 2")
        assert await cur.fetchall() == [("issuer", 3), ("issuer", 5)]
