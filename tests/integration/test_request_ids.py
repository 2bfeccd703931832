"""AIP-155 request ids: a retry gets the first attempt's outcome, never a conflict."""

from __future__ import annotations

import uuid

import grpc
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from google.protobuf import duration_pb2

from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from myl.key.v1 import key_pb2
from tests.fixtures.cert import RunningCertService, make_csr, violated_fields
from tests.fixtures.key import RunningKeyService

P = cert_pb2.ProvisionCertificateRequest
VALID = key_pb2.VERIFY_RESULT_VALID
REVOKED = key_pb2.VERIFY_RESULT_REVOKED


def leaf(certificate: cert_pb2.Certificate) -> x509.Certificate:
    return x509.load_pem_x509_certificates(certificate.certificate_chain_pem.encode())[0]


async def test_a_provision_retried_after_success_gets_a_working_certificate(
    cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub,
) -> None:
    request = P(device_id="retried-device", request_id=str(uuid.uuid4()))
    first = await cert_stub.ProvisionCertificate(request)
    # The caller never saw `first` (its deadline passed): it retries with the same id.
    second = await cert_stub.ProvisionCertificate(request)
    assert second.certificate.uuid_subdomain == first.certificate.uuid_subdomain
    assert second.certificate.serial_number != first.certificate.serial_number
    key = load_pem_private_key(second.private_key_pem.encode(), password=None)
    assert key.public_key() == leaf(second.certificate).public_key()
    stored = await cert_stub.GetCertificate(
        cert_pb2.GetCertificateRequest(device_id="retried-device")
    )
    assert stored.certificate.serial_number == second.certificate.serial_number

    # Without a request id, or with another one, the device is taken: ALREADY_EXISTS.
    for other in ("", str(uuid.uuid4())):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await cert_stub.ProvisionCertificate(P(device_id="retried-device", request_id=other))
        assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_a_provision_with_a_csr_retried_returns_the_same_certificate(
    cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub,
) -> None:
    request = P(
        device_id="csr-device",
        uuid_subdomain="csr-device.myl.zip",
        csr_pem=make_csr(["csr-device.myl.zip", "*.csr-device.myl.zip"]),
        request_id=str(uuid.uuid4()),
    )
    first = await cert_stub.ProvisionCertificate(request)
    second = await cert_stub.ProvisionCertificate(request)
    assert second.certificate.serial_number == first.certificate.serial_number
    assert second.private_key_pem == ""


async def test_a_request_id_reused_for_another_request_or_malformed_is_refused(
    cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub,
) -> None:
    request_id = str(uuid.uuid4())
    await cert_stub.ProvisionCertificate(P(device_id="one-device", request_id=request_id))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cert_stub.ProvisionCertificate(
            P(device_id="one-device", validity_days=30, request_id=request_id)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(caught.value) == ["request_id"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cert_stub.ProvisionCertificate(P(device_id="two-device", request_id="not-a-uuid"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(caught.value) == ["request_id"]


async def test_renew_and_delete_retried_return_the_first_outcome(
    cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub,
) -> None:
    await cert_stub.ProvisionCertificate(P(device_id="lifecycle-device"))
    renew = cert_pb2.RenewCertificateRequest(
        device_id="lifecycle-device", request_id=str(uuid.uuid4())
    )
    first = await cert_stub.RenewCertificate(renew)
    second = await cert_stub.RenewCertificate(renew)
    assert second.certificate.serial_number == first.certificate.serial_number
    assert second.certificate.renewal_count == 1

    delete = cert_pb2.DeleteDeviceRequest(
        device_id="lifecycle-device", request_id=str(uuid.uuid4())
    )
    await cert_stub.DeleteDevice(delete)
    await cert_stub.DeleteDevice(delete)  # a retry: OK, not NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cert_stub.DeleteDevice(cert_pb2.DeleteDeviceRequest(device_id="lifecycle-device"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_generate_and_rotate_retried_leave_exactly_one_working_key(
    cert_service: RunningCertService,
    cert_stub: cert_pb2_grpc.CertificateServiceAsyncStub,
    key_service: RunningKeyService,
) -> None:
    await cert_stub.ProvisionCertificate(P(device_id="keyed-device"))

    async def verify(plaintext: str) -> int:
        reply = await key_service.stub.VerifyApiKey(key_pb2.VerifyApiKeyRequest(api_key=plaintext))
        return reply.result

    generate = key_pb2.GenerateApiKeyRequest(
        device_id="keyed-device", device_name="retried", request_id=str(uuid.uuid4())
    )
    first = await key_service.stub.GenerateApiKey(generate)
    second = await key_service.stub.GenerateApiKey(generate)
    assert second.key.key_id != first.key.key_id
    assert [await verify(first.api_key), await verify(second.api_key)] == [REVOKED, VALID]

    rotate = key_pb2.RotateApiKeyRequest(
        key_id=second.key.key_id,
        grace_period=duration_pb2.Duration(seconds=3600),
        request_id=str(uuid.uuid4()),
    )
    rotated = await key_service.stub.RotateApiKey(rotate)
    again = await key_service.stub.RotateApiKey(rotate)
    assert again.key.rotated_from_key_id == second.key.key_id
    assert again.previous_key.key_id == second.key.key_id
    assert [await verify(rotated.api_key), await verify(again.api_key)] == [REVOKED, VALID]
    assert await verify(second.api_key) == VALID  # still in its grace period

    keys = await key_service.stub.ListApiKeys(
        key_pb2.ListApiKeysRequest(device_id="keyed-device", show_inactive=True)
    )
    active = [k.key_id for k in keys.keys if k.status == key_pb2.API_KEY_STATUS_ACTIVE]
    assert sorted(active) == sorted([second.key.key_id, again.key.key_id])


async def test_forgetting_old_request_ids_does_not_read_the_whole_table(
    cert_service: RunningCertService, db_conn: psycopg.AsyncConnection[tuple[object, ...]]
) -> None:
    # The lifecycle worker runs this every minute; at ten million devices a sequential scan
    # of device_certificates is gigabytes. The partial index must be usable for it.
    await db_conn.execute("SET enable_seqscan = off")
    cur = await db_conn.execute(
        "EXPLAIN UPDATE device_certificates SET request_id = NULL, request_hash = NULL "
        "WHERE request_id IS NOT NULL AND created_at < now()"
    )
    plan = "\n".join(str(row[0]) for row in await cur.fetchall())
    assert "idx_device_certificates_request_created" in plan, plan
