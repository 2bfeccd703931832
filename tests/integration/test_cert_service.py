"""cert_service end to end: real PostgreSQL, Redis and gRPC, the service in-process."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable
from datetime import timedelta
from typing import TypeAlias

import grpc
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from google.protobuf import timestamp_pb2

from cert_service.issuer import serial_hex
from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from tests.fixtures.cert import (
    RunningCertService,
    error_reason,
    make_csr,
    violated_fields,
)

Stub: TypeAlias = "cert_pb2_grpc.CertificateServiceAsyncStub"
Conn = psycopg.AsyncConnection[tuple[object, ...]]
ACTIVE = cert_pb2.CERTIFICATE_STATUS_ACTIVE
EXPIRED = cert_pb2.CERTIFICATE_STATUS_EXPIRED
REVOKED = cert_pb2.CERTIFICATE_STATUS_REVOKED
UUID_LABEL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


async def provision(
    stub: Stub, device_id: str, subdomain: str = "", **fields: object
) -> cert_pb2.ProvisionCertificateResponse:
    request = cert_pb2.ProvisionCertificateRequest(
        device_id=device_id,
        uuid_subdomain=subdomain,
        **fields,  # type: ignore[arg-type]
    )
    reply: cert_pb2.ProvisionCertificateResponse = await stub.ProvisionCertificate(request)
    return reply


def leaf(certificate: cert_pb2.Certificate) -> x509.Certificate:
    return x509.load_pem_x509_certificates(certificate.certificate_chain_pem.encode())[0]


async def test_seed_example_issues_a_wildcard_certificate_with_a_returned_key(
    cert_stub: Stub, cert_service: RunningCertService, db_conn: Conn
) -> None:
    reply = await provision(cert_stub, "device-001", "test-device.myl.zip")
    cert = reply.certificate
    assert cert.device_id == "device-001"
    assert cert.uuid_subdomain == "test-device.myl.zip"
    assert cert.certificate_type == cert_pb2.CERTIFICATE_TYPE_WILDCARD
    assert cert.status == ACTIVE
    assert list(cert.dns_names) == ["test-device.myl.zip", "*.test-device.myl.zip"]
    assert cert.auto_renewal is True

    issued = leaf(cert)
    san = issued.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == list(cert.dns_names)
    assert serial_hex(issued.serial_number) == cert.serial_number
    assert cert.not_after.ToDatetime() - cert.not_before.ToDatetime() == timedelta(days=90)

    # The generated key is returned once and matches the certificate...
    key = load_pem_private_key(reply.private_key_pem.encode(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert key.public_key() == issued.public_key()
    # ...and issued by the CA that GetCaChain hands out.
    chain = await cert_stub.GetCaChain(cert_pb2.GetCaChainRequest())
    ca = x509.load_pem_x509_certificate(chain.ca_chain_pem.encode())
    issued.verify_directly_issued_by(ca)

    # Nothing private is stored.
    cur = await db_conn.execute("SELECT certificate_data::text FROM device_certificates")
    row = await cur.fetchone()
    assert row is not None
    assert "PRIVATE" not in str(row[0])
    data_cur = await db_conn.execute(
        "SELECT certificate_data FROM device_certificates WHERE device_id = 'device-001'"
    )
    data_row = await data_cur.fetchone()
    assert data_row is not None
    data = data_row[0]
    assert isinstance(data, dict)
    assert {
        "chain_pem",
        "serial_number",
        "fingerprint_sha256",
        "public_key_sha256",
        "public_key_pem",
        "issuer",
        "not_before",
        "not_after",
        "csr_pem",
    } <= set(data)
    assert data["csr_pem"] is None


async def test_uuid_label_single_type_csr_and_validity(cert_stub: Stub) -> None:
    reply = await provision(
        cert_stub,
        "device-uuid",
        certificate_type=cert_pb2.CERTIFICATE_TYPE_SINGLE,
        validity_days=7,
        auto_renewal=False,
    )
    cert = reply.certificate
    label, _, zone = cert.uuid_subdomain.partition(".")
    assert zone == "myl.zip"
    assert UUID_LABEL.fullmatch(label)
    assert list(cert.dns_names) == [cert.uuid_subdomain]
    assert cert.auto_renewal is False
    assert cert.not_after.ToDatetime() - cert.not_before.ToDatetime() == timedelta(days=7)

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = make_csr(["csr-device.myl.zip", "*.csr-device.myl.zip"], key)
    with_csr = await provision(cert_stub, "device-csr", "CSR-Device", csr_pem=csr)
    assert with_csr.private_key_pem == ""
    assert with_csr.certificate.uuid_subdomain == "csr-device.myl.zip"
    assert leaf(with_csr.certificate).public_key() == key.public_key()


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"device_id": ""}, "device_id"),
        ({"device_id": "-leading-dash"}, "device_id"),
        ({"device_id": "x" * 129}, "device_id"),
        ({"uuid_subdomain": "two.labels.myl.zip"}, "uuid_subdomain"),
        ({"uuid_subdomain": "other.example.com"}, "uuid_subdomain"),
        ({"uuid_subdomain": "www"}, "uuid_subdomain"),
        ({"uuid_subdomain": "a" * 64}, "uuid_subdomain"),
        ({"uuid_subdomain": "bad_label"}, "uuid_subdomain"),
        ({"uuid_subdomain": "*.wild"}, "uuid_subdomain"),
        ({"certificate_type": 7}, "certificate_type"),
        ({"validity_days": 826}, "validity_days"),
        ({"validity_days": -1}, "validity_days"),
        ({"csr_pem": "not a csr"}, "csr_pem"),
        ({"csr_pem": "-----BEGIN CERTIFICATE REQUEST-----\x00"}, "csr_pem"),
    ],
)
async def test_provision_refuses_bad_fields_by_name(
    cert_stub: Stub, fields: dict[str, object], field: str
) -> None:
    request: dict[str, object] = {"device_id": "device-1", "uuid_subdomain": "ok-name", **fields}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cert_stub.ProvisionCertificate(
            cert_pb2.ProvisionCertificateRequest(**request)  # type: ignore[arg-type]
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(caught.value) == [field]


async def test_csr_names_and_keys_are_checked(cert_stub: Stub) -> None:
    cases = {
        "other name": make_csr(["someone-else.myl.zip"]),
        "wildcard for SINGLE": make_csr(["*.mine.myl.zip"]),
        "short RSA": make_csr([], rsa.generate_private_key(public_exponent=65537, key_size=1024)),
        "P-521": make_csr([], ec.generate_private_key(ec.SECP521R1())),
    }
    for case, csr in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await provision(
                cert_stub,
                "device-1",
                "mine",
                csr_pem=csr,
                certificate_type=cert_pb2.CERTIFICATE_TYPE_SINGLE,
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
        assert violated_fields(caught.value) == ["csr_pem"], case
    # A CSR without names, or with the device's own names, is fine.
    reply = await provision(cert_stub, "device-1", "mine", csr_pem=make_csr())
    assert reply.certificate.status == ACTIVE


async def test_existing_device_or_subdomain_is_already_exists(cert_stub: Stub) -> None:
    await provision(cert_stub, "device-1", "taken")
    with pytest.raises(grpc.aio.AioRpcError) as same_device:
        await provision(cert_stub, "device-1", "another")
    assert same_device.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(same_device.value) == "DEVICE_ALREADY_PROVISIONED"
    assert "device-1" in (same_device.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as same_name:
        await provision(cert_stub, "device-2", "TAKEN.myl.zip")
    assert same_name.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(same_name.value) == "SUBDOMAIN_TAKEN"
    assert "taken.myl.zip" in (same_name.value.details() or "")


@pytest.mark.parametrize("contended", ["device", "subdomain"])
async def test_concurrent_provisions_yield_exactly_one_certificate(
    cert_stub: Stub, db_conn: Conn, contended: str
) -> None:
    async def attempt(i: int) -> grpc.StatusCode:
        device_id = "racer" if contended == "device" else f"racer-{i}"
        subdomain = f"race-{i}" if contended == "device" else "race"
        try:
            await provision(cert_stub, device_id, subdomain)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    codes = await asyncio.gather(*(attempt(i) for i in range(20)))
    assert codes.count(grpc.StatusCode.OK) == 1
    assert codes.count(grpc.StatusCode.ALREADY_EXISTS) == 19
    cur = await db_conn.execute("SELECT count(*) FROM device_certificates")
    assert await cur.fetchone() == (1,)


async def test_get_and_lookup(cert_stub: Stub) -> None:
    provisioned = (await provision(cert_stub, "device-1", "Lookup-Me")).certificate
    got = await cert_stub.GetCertificate(cert_pb2.GetCertificateRequest(device_id="device-1"))
    assert got.certificate.serial_number == provisioned.serial_number
    for name in ("lookup-me", "LOOKUP-ME.myl.zip", "lookup-me.myl.zip.", "api.lookup-me.myl.zip"):
        found = await cert_stub.LookupCertificate(
            cert_pb2.LookupCertificateRequest(uuid_subdomain=name)
        )
        assert found.certificate.device_id == "device-1", name

    await provision(
        cert_stub, "device-2", "single-one", certificate_type=cert_pb2.CERTIFICATE_TYPE_SINGLE
    )
    for missing in ("nobody", "www.myl.zip", "api.single-one.myl.zip"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await cert_stub.LookupCertificate(
                cert_pb2.LookupCertificateRequest(uuid_subdomain=missing)
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND, missing
    for bad in ("", "a.b.c.myl.zip", "foo.example.com", "*.lookup-me.myl.zip"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await cert_stub.LookupCertificate(cert_pb2.LookupCertificateRequest(uuid_subdomain=bad))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert violated_fields(caught.value) == ["uuid_subdomain"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cert_stub.GetCertificate(cert_pb2.GetCertificateRequest(device_id="unknown"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(caught.value) == "CERTIFICATE_NOT_FOUND"


async def test_device_keys_act_only_on_their_own_device(cert_stub: Stub) -> None:
    await provision(cert_stub, "device-1", "first")
    await provision(cert_stub, "device-2", "second")
    device_key = (
        ("x-myl-key-id", "k1"),
        ("x-myl-device-id", "device-1"),
        ("x-myl-permissions", "ssl:read,ssl:write,device:write"),
        ("x-myl-operator", "false"),
    )
    operator_key = (("x-myl-key-id", "op"), ("x-myl-operator", "true"))
    own = await cert_stub.GetCertificate(
        cert_pb2.GetCertificateRequest(device_id="device-1"), metadata=device_key
    )
    assert own.certificate.device_id == "device-1"
    found = await cert_stub.LookupCertificate(
        cert_pb2.LookupCertificateRequest(uuid_subdomain="first"), metadata=device_key
    )
    assert found.certificate.device_id == "device-1"

    calls: list[Awaitable[object]] = [
        cert_stub.GetCertificate(
            cert_pb2.GetCertificateRequest(device_id="device-2"), metadata=device_key
        ),
        cert_stub.RenewCertificate(
            cert_pb2.RenewCertificateRequest(device_id="device-2"), metadata=device_key
        ),
        cert_stub.RevokeCertificate(
            cert_pb2.RevokeCertificateRequest(device_id="device-2"), metadata=device_key
        ),
        cert_stub.DeleteDevice(
            cert_pb2.DeleteDeviceRequest(device_id="device-2"), metadata=device_key
        ),
        cert_stub.ProvisionCertificate(
            cert_pb2.ProvisionCertificateRequest(device_id="device-3"), metadata=device_key
        ),
        cert_stub.ListCertificates(cert_pb2.ListCertificatesRequest(), metadata=device_key),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # Another device's name reads exactly like a name that does not exist.
    answers = []
    for name in ("second", "no-such-name"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await cert_stub.LookupCertificate(
                cert_pb2.LookupCertificateRequest(uuid_subdomain=name), metadata=device_key
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        answers.append(str(caught.value.details()).replace(name, "NAME"))
    assert answers[0] == answers[1]

    other = await cert_stub.GetCertificate(
        cert_pb2.GetCertificateRequest(device_id="device-2"), metadata=operator_key
    )
    assert other.certificate.device_id == "device-2"
    listed = await cert_stub.ListCertificates(
        cert_pb2.ListCertificatesRequest(), metadata=operator_key
    )
    assert len(listed.certificates) == 2


async def test_list_paginates_newest_first_with_filters(
    cert_stub: Stub, cert_service: RunningCertService
) -> None:
    for i in range(7):
        await provision(cert_stub, f"device-{i}", f"list-{i}", validity_days=10 + i)
    await cert_stub.RevokeCertificate(cert_pb2.RevokeCertificateRequest(device_id="device-3"))

    seen: list[str] = []
    token = ""
    while True:
        page = await cert_stub.ListCertificates(
            cert_pb2.ListCertificatesRequest(page_size=3, page_token=token)
        )
        assert len(page.certificates) <= 3
        seen += [c.device_id for c in page.certificates]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"device-{i}" for i in reversed(range(7))]

    revoked = await cert_stub.ListCertificates(cert_pb2.ListCertificatesRequest(status=REVOKED))
    assert [c.device_id for c in revoked.certificates] == ["device-3"]
    active = await cert_stub.ListCertificates(cert_pb2.ListCertificatesRequest(status=ACTIVE))
    assert len(active.certificates) == 6

    cutoff = timestamp_pb2.Timestamp()
    cutoff.FromDatetime(cert_service.clock.now() + timedelta(days=12, hours=1))
    soon = await cert_stub.ListCertificates(cert_pb2.ListCertificatesRequest(expire_before=cutoff))
    assert sorted(c.device_id for c in soon.certificates) == ["device-0", "device-1", "device-2"]

    # Nine days later, the 10-day certificate reads expired without the worker having run.
    cert_service.clock.advance(days=10, minutes=1)
    expired = await cert_stub.ListCertificates(cert_pb2.ListCertificatesRequest(status=EXPIRED))
    assert [c.device_id for c in expired.certificates] == ["device-0"]
    assert all(c.status == EXPIRED for c in expired.certificates)

    first = await cert_stub.ListCertificates(cert_pb2.ListCertificatesRequest(page_size=2))
    bad_requests: list[tuple[cert_pb2.ListCertificatesRequest, str]] = [
        (cert_pb2.ListCertificatesRequest(page_size=-1), "page_size"),
        (cert_pb2.ListCertificatesRequest(page_token="garbage!"), "page_token"),
        (
            cert_pb2.ListCertificatesRequest(page_token=first.next_page_token, status=ACTIVE),
            "page_token",
        ),
        (cert_pb2.ListCertificatesRequest(status=9), "status"),  # type: ignore[arg-type]
        (
            cert_pb2.ListCertificatesRequest(expire_before=timestamp_pb2.Timestamp(seconds=10**13)),
            "expire_before",
        ),
    ]
    for request, field in bad_requests:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await cert_stub.ListCertificates(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert violated_fields(caught.value) == [field]
    big = await cert_stub.ListCertificates(cert_pb2.ListCertificatesRequest(page_size=5000))
    assert len(big.certificates) == 7


async def test_renew_keeps_the_key_or_takes_a_new_csr(
    cert_stub: Stub, cert_service: RunningCertService
) -> None:
    first = (await provision(cert_stub, "device-1", "renew-me", validity_days=30)).certificate
    cert_service.clock.advance(days=1)
    renewed = (
        await cert_stub.RenewCertificate(cert_pb2.RenewCertificateRequest(device_id="device-1"))
    ).certificate
    assert renewed.serial_number != first.serial_number
    assert renewed.public_key_sha256 == first.public_key_sha256
    assert renewed.renewal_count == 1
    assert renewed.not_before.seconds > first.not_before.seconds
    # The provisioned validity is kept.
    assert renewed.not_after.seconds - renewed.not_before.seconds == 30 * 86400

    key = ec.generate_private_key(ec.SECP384R1())
    with_csr = (
        await cert_stub.RenewCertificate(
            cert_pb2.RenewCertificateRequest(
                device_id="device-1", csr_pem=make_csr(["renew-me.myl.zip"], key)
            )
        )
    ).certificate
    assert leaf(with_csr).public_key() == key.public_key()
    assert with_csr.renewal_count == 2

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cert_stub.RenewCertificate(
            cert_pb2.RenewCertificateRequest(
                device_id="device-1", csr_pem=make_csr(["not-mine.myl.zip"])
            )
        )
    assert violated_fields(caught.value) == ["csr_pem"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cert_stub.RenewCertificate(cert_pb2.RenewCertificateRequest(device_id="nobody"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    # An expired certificate is renewed with its key.
    cert_service.clock.advance(days=31)
    got = await cert_stub.GetCertificate(cert_pb2.GetCertificateRequest(device_id="device-1"))
    assert got.certificate.status == EXPIRED
    again = await cert_stub.RenewCertificate(cert_pb2.RenewCertificateRequest(device_id="device-1"))
    assert again.certificate.status == ACTIVE


async def test_revoked_stays_revoked_until_renewed_with_a_new_key(cert_stub: Stub) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    await provision(cert_stub, "device-1", "revoke-me", csr_pem=make_csr([], key))
    await cert_stub.GetCertificate(cert_pb2.GetCertificateRequest(device_id="device-1"))
    revoked = await cert_stub.RevokeCertificate(
        cert_pb2.RevokeCertificateRequest(
            device_id="device-1", reason=cert_pb2.REVOCATION_REASON_KEY_COMPROMISE
        )
    )
    assert revoked.certificate.status == REVOKED
    assert revoked.certificate.revocation_reason == cert_pb2.REVOCATION_REASON_KEY_COMPROMISE
    assert revoked.certificate.HasField("revoke_time")

    # Every read says REVOKED from now on (the cached ACTIVE copy is gone).
    got = await cert_stub.GetCertificate(cert_pb2.GetCertificateRequest(device_id="device-1"))
    assert got.certificate.status == REVOKED
    found = await cert_stub.LookupCertificate(
        cert_pb2.LookupCertificateRequest(uuid_subdomain="revoke-me")
    )
    assert found.certificate.status == REVOKED
    # Revoking again changes nothing.
    again = await cert_stub.RevokeCertificate(
        cert_pb2.RevokeCertificateRequest(
            device_id="device-1", reason=cert_pb2.REVOCATION_REASON_SUPERSEDED
        )
    )
    assert again.certificate.revocation_reason == cert_pb2.REVOCATION_REASON_KEY_COMPROMISE

    # Provisioning again is refused; renewing needs a new key.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await provision(cert_stub, "device-1", "revoke-me-2")
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    for request in (
        cert_pb2.RenewCertificateRequest(device_id="device-1"),
        cert_pb2.RenewCertificateRequest(device_id="device-1", csr_pem=make_csr([], key)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await cert_stub.RenewCertificate(request)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    renewed = await cert_stub.RenewCertificate(
        cert_pb2.RenewCertificateRequest(device_id="device-1", csr_pem=make_csr())
    )
    assert renewed.certificate.status == ACTIVE
    assert not renewed.certificate.HasField("revoke_time")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cert_stub.RevokeCertificate(
            cert_pb2.RevokeCertificateRequest(device_id="device-1", reason=42)  # type: ignore[arg-type]
        )
    assert violated_fields(caught.value) == ["reason"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cert_stub.RevokeCertificate(cert_pb2.RevokeCertificateRequest(device_id="nobody"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_delete_frees_the_device_and_its_subdomain(cert_stub: Stub, db_conn: Conn) -> None:
    await provision(cert_stub, "device-1", "short-lived")
    await cert_stub.GetCertificate(cert_pb2.GetCertificateRequest(device_id="device-1"))
    await cert_stub.DeleteDevice(cert_pb2.DeleteDeviceRequest(device_id="device-1"))
    for call in (
        cert_stub.GetCertificate(cert_pb2.GetCertificateRequest(device_id="device-1")),
        cert_stub.LookupCertificate(
            cert_pb2.LookupCertificateRequest(uuid_subdomain="short-lived")
        ),
        cert_stub.DeleteDevice(cert_pb2.DeleteDeviceRequest(device_id="device-1")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    cur = await db_conn.execute("SELECT count(*) FROM device_certificates")
    assert await cur.fetchone() == (0,)
    # The subdomain is free for another device at once.
    reply = await provision(cert_stub, "device-2", "short-lived")
    assert reply.certificate.uuid_subdomain == "short-lived.myl.zip"


async def test_refused_lookup_does_not_count_as_an_access(
    cert_service: RunningCertService, cert_stub: Stub, db_conn: Conn
) -> None:
    await provision(cert_stub, "device-1", "first")
    await provision(cert_stub, "device-2", "second")
    device_key = (("x-myl-key-id", "k1"), ("x-myl-device-id", "device-1"))
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await cert_stub.LookupCertificate(
                cert_pb2.LookupCertificateRequest(uuid_subdomain="second"), metadata=device_key
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    await cert_stub.LookupCertificate(
        cert_pb2.LookupCertificateRequest(uuid_subdomain="first"), metadata=device_key
    )
    await cert_service.app.access.flush()
    cur = await db_conn.execute(
        "SELECT device_id, access_count FROM device_certificates ORDER BY device_id"
    )
    assert await cur.fetchall() == [("device-1", 1), ("device-2", 0)]
