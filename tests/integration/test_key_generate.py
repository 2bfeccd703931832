"""GenerateApiKey against the real cert_service, and the delete cascade."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, timestamp_pb2

from key_service import keyformat
from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from myl.key.v1 import key_pb2
from shared.config import ServerConfig
from tests.fixtures.cert import RunningCertService, error_reason, violated_fields
from tests.fixtures.clock import FakeClock
from tests.fixtures.key import RunningKeyService, start_key_service

G = key_pb2.GenerateApiKeyRequest


async def provision(cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub, device: str) -> str:
    reply = await cert_stub.ProvisionCertificate(
        cert_pb2.ProvisionCertificateRequest(device_id=device, uuid_subdomain=f"{device}-name")
    )
    return reply.certificate.uuid_subdomain


async def verify(service: RunningKeyService, plaintext: str) -> int:
    reply = await service.stub.VerifyApiKey(key_pb2.VerifyApiKeyRequest(api_key=plaintext))
    return reply.result


async def test_generate_for_a_device_with_an_active_certificate(
    cert_service: RunningCertService,
    cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub,
    key_service: RunningKeyService,
    key_clock: FakeClock,
    db_conn: Any,
) -> None:
    subdomain = await provision(cert_stub, "sensor-1")
    # The seed's REST body, as the transcoder would turn it into the request.
    request = json_format.Parse('{"deviceId": "sensor-1", "deviceName": "Kitchen"}', G())
    reply = await key_service.stub.GenerateApiKey(request)
    assert keyformat.is_well_formed(reply.api_key)
    key = reply.key
    assert (key.device_id, key.device_name, key.uuid_subdomain) == (
        "sensor-1",
        "Kitchen",
        subdomain,
    )
    assert list(key.permissions) == ["ssl:read", "device:read", "api:access"]
    assert key.rate_limit == 1000
    assert key.expire_time.ToDatetime().timestamp() == pytest.approx(
        (key_clock.now() + timedelta(days=365)).timestamp()
    )
    assert key.display_prefix == reply.api_key[:12]
    assert not key.operator
    assert await verify(key_service, reply.api_key) == key_pb2.VERIFY_RESULT_VALID

    cur = await db_conn.execute(
        "SELECT key_hash, key_prefix FROM device_api_keys WHERE id = %s", (key.key_id,)
    )
    stored = await cur.fetchone()
    assert bytes(stored[0]) == keyformat.hash_key(reply.api_key)
    assert stored[1] == reply.api_key[:12]
    events = await key_service.stub.ListAuditEvents(
        key_pb2.ListAuditEventsRequest(key_id=key.key_id)
    )
    assert [(e.action, e.actor) for e in events.events] == [
        (key_pb2.AUDIT_ACTION_CREATE, "internal")
    ]


async def test_generate_with_explicit_settings(
    cert_service: RunningCertService,
    cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub,
    key_service: RunningKeyService,
    key_clock: FakeClock,
) -> None:
    subdomain = await provision(cert_stub, "sensor-2")
    expires = timestamp_pb2.Timestamp()
    expires.FromDatetime(key_clock.now() + timedelta(days=7))
    reply = await key_service.stub.GenerateApiKey(
        G(
            device_id="sensor-2",
            user_initials="JD",
            uuid_subdomain=subdomain.split(".")[0],
            permissions=["ssl:write", "ssl:read", "ssl:write"],
            rate_limit=5,
            expire_time=expires,
        )
    )
    assert list(reply.key.permissions) == ["ssl:read", "ssl:write"]
    assert reply.key.rate_limit == 5
    assert reply.key.uuid_subdomain == subdomain
    assert reply.key.expire_time == expires

    past = timestamp_pb2.Timestamp()
    past.FromDatetime(key_clock.now() - timedelta(seconds=1))
    for bad, field in [
        (G(device_id="sensor-2", expire_time=past), "expire_time"),
        (G(device_id="sensor-2", uuid_subdomain="someone-else"), "uuid_subdomain"),
        (G(device_id="sensor-2", rate_limit=-1), "rate_limit"),
        (G(device_id="sensor-2", permissions=["ssl:read", "superuser"]), "permissions[1]"),
        (G(device_id=""), "device_id"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await key_service.stub.GenerateApiKey(bad)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violated_fields(refused.value) == [field]


async def test_generate_needs_a_device_with_an_active_certificate(
    cert_service: RunningCertService,
    cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub,
    key_service: RunningKeyService,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await key_service.stub.GenerateApiKey(G(device_id="no-such-device"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(unknown.value) == "DEVICE_NOT_FOUND"

    await provision(cert_stub, "sensor-3")
    await cert_stub.RevokeCertificate(cert_pb2.RevokeCertificateRequest(device_id="sensor-3"))
    with pytest.raises(grpc.aio.AioRpcError) as revoked:
        await key_service.stub.GenerateApiKey(G(device_id="sensor-3"))
    assert revoked.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(revoked.value) == "CERTIFICATE_NOT_ACTIVE"

    await cert_service.stop()
    with pytest.raises(grpc.aio.AioRpcError) as down:
        await key_service.stub.GenerateApiKey(G(device_id="sensor-3"))
    assert down.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_deleting_a_device_revokes_its_keys_even_when_key_service_was_down(
    cert_service: RunningCertService,
    cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub,
    key_service: RunningKeyService,
    make_config: Callable[..., ServerConfig],
    key_clock: FakeClock,
    db_conn: Any,
) -> None:
    await provision(cert_stub, "doomed")
    await provision(cert_stub, "survivor")
    doomed = [
        (await key_service.stub.GenerateApiKey(G(device_id="doomed"))).api_key for _ in range(2)
    ]
    survivor = (await key_service.stub.GenerateApiKey(G(device_id="survivor"))).api_key
    for plaintext in [*doomed, survivor]:
        assert await verify(key_service, plaintext) == key_pb2.VERIFY_RESULT_VALID  # cached

    await key_service.stop()
    await cert_stub.DeleteDevice(cert_pb2.DeleteDeviceRequest(device_id="doomed"))
    # The outbox tries, and fails, to reach key_service.
    for _ in range(100):
        cur = await db_conn.execute(
            "SELECT attempts, last_error FROM device_events_outbox WHERE device_id = 'doomed'"
        )
        attempt = await cur.fetchone()
        if attempt is not None and attempt[0] >= 1 and attempt[1]:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the outbox never tried to reach key_service")

    restarted = await start_key_service(
        make_config("key_service", PORT=str(cert_service.key_service_port)),
        key_clock,
        cert_address=cert_service.address,
    )
    try:
        for _ in range(100):  # the outbox retries every 0.1-0.5 s
            if await verify(restarted, doomed[0]) == key_pb2.VERIFY_RESULT_REVOKED:
                break
            await asyncio.sleep(0.1)
        for plaintext in doomed:
            assert await verify(restarted, plaintext) == key_pb2.VERIFY_RESULT_REVOKED
        assert await verify(restarted, survivor) == key_pb2.VERIFY_RESULT_VALID
        events = await restarted.stub.ListAuditEvents(
            key_pb2.ListAuditEventsRequest(device_id="doomed")
        )
        cascades = [e for e in events.events if e.action == key_pb2.AUDIT_ACTION_CASCADE_REVOKE]
        assert len(cascades) == 2
        assert {e.actor for e in cascades} == {"cert_service"}
        assert all(e.reason.startswith("device deleted") for e in cascades)
    finally:
        await restarted.stop()


async def test_a_device_key_cannot_mint_a_stronger_key(
    cert_service: RunningCertService,
    cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub,
    key_service: RunningKeyService,
    key_clock: FakeClock,
) -> None:
    await provision(cert_stub, "minter")
    _, own = await key_service.issue_device_key(
        "minter",
        permissions=["device:write", "api:access"],
        rate_limit=10,
        expires_in=timedelta(days=7),
    )
    as_device_key = (
        ("x-myl-key-id", str(own.id)),
        ("x-myl-device-id", "minter"),
        ("x-myl-permissions", "device:write,api:access"),
        ("x-myl-operator", "false"),
    )
    asks = [
        G(device_id="minter", permissions=["api:access"], rate_limit=1_000_000),
        G(
            device_id="minter",
            permissions=["api:access"],
            expire_time=timestamp_pb2.Timestamp(
                seconds=int((key_clock.now() + timedelta(days=300)).timestamp())
            ),
        ),
    ]
    for ask in asks:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await key_service.stub.GenerateApiKey(ask, metadata=as_device_key)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Defaults are capped to the calling key's own limits.
    minted = await key_service.stub.GenerateApiKey(
        G(device_id="minter", permissions=["api:access"]), metadata=as_device_key
    )
    assert minted.key.rate_limit == 10
    assert minted.key.expire_time.ToDatetime().timestamp() == pytest.approx(
        own.expires_at.timestamp()
    )


async def test_a_key_issued_while_its_device_is_deleted_never_works(
    cert_service: RunningCertService,
    cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub,
    key_service: RunningKeyService,
    db_conn: Any,
) -> None:
    """DeleteDevice and its key revocation land between GenerateApiKey's device
    check and its insert: the new key must not escape the cascade."""
    await provision(cert_stub, "racing")
    store = key_service.app.store
    create = store.create
    entered, inserted, release = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def create_then_wait(*args: Any, **kwargs: Any) -> Any:
        entered.set()  # GenerateApiKey has passed its device check
        await release.wait()  # the device is deleted and its keys revoked meanwhile
        row = await create(*args, **kwargs)
        inserted.set()
        return row

    store.create = create_then_wait  # type: ignore[method-assign]
    try:

        async def generate() -> key_pb2.GenerateApiKeyResponse:
            reply: key_pb2.GenerateApiKeyResponse = await key_service.stub.GenerateApiKey(
                G(device_id="racing")
            )
            return reply

        generating = asyncio.create_task(generate())
        await asyncio.wait_for(entered.wait(), 10)
        await cert_stub.DeleteDevice(cert_pb2.DeleteDeviceRequest(device_id="racing"))
        for _ in range(100):
            cur = await db_conn.execute("SELECT count(*) FROM device_events_outbox")
            if (await cur.fetchone()) == (0,):
                break  # the cascade was delivered, before the key existed
            await asyncio.sleep(0.05)
        release.set()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await generating
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        store.create = create  # type: ignore[method-assign]
    assert inserted.is_set()
    cur = await db_conn.execute(
        "SELECT count(*) FILTER (WHERE revoked_at IS NULL), count(*) "
        "FROM device_api_keys WHERE device_id = 'racing'"
    )
    assert await cur.fetchone() == (0, 1)
