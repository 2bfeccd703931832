"""The provisioning and registration limits as clients meet them, over real gRPC.

Real cert_service and key_service on real PostgreSQL and Redis; the limits come from a
LIMITS_FILE with small overrides for the ids these tests use.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from google.rpc import code_pb2, error_details_pb2  # type: ignore[attr-defined]

from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from myl.envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from myl.key.v1 import key_pb2
from shared.config import ServerConfig
from tests.fixtures import gateway_identity
from tests.fixtures.cert import (
    RunningCertService,
    StartCertService,
    error_reason,
    rpc_status,
)
from tests.fixtures.clock import FakeClock
from tests.fixtures.key import RunningKeyService, start_key_service

LIMITS = """
overrides:
  - CertificatesPerDeviceName: {burst: 3, count: 3, period: 168h, ids: [early.myl.zip]}
  - NewDevicesPerOperatorKey: {burst: 2, count: 2, period: 1h, ids: [op-key-1]}
  - NewApiKeysPerDevice: {burst: 2, count: 2, period: 24h, ids: [keyed-device]}
  - FailedVerificationsPerAddress:
      burst: 3
      count: 3
      period: 1h
      ids: [192.0.2.7, "2001:db8:1:2::/64"]
"""
GET_CERTIFICATE = "/myl.cert.v1.CertificateService/GetCertificate"


@pytest.fixture
def limits_file(tmp_path: Path) -> Path:
    path = tmp_path / "limits.yaml"
    path.write_text(LIMITS)
    return path


@pytest.fixture
async def limited_cert(
    start_cert_service: StartCertService, limits_file: Path
) -> RunningCertService:
    return await start_cert_service(LIMITS_FILE=str(limits_file))


@pytest.fixture
async def cert(
    limited_cert: RunningCertService,
) -> AsyncIterator[cert_pb2_grpc.CertificateServiceAsyncStub]:
    async with gateway_identity.channel(limited_cert.address) as channel:
        yield cert_pb2_grpc.CertificateServiceStub(channel)


@pytest.fixture
async def limited_keys(
    limited_cert: RunningCertService,
    make_config: Callable[..., ServerConfig],
    limits_file: Path,
) -> AsyncIterator[RunningKeyService]:
    running = await start_key_service(
        make_config("key_service", PORT=str(limited_cert.key_service_port)),
        FakeClock(datetime.now(UTC).replace(microsecond=0), frozen=True),
        cert_address=limited_cert.address,
        LIMITS_FILE=str(limits_file),
    )
    try:
        yield running
    finally:
        await running.stop()


def retry_delay(error: grpc.aio.AioRpcError) -> float:
    status = rpc_status(error)
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return float(info.retry_delay.ToTimedelta().total_seconds())
    raise AssertionError("no RetryInfo")


def limit_named(error: grpc.aio.AioRpcError) -> str:
    for detail in rpc_status(error).details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.metadata["limit"])
    return ""


def trailer(error: grpc.aio.AioRpcError, name: str) -> str | None:
    metadata: Any = error.trailing_metadata() or ()
    for key, value in metadata:
        if key == name:
            return str(value)
    return None


OPERATOR = (
    ("x-myl-key-id", "op-key-1"),
    ("x-myl-permissions", "admin,api:access"),
    ("x-myl-operator", "true"),
)


async def test_early_renewals_count_against_the_name_due_ones_do_not(
    cert: cert_pb2_grpc.CertificateServiceAsyncStub, limited_cert: RunningCertService
) -> None:
    await cert.ProvisionCertificate(
        cert_pb2.ProvisionCertificateRequest(device_id="early", uuid_subdomain="early")
    )
    renew = cert_pb2.RenewCertificateRequest(device_id="early")
    await cert.RenewCertificate(renew)
    await cert.RenewCertificate(renew)  # the first provision and two early renewals: 3
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await cert.RenewCertificate(renew)
    error = refused.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(error) == "CERTIFICATES_PER_DEVICE_NAME_EXCEEDED"
    assert limit_named(error) == "CertificatesPerDeviceName"
    assert retry_delay(error) == pytest.approx(7 * 24 * 3600 / 3, abs=2)
    assert trailer(error, "retry-after") == str(int(retry_delay(error)))
    # At the renewal point (2/3 of 90 days) a renewal is due: it never counts.
    limited_cert.clock.advance(days=61)
    renewed = await cert.RenewCertificate(renew)
    assert renewed.certificate.status == cert_pb2.CERTIFICATE_STATUS_ACTIVE
    await cert.RenewCertificate(renew)


async def test_new_devices_per_operator_key(
    cert: cert_pb2_grpc.CertificateServiceAsyncStub,
) -> None:
    for device in ("fleet-1", "fleet-2"):
        await cert.ProvisionCertificate(
            cert_pb2.ProvisionCertificateRequest(device_id=device), metadata=OPERATOR
        )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await cert.ProvisionCertificate(
            cert_pb2.ProvisionCertificateRequest(device_id="fleet-3"), metadata=OPERATOR
        )
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(refused.value) == "NEW_DEVICES_PER_OPERATOR_KEY_EXCEEDED"
    assert retry_delay(refused.value) == 1800  # one device per half hour from now on
    # An existing device is still told so, not about the limit.
    with pytest.raises(grpc.aio.AioRpcError) as exists:
        await cert.ProvisionCertificate(
            cert_pb2.ProvisionCertificateRequest(device_id="fleet-1"), metadata=OPERATOR
        )
    assert exists.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # Internal callers are not limited per key.
    await cert.ProvisionCertificate(cert_pb2.ProvisionCertificateRequest(device_id="fleet-3"))


async def test_a_failed_provision_costs_nothing(
    cert: cert_pb2_grpc.CertificateServiceAsyncStub,
) -> None:
    await cert.ProvisionCertificate(
        cert_pb2.ProvisionCertificateRequest(device_id="owner", uuid_subdomain="taken")
    )
    for attempt in range(4):
        with pytest.raises(grpc.aio.AioRpcError) as taken:
            await cert.ProvisionCertificate(
                cert_pb2.ProvisionCertificateRequest(
                    device_id=f"x{attempt}", uuid_subdomain="taken"
                ),
                metadata=OPERATOR,
            )
        assert taken.value.code() == grpc.StatusCode.ALREADY_EXISTS
    await cert.ProvisionCertificate(
        cert_pb2.ProvisionCertificateRequest(device_id="fine"), metadata=OPERATOR
    )


async def test_new_api_keys_per_device(
    cert: cert_pb2_grpc.CertificateServiceAsyncStub, limited_keys: RunningKeyService
) -> None:
    await cert.ProvisionCertificate(cert_pb2.ProvisionCertificateRequest(device_id="keyed-device"))
    generate = key_pb2.GenerateApiKeyRequest(device_id="keyed-device", device_name="d")
    await limited_keys.stub.GenerateApiKey(generate)
    await limited_keys.stub.GenerateApiKey(generate)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await limited_keys.stub.GenerateApiKey(generate)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(refused.value) == "NEW_API_KEYS_PER_DEVICE_EXCEEDED"
    assert trailer(refused.value, "retry-after") == str(12 * 3600)
    listed = await limited_keys.stub.ListApiKeys(
        key_pb2.ListApiKeysRequest(device_id="keyed-device")
    )
    assert len(listed.keys) == 2


async def check_from(
    service: RunningKeyService, address: str, key: str
) -> external_auth_pb2.CheckResponse:
    context = attribute_context_pb2.AttributeContext
    source = context.Peer()
    source.address.socket_address.address = address
    request = external_auth_pb2.CheckRequest(
        attributes=context(
            source=source,
            request=context.Request(
                http=context.HttpRequest(
                    method="GET", path=GET_CERTIFICATE, headers={"x-api-key": key}
                )
            ),
        )
    )
    response: external_auth_pb2.CheckResponse = await service.authz.Check(request)
    return response


@pytest.mark.parametrize(
    ("first", "second"), [("192.0.2.7", "192.0.2.7"), ("2001:db8:1:2::1", "2001:db8:1:2:ffff::9")]
)
async def test_failed_verifications_per_address(
    limited_keys: RunningKeyService, first: str, second: str
) -> None:
    good, _ = await limited_keys.issue_device_key("device-1")
    wrong = "myl_definitely-not-a-key"
    for _ in range(3):
        reply = await check_from(limited_keys, first, wrong)
        assert reply.denied_response.status.code == 401
    refused = await check_from(limited_keys, second, wrong)
    assert refused.status.code == code_pb2.RESOURCE_EXHAUSTED
    assert refused.denied_response.status.code == 429
    headers = {h.header.key: h.header.value for h in refused.denied_response.headers}
    assert headers["retry-after"] == "1200"
    assert "FAILED_VERIFICATIONS_PER_ADDRESS_EXCEEDED" in refused.denied_response.body
    # Until it may try again, the address is refused even with a good key...
    blocked = await check_from(limited_keys, first, good)
    assert blocked.denied_response.status.code == 429
    # ...while other addresses are not affected.
    allowed = await check_from(limited_keys, "198.51.100.1", good)
    assert allowed.status.code == code_pb2.OK
    assert allowed.WhichOneof("http_response") == "ok_response"


async def test_a_provision_whose_outcome_is_unknown_is_counted(
    cert: cert_pb2_grpc.CertificateServiceAsyncStub,
    db_conn: psycopg.AsyncConnection[tuple[object, ...]],
    database: str,
) -> None:
    """The server processes of cert_service's connections stop (SIGSTOP) while it provisions:
    the answer is OUTCOME_UNKNOWN, and the provision counts against the operator key as if it
    were stored (a retry that found it stored would replay it without counting)."""
    cur = await db_conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = 'myl'",
        (database,),
    )
    backends = [int(str(pid)) for (pid,) in await cur.fetchall()]
    assert backends
    for pid in backends:
        os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await cert.ProvisionCertificate(
                cert_pb2.ProvisionCertificateRequest(device_id="fleet-unknown"),
                metadata=OPERATOR,
            )
    finally:
        for pid in backends:
            os.kill(pid, signal.SIGCONT)
    assert unknown.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_reason(unknown.value) == "OUTCOME_UNKNOWN"
    # The service may still take PostgreSQL to be away after the stop (DATABASE_UNAVAILABLE:
    # nothing written, nothing spent); a client retries that after the delay it is given.
    deadline = time.monotonic() + 10
    while True:
        try:
            await cert.ProvisionCertificate(
                cert_pb2.ProvisionCertificateRequest(device_id="fleet-known"), metadata=OPERATOR
            )
            break
        except grpc.aio.AioRpcError as exc:
            if error_reason(exc) != "DATABASE_UNAVAILABLE" or time.monotonic() > deadline:
                raise
            await asyncio.sleep(retry_delay(exc))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await cert.ProvisionCertificate(
            cert_pb2.ProvisionCertificateRequest(device_id="fleet-more"), metadata=OPERATOR
        )
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
