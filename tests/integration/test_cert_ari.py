"""Renewal information (RFC 9773) over gRPC, and the lifecycle worker renewing by the same
window: a device that asks and the worker never disagree. Time moves with the fake clock."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import TypeAlias

import grpc
import pytest
from cryptography import x509

from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from tests.fixtures import internal_tls
from tests.fixtures.cert import (
    RunningCertService,
    StartCertService,
    make_csr,
    violated_fields,
)
from tests.fixtures.clock import FakeClock

Stub: TypeAlias = "cert_pb2_grpc.CertificateServiceAsyncStub"


async def renewal_info(stub: Stub, device_id: str) -> cert_pb2.GetRenewalInfoResponse:
    return await stub.GetRenewalInfo(cert_pb2.GetRenewalInfoRequest(device_id=device_id))


def window(info: cert_pb2.GetRenewalInfoResponse) -> tuple[datetime, datetime]:
    return (
        info.suggested_window.start.ToDatetime(UTC),
        info.suggested_window.end.ToDatetime(UTC),
    )


async def test_window_is_two_thirds_into_the_lifetime_and_the_worker_agrees(
    start_cert_service: StartCertService,
) -> None:
    clock = FakeClock(datetime.now(UTC), frozen=True)
    service = await start_cert_service(clock)
    async with internal_tls.channel(service.address) as channel:
        stub = cert_pb2_grpc.CertificateServiceStub(channel)
        provisioned = await stub.ProvisionCertificate(
            cert_pb2.ProvisionCertificateRequest(device_id="ari", validity_days=30)
        )
        certificate = provisioned.certificate
        info = await renewal_info(stub, "ari")
        start, end = window(info)
        not_before = certificate.not_before.ToDatetime(UTC)
        not_after = certificate.not_after.ToDatetime(UTC)
        # RENEW_AT_FRACTION 0.6667 of 30 days is 20 days and 86.4 s; whole seconds, rounded up.
        assert start == not_before + timedelta(days=20, seconds=87)
        # Closes halfway between that point and expiry: five sixths into the lifetime.
        assert abs(end - (not_before + (not_after - not_before) * (0.6667 + 0.3333 / 2))) <= (
            timedelta(seconds=1)
        )
        assert info.explanation_url == ""
        assert info.serial_number == certificate.serial_number

        # RFC 9773 certificate identifier: AKI keyIdentifier "." serial.
        leaf = x509.load_pem_x509_certificates(certificate.certificate_chain_pem.encode())[0]
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        key_id, serial = info.cert_id.split(".")
        assert base64.urlsafe_b64decode(key_id + "=" * (-len(key_id) % 4)) == aki.key_identifier
        assert int.from_bytes(base64.urlsafe_b64decode(serial + "=" * (-len(serial) % 4))) == (
            leaf.serial_number
        )

        worker = service.app.lifecycle
        clock.set(start - timedelta(milliseconds=1))
        assert (await worker.run_once()).renewed == 0  # the window has not opened
        clock.set(start)
        assert (await worker.run_once()).renewed == 1  # it has: renewed at once
        renewed = (
            await stub.GetCertificate(cert_pb2.GetCertificateRequest(device_id="ari"))
        ).certificate
        assert renewed.serial_number != certificate.serial_number
        next_start, _ = window(await renewal_info(stub, "ari"))
        assert next_start > start + timedelta(days=19)


async def test_revoked_certificate_is_due_now_with_an_explanation(
    cert_stub: Stub, cert_service: RunningCertService
) -> None:
    await cert_stub.ProvisionCertificate(
        cert_pb2.ProvisionCertificateRequest(device_id="gone", uuid_subdomain="gone")
    )
    await cert_stub.RevokeCertificate(
        cert_pb2.RevokeCertificateRequest(
            device_id="gone", reason=cert_pb2.REVOCATION_REASON_KEY_COMPROMISE
        )
    )
    info = await renewal_info(cert_stub, "gone")
    start, end = window(info)
    now = cert_service.clock.now()
    assert start < end < now  # a window in the past: renew immediately
    assert info.explanation_url == "http://pki.myl.zip/pki/renewal"
    # Renewing with a new key ends the urgency.
    await cert_stub.RenewCertificate(
        cert_pb2.RenewCertificateRequest(device_id="gone", csr_pem=make_csr(["gone.myl.zip"]))
    )
    start, _ = window(await renewal_info(cert_stub, "gone"))
    assert start > now + timedelta(days=50)


async def test_mass_reissue_makes_older_certificates_due_for_devices_and_worker(
    start_cert_service: StartCertService,
) -> None:
    # A minute ago: the cut-off below must not lie in the (real) future.
    clock = FakeClock(datetime.now(UTC) - timedelta(minutes=1), frozen=True)
    first = await start_cert_service(clock)
    async with internal_tls.channel(first.address) as channel:
        stub = cert_pb2_grpc.CertificateServiceStub(channel)
        await stub.ProvisionCertificate(cert_pb2.ProvisionCertificateRequest(device_id="old"))
    await first.stop()

    # The operator announces a re-issue of everything issued before now.
    cutoff = (clock.now() + timedelta(seconds=1)).replace(microsecond=0)
    clock.set(cutoff + timedelta(seconds=1))
    second = await start_cert_service(clock, REISSUE_ISSUED_BEFORE=cutoff.isoformat())
    async with internal_tls.channel(second.address) as channel:
        stub = cert_pb2_grpc.CertificateServiceStub(channel)
        await stub.ProvisionCertificate(cert_pb2.ProvisionCertificateRequest(device_id="new"))
        old = await renewal_info(stub, "old")
        assert old.explanation_url != ""
        assert window(old)[1] < clock.now()
        assert (await renewal_info(stub, "new")).explanation_url == ""

        assert (await second.app.lifecycle.run_once()).renewed == 1  # "old" only
        assert (await renewal_info(stub, "old")).explanation_url == ""
        assert (await second.app.lifecycle.run_once()).renewed == 0


async def test_renewal_info_errors(cert_stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await renewal_info(cert_stub, "")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(caught.value) == ["device_id"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await renewal_info(cert_stub, "nobody")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
