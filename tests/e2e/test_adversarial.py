"""Attacks at the seams: where the gateway's check and the parts behind it meet.

Each test is something an attacker tried through the real Envoy gateway (and the service
ports) with real clients; the assertions are what the attacker gets: a clear 4xx with the
JSON error shape, never a 5xx, an empty message, or a method run that the key may not call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from grpc_status import rpc_status

from key_service.authz import PUBLIC_SERVICES
from key_service.permissions import grants
from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from myl.key.v1 import key_pb2, key_pb2_grpc
from shared.httprules import HttpRoute, HttpRoutes
from shared.identity import (
    AUTHORIZED_METHOD_HEADER,
    KEY_ID_HEADER,
    OPERATOR_HEADER,
    PERMISSIONS_HEADER,
    method_policy,
)
from tests.e2e.conftest import Gateway
from tests.e2e.test_edge import error_reason
from tests.e2e.test_gateway import device_key, operator_key, provision
from tests.fixtures import internal_tls
from tests.fixtures.key import RunningKeyService

ROUTES = HttpRoutes.build(PUBLIC_SERVICES).routes
NARROW = ["ssl:read", "api:access"]


def concrete(route: HttpRoute, values: dict[str, str]) -> str:
    """The route's path with each variable set from `values` (by field name)."""
    names = dict(route.variables)
    segments = [
        values.get(names[i], "x") if segment is None else segment
        for i, segment in enumerate(route.segments)
    ]
    return "/" + "/".join(segments) + (f":{route.verb}" if route.verb else "")


def variants(path: str, route: HttpRoute) -> Iterator[tuple[str, str]]:
    """(name, path) for what an attacker sends instead of the canonical path."""
    base, colon, verb = path.rpartition(":") if route.verb else (path, "", "")
    suffix = f"{colon}{verb}"
    head, _, last = base.rpartition("/")
    yield "trailing-slash", f"{base}/{suffix}"
    yield "dot", f"{base}/.{suffix}"
    yield "encoded-dot", f"{base}/%2e{suffix}"
    yield "dot-dot", f"{base}/x/..{suffix}"
    yield "double-slash", f"{head}//{last}{suffix}"
    yield "encoded-slash", f"{head}%2f{last}{suffix}"
    yield "mixed-case", base.replace("/api/", "/API/", 1).replace("/pki/", "/PKI/", 1) + suffix
    yield "semicolon", f"{base};x=1{suffix}"
    yield "encoded-colon", f"{base}%3A{verb}" if verb else f"{base}%3Alist"
    for _, field in route.variables:
        camel = field.split("_")[0] + "".join(w.title() for w in field.split("_")[1:])
        yield f"query-{camel}", f"{path}?{camel}=someone-else"


async def logged_all(gateway: Gateway, user_agents: list[str]) -> list[dict[str, Any]]:
    """The gateway's access log entries of the requests sent with `user_agents`, in that
    order (the log is flushed every 100 ms)."""
    deadline = time.monotonic() + 10
    while True:
        found: dict[str, dict[str, Any]] = {}
        for line in gateway.access_log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                found.setdefault(entry.get("user_agent"), dict(entry))
        missing = [agent for agent in user_agents if agent not in found]
        if not missing:
            return [found[agent] for agent in user_agents]
        assert time.monotonic() < deadline, f"no access log entry for {missing[:5]}"
        await asyncio.sleep(0.05)


async def test_no_path_variant_runs_a_method_the_key_may_not_call(
    gateway: Gateway, key_service: RunningKeyService
) -> None:
    """For every REST route and every variant an attacker tries, with a narrow operator key
    (ssl:read only) and a device key: either the gateway refuses it before any service, or
    the method that ran is one the key holds the permission for."""
    admin = await operator_key(key_service)
    narrow, _ = await key_service.issue_device_key(None, permissions=NARROW, rate_limit=100_000)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        await provision(client, gateway, admin, "adv-dev")
        device = await device_key(
            client, gateway, admin, "adv-dev",
            permissions=["ssl:read", "device:read", "api:access"], rateLimit=100_000,
        )  # fmt: skip
        values = {
            "device_id": "adv-dev",
            "uuid_subdomain": "adv-dev.myl.zip",
            "key_id": device["key"]["keyId"],
            "shard": "0.crl",
        }
        keys = {
            "narrow": (narrow, frozenset(NARROW)),
            "device": (device["apiKey"], frozenset(device["key"]["permissions"])),
        }
        attacks = [
            (route, variant, attack, key_name)
            for route in ROUTES
            for variant, attack in variants(concrete(route, values), route)
            for key_name in keys
        ]
        # A few at once (the gateway's answers do not depend on the order), then each one's
        # access log entry: one wait for the log instead of one per request. Few: the key
        # check runs in this process too, and must answer each within the gateway's 0.5 s.
        in_flight = asyncio.Semaphore(4)

        async def send(index: int, route: HttpRoute, attack: str, key_name: str) -> httpx.Response:
            async with in_flight:
                return await client.request(
                    route.http_method,
                    attack,
                    headers={"X-API-Key": keys[key_name][0], "User-Agent": f"attack-{index}"},
                    content=b"{}" if route.http_method == "POST" else None,
                )

        replies = await asyncio.gather(
            *(send(i, route, attack, name) for i, (route, _, attack, name) in enumerate(attacks))
        )
        entries = await logged_all(gateway, [f"attack-{i}" for i in range(len(attacks))])
        tried = ran = 0
        for (route, variant, attack, key_name), reply, entry in zip(
            attacks, replies, entries, strict=True
        ):
            held = keys[key_name][1]
            where = (route.grpc_path, variant, attack, key_name, reply.status_code)
            tried += 1
            assert reply.status_code < 500, (where, reply.text)
            executed = entry["grpc_path"]
            reached = entry["upstream_cluster"] in ("cert_service", "key_service")
            policy = method_policy(executed) if reached else None
            if policy is None:
                continue
            ran += 1
            assert grants(held, (policy.permission, "api:access")) or (
                reply.status_code == 403 and error_reason(reply.json()) == "METHOD_NOT_AUTHORIZED"
            ), (where, executed, reply.text)
        # The attack that worked before: the list route with a trailing slash.
        reply = await client.get(
            "/api/v1/ssl/certificates/", headers={"X-API-Key": keys["narrow"][0]}
        )
        assert reply.status_code == 400, reply.text
        assert error_reason(reply.json()) == "NON_CANONICAL_PATH"
        assert reply.json()["details"][1]["fieldViolations"][0]["field"] == "path"
    assert tried > 300
    print(f"{tried} variant requests, {ran} reached a service")


async def test_a_service_refuses_a_method_other_than_the_one_authorized(
    cert_service: Any, key_service: RunningKeyService
) -> None:
    """The services enforce the gateway's decision: a gateway call (identity headers) runs
    only the method the check named."""
    gateway_identity = [
        (KEY_ID_HEADER, "k1"),
        (PERMISSIONS_HEADER, "admin,api:access"),
        (OPERATOR_HEADER, "true"),
    ]
    async with internal_tls.channel(str(cert_service.address)) as channel:
        stub = cert_pb2_grpc.CertificateServiceStub(channel)
        for authorized in (
            [(AUTHORIZED_METHOD_HEADER, "/myl.cert.v1.CertificateService/LookupCertificate")],
            [],
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ListCertificates(
                    cert_pb2.ListCertificatesRequest(), metadata=[*gateway_identity, *authorized]
                )
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            status = rpc_status.from_call(refused.value)  # type: ignore[arg-type]
            assert status is not None
            assert b"METHOD_NOT_AUTHORIZED" in status.details[0].value
        listed = await stub.ListCertificates(
            cert_pb2.ListCertificatesRequest(),
            metadata=[
                *gateway_identity,
                (AUTHORIZED_METHOD_HEADER, "/myl.cert.v1.CertificateService/ListCertificates"),
            ],
        )
        assert listed is not None
    async with internal_tls.channel(key_service.address) as channel:
        keys = key_pb2_grpc.ApiKeyServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await keys.ListAuditEvents(key_pb2.ListAuditEventsRequest(), metadata=gateway_identity)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_body_or_query_field_naming_another_object_than_the_path_is_400(
    gateway: Gateway, key_service: RunningKeyService
) -> None:
    admin = await operator_key(key_service)
    headers = {"X-API-Key": admin}
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        await provision(client, gateway, admin, "dev-a")
        await provision(client, gateway, admin, "dev-b")
        key = await device_key(client, gateway, admin, "dev-a")
        other = await device_key(client, gateway, admin, "dev-b")
        for name in ("deviceId", "device_id"):
            reply = await client.post(
                "/api/v1/devices/dev-a/certificate:revoke",
                headers=headers,
                json={name: "dev-b", "reason": "REVOCATION_REASON_KEY_COMPROMISE"},
            )
            assert reply.status_code == 400, reply.text
            body = reply.json()
            assert body["details"][1]["fieldViolations"][0]["field"] == name, body
            assert "dev-b" in body["message"]
            assert "dev-a" in body["message"]
        for name in ("keyId", "key_id"):
            reply = await client.post(
                f"/api/v1/keys/{key['key']['keyId']}:revoke",
                headers=headers,
                json={name: other["key"]["keyId"]},
            )
            assert reply.status_code == 400, reply.text
            assert reply.json()["details"][1]["fieldViolations"][0]["field"] == name
        shadowed = await client.get(
            "/api/v1/devices/dev-a/certificate?deviceId=dev-b", headers=headers
        )
        assert shadowed.status_code == 400, shadowed.text
        # Nothing was revoked by any of it; the same id in both places is fine.
        for device in ("dev-a", "dev-b"):
            read = await client.get(f"/api/v1/devices/{device}/certificate", headers=headers)
            assert read.json()["certificate"]["status"] == "CERTIFICATE_STATUS_ACTIVE"
        same = await client.get("/api/v1/devices/dev-a/certificate?deviceId=dev-a", headers=headers)
        assert same.status_code == 200, same.text
        for kid in (key["key"]["keyId"], other["key"]["keyId"]):
            read = await client.get(f"/api/v1/keys/{kid}", headers=headers)
            assert read.json()["key"]["status"] == "API_KEY_STATUS_ACTIVE", read.text


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ("{'deviceId': 'dev-j', 'deviceName': 'x', 'expiresAt': '2030-01-01T00:00:00Z'}", "body"),
        ('{"deviceId": "dev-j", "deviceName": "x", "expiresAt": "2030-01-01T00:00:00Z",}', "body"),
        ('{"deviceId": "dev-j", "deviceName": "x", "rateLimit": NaN}', "body"),
        ('{"deviceId": "dev-j", "deviceName": "x", "deviceName": "y"}', "body"),
        ('{"deviceId": "dev-j", /* c */ "deviceName": "x"}', "body"),
        ('{"deviceId": "dev-j", "deviceName": "x", "expiresAt": "2030-01-01T00:00:00Z"}',
         "expiresAt"),
        ('{"deviceId": "dev-j", "deviceName": "x", "z": ' + "[" * 2500 + "]" * 2500 + "}", "body"),
        ('{"deviceId": "dev-j", "deviceName": "x", "z": ' + '{"a":' * 40 + "1" + "}" * 40 + "}",
         "body"),
        ('{"deviceId": ["dev-j"], "deviceName": "x"}', "deviceId"),
        ('{"deviceId": "dev-j", "deviceName": "x", "expireTime": {"seconds": 1}}', "expireTime"),
        ('{"deviceId": "dev-j", "deviceName": "x", "permissions": "ssl:read"}', "permissions"),
        ('{"deviceId": "dev-j", "deviceName": "x", "permissions": [1]}', "permissions[0]"),
    ],
    ids=["single-quotes", "trailing-comma", "nan", "duplicate", "comment", "misspelled",
         "nested-2500", "nested-40", "list-for-string", "object-for-timestamp",
         "string-for-list", "number-in-list"],
)  # fmt: skip
async def test_lenient_or_deep_json_is_400_and_creates_nothing(
    gateway: Gateway, key_service: RunningKeyService, body: str, field: str
) -> None:
    admin = await operator_key(key_service)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        await provision(client, gateway, admin, "dev-j")
        reply = await client.post(
            "/api/v1/device/generate-key",
            headers={"X-API-Key": admin, "Content-Type": "application/json"},
            content=body,
        )
        assert reply.status_code == 400, reply.text
        details = reply.json()["details"]
        fields = [v["field"] for d in details for v in d.get("fieldViolations", [])]
        assert fields == [field], reply.json()
        assert reply.json()["message"]
        listed = await client.get("/api/v1/devices/dev-j/keys", headers={"X-API-Key": admin})
        assert listed.json().get("keys", []) == [], listed.text


async def test_header_counts_and_sizes_are_4xx_with_the_json_shape(
    gateway: Gateway, key_service: RunningKeyService
) -> None:
    admin = await operator_key(key_service)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        await provision(client, gateway, admin, "dev-h")
        for extra in (50, 70, 76, 77, 78, 80, 88, 93, 94, 98, 150):
            headers = {"X-API-Key": admin, **{f"x-extra-{i}": "v" for i in range(extra)}}
            reply = await client.get("/api/v1/devices/dev-h/certificate", headers=headers)
            assert reply.status_code in (200, 431), (extra, reply.status_code, reply.text)
            if extra <= 50:
                assert reply.status_code == 200, reply.text
            if reply.status_code == 431:
                assert reply.json()["code"] == 3
                assert "80 headers" in reply.json()["message"]
        many = {"X-API-Key": admin, **{f"x-extra-{i}": "v" for i in range(100)}}
        refused = await client.get("/api/v1/devices/dev-h/certificate", headers=many)
        assert refused.status_code == 431
        assert "80 headers" in refused.json()["message"]


async def test_http_1_0_gets_the_json_error_shape(gateway: Gateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(b"GET /api/v1/ssl/ca HTTP/1.0\r\nHost: x\r\nX-API-Key: k\r\n\r\n")
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b" 426 " in head.split(b"\r\n")[0], raw
    parsed = json.loads(body)
    assert parsed["code"] == 9, parsed
    assert "HTTP/1.1" in parsed["message"]


async def test_native_grpc_reads_and_writes_meet_the_same_size_limit(
    gateway: Gateway, key_service: RunningKeyService
) -> None:
    admin = await operator_key(key_service)
    metadata = (("x-api-key", admin),)
    async with grpc.aio.insecure_channel(gateway.grpc_address) as channel:
        certs = cert_pb2_grpc.CertificateServiceStub(channel)
        big = "a" * (70 * 1024)
        with pytest.raises(grpc.aio.AioRpcError) as read:
            await certs.GetCertificate(
                cert_pb2.GetCertificateRequest(device_id=big), metadata=metadata
            )
        with pytest.raises(grpc.aio.AioRpcError) as write:
            await certs.ProvisionCertificate(
                cert_pb2.ProvisionCertificateRequest(device_id="dev-g", csr_pem=big),
                metadata=metadata,
            )
        for refused in (read, write):
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "64 KiB" in (refused.value.details() or "")
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        reply = await client.post(
            "/api/v1/ssl/provision",
            headers={"X-API-Key": admin},
            json={"deviceId": "dev-g", "csrPem": "a" * (70 * 1024)},
        )
        assert reply.status_code == 413, reply.text
        assert reply.json()["code"] == 8


async def slow_send(port: int, at_once: bytes, trickled: bytes) -> tuple[float, bytes]:
    """Send `at_once`, then `trickled` one byte a second; (seconds until the gateway
    closed the connection, what it answered before)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.monotonic()

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(at_once)
            await writer.drain()
            for i in range(len(trickled)):
                writer.write(trickled[i : i + 1])
                await writer.drain()
                await asyncio.sleep(1)

    async def answer() -> bytes:
        received = b""
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                received += chunk
        return received

    sender = asyncio.ensure_future(trickle())
    try:
        raw = await asyncio.wait_for(answer(), 30)
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        writer.close()
    return time.monotonic() - start, raw


async def test_slow_clients_are_cut_off(gateway: Gateway) -> None:
    """One byte a second: the headers get 5 s, the whole request 10 s, then 408."""
    slow_head = b"GET /api/v1/ssl/ca HTTP/1.1\r\nHost: x\r\nX-API-Key: k\r\n\r\n"
    head = (
        b"POST /api/v1/ssl/provision HTTP/1.1\r\nHost: x\r\nX-API-Key: k\r\n"
        b"Content-Type: application/json\r\nContent-Length: 400\r\n\r\n"
    )
    (head_seconds, head_raw), (body_seconds, body_raw) = await asyncio.gather(
        slow_send(gateway.port, b"", slow_head),
        slow_send(gateway.port, head, b'{"deviceId": "slow"' + b" " * 380 + b"}"),
    )
    print(f"slow headers cut after {head_seconds:.1f} s, slow body after {body_seconds:.1f} s")
    # A connection that sent only part of its headers is closed (with a 408 when Envoy
    # can still write one); one that sent its headers gets 408 and the JSON shape.
    assert head_seconds < 20
    assert head_raw == b"" or b" 408 " in head_raw.split(b"\r\n")[0], head_raw
    assert body_seconds < 25
    assert b" 408 " in body_raw.split(b"\r\n")[0], body_raw
    assert json.loads(body_raw.partition(b"\r\n\r\n")[2])["code"] == 4


async def test_an_unanswered_key_check_is_503_saying_so(
    gateway: Gateway, key_service: RunningKeyService
) -> None:
    """key_service gone: the gateway cannot check the key and says that, not an empty 503."""
    admin = await operator_key(key_service)
    await key_service.stop()
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        reply = await client.get("/api/v1/ssl/ca", headers={"X-API-Key": admin})
    assert reply.status_code == 503, reply.text
    body = reply.json()
    assert body["code"] == 14
    assert "could not be checked" in body["message"]
    assert error_reason(body) == "AUTHORIZATION_UNAVAILABLE"
