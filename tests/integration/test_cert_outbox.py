"""DeleteDevice's durable cascade to key_service, against a stand-in ApiKeyService.

The stand-in implements only RevokeDeviceApiKeys (the one call cert_service makes) and records
what it was asked; it listens on the port each cert_service was told about at start-up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any, TypeAlias

import grpc
import psycopg
import pytest

from deploy.devstack.servers import free_port
from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from myl.key.v1 import key_pb2
from tests.fixtures import internal_tls
from tests.fixtures.cert import RunningCertService, StartCertService, error_reason
from tests.fixtures.clock import FakeClock

Stub: TypeAlias = "cert_pb2_grpc.CertificateServiceAsyncStub"
Conn = psycopg.AsyncConnection[tuple[object, ...]]


class KeyServiceStandIn:
    def __init__(self) -> None:
        self.revoked: list[tuple[str, str]] = []
        self.server: grpc.aio.Server | None = None

    async def RevokeDeviceApiKeys(
        self, request: key_pb2.RevokeDeviceApiKeysRequest, context: Any
    ) -> key_pb2.RevokeDeviceApiKeysResponse:
        self.revoked.append((request.device_id, request.reason))
        return key_pb2.RevokeDeviceApiKeysResponse(revoked_count=2)

    async def start(self, port: int) -> None:
        self.server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(
            self.RevokeDeviceApiKeys,
            request_deserializer=key_pb2.RevokeDeviceApiKeysRequest.FromString,
            response_serializer=key_pb2.RevokeDeviceApiKeysResponse.SerializeToString,
        )
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "myl.key.v1.ApiKeyService", {"RevokeDeviceApiKeys": handler}
                ),
            )
        )
        credentials = internal_tls.server_credentials("key_service")
        assert self.server.add_secure_port(f"127.0.0.1:{port}", credentials) == port
        await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)
            self.server = None


@pytest.fixture
async def key_standin() -> AsyncIterator[KeyServiceStandIn]:
    standin = KeyServiceStandIn()
    try:
        yield standin
    finally:
        await standin.stop()


async def provision(stub: Stub, device_id: str) -> None:
    await stub.ProvisionCertificate(
        cert_pb2.ProvisionCertificateRequest(device_id=device_id, uuid_subdomain=device_id)
    )


async def delete(stub: Stub, device_id: str) -> None:
    await stub.DeleteDevice(cert_pb2.DeleteDeviceRequest(device_id=device_id))


async def outbox_rows(conn: Conn) -> list[tuple[Any, ...]]:
    cur = await conn.execute(
        "SELECT device_id, event_type, attempts, last_error IS NOT NULL "
        "FROM device_events_outbox ORDER BY id"
    )
    return await cur.fetchall()


async def eventually(check: Callable[[], Any], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_delete_revokes_the_device_keys_before_returning(
    cert_stub: Stub,
    cert_service: RunningCertService,
    key_standin: KeyServiceStandIn,
    db_conn: Conn,
) -> None:
    await key_standin.start(cert_service.key_service_port)
    await provision(cert_stub, "device-1")
    await delete(cert_stub, "device-1")
    assert key_standin.revoked == [("device-1", "device deleted")]
    assert await outbox_rows(db_conn) == []


async def test_cascade_survives_key_service_being_down(
    cert_stub: Stub,
    cert_service: RunningCertService,
    key_standin: KeyServiceStandIn,
    db_conn: Conn,
) -> None:
    await provision(cert_stub, "device-1")
    await delete(cert_stub, "device-1")  # key_service is not running: still OK
    rows = await outbox_rows(db_conn)
    assert len(rows) == 1
    device_id, event_type, attempts, has_error = rows[0]
    assert (device_id, event_type, has_error) == ("device-1", "device_deleted", True)
    assert attempts >= 1

    # Until the revocation is delivered, the device id cannot be provisioned again (its
    # late revocation would hit the new device's keys).
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await provision(cert_stub, "device-1")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_reason(caught.value) == "DEVICE_DELETION_PENDING"

    await key_standin.start(cert_service.key_service_port)
    # The background relay retries with backoff; run_once delivers whatever is due now.
    cert_service.clock.advance(minutes=5)
    await cert_service.app.outbox.run_once()
    await eventually(lambda: _empty(db_conn))
    assert key_standin.revoked == [("device-1", "device deleted")]
    await provision(cert_stub, "device-1")


async def test_the_relay_delivers_once_key_service_listens(
    cert_stub: Stub,
    cert_service: RunningCertService,
    key_standin: KeyServiceStandIn,
    db_conn: Conn,
) -> None:
    """The background relay alone (no `run_once`): key_service starts after the delete, at
    the address cert_service was built with, and the waiting event reaches it."""
    await provision(cert_stub, "device-1")
    await delete(cert_stub, "device-1")
    await key_standin.start(cert_service.key_service_port)
    cert_service.clock.advance(minutes=5)
    await eventually(lambda: _empty(db_conn))
    assert key_standin.revoked == [("device-1", "device deleted")]


async def test_replicas_deliver_each_event_once(
    start_cert_service: StartCertService, key_standin: KeyServiceStandIn, db_conn: Conn
) -> None:
    clock = FakeClock(datetime.now(UTC), frozen=True)  # no retry comes due unless the test says so
    port = free_port()  # key_service's: it listens once the events wait in the outbox
    replicas = [
        await start_cert_service(clock=clock, KEY_SERVICE_ADDRESS=f"127.0.0.1:{port}")
        for _ in range(3)
    ]
    async with internal_tls.channel(replicas[0].address) as channel:
        stub = cert_pb2_grpc.CertificateServiceStub(channel)
        devices = [f"device-{i}" for i in range(12)]
        for device_id in devices:
            await provision(stub, device_id)
            await delete(stub, device_id)
    assert len(await outbox_rows(db_conn)) == 12

    await key_standin.start(port)
    clock.advance(minutes=5)
    results = await asyncio.gather(*(r.app.outbox.run_once() for r in replicas))
    await eventually(lambda: _empty(db_conn))
    assert sum(r.delivered for r in results) <= 12
    assert sorted(device for device, _ in key_standin.revoked) == sorted(devices)


async def _empty(conn: Conn) -> bool:
    return await outbox_rows(conn) == []
