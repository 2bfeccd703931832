"""Bad input never breaks the service, and no key ever lands in storage, cache or logs."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf import duration_pb2, message, timestamp_pb2
from google.rpc import error_details_pb2, status_pb2  # type: ignore[attr-defined]
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from deploy.devstack.servers import RedisServer
from key_service import keyformat
from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from myl.envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from myl.key.v1 import key_pb2
from tests.fixtures.cert import RunningCertService
from tests.fixtures.key import RunningKeyService

EXAMPLES = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Text as a client can send it: any code point but lone surrogates.
any_text = st.text(st.characters(codec="utf-8"), max_size=300)
names = st.one_of(
    any_text,
    st.sampled_from(["", "dev-1", "a", "x" * 128, "x" * 129, "-bad", "dev\x00", "Ä", "dev 1"]),
)
key_ids = st.one_of(
    any_text,
    st.uuids().map(str),
    st.sampled_from(["", "00000000-0000-0000-0000-000000000000", "{0-0}", "z" * 36]),
)
int32 = st.integers(-(2**31), 2**31 - 1)
timestamps = st.builds(
    timestamp_pb2.Timestamp,
    seconds=st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(0, 2**34)),
    nanos=st.one_of(int32, st.integers(0, 999_999_999)),
)
durations = st.builds(
    duration_pb2.Duration,
    seconds=st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-10, 4_000_000)),
    nanos=st.one_of(int32, st.integers(-999_999_999, 999_999_999)),
)
permission_lists = st.lists(
    st.one_of(
        any_text, st.sampled_from(["ssl:read", "ssl:write", "admin", "api:access", "device:read"])
    ),
    max_size=40,
)
api_keys = st.one_of(
    any_text,
    st.builds(lambda: keyformat.generate().plaintext),
    st.text("0123456789ABCDEFabcdef", min_size=49, max_size=49).map(lambda s: "myl_" + s),
)
# Header values a gRPC client can send: printable ASCII.
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
identities = st.one_of(
    st.just(()),
    st.tuples(
        st.one_of(header_text, st.uuids().map(str)),
        st.one_of(header_text, st.just("dev-1")),
        st.sampled_from(["", "ssl:read", "admin", "device:write,x", "device:read,device:write"]),
        st.booleans(),
    ).map(
        lambda t: (
            ("x-myl-key-id", t[0].strip() or "k"),
            ("x-myl-device-id", t[1].strip()),
            ("x-myl-permissions", t[2]),
            ("x-myl-operator", "true" if t[3] else "false"),
        )
    ),
)


def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


REQUESTS: dict[str, st.SearchStrategy[message.Message]] = {
    "GenerateApiKey": st.builds(
        key_pb2.GenerateApiKeyRequest,
        device_id=names,
        device_name=names,
        user_initials=names,
        uuid_subdomain=names,
        permissions=permission_lists,
        rate_limit=int32,
        expire_time=optional(timestamps),
    ),
    "VerifyApiKey": st.builds(
        key_pb2.VerifyApiKeyRequest,
        api_key=api_keys,
        required_permissions=permission_lists,
        dry_run=st.booleans(),
    ),
    "GetApiKey": st.builds(key_pb2.GetApiKeyRequest, key_id=key_ids),
    "ListApiKeys": st.builds(
        key_pb2.ListApiKeysRequest,
        device_id=names,
        page_size=int32,
        page_token=st.one_of(any_text, st.text("ABCDEFabcdef0123456789-_", max_size=80)),
        show_inactive=st.booleans(),
    ),
    "RotateApiKey": st.builds(
        key_pb2.RotateApiKeyRequest, key_id=key_ids, grace_period=optional(durations)
    ),
    "RevokeApiKey": st.builds(key_pb2.RevokeApiKeyRequest, key_id=key_ids, reason=any_text),
    "RevokeDeviceApiKeys": st.builds(
        key_pb2.RevokeDeviceApiKeysRequest, device_id=names, reason=any_text
    ),
    "ListAuditEvents": st.builds(
        key_pb2.ListAuditEventsRequest,
        device_id=names,
        key_id=key_ids,
        page_size=int32,
        page_token=any_text,
    ),
}


def assert_acceptable(error: grpc.aio.AioRpcError) -> None:
    code = error.code()
    assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), error.details()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        trailers: Any = error.trailing_metadata() or ()
        details = next((v for k, v in trailers if k == "grpc-status-details-bin"), None)
        assert isinstance(details, bytes)
        status = status_pb2.Status.FromString(details)
        violations = []
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations += [v.field for v in bad.field_violations]
        assert violations, status
        assert all(violations), status


@pytest.mark.parametrize("method", sorted(REQUESTS))
@EXAMPLES
@given(data=st.data())
async def test_random_requests_never_fail_internally(
    cert_service: RunningCertService,
    key_service: RunningKeyService,
    method: str,
    data: st.DataObject,
) -> None:
    call: Callable[..., Awaitable[Any]] = getattr(key_service.stub, method)
    request = data.draw(REQUESTS[method], label="request")
    metadata = data.draw(identities, label="metadata")
    try:
        await call(request, metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as error:
        assert_acceptable(error)


CHECK_PATHS = st.one_of(
    any_text,
    st.sampled_from(
        [
            "/myl.cert.v1.CertificateService/GetCertificate",
            "/myl.key.v1.ApiKeyService/ListApiKeys?x=1",
            "/myl.key.v1.ApiKeyService/VerifyApiKey",
        ]
    ),
)
CHECK_HEADERS = st.dictionaries(
    st.sampled_from(["x-api-key", "x-myl-device-id", "content-type"]),
    st.one_of(any_text, api_keys),
)


@EXAMPLES
@given(path=CHECK_PATHS, headers=CHECK_HEADERS, method=any_text)
async def test_random_check_requests_never_fail(
    key_service: RunningKeyService, path: str, headers: dict[str, str], method: str
) -> None:
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        path=path, headers=headers, method=method
    )
    request = external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )
    response = await key_service.authz.Check(request, timeout=10)
    assert response.WhichOneof("http_response") in ("ok_response", "denied_response")


async def _database_text(db_conn: Any) -> str:
    cur = await db_conn.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
    )
    tables = [str(row[0]) for row in await cur.fetchall()]
    assert {"device_api_keys", "api_key_audit_events"} <= set(tables)
    dump = []
    for table in tables:
        cur = await db_conn.execute(f'SELECT row_to_json(t)::text FROM "{table}" AS t')
        dump += [str(row[0]) for row in await cur.fetchall()]
    return "\n".join(dump)


async def _redis_bytes(server: RedisServer) -> bytes:
    client = aioredis.Redis(host=server.host, port=server.port)
    chunks = []
    async for key in client.scan_iter(count=1000):
        chunks.append(key)
        dumped = await client.dump(key)
        if dumped:
            chunks.append(dumped)
        if await client.type(key) == b"string":
            chunks.append(await client.get(key) or b"")
    await client.aclose()
    assert chunks
    return b"\n".join(chunks)


async def test_no_plaintext_key_in_database_cache_or_logs(
    cert_service: RunningCertService,
    cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub,
    key_service: RunningKeyService,
    db_conn: Any,
    clean_redis: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    stub = key_service.stub
    with capture_logs() as events:
        plaintexts = []
        for device in ("dev-leak-1", "dev-leak-2"):
            await cert_stub.ProvisionCertificate(
                cert_pb2.ProvisionCertificateRequest(device_id=device)
            )
            generated = await stub.GenerateApiKey(key_pb2.GenerateApiKeyRequest(device_id=device))
            plaintexts.append(generated.api_key)
            rotated = await stub.RotateApiKey(
                key_pb2.RotateApiKeyRequest(
                    key_id=generated.key.key_id, grace_period=duration_pb2.Duration(seconds=60)
                )
            )
            plaintexts.append(rotated.api_key)
        for plaintext in plaintexts:
            for _ in range(2):
                reply = await stub.VerifyApiKey(key_pb2.VerifyApiKeyRequest(api_key=plaintext))
                assert reply.result == key_pb2.VERIFY_RESULT_VALID
        await stub.RevokeApiKey(key_pb2.RevokeApiKeyRequest(key_id=reply.key_id, reason="test"))
        await key_service.app.usage.flush()

    database = await _database_text(db_conn)
    cache = await _redis_bytes(clean_redis)
    logs = "\n".join(str(e) for e in events) + caplog.text
    assert "dev-leak-1" in database
    for plaintext in plaintexts:
        body = plaintext[len(keyformat.PREFIX) :]
        for secret in (plaintext, body, body[: -keyformat.CHECKSUM_LENGTH]):
            assert secret not in database
            assert secret.encode() not in cache
            assert secret not in logs
