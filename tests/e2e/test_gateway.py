"""End to end through the real Envoy gateway, with real clients.

REST over HTTP/1.1 (httpx), native gRPC stubs and grpcurl, all against one
port, in front of the real cert_service and key_service.
"""

from __future__ import annotations

import asyncio
import json
import sys
from asyncio.subprocess import PIPE
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from deploy.devstack.gateway import envoy_command
from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from tests.e2e.conftest import Gateway
from tests.fixtures.key import RunningKeyService

GRPCURL = Path(sys.executable).parent / "grpcurl"
PROTOSET = Path(__file__).resolve().parents[2] / "deploy" / "envoy" / "myl.pb"
OPERATOR = ["admin", "api:access", "ssl:read", "ssl:write", "device:read", "device:write"]


async def operator_key(keys: RunningKeyService) -> str:
    plaintext, _ = await keys.issue_device_key(None, permissions=OPERATOR)
    return plaintext


async def provision(client: httpx.AsyncClient, gw: Gateway, key: str, device: str) -> Any:
    reply = await client.post(
        f"{gw.url}/api/v1/ssl/provision",
        headers={"X-API-Key": key},
        json={"deviceId": device, "uuidSubdomain": f"{device}.myl.zip"},
    )
    assert reply.status_code == 200, reply.text
    return reply.json()


async def device_key(
    client: httpx.AsyncClient, gw: Gateway, key: str, device: str, **extra: Any
) -> Any:
    reply = await client.post(
        f"{gw.url}/api/v1/device/generate-key",
        headers={"X-API-Key": key},
        json={"deviceId": device, "deviceName": "Test Device", **extra},
    )
    assert reply.status_code == 200, reply.text
    return reply.json()


async def test_seed_calls_verbatim_then_read_revoke_and_401(
    gateway: Gateway, key_service: RunningKeyService
) -> None:
    admin = await operator_key(key_service)
    async with httpx.AsyncClient() as client:
        # The seed's two calls, byte for byte.
        provisioned = await client.post(
            f"{gateway.url}/api/v1/ssl/provision",
            headers={"Content-Type": "application/json", "X-API-Key": admin},
            content='{"deviceId": "test-device", "uuidSubdomain": "test-device.myl.zip"}',
        )
        assert provisioned.status_code == 200, provisioned.text
        certificate = provisioned.json()["certificate"]
        assert certificate["deviceId"] == "test-device"
        assert certificate["uuidSubdomain"] == "test-device.myl.zip"
        assert certificate["status"] == "CERTIFICATE_STATUS_ACTIVE"
        assert "BEGIN CERTIFICATE" in certificate["certificateChainPem"]
        assert "PRIVATE KEY" in provisioned.json()["privateKeyPem"]

        generated = await client.post(
            f"{gateway.url}/api/v1/device/generate-key",
            headers={"Content-Type": "application/json", "X-API-Key": admin},
            content='{"deviceId": "test-device", "deviceName": "Test Device"}',
        )
        assert generated.status_code == 200, generated.text
        api_key = generated.json()["apiKey"]
        key_id = generated.json()["key"]["keyId"]
        assert api_key.startswith("myl_")

        read = await client.get(
            f"{gateway.url}/api/v1/devices/test-device/certificate",
            headers={"X-API-Key": api_key},
        )
        assert read.status_code == 200, read.text
        assert read.json()["certificate"]["fingerprintSha256"] == certificate["fingerprintSha256"]

        revoked = await client.post(
            f"{gateway.url}/api/v1/keys/{key_id}:revoke",
            headers={"X-API-Key": admin},
            json={"reason": "device retired"},
        )
        assert revoked.status_code == 200, revoked.text
        assert revoked.json()["key"]["status"] == "API_KEY_STATUS_REVOKED"

        again = await client.get(
            f"{gateway.url}/api/v1/devices/test-device/certificate",
            headers={"X-API-Key": api_key},
        )
        assert again.status_code == 401
        assert again.headers["content-type"].startswith("application/json")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-API-Key": "myl_not-a-real-key"},
        {"X-API-Key": "myl_" + "A" * 49},
        {"X-API-Key": ""},
    ],
    ids=["no-key", "malformed-key", "unknown-key", "empty-key"],
)
async def test_without_a_valid_key_is_401(gateway: Gateway, headers: dict[str, str]) -> None:
    async with httpx.AsyncClient() as client:
        for method, path in [
            ("GET", "/api/v1/devices/test-device/certificate"),
            ("POST", "/api/v1/ssl/provision"),
            ("GET", "/api/v1/ssl/ca"),
        ]:
            reply = await client.request(
                method, f"{gateway.url}{path}", headers=headers, json={"deviceId": "x"}
            )
            assert reply.status_code == 401, (path, reply.text)
            body = reply.json()
            assert body["code"] == 16 or body.get("error") == "UNAUTHENTICATED", body


async def test_missing_permission_is_403(gateway: Gateway, key_service: RunningKeyService) -> None:
    admin = await operator_key(key_service)
    async with httpx.AsyncClient() as client:
        await provision(client, gateway, admin, "dev-a")
        key = (await device_key(client, gateway, admin, "dev-a"))["apiKey"]
        # Default device permissions: ssl:read, device:read, api:access; not ssl:write.
        renew = await client.post(
            f"{gateway.url}/api/v1/devices/dev-a/certificate:renew",
            headers={"X-API-Key": key},
            json={},
        )
        assert renew.status_code == 403, renew.text
        listed = await client.get(
            f"{gateway.url}/api/v1/ssl/certificates", headers={"X-API-Key": key}
        )
        assert listed.status_code == 403


async def test_device_key_acts_only_on_its_own_device_even_with_forged_headers(
    gateway: Gateway, key_service: RunningKeyService
) -> None:
    admin = await operator_key(key_service)
    async with httpx.AsyncClient() as client:
        await provision(client, gateway, admin, "dev-a")
        await provision(client, gateway, admin, "dev-b")
        key_a = (await device_key(client, gateway, admin, "dev-a"))["apiKey"]

        own = await client.get(
            f"{gateway.url}/api/v1/devices/dev-a/certificate", headers={"X-API-Key": key_a}
        )
        assert own.status_code == 200

        forged = {
            "X-API-Key": key_a,
            "X-Myl-Device-Id": "dev-b",
            "X-Myl-Operator": "true",
            "X-Myl-Key-Id": "someone-else",
            "X-Myl-Permissions": "admin",
        }
        other = await client.get(f"{gateway.url}/api/v1/devices/dev-b/certificate", headers=forged)
        assert other.status_code == 403, other.text
        assert other.json()["code"] == 7  # PERMISSION_DENIED from cert_service
        lookup = await client.get(
            f"{gateway.url}/api/v1/ssl/certificates/dev-b.myl.zip", headers=forged
        )
        # Another device's name reads like a name that does not exist.
        assert lookup.status_code == 404
        missing = await client.get(
            f"{gateway.url}/api/v1/ssl/certificates/dev-z.myl.zip", headers=forged
        )
        assert missing.status_code == 404
        assert lookup.json()["message"] == missing.json()["message"]
        # The operator key reads any device.
        any_device = await client.get(
            f"{gateway.url}/api/v1/devices/dev-b/certificate", headers={"X-API-Key": admin}
        )
        assert any_device.status_code == 200


async def test_malformed_json_is_400(gateway: Gateway, key_service: RunningKeyService) -> None:
    admin = await operator_key(key_service)
    async with httpx.AsyncClient() as client:
        reply = await client.post(
            f"{gateway.url}/api/v1/ssl/provision",
            headers={"X-API-Key": admin, "Content-Type": "application/json"},
            content='{"deviceId": "x", ',
        )
        assert reply.status_code == 400
        invalid = await client.post(
            f"{gateway.url}/api/v1/ssl/provision",
            headers={"X-API-Key": admin},
            json={"deviceId": "bad device id", "uuidSubdomain": "www.myl.zip"},
        )
        assert invalid.status_code == 400
        body = invalid.json()
        assert body["code"] == 3
        violations = [
            v["field"]
            for d in body["details"]
            if d["@type"].endswith("BadRequest")
            for v in d["fieldViolations"]
        ]
        assert violations, body


async def test_rate_limit_is_429_with_retry_after(
    gateway: Gateway, key_service: RunningKeyService
) -> None:
    admin = await operator_key(key_service)
    async with httpx.AsyncClient() as client:
        await provision(client, gateway, admin, "dev-r")
        key = (await device_key(client, gateway, admin, "dev-r", rateLimit=3))["apiKey"]
        codes = []
        for _ in range(5):
            reply = await client.get(
                f"{gateway.url}/api/v1/devices/dev-r/certificate", headers={"X-API-Key": key}
            )
            codes.append(reply.status_code)
        assert codes == [200, 200, 200, 429, 429]
        assert int(reply.headers["retry-after"]) >= 1


async def test_native_grpc_and_grpcurl_through_the_gateway(
    gateway: Gateway, key_service: RunningKeyService
) -> None:
    admin = await operator_key(key_service)
    async with grpc.aio.insecure_channel(gateway.grpc_address) as channel:
        stub = cert_pb2_grpc.CertificateServiceStub(channel)
        reply = await stub.ProvisionCertificate(
            cert_pb2.ProvisionCertificateRequest(device_id="grpc-dev"),
            metadata=(("x-api-key", admin),),
        )
        assert reply.certificate.uuid_subdomain.endswith(".myl.zip")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetCertificate(cert_pb2.GetCertificateRequest(device_id="grpc-dev"))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

    async def grpcurl(*args: str) -> str:
        process = await asyncio.create_subprocess_exec(
            str(GRPCURL), "-plaintext", *args, stdout=PIPE, stderr=PIPE
        )
        out, err = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0, err.decode()
        return out.decode()

    assert "myl.cert.v1.CertificateService" in await grpcurl(gateway.grpc_address, "list")
    got = await grpcurl(
        "-H", f"x-api-key: {admin}",
        "-d", '{"deviceId": "grpc-dev"}',
        gateway.grpc_address, "myl.cert.v1.CertificateService/GetCertificate",
    )  # fmt: skip
    # grpcurl prints proto field names.
    assert json.loads(got)["certificate"]["device_id"] == "grpc-dev"
    listed = await grpcurl(
        "-protoset", str(PROTOSET),
        "-H", f"x-api-key: {admin}",
        "-d", '{"deviceId": "grpc-dev"}',
        gateway.grpc_address, "myl.key.v1.ApiKeyService/ListApiKeys",
    )  # fmt: skip
    assert json.loads(listed) == {} or "keys" in json.loads(listed)


async def test_internal_methods_are_not_reachable(
    gateway: Gateway, key_service: RunningKeyService
) -> None:
    admin = await operator_key(key_service)
    async with httpx.AsyncClient(http2=False) as client:
        reply = await client.get(f"{gateway.url}/api/v1/nothing-here", headers={"X-API-Key": admin})
        assert reply.status_code == 404
    async with grpc.aio.insecure_channel(gateway.grpc_address) as channel:
        verify = channel.unary_unary(
            "/myl.key.v1.ApiKeyService/VerifyApiKey",
            request_serializer=bytes,
            response_deserializer=bytes,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await verify(b"", metadata=(("x-api-key", admin),))
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_configuration_passes_envoy_validate(gateway: Gateway) -> None:
    process = await asyncio.create_subprocess_exec(
        *envoy_command(gateway.config_path, concurrency=1, validate_only=True),
        stdout=PIPE,
        stderr=PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, (out + err).decode()
    assert b"OK" in out + err


async def test_access_log_carries_the_request_id_the_client_saw(
    gateway: Gateway, key_service: RunningKeyService
) -> None:
    admin = await operator_key(key_service)
    async with httpx.AsyncClient() as client:
        healthz = await client.get(f"{gateway.url}/healthz")
        assert healthz.status_code == 200
        reply = await client.get(f"{gateway.url}/api/v1/ssl/ca", headers={"X-API-Key": admin})
        assert reply.status_code == 200, reply.text
        assert "BEGIN CERTIFICATE" in reply.json()["caChainPem"]
    request_id = reply.headers["x-request-id"]
    for _ in range(50):  # the access log is flushed every 100 ms
        lines = [json.loads(line) for line in gateway.access_log.read_text().splitlines()]
        entries = [e for e in lines if e["request_id"] == request_id]
        if entries:
            break
        await asyncio.sleep(0.1)
    assert entries, lines
    assert entries[0]["path"] == "/api/v1/ssl/ca"
    assert entries[0]["grpc_path"] == "/myl.cert.v1.CertificateService/GetCaChain"
    assert entries[0]["status"] == 200
    assert admin not in gateway.access_log.read_text()


async def test_grpc_caller_over_its_rate_limit_sees_resource_exhausted(
    gateway: Gateway, key_service: RunningKeyService
) -> None:
    admin = await operator_key(key_service)
    limited, _ = await key_service.issue_device_key(
        None, permissions=["api:access", "ssl:read"], rate_limit=1
    )
    async with grpc.aio.insecure_channel(gateway.grpc_address) as channel:
        stub = cert_pb2_grpc.CertificateServiceStub(channel)
        await stub.ProvisionCertificate(
            cert_pb2.ProvisionCertificateRequest(device_id="rl-dev"),
            metadata=(("x-api-key", admin),),
        )
        request = cert_pb2.GetCertificateRequest(device_id="rl-dev")
        await stub.GetCertificate(request, metadata=(("x-api-key", limited),))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetCertificate(request, metadata=(("x-api-key", limited),))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
