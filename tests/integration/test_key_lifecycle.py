"""Get, list, rotate, revoke, cascade and the audit trail, over real gRPC."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from asyncio.subprocess import PIPE
from collections.abc import Awaitable
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from deploy.devstack.servers import PostgresServer
from key_service.storage import ApiKeyRow
from myl.key.v1 import key_pb2
from tests.conftest import ROOT
from tests.fixtures.clock import FakeClock
from tests.fixtures.key import RunningKeyService

Metadata = tuple[tuple[str, str], ...]


def as_device_key(row: ApiKeyRow) -> Metadata:
    """The identity headers the gateway sets for this (device) key."""
    return (
        ("x-myl-key-id", str(row.id)),
        ("x-myl-device-id", row.device_id or ""),
        ("x-myl-permissions", ",".join(row.permissions)),
        ("x-myl-operator", "false"),
    )


def as_operator_key(row: ApiKeyRow) -> Metadata:
    return (
        ("x-myl-key-id", str(row.id)),
        ("x-myl-permissions", ",".join(row.permissions)),
        ("x-myl-operator", "true"),
    )


async def verify(service: RunningKeyService, plaintext: str) -> int:
    reply = await service.stub.VerifyApiKey(key_pb2.VerifyApiKeyRequest(api_key=plaintext))
    return reply.result


async def audit(service: RunningKeyService, **filters: Any) -> list[key_pb2.AuditEvent]:
    reply = await service.stub.ListAuditEvents(key_pb2.ListAuditEventsRequest(**filters))
    return list(reply.events)


async def test_get_returns_metadata_never_the_key(key_service: RunningKeyService) -> None:
    plaintext, row = await key_service.issue_device_key("dev-1")
    key = (await key_service.stub.GetApiKey(key_pb2.GetApiKeyRequest(key_id=str(row.id)))).key
    assert key.key_id == str(row.id)
    assert key.display_prefix == plaintext[:12]
    assert key.status == key_pb2.API_KEY_STATUS_ACTIVE
    assert plaintext not in str(key)
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await key_service.stub.GetApiKey(
            key_pb2.GetApiKeyRequest(key_id="00000000-0000-4000-8000-000000000000")
        )
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_list_pages_newest_first_and_hides_inactive(
    key_service: RunningKeyService, key_clock: FakeClock
) -> None:
    ids = []
    for _ in range(7):
        _, row = await key_service.issue_device_key("dev-list")
        ids.append(str(row.id))
        key_clock.advance(seconds=1)
    await key_service.issue_device_key("someone-else")
    await key_service.stub.RevokeApiKey(key_pb2.RevokeApiKeyRequest(key_id=ids[0]))

    seen: list[str] = []
    token = ""
    while True:
        page = await key_service.stub.ListApiKeys(
            key_pb2.ListApiKeysRequest(device_id="dev-list", page_size=2, page_token=token)
        )
        assert len(page.keys) <= 2
        seen += [k.key_id for k in page.keys]
        token = page.next_page_token
        if not token:
            break
    assert seen == list(reversed(ids[1:]))

    everything = await key_service.stub.ListApiKeys(
        key_pb2.ListApiKeysRequest(device_id="dev-list", show_inactive=True)
    )
    assert [k.key_id for k in everything.keys] == list(reversed(ids))
    assert everything.keys[-1].status == key_pb2.API_KEY_STATUS_REVOKED

    first = await key_service.stub.ListApiKeys(
        key_pb2.ListApiKeysRequest(device_id="dev-list", page_size=2)
    )
    with pytest.raises(grpc.aio.AioRpcError) as reused:
        await key_service.stub.ListApiKeys(
            key_pb2.ListApiKeysRequest(device_id="other", page_token=first.next_page_token)
        )
    assert reused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_rotate_without_grace_revokes_the_old_key_at_once(
    key_service: RunningKeyService,
) -> None:
    old_plain, old = await key_service.issue_device_key("dev-r", rate_limit=77)
    assert await verify(key_service, old_plain) == key_pb2.VERIFY_RESULT_VALID  # cached
    reply = await key_service.stub.RotateApiKey(key_pb2.RotateApiKeyRequest(key_id=str(old.id)))
    assert reply.api_key != old_plain
    assert reply.key.rotated_from_key_id == str(old.id)
    assert reply.key.rate_limit == 77
    assert list(reply.key.permissions) == old.permissions
    assert reply.key.device_id == "dev-r"
    assert reply.previous_key.status == key_pb2.API_KEY_STATUS_REVOKED
    assert await verify(key_service, old_plain) == key_pb2.VERIFY_RESULT_REVOKED
    assert await verify(key_service, reply.api_key) == key_pb2.VERIFY_RESULT_VALID

    events = await audit(key_service, device_id="dev-r")
    assert [(e.action, e.key_id) for e in events[:2]] == [
        (key_pb2.AUDIT_ACTION_CREATE, reply.key.key_id),
        (key_pb2.AUDIT_ACTION_ROTATE, str(old.id)),
    ]
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await key_service.stub.RotateApiKey(key_pb2.RotateApiKeyRequest(key_id=str(old.id)))
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_rotate_with_grace_keeps_the_old_key_until_it_ends(
    key_service: RunningKeyService, key_clock: FakeClock
) -> None:
    old_plain, old = await key_service.issue_device_key("dev-g")
    assert await verify(key_service, old_plain) == key_pb2.VERIFY_RESULT_VALID
    reply = await key_service.stub.RotateApiKey(
        key_pb2.RotateApiKeyRequest(
            key_id=str(old.id), grace_period=duration_pb2.Duration(seconds=3600)
        )
    )
    assert reply.previous_key.status == key_pb2.API_KEY_STATUS_ACTIVE
    assert reply.previous_key.expire_time.ToDatetime().timestamp() == pytest.approx(
        (key_clock.now() + timedelta(hours=1)).timestamp()
    )
    assert await verify(key_service, old_plain) == key_pb2.VERIFY_RESULT_VALID
    assert await verify(key_service, reply.api_key) == key_pb2.VERIFY_RESULT_VALID
    with pytest.raises(grpc.aio.AioRpcError) as twice:
        await key_service.stub.RotateApiKey(key_pb2.RotateApiKeyRequest(key_id=str(old.id)))
    assert twice.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    key_clock.advance(hours=1)
    assert await verify(key_service, old_plain) == key_pb2.VERIFY_RESULT_REVOKED
    assert await verify(key_service, reply.api_key) == key_pb2.VERIFY_RESULT_VALID


async def test_revoke_is_idempotent_and_audited(key_service: RunningKeyService) -> None:
    plaintext, row = await key_service.issue_device_key("dev-v")
    for _ in range(2):
        reply = await key_service.stub.RevokeApiKey(
            key_pb2.RevokeApiKeyRequest(key_id=str(row.id), reason="lost the device"),
            metadata=(("x-myl-actor", "support-desk"),),
        )
        assert reply.key.status == key_pb2.API_KEY_STATUS_REVOKED
        assert reply.key.revocation_reason == "lost the device"
    revokes = [
        e
        for e in await audit(key_service, key_id=str(row.id))
        if e.action == key_pb2.AUDIT_ACTION_REVOKE
    ]
    assert len(revokes) == 1
    assert (revokes[0].actor, revokes[0].reason) == ("support-desk", "lost the device")
    assert revokes[0].display_prefix == plaintext[:12]
    assert await verify(key_service, plaintext) == key_pb2.VERIFY_RESULT_REVOKED


async def test_revoke_device_keys_is_idempotent_and_cascade_is_recorded(
    key_service: RunningKeyService,
) -> None:
    keys = [await key_service.issue_device_key("dev-c") for _ in range(3)]
    other, _ = await key_service.issue_device_key("dev-keep")
    for plaintext, _ in keys:
        assert await verify(key_service, plaintext) == key_pb2.VERIFY_RESULT_VALID
    request = key_pb2.RevokeDeviceApiKeysRequest(device_id="dev-c", reason="device deleted")
    cert_service_metadata = (("x-myl-actor", "cert_service"),)
    first = await key_service.stub.RevokeDeviceApiKeys(request, metadata=cert_service_metadata)
    second = await key_service.stub.RevokeDeviceApiKeys(request, metadata=cert_service_metadata)
    assert (first.revoked_count, second.revoked_count) == (3, 0)
    for plaintext, _ in keys:
        assert await verify(key_service, plaintext) == key_pb2.VERIFY_RESULT_REVOKED
    assert await verify(key_service, other) == key_pb2.VERIFY_RESULT_VALID
    cascades = [
        e
        for e in await audit(key_service, device_id="dev-c")
        if e.action == key_pb2.AUDIT_ACTION_CASCADE_REVOKE
    ]
    assert sorted(e.key_id for e in cascades) == sorted(str(row.id) for _, row in keys)
    assert {e.actor for e in cascades} == {"cert_service"}

    # The same call from a key through the gateway is a plain revoke.
    _, operator = await key_service.issue_device_key(None, permissions=["admin"])
    await key_service.issue_device_key("dev-c")
    await key_service.stub.RevokeDeviceApiKeys(
        key_pb2.RevokeDeviceApiKeysRequest(device_id="dev-c", reason="device deleted"),
        metadata=(*as_operator_key(operator), ("x-myl-actor", "cert_service")),
    )
    latest = (await audit(key_service, device_id="dev-c"))[0]
    assert latest.action == key_pb2.AUDIT_ACTION_REVOKE
    assert latest.actor == f"operator-key:{operator.id}"


async def test_audit_trail_pages_and_filters(key_service: RunningKeyService) -> None:
    rows = [(await key_service.issue_device_key(f"dev-{i % 2}"))[1] for i in range(5)]
    everything = await audit(key_service)
    assert [e.key_id for e in everything] == [str(r.id) for r in reversed(rows)]
    assert {e.action for e in everything} == {key_pb2.AUDIT_ACTION_CREATE}
    assert [e.key_id for e in await audit(key_service, device_id="dev-1")] == [
        str(rows[3].id),
        str(rows[1].id),
    ]
    assert [e.key_id for e in await audit(key_service, key_id=str(rows[2].id))] == [str(rows[2].id)]
    paged: list[str] = []
    token = ""
    while True:
        page = await key_service.stub.ListAuditEvents(
            key_pb2.ListAuditEventsRequest(page_size=2, page_token=token)
        )
        paged += [e.event_id for e in page.events]
        token = page.next_page_token
        if not token:
            break
    assert paged == [e.event_id for e in everything]


async def test_audit_rows_cannot_be_changed(key_service: RunningKeyService, db_conn: Any) -> None:
    import psycopg

    await key_service.issue_device_key()
    for statement in [
        "UPDATE api_key_audit_events SET actor = 'someone else'",
        "DELETE FROM api_key_audit_events",
        "TRUNCATE api_key_audit_events",
    ]:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await db_conn.execute(statement)


async def test_audit_trail_needs_admin_through_the_gateway(key_service: RunningKeyService) -> None:
    _, device = await key_service.issue_device_key()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await key_service.stub.ListAuditEvents(
            key_pb2.ListAuditEventsRequest(), metadata=as_device_key(device)
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    _, operator = await key_service.issue_device_key(None, permissions=["admin"])
    await key_service.stub.ListAuditEvents(
        key_pb2.ListAuditEventsRequest(), metadata=as_operator_key(operator)
    )


async def test_device_keys_act_only_on_their_own_device(key_service: RunningKeyService) -> None:
    _, mine = await key_service.issue_device_key(
        "dev-mine", permissions=["device:read", "device:write", "api:access"]
    )
    _, theirs = await key_service.issue_device_key("dev-theirs")
    _, operator_row = await key_service.issue_device_key(None, permissions=["admin"])
    me = as_device_key(mine)
    # Refused before any look-up: PERMISSION_DENIED.
    calls: list[Awaitable[Any]] = [
        key_service.stub.ListApiKeys(
            key_pb2.ListApiKeysRequest(device_id="dev-theirs"), metadata=me
        ),
        key_service.stub.RevokeDeviceApiKeys(
            key_pb2.RevokeDeviceApiKeysRequest(device_id="dev-theirs"), metadata=me
        ),
        key_service.stub.GenerateApiKey(
            key_pb2.GenerateApiKeyRequest(device_id="dev-theirs"), metadata=me
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Another device's key, or an operator key, reads exactly like no key at all.
    nobody = uuid.uuid4()
    for key_id in (theirs.id, operator_row.id, nobody):
        for call in (
            key_service.stub.GetApiKey(key_pb2.GetApiKeyRequest(key_id=str(key_id)), metadata=me),
            key_service.stub.RevokeApiKey(
                key_pb2.RevokeApiKeyRequest(key_id=str(key_id)), metadata=me
            ),
            key_service.stub.RotateApiKey(
                key_pb2.RotateApiKeyRequest(key_id=str(key_id)), metadata=me
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as hidden:
                await call
            assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
            assert hidden.value.details() == "API key not found"
    own = await key_service.stub.ListApiKeys(
        key_pb2.ListApiKeysRequest(device_id="dev-mine"), metadata=me
    )
    assert [k.key_id for k in own.keys] == [str(mine.id)]
    theirs_now = await key_service.stub.GetApiKey(
        key_pb2.GetApiKeyRequest(key_id=str(theirs.id)), metadata=as_operator_key(operator_row)
    )
    assert theirs_now.key.status == key_pb2.API_KEY_STATUS_ACTIVE


async def test_a_key_cannot_grant_what_it_lacks(key_service: RunningKeyService) -> None:
    _, mine = await key_service.issue_device_key(
        "dev-x", permissions=["device:read", "device:write", "api:access"]
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await key_service.stub.GenerateApiKey(
            key_pb2.GenerateApiKeyRequest(device_id="dev-x", permissions=["ssl:write"]),
            metadata=as_device_key(mine),
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as admin:
        await key_service.stub.GenerateApiKey(
            key_pb2.GenerateApiKeyRequest(device_id="dev-x", permissions=["admin"])
        )
    assert admin.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_generate_is_unavailable_without_cert_service(
    key_service: RunningKeyService,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await key_service.stub.GenerateApiKey(key_pb2.GenerateApiKeyRequest(device_id="dev-1"))
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_admin_command_prints_a_working_operator_key(
    key_service: RunningKeyService, pg_server: PostgresServer, database: str
) -> None:
    environ = {
        **os.environ,
        "DB_HOST": pg_server.host,
        "DB_PORT": str(pg_server.port),
        "DB_NAME": database,
        "DB_USER": pg_server.user,
        "DB_SSLMODE": "disable",
    }
    command = [sys.executable, "-m", "key_service", "admin", "create-key"]

    async def run(*args: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            *command, *args, env=environ, cwd=ROOT, stdout=PIPE, stderr=PIPE
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
        return await process.wait(), out.decode(), err.decode()

    code, out, err = await run("--permissions", "admin", "--rate-limit", "50", "--name", "boot")
    assert code == 0, err
    plaintext = out.strip()
    assert plaintext.startswith("myl_")
    assert plaintext not in err
    reply = await key_service.stub.VerifyApiKey(
        key_pb2.VerifyApiKeyRequest(api_key=plaintext, required_permissions=["ssl:write"])
    )
    assert reply.result == key_pb2.VERIFY_RESULT_VALID
    assert reply.operator
    assert reply.rate_limit == 50
    event = (await audit(key_service, key_id=reply.key_id))[0]
    assert (event.action, event.actor) == (key_pb2.AUDIT_ACTION_CREATE, "operator-cli")

    code, _, err = await run("--permissions", "root")
    assert code == 2
    assert "unknown permission" in err
