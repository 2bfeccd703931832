"""CRL shards against the real PostgreSQL: what a shard lists, when it is re-signed, and CRL
numbers across replicas. Signing is driven with `crl_publisher.run_once()` (no sleeping); the
CRLs are read back through GetCrl, as the gateway serves them."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import TypeAlias

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtensionOID

from cert_service.crl import CrlPublisher
from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from tests.fixtures import internal_tls
from tests.fixtures.cert import RunningCertService, StartCertService, make_csr, violated_fields

Stub: TypeAlias = "cert_pb2_grpc.CertificateServiceAsyncStub"
SHARDS = 4  # TEST_ENV's CRL_SHARDS


def publisher(service: RunningCertService) -> CrlPublisher:
    assert service.app.crl_publisher is not None
    return service.app.crl_publisher


async def provision(stub: Stub, device_id: str, csr_pem: str = "") -> x509.Certificate:
    reply = await stub.ProvisionCertificate(
        cert_pb2.ProvisionCertificateRequest(
            device_id=device_id, uuid_subdomain=device_id, csr_pem=csr_pem
        )
    )
    return leaf(reply.certificate)


def leaf(certificate: cert_pb2.Certificate) -> x509.Certificate:
    return x509.load_pem_x509_certificates(certificate.certificate_chain_pem.encode())[0]


def shard_of(certificate: x509.Certificate) -> int:
    points = certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    full_name = next(iter(points)).full_name
    assert full_name is not None
    url = str(full_name[0].value)
    return int(url.rsplit("/", 1)[1].removesuffix(".crl"))


async def fetch_crl(stub: Stub, shard: int) -> x509.CertificateRevocationList:
    body = await stub.GetCrl(cert_pb2.GetCrlRequest(file_name=f"{shard}.crl"))
    assert body.content_type == "application/pkix-crl"
    return x509.load_der_x509_crl(body.data)


def listed(crl: x509.CertificateRevocationList) -> dict[int, x509.ReasonFlags | None]:
    reasons: dict[int, x509.ReasonFlags | None] = {}
    for entry in crl:
        try:
            reasons[entry.serial_number] = entry.extensions.get_extension_for_class(
                x509.CRLReason
            ).value.reason
        except x509.ExtensionNotFound:
            reasons[entry.serial_number] = None
    return reasons


async def revoke(stub: Stub, device_id: str, reason: cert_pb2.RevocationReason.ValueType) -> None:
    await stub.RevokeCertificate(
        cert_pb2.RevokeCertificateRequest(device_id=device_id, reason=reason)
    )


async def test_every_shard_gets_an_rfc5280_crl(
    cert_stub: Stub, cert_service: RunningCertService
) -> None:
    assert await publisher(cert_service).run_once() == SHARDS
    assert await publisher(cert_service).run_once() == 0  # nothing due: nothing signed
    ca = cert_service.app.crl_publisher.ca  # type: ignore[union-attr]
    for shard in range(SHARDS):
        crl = await fetch_crl(cert_stub, shard)
        assert crl.is_signature_valid(ca.certificate.public_key())  # type: ignore[arg-type]
        assert crl.issuer == ca.certificate.subject
        assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1
        aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier == ca.key_id
        idp = crl.extensions.get_extension_for_oid(ExtensionOID.ISSUING_DISTRIBUTION_POINT)
        assert idp.critical
        assert idp.value.full_name == [  # type: ignore[attr-defined]
            x509.UniformResourceIdentifier(f"http://pki.myl.zip/pki/crls/{shard}.crl")
        ]
        assert crl.next_update_utc is not None
        assert crl.next_update_utc - crl.last_update_utc == timedelta(days=1)
        assert len(crl) == 0


async def test_revocations_are_listed_in_their_shard_with_reason_codes(
    cert_stub: Stub, cert_service: RunningCertService
) -> None:
    reasons = {
        "compromised": cert_pb2.REVOCATION_REASON_KEY_COMPROMISE,
        "superseded": cert_pb2.REVOCATION_REASON_SUPERSEDED,
        "unspecified": cert_pb2.REVOCATION_REASON_UNSPECIFIED,
    }
    leaves = {device: await provision(cert_stub, device) for device in [*reasons, "active"]}
    await publisher(cert_service).run_once()
    for device, reason in reasons.items():
        await revoke(cert_stub, device, reason)
    assert await publisher(cert_service).run_once() >= 1

    expected = {
        "compromised": x509.ReasonFlags.key_compromise,
        "superseded": x509.ReasonFlags.superseded,
        "unspecified": None,  # RFC 5280: no reasonCode extension for "unspecified"
    }
    for device, certificate in leaves.items():
        for shard in range(SHARDS):
            entries = listed(await fetch_crl(cert_stub, shard))
            if device in expected and shard == shard_of(certificate):
                assert entries[certificate.serial_number] == expected[device]
            else:
                assert certificate.serial_number not in entries
    numbers = {
        shard: (await fetch_crl(cert_stub, shard))
        .extensions.get_extension_for_class(x509.CRLNumber)
        .value.crl_number
        for shard in range(SHARDS)
    }
    touched = {shard_of(leaves[device]) for device in reasons}
    assert {shard for shard, number in numbers.items() if number == 2} == touched


async def test_renewing_or_deleting_never_takes_a_revoked_certificate_off_the_crl(
    cert_stub: Stub, cert_service: RunningCertService
) -> None:
    revoked = await provision(cert_stub, "renewed-after-revoke")
    await revoke(cert_stub, "renewed-after-revoke", cert_pb2.REVOCATION_REASON_KEY_COMPROMISE)
    await cert_stub.RenewCertificate(
        cert_pb2.RenewCertificateRequest(
            device_id="renewed-after-revoke", csr_pem=make_csr(["renewed-after-revoke.myl.zip"])
        )
    )
    # Deleting a device with an active certificate revokes it: its name is free again.
    deleted = await provision(cert_stub, "deleted-device")
    await cert_stub.DeleteDevice(cert_pb2.DeleteDeviceRequest(device_id="deleted-device"))
    await publisher(cert_service).run_once()

    assert listed(await fetch_crl(cert_stub, shard_of(revoked)))[revoked.serial_number] == (
        x509.ReasonFlags.key_compromise
    )
    assert listed(await fetch_crl(cert_stub, shard_of(deleted)))[deleted.serial_number] == (
        x509.ReasonFlags.cessation_of_operation
    )


async def test_entries_leave_after_expiry_and_crls_are_resigned_before_next_update(
    cert_stub: Stub, cert_service: RunningCertService
) -> None:
    await cert_stub.ProvisionCertificate(
        cert_pb2.ProvisionCertificateRequest(
            device_id="short", uuid_subdomain="short", validity_days=1
        )
    )
    short = leaf(
        (
            await cert_stub.GetCertificate(cert_pb2.GetCertificateRequest(device_id="short"))
        ).certificate
    )
    await revoke(cert_stub, "short", cert_pb2.REVOCATION_REASON_SUPERSEDED)
    await publisher(cert_service).run_once()
    first = await fetch_crl(cert_stub, shard_of(short))
    assert short.serial_number in listed(first)

    cert_service.clock.advance(hours=11)  # less than half of the CRL's day
    assert await publisher(cert_service).run_once() == 0
    cert_service.clock.advance(hours=2)  # past half: every shard is re-signed
    assert await publisher(cert_service).run_once() == SHARDS
    second = await fetch_crl(cert_stub, shard_of(short))
    assert second.last_update_utc > first.last_update_utc
    assert first.next_update_utc is not None
    assert second.last_update_utc < first.next_update_utc
    assert short.serial_number in listed(second)  # still valid for 11 more hours

    cert_service.clock.advance(hours=13)  # the certificate has expired
    assert await publisher(cert_service).run_once() == SHARDS
    assert short.serial_number not in listed(await fetch_crl(cert_stub, shard_of(short)))


async def test_replicas_never_publish_conflicting_crl_numbers(
    start_cert_service: StartCertService,
) -> None:
    replicas = [await start_cert_service() for _ in range(3)]
    async with internal_tls.channel(replicas[0].address) as channel:
        stub = cert_pb2_grpc.CertificateServiceStub(channel)
        seen: dict[int, set[int]] = {shard: set() for shard in range(SHARDS)}
        total_signed = 0
        for round_ in range(6):
            device = f"replicated-{round_}"
            await provision(stub, device)
            await revoke(stub, device, cert_pb2.REVOCATION_REASON_KEY_COMPROMISE)
            signed = await asyncio.gather(*(publisher(r).run_once() for r in replicas))
            assert sum(signed) >= 1
            total_signed += sum(signed)
            for shard in range(SHARDS):
                crl = await fetch_crl(stub, shard)
                number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
                seen[shard].add(number)
        # Each shard's numbers only grew by one per signature, with no number reused.
        for numbers in seen.values():
            assert sorted(numbers) == list(range(1, max(numbers) + 1))
        # Every signature any replica made became a CRL with a number of its own.
        assert total_signed == sum(max(numbers) for numbers in seen.values())


async def test_bad_crl_names_are_invalid_argument(cert_stub: Stub) -> None:
    for name in ["", "x.crl", "7", "-1.crl", "07.crl", "1234567.crl"]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await cert_stub.GetCrl(cert_pb2.GetCrlRequest(file_name=name))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violated_fields(caught.value) == ["file_name"]
