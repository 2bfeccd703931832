"""The public edge through the real gateway: every bad request gets a clear 4xx.

Each test is one thing a device developer or an attacker tried; the assertions are what
they see (status, body, headers) and what reaches the logs.
"""

from __future__ import annotations

import asyncio
import json
from asyncio.subprocess import PIPE, STDOUT
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_status import rpc_status

from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from myl.key.v1 import key_pb2, key_pb2_grpc
from shared.identity import method_policy
from tests.e2e.conftest import Gateway
from tests.e2e.test_gateway import GRPCURL, device_key, operator_key, provision
from tests.fixtures import internal_tls
from tests.fixtures.key import RunningKeyService

ROOT = Path(__file__).resolve().parents[2]


def error_reason(body: dict[str, object]) -> str:
    details = body.get("details")
    assert isinstance(details, list), body
    return next(str(d["reason"]) for d in details if str(d["@type"]).endswith("ErrorInfo"))


async def test_rotation_cannot_obtain_what_the_caller_may_not_grant(
    gateway: Gateway, key_service: RunningKeyService
) -> None:
    admin = await operator_key(key_service)
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        await provision(client, gateway, admin, "dev-rot")
        weak = await device_key(
            client, gateway, admin, "dev-rot",
            permissions=["device:read", "device:write", "api:access"], rateLimit=100,
        )  # fmt: skip
        strong = await device_key(
            client, gateway, admin, "dev-rot",
            permissions=["ssl:read", "ssl:write", "api:access"], rateLimit=1_000_000,
        )  # fmt: skip
        fast = await device_key(
            client, gateway, admin, "dev-rot",
            permissions=["device:read", "api:access"], rateLimit=5000,
        )  # fmt: skip
        weak_key = {"X-API-Key": weak["apiKey"]}

        stronger = await client.post(
            f"/api/v1/keys/{strong['key']['keyId']}:rotate", headers=weak_key, json={}
        )
        assert stronger.status_code == 403, stronger.text
        assert error_reason(stronger.json()) == "PERMISSION_NOT_GRANTABLE"
        assert "ssl:write" in stronger.json()["message"]
        assert "apiKey" not in stronger.json()

        faster = await client.post(
            f"/api/v1/keys/{fast['key']['keyId']}:rotate", headers=weak_key, json={}
        )
        assert faster.status_code == 403, faster.text
        assert error_reason(faster.json()) == "RATE_LIMIT_NOT_GRANTABLE"

        # Both keys are untouched and still work.
        for key in (strong, fast):
            got = await client.get(f"/api/v1/keys/{key['key']['keyId']}", headers=weak_key)
            assert got.json()["key"]["status"] == "API_KEY_STATUS_ACTIVE", got.text

        # A key it could have granted itself it may rotate; the new key does not outlive it.
        peer = await device_key(
            client, gateway, admin, "dev-rot",
            permissions=["device:read", "api:access"], rateLimit=10,
            expireTime=(datetime.now(UTC) + timedelta(days=3000)).isoformat(),
        )  # fmt: skip
        rotated = await client.post(
            f"/api/v1/keys/{peer['key']['keyId']}:rotate", headers=weak_key, json={}
        )
        assert rotated.status_code == 200, rotated.text
        assert rotated.json()["key"]["expireTime"] <= weak["key"]["expireTime"]
        assert rotated.json()["key"]["permissions"] == ["device:read", "api:access"]

        # Its own key, and the operator any key: as before.
        own = await client.post(
            f"/api/v1/keys/{weak['key']['keyId']}:rotate", headers=weak_key, json={}
        )
        assert own.status_code == 200, own.text
        by_operator = await client.post(
            f"/api/v1/keys/{strong['key']['keyId']}:rotate",
            headers={"X-API-Key": admin},
            json={},
        )
        assert by_operator.status_code == 200, by_operator.text
        assert by_operator.json()["key"]["rateLimit"] == 1_000_000


def field_violations(body: dict[str, Any]) -> list[str]:
    return [
        v["field"]
        for d in body["details"]
        if d["@type"].endswith("BadRequest")
        for v in d["fieldViolations"]
    ]


async def read_logs(gateway: Gateway, request_id: str) -> str:
    """The access log once the line for `request_id` is flushed, plus Envoy's own log."""
    for _ in range(50):  # flushed every 100 ms
        text = gateway.access_log.read_text()
        if request_id in text:
            break
        await asyncio.sleep(0.1)
    assert request_id in text
    return text + (gateway.config_path.parent / "envoy.log").read_text()


async def test_a_key_in_the_query_string_reaches_no_log(
    gateway: Gateway, key_service: RunningKeyService, capsys: pytest.CaptureFixture[str]
) -> None:
    admin = await operator_key(key_service)
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        await provision(client, gateway, admin, "dev-q")
        key = (await device_key(client, gateway, admin, "dev-q"))["apiKey"]
        body = key[len("myl_") :]
        # Only in the query: not a key at all (401), and not logged.
        only_query = await client.get(f"/api/v1/devices/dev-q/certificate?api_key={key}")
        assert only_query.status_code == 401, only_query.text
        # Header and query: the unknown parameter is refused, its value not echoed.
        both = await client.get(
            f"/api/v1/devices/dev-q/certificate?api_key={key}", headers={"X-API-Key": key}
        )
        assert both.status_code == 400, both.text
        assert body not in both.text
        # A gRPC-path request with the key in its query.
        grpc_path = await client.post(
            f"/myl.cert.v1.CertificateService/GetCertificate?key={key}",
            headers={"X-API-Key": key},
        )
        assert grpc_path.status_code >= 400
    logs = await read_logs(gateway, both.headers["x-request-id"])
    logs = await read_logs(gateway, grpc_path.headers["x-request-id"]) + logs
    assert only_query.headers["x-request-id"] in logs
    assert body not in logs
    assert body not in capsys.readouterr().out
    entries = [json.loads(line) for line in gateway.access_log.read_text().splitlines()]
    paths = {e["path"] for e in entries}
    assert "/api/v1/devices/dev-q/certificate" in paths


ROUTES_WITH_TEXT_FROM_THE_URL = [
    ("GET", "/api/v1/devices/dev%ffx/certificate", "device_id"),
    ("GET", "/api/v1/ssl/certificates/dev%ff.myl.zip", "uuid_subdomain"),
    ("GET", "/api/v1/ssl/certificates?pageToken=%ff", "page_token"),
    ("POST", "/api/v1/devices/dev%ffx/certificate:renew", "device_id"),
    ("POST", "/api/v1/devices/dev%ffx/certificate:revoke", "device_id"),
    ("DELETE", "/api/v1/devices/dev%ffx", "device_id"),
    ("GET", "/api/v1/keys/%ff", "key_id"),
    ("GET", "/api/v1/devices/dev%ffx/keys", "device_id"),
    ("GET", "/api/v1/devices/dev-u/keys?pageToken=%ff", "page_token"),
    ("POST", "/api/v1/keys/%ff:rotate", "key_id"),
    ("POST", "/api/v1/keys/%ff:revoke", "key_id"),
    ("POST", "/api/v1/devices/dev%ffx/keys:revoke", "device_id"),
    ("GET", "/api/v1/audit-events?deviceId=%ff", "device_id"),
    ("GET", "/api/v1/audit-events?keyId=%c3%28", "key_id"),
]


async def test_invalid_utf8_in_a_path_or_query_is_400_naming_the_field(
    gateway: Gateway, key_service: RunningKeyService, capsys: pytest.CaptureFixture[str]
) -> None:
    admin = await operator_key(key_service)
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        for method, path, field in ROUTES_WITH_TEXT_FROM_THE_URL:
            reply = await client.request(
                method,
                path,
                headers={"X-API-Key": admin},
                content=None if method in ("GET", "DELETE") else b"{}",
            )
            assert reply.status_code == 400, (path, reply.text)
            body = reply.json()
            assert body["code"] == 3, (path, body)
            assert field_violations(body) == [field], (path, body)
            assert "DecodeError" not in reply.text
    assert "Traceback" not in capsys.readouterr().out


async def test_a_corrupt_grpc_message_is_invalid_argument(
    gateway: Gateway, key_service: RunningKeyService, cert_service: Any
) -> None:
    admin = await operator_key(key_service)
    # GetCertificateRequest{device_id: b"\xff"} on the wire, and bytes that are no message.
    bad_utf8 = b"\x0a\x01\xff"
    truncated = b"\x0a\x05ab"
    for address, metadata in (
        (gateway.grpc_address, (("x-api-key", admin),)),
        (cert_service.address, ()),
    ):
        opened = (
            internal_tls.channel(address)
            if address == cert_service.address
            else grpc.aio.insecure_channel(address)
        )
        async with opened as channel:
            call = channel.unary_unary(
                "/myl.cert.v1.CertificateService/GetCertificate",
                request_serializer=bytes,
                response_deserializer=bytes,
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(bad_utf8, metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "device_id" in str(caught.value.details())
            status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
            assert status is not None
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(truncated, metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_oversized_requests_are_413_or_431_before_the_key_is_checked(
    gateway: Gateway, key_service: RunningKeyService
) -> None:
    admin = await operator_key(key_service)
    long_name = "a" * 10_000
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        for headers in ({"X-API-Key": admin}, {}):
            path = await client.get(f"/api/v1/devices/{long_name}/certificate", headers=headers)
            assert path.status_code == 431, path.text
            assert path.json()["code"] == 3
            assert "x-myl" not in path.text
            query = await client.get(
                f"/api/v1/ssl/certificates?pageToken={long_name}", headers=headers
            )
            assert query.status_code == 431, query.text
            header = await client.get("/api/v1/ssl/ca", headers={**headers, "X-Padding": long_name})
            assert header.status_code == 431, header.text
            body = await client.post(
                "/api/v1/ssl/provision",
                headers={**headers, "Content-Type": "application/json"},
                content=b'{"deviceId": "' + b"a" * 200_000 + b'"}',
            )
            assert body.status_code == 413, body.text
            assert body.json()["message"] == "request body larger than 64 KiB"
            assert body.json()["code"] == 8
            # 10 MB from curl, which waits for "100 Continue" and so reads the answer.
            curl = await asyncio.create_subprocess_exec(
                "curl", "-s", "-o", "-", "-w", "%{http_code}", "-X", "POST",
                "-H", "Content-Type: application/json",
                *(f"-H{k}: {v}" for k, v in headers.items()),
                "--data-binary", "@-", f"{gateway.url}/api/v1/ssl/provision",
                stdin=PIPE, stdout=PIPE,
            )  # fmt: skip
            out, _ = await curl.communicate(b'{"deviceId": "' + b"a" * 10_000_000 + b'"}')
            assert out.endswith(b"413"), out
        # Just inside the limits: an ordinary answer from the service.
        fits = await client.get(
            f"/api/v1/devices/{'a' * 6000}/certificate", headers={"X-API-Key": admin}
        )
        assert fits.status_code == 400, fits.text
        assert field_violations(fits.json()) == ["device_id"]


async def test_authentication_comes_before_parsing_the_body(
    gateway: Gateway, key_service: RunningKeyService
) -> None:
    admin = await operator_key(key_service)
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        for body in ('{"deviceId": "x", ', '{"deviceId": ["a"]}', "not json"):
            anonymous = await client.post(
                "/api/v1/ssl/provision",
                headers={"Content-Type": "application/json"},
                content=body,
            )
            assert anonymous.status_code == 401, anonymous.text
            assert error_reason(anonymous.json()) == "API_KEY_MISSING"
            keyed = await client.post(
                "/api/v1/ssl/provision",
                headers={"Content-Type": "application/json", "X-API-Key": admin},
                content=body,
            )
            assert keyed.status_code == 400, keyed.text
            assert keyed.json()["code"] == 3
        unknown = await client.get("/api/v1/nothing-here")
        assert unknown.status_code == 404


async def test_permission_missing_names_the_permission(
    gateway: Gateway, key_service: RunningKeyService
) -> None:
    admin = await operator_key(key_service)
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        await provision(client, gateway, admin, "dev-p")
        key = (await device_key(client, gateway, admin, "dev-p"))["apiKey"]
        renew = await client.post(
            "/api/v1/devices/dev-p/certificate:renew", headers={"X-API-Key": key}, json={}
        )
        assert renew.status_code == 403
        body = renew.json()
        assert error_reason(body) == "PERMISSION_MISSING"
        assert "ssl:write" in body["message"]
        assert body["details"][0]["metadata"] == {"permissions": "ssl:write"}
    async with grpc.aio.insecure_channel(gateway.grpc_address) as channel:
        stub = cert_pb2_grpc.CertificateServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListCertificates(
                cert_pb2.ListCertificatesRequest(), metadata=(("x-api-key", key),)
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "admin" in str(caught.value.details())


async def grpcurl(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        str(GRPCURL), "-plaintext", *args, stdout=PIPE, stderr=STDOUT
    )
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_grpcurl_lists_describes_and_calls_every_public_method_through_the_gateway(
    gateway: Gateway, key_service: RunningKeyService
) -> None:
    admin = await operator_key(key_service)
    address = gateway.grpc_address
    code, listed = await grpcurl(address, "list")
    assert code == 0, listed
    assert listed.split() == [
        "grpc.reflection.v1alpha.ServerReflection",
        "myl.cert.v1.CertificateService",
        "myl.key.v1.ApiKeyService",
    ]
    public = [
        m
        for service in (cert_pb2.DESCRIPTOR.services_by_name["CertificateService"],
                        key_pb2.DESCRIPTOR.services_by_name["ApiKeyService"])
        for m in service.methods
        if method_policy(f"/{service.full_name}/{m.name}") is not None
    ]  # fmt: skip
    assert len(public) == 17  # GetRenewalInfo and CreateAcmeEabCredentials included
    for symbol in ("myl.cert.v1.CertificateService", "myl.key.v1.ApiKeyService"):
        code, described = await grpcurl(address, "describe", symbol)
        assert code == 0, described
        assert all(f"rpc {m.name} (" in described for m in public if symbol in m.full_name)
    for symbol in (
        "myl.cert.v1.CertificateService.GetCertificate",
        "myl.key.v1.GenerateApiKeyRequest",
    ):
        code, described = await grpcurl(address, "describe", symbol)
        assert code == 0, described
    for method in public:
        # Called with reflection alone: it reaches the service (an empty request is
        # INVALID_ARGUMENT for most methods), never UNIMPLEMENTED or an unknown symbol.
        target = f"{method.containing_service.full_name}/{method.name}"
        code, answer = await grpcurl("-H", f"x-api-key: {admin}", "-d", "{}", address, target)
        if code != 0:
            assert "Code: InvalidArgument" in answer, (target, answer)


async def test_transcoder_errors_name_the_problem_and_unknown_fields_are_refused(
    gateway: Gateway, key_service: RunningKeyService
) -> None:
    admin = await operator_key(key_service)
    headers = {"X-API-Key": admin}
    async with httpx.AsyncClient(base_url=gateway.url, headers=headers) as client:
        await provision(client, gateway, admin, "dev-t")

        nul = await client.get("/api/v1/devices/dev%00t/certificate")
        assert nul.status_code == 400
        assert nul.json()["message"], nul.text
        assert field_violations(nul.json()) == ["path"]

        not_a_list = await client.post("/api/v1/ssl/provision", json={"deviceId": ["a"]})
        assert not_a_list.status_code == 400
        assert field_violations(not_a_list.json()) == ["deviceId"]
        assert "must be a JSON string" in not_a_list.json()["message"]

        short_enum = await client.get("/api/v1/ssl/certificates", params={"status": "ACTIVE"})
        assert short_enum.status_code == 400
        assert field_violations(short_enum.json()) == ["url"]
        assert "CERTIFICATE_STATUS_ACTIVE" in short_enum.json()["details"][0]["metadata"]["hint"]
        any_case = await client.get(
            "/api/v1/ssl/certificates", params={"status": "certificate_status_active"}
        )
        assert any_case.status_code == 200, any_case.text

        # A misspelled field is refused, naming it; nothing is created.
        misspelled = await client.post(
            "/api/v1/device/generate-key",
            json={"deviceId": "dev-t", "expiresAt": "2030-01-01T00:00:00Z", "extra": {"a": 1}},
        )
        assert misspelled.status_code == 400, misspelled.text
        assert error_reason(misspelled.json()) == "UNKNOWN_FIELD"
        assert field_violations(misspelled.json()) == ["expiresAt", "extra"]
        listed = await client.get("/api/v1/devices/dev-t/keys")
        assert listed.json()["keys"] == []
        # Both spellings proto3 JSON accepts are known; what was applied is in the answer.
        expire = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
        both = await client.post(
            "/api/v1/device/generate-key",
            json={"device_id": "dev-t", "expireTime": expire.isoformat().replace("+00:00", "Z")},
        )
        assert both.status_code == 200, both.text
        applied = datetime.fromisoformat(both.json()["key"]["expireTime"].replace("Z", "+00:00"))
        assert applied == expire
        revoked = await client.post(
            "/api/v1/devices/dev-t/certificate:revoke",
            json={"reason": "revocation_reason_superseded"},
        )
        assert revoked.status_code == 200, revoked.text
        assert revoked.json()["certificate"]["revocationReason"] == "REVOCATION_REASON_SUPERSEDED"


async def test_openapi_document_is_served_without_a_key_and_covers_every_route(
    gateway: Gateway,
) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        reply = await client.get("/openapi.json")
        assert reply.status_code == 200
        assert reply.headers["content-type"] == "application/json"
        document = reply.json()
        assert document == json.loads((ROOT / "deploy" / "envoy" / "openapi.json").read_text())
        # An undeclared method on a real path: 405 naming the one it takes.
        wrong = await client.put("/api/v1/ssl/ca")
        assert wrong.status_code == 405
        assert wrong.headers["allow"] == "GET"
    assert document["openapi"].startswith("3.")
    assert document["components"]["securitySchemes"]["ApiKey"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
    }
    operations = {
        op["x-grpc-method"]: (verb.upper(), path, op)
        for path, item in document["paths"].items()
        for verb, op in item.items()
    }
    public = {
        f"/{s.full_name}/{m.name}": m
        for s in (
            cert_pb2.DESCRIPTOR.services_by_name["CertificateService"],
            key_pb2.DESCRIPTOR.services_by_name["ApiKeyService"],
        )
        for m in s.methods
        if method_policy(f"/{s.full_name}/{m.name}") is not None
    }
    repository = {
        "/myl.cert.v1.CertificateService/GetCrl": "/pki/crls/{fileName}",
        "/myl.cert.v1.CertificateService/GetIssuerCertificate": "/pki/ca.cer",
    }
    assert set(operations) == set(public) | set(repository)
    for grpc_path, path in repository.items():
        verb, documented, operation = operations.pop(grpc_path)
        assert (verb, documented) == ("GET", path)
        assert operation["security"] == []  # no key
        assert "application/pkix-" in next(iter(operation["responses"]["200"]["content"]))
    for grpc_path, (_, _, operation) in operations.items():
        policy = method_policy(grpc_path)
        assert policy is not None
        assert operation["x-required-permission"] == policy.permission
        assert f"`{policy.permission}`" in operation["description"]
        assert operation["responses"]["default"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/google.rpc.Status"
        }
    verb, path, rotate = operations["/myl.key.v1.ApiKeyService/RotateApiKey"]
    assert (verb, path) == ("POST", "/api/v1/keys/{keyId}:rotate")
    body = rotate["requestBody"]["content"]["application/json"]["schema"]
    assert "gracePeriod" in body["properties"]
    assert "keyId" not in body["properties"]  # bound to the path
    assert body["additionalProperties"] is False
    key_schema = document["components"]["schemas"]["myl.key.v1.ApiKey"]
    assert "expireTime" in key_schema["properties"]


async def test_refusals_say_what_was_sent(gateway: Gateway, key_service: RunningKeyService) -> None:
    admin = await operator_key(key_service)
    async with httpx.AsyncClient(base_url=gateway.url, headers={"X-API-Key": admin}) as client:
        await provision(client, gateway, admin, "dev-msg")
        # A timestamp written as a JSON object is refused by the gateway's check, naming
        # the field and the form it takes (the transcoder would read it as 1970).
        as_object = await client.post(
            "/api/v1/device/generate-key", json={"deviceId": "dev-msg", "expireTime": {}}
        )
        assert as_object.status_code == 400, as_object.text
        message = as_object.json()["message"]
        assert message.startswith("invalid expireTime: must be an RFC 3339 string")
        assert 'e.g. "2030-01-01T00:00:00Z"' in message
        past = await client.post(
            "/api/v1/device/generate-key",
            json={"deviceId": "dev-msg", "expireTime": "2020-05-01T00:00:00Z"},
        )
        assert past.status_code == 400, past.text
        assert past.json()["message"] == (
            "invalid expire_time: must lie in the future, got 2020-05-01T00:00:00Z"
        )
        oversized = await client.post(
            "/api/v1/ssl/provision", json={"deviceId": "dev-big", "csrPem": "A" * 20000}
        )
        assert oversized.status_code == 400, oversized.text
        assert oversized.json()["message"] == (
            "invalid csr_pem: the CSR is 20000 bytes long, more than the 16384 accepted"
        )
        assert field_violations(oversized.json()) == ["csr_pem"]
    # A gRPC caller that sets an empty Timestamp sends the zero moment: named as such.
    address = gateway.url.removeprefix("http://")
    async with grpc.aio.insecure_channel(address) as channel:
        stub = key_pb2_grpc.ApiKeyServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GenerateApiKey(
                key_pb2.GenerateApiKeyRequest(device_id="dev-msg", expire_time=Timestamp()),
                metadata=(("x-api-key", admin),),
            )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details() or ""
    assert details.startswith("invalid expire_time: must lie in the future, got 1970-01-01")
    assert 'RFC 3339 string, e.g. "2030-01-01T00:00:00Z"' in details
