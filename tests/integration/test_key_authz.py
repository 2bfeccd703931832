"""The gateway's ext_authz Check, served by key_service, over real gRPC."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import timedelta

import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2  # type: ignore[attr-defined]

from key_service import keyformat
from myl.envoy.config.core.v3 import base_pb2
from myl.envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from myl.key.v1 import key_pb2
from tests.fixtures.clock import FakeClock
from tests.fixtures.key import RunningKeyService

GET_CERTIFICATE = "/myl.cert.v1.CertificateService/GetCertificate"
PROVISION = "/myl.cert.v1.CertificateService/ProvisionCertificate"
LIST_CERTIFICATES = "/myl.cert.v1.CertificateService/ListCertificates"
GENERATE_KEY = "/myl.key.v1.ApiKeyService/GenerateApiKey"
OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


async def check(
    service: RunningKeyService,
    path: str,
    headers: dict[str, str] | None = None,
    method: str = "POST",
) -> external_auth_pb2.CheckResponse:
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method=method, path=path, headers=headers or {}
    )
    request = external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )
    response: external_auth_pb2.CheckResponse = await service.authz.Check(request)
    return response


def denial(
    response: external_auth_pb2.CheckResponse,
) -> tuple[int, int, dict[str, str], dict[str, object]]:
    assert response.WhichOneof("http_response") == "denied_response"
    denied = response.denied_response
    headers = {h.header.key: h.header.value for h in denied.headers}
    return int(denied.status.code), response.status.code, headers, json.loads(denied.body)


@pytest.mark.parametrize(
    "path",
    [
        "/myl.key.v1.ApiKeyService/VerifyApiKey",
        "/envoy.service.auth.v3.Authorization/Check",
        "/grpc.health.v1.Health/Check",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/myl.cert.v1.CertificateService/NoSuchMethod",
        "/api/v1/ssl/no-such-route",
        "/api/v1/ssl/provision/extra",
        "/",
        "",
    ],
)
async def test_paths_without_a_policy_are_not_found(
    key_service: RunningKeyService, path: str
) -> None:
    plaintext, _ = await key_service.issue_device_key(None, permissions=["admin"])
    status, code, headers, body = denial(await check(key_service, path, {"x-api-key": plaintext}))
    assert (status, code) == (404, code_pb2.NOT_FOUND)
    assert headers["content-type"] == "application/json"
    assert body["code"] == code_pb2.NOT_FOUND


@pytest.mark.parametrize(
    ("method", "path", "permission"),
    [
        ("POST", "/api/v1/ssl/provision", "ssl:write"),
        ("GET", "/api/v1/devices/d-1/certificate", "ssl:read"),
        ("GET", "/api/v1/ssl/certificates/d-1.myl.zip", "ssl:read"),
        ("GET", "/api/v1/ssl/certificates?pageSize=3", "admin"),
        ("POST", "/api/v1/devices/d-1/certificate:renew", "ssl:write"),
        ("POST", "/api/v1/devices/d-1/certificate:revoke", "ssl:write"),
        ("DELETE", "/api/v1/devices/d-1", "device:write"),
        ("GET", "/api/v1/ssl/ca", "ssl:read"),
        ("POST", "/api/v1/device/generate-key", "device:write"),
        ("GET", "/api/v1/keys/k-1", "device:read"),
        ("GET", "/api/v1/devices/d-1/keys", "device:read"),
        ("POST", "/api/v1/keys/k-1:rotate", "device:write"),
        ("POST", "/api/v1/keys/k-1:revoke", "device:write"),
        ("POST", "/api/v1/devices/d-1/keys:revoke", "device:write"),
        ("GET", "/api/v1/audit-events?deviceId=d-1", "admin"),
    ],
)
async def test_rest_calls_are_checked_against_their_methods_permission(
    key_service: RunningKeyService, method: str, path: str, permission: str
) -> None:
    """The gateway checks REST calls before transcoding: the route decides the permission."""
    others = ["ssl:read", "ssl:write", "device:read", "device:write"]
    weaker, _ = await key_service.issue_device_key(
        None, permissions=["api:access", *(p for p in others if p != permission)]
    )
    status, code, _, body = denial(await check(key_service, path, {"x-api-key": weaker}, method))
    assert (status, code) == (403, code_pb2.PERMISSION_DENIED), body
    assert body["details"][0]["metadata"] == {"permissions": permission}  # type: ignore[index]
    assert permission in str(body["message"])
    enough, _ = await key_service.issue_device_key(None, permissions=["api:access", permission])
    allowed = await check(key_service, path, {"x-api-key": enough}, method)
    assert allowed.WhichOneof("http_response") == "ok_response"
    # The same path with another verb: 405 naming the verb it takes.
    wrong_verb = "PUT"
    status, code, headers, _ = denial(
        await check(key_service, path, {"x-api-key": enough}, wrong_verb)
    )
    assert (status, code) == (405, code_pb2.UNIMPLEMENTED)
    assert headers["allow"] == method


async def test_missing_and_bad_keys_are_unauthenticated(
    key_service: RunningKeyService, key_clock: FakeClock
) -> None:
    status, code, _, body = denial(await check(key_service, GET_CERTIFICATE))
    assert (status, code) == (401, code_pb2.UNAUTHENTICATED)
    assert body == {
        "code": code_pb2.UNAUTHENTICATED,
        "message": "missing x-api-key header",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_MISSING",
                "domain": "myl.zip",
            }
        ],
    }
    for bad in ["nonsense", keyformat.generate().plaintext]:
        status, code, _, _ = denial(await check(key_service, GET_CERTIFICATE, {"x-api-key": bad}))
        assert (status, code) == (401, code_pb2.UNAUTHENTICATED)

    revoked, row = await key_service.issue_device_key()
    await key_service.stub.RevokeApiKey(key_pb2.RevokeApiKeyRequest(key_id=str(row.id)))
    status, _, _, body = denial(await check(key_service, GET_CERTIFICATE, {"x-api-key": revoked}))
    assert (status, body["message"]) == (401, "API key revoked")

    expiring, _ = await key_service.issue_device_key(expires_in=timedelta(minutes=1))
    key_clock.advance(minutes=2)
    status, _, _, body = denial(await check(key_service, GET_CERTIFICATE, {"x-api-key": expiring}))
    assert (status, body["message"]) == (401, "API key expired")


async def test_device_key_is_allowed_with_identity_headers(key_service: RunningKeyService) -> None:
    plaintext, row = await key_service.issue_device_key("dev-7")
    response = await check(
        key_service,
        GET_CERTIFICATE,
        {"x-api-key": plaintext, "x-myl-device-id": "forged", "x-myl-operator": "true"},
    )
    assert response.status.code == code_pb2.OK
    ok = response.ok_response
    headers = {h.header.key: h.header.value for h in ok.headers}
    assert headers == {
        "x-myl-key-id": str(row.id),
        "x-myl-device-id": "dev-7",
        "x-myl-permissions": "ssl:read,device:read,api:access",
        "x-myl-operator": "false",
        "x-myl-method": GET_CERTIFICATE,
    }
    assert all(h.append_action == OVERWRITE for h in ok.headers)
    assert list(ok.headers_to_remove) == ["x-api-key"]


async def test_operator_key_removes_any_device_header(key_service: RunningKeyService) -> None:
    plaintext, row = await key_service.issue_device_key(None, permissions=["admin"])
    response = await check(key_service, LIST_CERTIFICATES, {"x-api-key": plaintext})
    ok = response.ok_response
    headers = {h.header.key: h.header.value for h in ok.headers}
    assert headers == {
        "x-myl-key-id": str(row.id),
        "x-myl-permissions": "admin",
        "x-myl-operator": "true",
        "x-myl-method": LIST_CERTIFICATES,
    }
    assert sorted(ok.headers_to_remove) == ["x-api-key", "x-myl-device-id"]


async def test_missing_permission_is_forbidden(key_service: RunningKeyService) -> None:
    reader, _ = await key_service.issue_device_key()  # ssl:read, device:read, api:access
    status, code, _, body = denial(await check(key_service, PROVISION, {"x-api-key": reader}))
    assert (status, code, body["code"]) == (403, code_pb2.PERMISSION_DENIED, 7)
    # api:access is needed through the gateway in addition to the method's permission.
    parked, _ = await key_service.issue_device_key(permissions=["ssl:read"])
    status, _, _, _ = denial(await check(key_service, GET_CERTIFICATE, {"x-api-key": parked}))
    assert status == 403
    # The admin-only listing needs admin; a device key's device:write does not do.
    writer, _ = await key_service.issue_device_key(
        permissions=["ssl:write", "device:write", "api:access"]
    )
    status, _, _, _ = denial(await check(key_service, LIST_CERTIFICATES, {"x-api-key": writer}))
    assert status == 403
    allowed = await check(key_service, GENERATE_KEY, {"x-api-key": writer})
    assert allowed.status.code == code_pb2.OK


async def test_rate_limited_gets_429_with_retry_after(key_service: RunningKeyService) -> None:
    plaintext, _ = await key_service.issue_device_key(rate_limit=2)
    for _ in range(2):
        assert (
            await check(key_service, GET_CERTIFICATE, {"x-api-key": plaintext})
        ).status.code == 0
    status, code, headers, body = denial(
        await check(key_service, GET_CERTIFICATE, {"x-api-key": plaintext})
    )
    assert (status, code) == (429, code_pb2.RESOURCE_EXHAUSTED)
    assert headers["retry-after"] == "30"
    assert body["code"] == code_pb2.RESOURCE_EXHAUSTED


async def test_retry_after_is_at_least_one_second(key_service: RunningKeyService) -> None:
    plaintext, _ = await key_service.issue_device_key(rate_limit=120)  # 0.5 s interval
    replies = await asyncio.gather(
        *(
            key_service.stub.VerifyApiKey(key_pb2.VerifyApiKeyRequest(api_key=plaintext))
            for _ in range(120)
        )
    )
    assert all(r.result == key_pb2.VERIFY_RESULT_VALID for r in replies)
    status, _, headers, _ = denial(
        await check(key_service, GET_CERTIFICATE, {"x-api-key": plaintext})
    )
    assert (status, headers["retry-after"]) == (429, "1")


async def test_grpc_callers_get_grpc_status_headers(key_service: RunningKeyService) -> None:
    """A native gRPC caller sees the real code (not one derived from HTTP)."""
    plaintext, _ = await key_service.issue_device_key(rate_limit=1)
    grpc_headers = {"content-type": "application/grpc", "x-api-key": plaintext}
    assert (await check(key_service, GET_CERTIFICATE, grpc_headers)).status.code == 0
    response = await check(key_service, GET_CERTIFICATE, grpc_headers)
    denied = response.denied_response
    headers = {h.header.key: h.header.value for h in denied.headers}
    assert headers["grpc-status"] == str(code_pb2.RESOURCE_EXHAUSTED)
    assert int(headers["retry-after"]) >= 1
    status = status_pb2.Status.FromString(base64.b64decode(headers["grpc-status-details-bin"]))
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (status.code, info.reason) == (code_pb2.RESOURCE_EXHAUSTED, "RATE_LIMITED")
    assert denied.body == "rate limit exceeded"

    # The same request transcoded from REST gets the JSON form.
    rest = await check(
        key_service, GET_CERTIFICATE, {**grpc_headers, "x-envoy-original-path": "/api/v1/x"}
    )
    assert json.loads(rest.denied_response.body)["code"] == code_pb2.RESOURCE_EXHAUSTED
