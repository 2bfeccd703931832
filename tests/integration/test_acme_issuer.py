"""CERT_ISSUER=acme against the real Pebble (Let's Encrypt's test CA) validating DNS-01 through
the real Knot DNS, which takes our RFC 2136 updates signed with TSIG.

Each test starts its own Knot and Pebble (a second or so), so failure injection and restarts
stay within the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeAlias

import dns.message
import dns.query
import dns.rdatatype
import grpc
import httpx
import pytest
import requests.adapters
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import REGISTRY

from cert_service.acme_worker import AcmeWorker
from cert_service.ari import ari_cert_id
from cert_service.storage import to_pb_timestamp
from deploy.devstack.acme import KnotServer, PebbleServer, TsigKey, generate_account_key
from deploy.devstack.servers import free_port
from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from shared.tls import GATEWAY
from tests.fixtures import internal_tls
from tests.fixtures.cert import RunningCertService, StartCertService, error_reason, make_csr

Stub: TypeAlias = "cert_pb2_grpc.CertificateServiceAsyncStub"
PENDING = cert_pb2.CERTIFICATE_STATUS_PENDING
ACTIVE = cert_pb2.CERTIFICATE_STATUS_ACTIVE
ZONE = "myl.zip"


@dataclass
class AcmeServers:
    directory: Path
    knot: KnotServer
    pebble: PebbleServer
    account_key: Path

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "CERT_ISSUER": "acme",
            "ACME_ACCOUNT_KEY_FILE": str(self.account_key),
            "ACME_RETRY_MIN": "0.2",
            "ACME_RETRY_MAX": "1",
            "ACME_POLL_INTERVAL": "0.1",
            "DNS_TIMEOUT": "2",
            "DNS_PROPAGATION_TIMEOUT": "5",
            **self.knot.env(),
            **self.pebble.env(),
            **extra,
        }

    def restart_pebble(self, **pebble_env: str) -> None:
        """Pebble again on the same ports and TLS CA, validating through Knot, with
        `pebble_env` as its only extra settings: it has forgotten every account and order."""
        self.pebble.stop()
        self.pebble.dns_port = self.knot.port
        self.pebble.extra_env = dict(pebble_env)
        self.pebble.start()


StartServers = Callable[..., AcmeServers]


@pytest.fixture
def acme_servers(tmp_path: Path) -> Iterator[StartServers]:
    started: list[AcmeServers] = []

    def start(*, dns_port: int | None = None, **pebble_env: str) -> AcmeServers:
        knot = KnotServer(tmp_path / "knot", free_port(), zone=ZONE, tsig=TsigKey.generate())
        knot.start()
        pebble = PebbleServer(
            tmp_path / "pebble",
            free_port(),
            free_port(),
            dns_port if dns_port is not None else knot.port,
            eab={"myl-test": "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"},
            extra_env=pebble_env or None,
        )
        servers = AcmeServers(tmp_path, knot, pebble, tmp_path / "account.key")
        started.append(servers)
        pebble.start()
        generate_account_key(servers.account_key)
        return servers

    try:
        yield start
    finally:
        for servers in started:
            servers.pebble.stop()
            servers.knot.stop()


@pytest.fixture
async def acme_stub(
    acme_servers: StartServers, start_cert_service: StartCertService
) -> AsyncIterator[tuple[AcmeServers, RunningCertService, Stub]]:
    servers = acme_servers()
    service = await start_cert_service(**servers.env())
    async with internal_tls.channel(service.address) as channel:
        yield servers, service, cert_pb2_grpc.CertificateServiceStub(channel)


async def provision(
    stub: Stub, device_id: str, **fields: Any
) -> cert_pb2.ProvisionCertificateResponse:
    reply: cert_pb2.ProvisionCertificateResponse = await stub.ProvisionCertificate(
        cert_pb2.ProvisionCertificateRequest(device_id=device_id, **fields), timeout=10
    )
    return reply


async def wait_for(
    stub: Stub,
    device_id: str,
    done: Callable[[cert_pb2.Certificate], bool],
    limit: float = 60,
) -> cert_pb2.Certificate:
    deadline = time.monotonic() + limit
    while True:
        reply = await stub.GetCertificate(
            cert_pb2.GetCertificateRequest(device_id=device_id), timeout=5
        )
        if done(reply.certificate):
            return reply.certificate
        if time.monotonic() > deadline:
            raise AssertionError(f"{device_id} still {reply.certificate} after {limit}s")
        await asyncio.sleep(0.05)


def is_active(certificate: cert_pb2.Certificate) -> bool:
    return certificate.status == ACTIVE and not certificate.HasField("pending_issuance")


def txt_values(knot: KnotServer, name: str) -> set[str]:
    query = dns.message.make_query(name, dns.rdatatype.TXT)
    with contextlib.suppress(Exception):
        response = dns.query.udp(query, "127.0.0.1", port=knot.port, timeout=0.5)
        return {b"".join(rdata.strings).decode() for rrset in response.answer for rdata in rrset}
    return set()


def openssl_verify(
    root_pem: str, chain_pem: str, directory: Path
) -> subprocess.CompletedProcess[str]:
    certificates = x509.load_pem_x509_certificates(chain_pem.encode())
    leaf, intermediates = certificates[0], certificates[1:]
    (directory / "root.pem").write_text(root_pem)
    (directory / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (directory / "chain.pem").write_bytes(
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in intermediates)
    )
    return subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(directory / "root.pem"),
            "-untrusted",
            str(directory / "chain.pem"),
            str(directory / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


def orders_placed() -> float:
    """Orders placed at the CA by every worker in this process."""
    return REGISTRY.get_sample_value("myl_acme_orders_placed_total") or 0.0


# -- the flow ---------------------------------------------------------------------------------


async def test_provision_is_pending_then_active_with_a_chain_pebbles_root_verifies(
    acme_servers: StartServers, start_cert_service: StartCertService, tmp_path: Path
) -> None:
    # Slow authorizations: Pebble's VA waits up to 2 s before each validation, so the
    # challenge records can be watched while they are needed.
    servers = acme_servers(PEBBLE_VA_NOSLEEP="0", PEBBLE_VA_SLEEPTIME="2")
    service = await start_cert_service(**servers.env())
    async with internal_tls.channel(service.address) as channel:
        stub = cert_pb2_grpc.CertificateServiceStub(channel)
        reply = await provision(stub, "acme-device-1", uuid_subdomain="acme-one")
        assert reply.certificate.status == PENDING
        assert reply.certificate.certificate_chain_pem == ""
        assert reply.certificate.HasField("pending_issuance")
        assert reply.private_key_pem.startswith("-----BEGIN PRIVATE KEY-----")
        fqdn = "acme-one.myl.zip"
        looked_up = await stub.LookupCertificate(
            cert_pb2.LookupCertificateRequest(uuid_subdomain=fqdn)
        )
        assert looked_up.certificate.status == PENDING
        challenge = f"_acme-challenge.{fqdn}"

        seen: set[str] = set()
        deadline = time.monotonic() + 60
        while True:
            seen |= txt_values(servers.knot, challenge)
            current = (
                await stub.GetCertificate(cert_pb2.GetCertificateRequest(device_id="acme-device-1"))
            ).certificate
            if is_active(current):
                break
            assert current.status == PENDING, current
            assert time.monotonic() < deadline, current
            await asyncio.sleep(0.02)

        # Both names of the WILDCARD certificate were validated: two values, served while
        # the CA looked, and gone afterwards.
        assert len(seen) == 2
        assert txt_values(servers.knot, challenge) == set()

        assert sorted(current.dns_names) == sorted([fqdn, f"*.{fqdn}"])
        assert current.serial_number
        assert current.fingerprint_sha256
        assert current.not_after.seconds > current.not_before.seconds
        verified = openssl_verify(
            servers.pebble.root_pem(), current.certificate_chain_pem, tmp_path
        )
        assert verified.returncode == 0, verified.stdout + verified.stderr

        # The certificate is for the key the provision handed out, and Lookup agrees.
        leaf = x509.load_pem_x509_certificates(current.certificate_chain_pem.encode())[0]
        key = serialization.load_pem_private_key(reply.private_key_pem.encode(), None)
        assert leaf.public_key() == key.public_key()
        looked_up = await stub.LookupCertificate(
            cert_pb2.LookupCertificateRequest(uuid_subdomain=fqdn)
        )
        assert looked_up.certificate.serial_number == current.serial_number
        assert looked_up.certificate.status == ACTIVE


async def test_device_csr_must_name_exactly_the_certificates_names(
    acme_stub: tuple[AcmeServers, RunningCertService, Stub],
) -> None:
    _, _, stub = acme_stub
    # The CA's chain comes with each certificate; there is no chain of ours to hand out.
    with pytest.raises(grpc.aio.AioRpcError) as no_chain:
        await stub.GetCaChain(cert_pb2.GetCaChainRequest())
    assert no_chain.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(no_chain.value) == "CA_CHAIN_WITH_CERTIFICATE"
    key = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await provision(
            stub,
            "acme-csr-1",
            uuid_subdomain="acme-csr",
            certificate_type=cert_pb2.CERTIFICATE_TYPE_WILDCARD,
            csr_pem=make_csr(["acme-csr.myl.zip"], key),
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "csr_pem" in (refused.value.details() or "")

    reply = await provision(
        stub,
        "acme-csr-1",
        uuid_subdomain="acme-csr",
        certificate_type=cert_pb2.CERTIFICATE_TYPE_SINGLE,
        csr_pem=make_csr(["acme-csr.myl.zip"], key),
    )
    assert reply.private_key_pem == ""
    assert reply.certificate.status == PENDING
    active = await wait_for(stub, "acme-csr-1", is_active)
    leaf = x509.load_pem_x509_certificates(active.certificate_chain_pem.encode())[0]
    assert leaf.public_key() == key.public_key()
    assert list(active.dns_names) == ["acme-csr.myl.zip"]


async def test_renewal_keeps_the_certificate_usable_until_the_new_one_replaces_it(
    acme_stub: tuple[AcmeServers, RunningCertService, Stub],
) -> None:
    _, service, stub = acme_stub
    await provision(stub, "acme-renew-1", uuid_subdomain="acme-renew")
    with pytest.raises(grpc.aio.AioRpcError) as pending:
        await stub.GetRenewalInfo(cert_pb2.GetRenewalInfoRequest(device_id="acme-renew-1"))
    assert pending.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(pending.value) == "CERTIFICATE_PENDING"
    first = await wait_for(stub, "acme-renew-1", is_active)
    info = await stub.GetRenewalInfo(cert_pb2.GetRenewalInfoRequest(device_id="acme-renew-1"))
    leaf = x509.load_pem_x509_certificates(first.certificate_chain_pem.encode())[0]
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert info.cert_id == ari_cert_id(aki.key_identifier or b"", first.serial_number)
    assert first.not_before.seconds < info.suggested_window.start.seconds < first.not_after.seconds

    renewed = await stub.RenewCertificate(
        cert_pb2.RenewCertificateRequest(device_id="acme-renew-1"), timeout=10
    )
    # At once: the current certificate, still ACTIVE, with the order in progress.
    assert renewed.certificate.status == ACTIVE
    assert renewed.certificate.serial_number == first.serial_number
    assert renewed.certificate.HasField("pending_issuance")

    second = await wait_for(
        stub, "acme-renew-1", lambda c: is_active(c) and c.serial_number != first.serial_number
    )
    assert second.renewal_count == 1
    # The stored CSR was submitted again: same key.
    assert second.public_key_sha256 == first.public_key_sha256

    # The lifecycle renews the same way once the renewal window opens.
    lifetime = second.not_after.seconds - second.not_before.seconds
    due = second.not_before.seconds + lifetime * 0.7
    service.clock.advance(seconds=due - service.clock.now().timestamp())
    await service.app.lifecycle.run_once()
    third = await wait_for(
        stub,
        "acme-renew-1",
        lambda c: (
            is_active(c) and c.serial_number not in (first.serial_number, second.serial_number)
        ),
    )
    assert third.renewal_count == 2


async def test_revocation_cancels_the_pending_renewal_of_the_revoked_key(
    acme_servers: StartServers, start_cert_service: StartCertService
) -> None:
    servers = acme_servers()
    service = await start_cert_service(**servers.env())
    async with internal_tls.channel(service.address) as channel:
        stub = cert_pb2_grpc.CertificateServiceStub(channel)
        await provision(stub, "acme-revoke-1", uuid_subdomain="acme-revoke")
        first = await wait_for(stub, "acme-revoke-1", is_active)
        servers.knot.stop()  # the renewal cannot complete now
        await stub.RenewCertificate(cert_pb2.RenewCertificateRequest(device_id="acme-revoke-1"))
        revoked = await stub.RevokeCertificate(
            cert_pb2.RevokeCertificateRequest(
                device_id="acme-revoke-1", reason=cert_pb2.REVOCATION_REASON_KEY_COMPROMISE
            )
        )
        assert revoked.certificate.status == cert_pb2.CERTIFICATE_STATUS_REVOKED
        assert not revoked.certificate.HasField("pending_issuance")
        servers.knot.start()
        await asyncio.sleep(2)
        after = await stub.GetCertificate(cert_pb2.GetCertificateRequest(device_id="acme-revoke-1"))
        assert after.certificate.status == cert_pb2.CERTIFICATE_STATUS_REVOKED
        assert after.certificate.serial_number == first.serial_number

        # Renewing a revoked certificate needs a CSR for a new key.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.RenewCertificate(cert_pb2.RenewCertificateRequest(device_id="acme-revoke-1"))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(refused.value) == "CERTIFICATE_REVOKED"


# -- faults -----------------------------------------------------------------------------------


async def test_dns_server_down_leaves_it_pending_with_its_error_then_it_completes(
    acme_stub: tuple[AcmeServers, RunningCertService, Stub],
) -> None:
    servers, _, stub = acme_stub
    servers.knot.stop()
    await provision(stub, "acme-dns-1", uuid_subdomain="acme-dns")
    failed = await wait_for(stub, "acme-dns-1", lambda c: c.pending_issuance.attempts >= 2)
    assert failed.status == PENDING
    assert failed.pending_issuance.last_error.startswith("dns-update:")
    assert failed.pending_issuance.HasField("next_attempt_time")

    servers.knot.start()
    active = await wait_for(stub, "acme-dns-1", is_active)
    assert active.certificate_chain_pem
    assert txt_values(servers.knot, "_acme-challenge.acme-dns.myl.zip") == set()


async def test_pebble_nonce_rejection_is_survived(
    acme_servers: StartServers, start_cert_service: StartCertService
) -> None:
    # 40 % of good nonces refused: requests are tried again with fresh ones, and an attempt
    # that still fails resumes its order (recorded as soon as the CA placed it, its records
    # kept while the CA validates), so each certificate costs exactly one order.
    servers = acme_servers(
        PEBBLE_WFE_NONCEREJECT="40", PEBBLE_VA_NOSLEEP="0", PEBBLE_VA_SLEEPTIME="1"
    )
    service = await start_cert_service(**servers.env())
    before = orders_placed()
    async with internal_tls.channel(service.address) as channel:
        stub = cert_pb2_grpc.CertificateServiceStub(channel)
        devices = [f"acme-nonce-{i}" for i in range(6)]
        for device in devices:
            await provision(stub, device, uuid_subdomain=device)
        for device in devices:
            active = await wait_for(stub, device, is_active)
            assert active.certificate_chain_pem
            assert txt_values(servers.knot, f"_acme-challenge.{device}.myl.zip") == set()
    assert orders_placed() - before == len(devices)


async def test_validation_failures_are_shown_and_retried_and_a_lost_account_is_registered_again(
    acme_servers: StartServers, start_cert_service: StartCertService
) -> None:
    # Pebble asks a DNS server that does not exist: every validation fails.
    servers = acme_servers(dns_port=free_port())
    service = await start_cert_service(**servers.env())
    async with internal_tls.channel(service.address) as channel:
        stub = cert_pb2_grpc.CertificateServiceStub(channel)
        await provision(stub, "acme-invalid-1", uuid_subdomain="acme-invalid")
        failing = await wait_for(stub, "acme-invalid-1", lambda c: c.pending_issuance.attempts >= 2)
        assert failing.status == PENDING
        assert "urn:ietf:params:acme:error" in failing.pending_issuance.last_error

        # Between two attempts, the failed one's challenge records are gone.
        async def between_attempts() -> cert_pb2.Certificate:
            reply = await stub.GetCertificate(
                cert_pb2.GetCertificateRequest(device_id="acme-invalid-1")
            )
            return reply.certificate

        deadline = time.monotonic() + 20
        while True:
            before, now = await between_attempts(), service.clock.now().timestamp()
            records = txt_values(servers.knot, "_acme-challenge.acme-invalid.myl.zip")
            after = await between_attempts()
            # Both reads saw the same failure recorded, its next attempt still ahead.
            due = after.pending_issuance.next_attempt_time
            waiting = due.seconds + due.nanos / 1e9 > now + 0.1
            same = before.pending_issuance == after.pending_issuance
            if same and waiting:
                assert records == set()
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)

        # A CA that lost its state (a new Pebble validating through Knot): the account is
        # registered again and the order placed anew.
        servers.restart_pebble()
        active = await wait_for(stub, "acme-invalid-1", is_active)
        assert active.certificate_chain_pem


async def test_two_replicas_never_place_two_orders_for_one_certificate(
    acme_servers: StartServers, start_cert_service: StartCertService
) -> None:
    servers = acme_servers()
    env = servers.env(ACME_CONCURRENCY="4")
    first = await start_cert_service(**env)
    second = await start_cert_service(**env)
    before = orders_placed()
    devices = [f"acme-replica-{i}" for i in range(12)]
    async with (
        internal_tls.channel(first.address) as one,
        internal_tls.channel(second.address) as two,
    ):
        stubs = [
            cert_pb2_grpc.CertificateServiceStub(one),
            cert_pb2_grpc.CertificateServiceStub(two),
        ]
        await asyncio.gather(
            *(
                provision(stubs[i % 2], device, uuid_subdomain=device)
                for i, device in enumerate(devices)
            )
        )
        for i, device in enumerate(devices):
            await wait_for(stubs[(i + 1) % 2], device, is_active)
    # Both replicas' workers are in this process: the counter is their sum.
    assert orders_placed() - before == len(devices)


async def test_the_order_budget_defers_orders_it_has_no_room_for(
    acme_servers: StartServers, start_cert_service: StartCertService
) -> None:
    servers = acme_servers()
    service = await start_cert_service(**servers.env(ACME_ORDERS="2", ACME_ORDER_PERIOD="3600"))
    async with internal_tls.channel(service.address) as channel:
        stub = cert_pb2_grpc.CertificateServiceStub(channel)
        for device in ("acme-budget-1", "acme-budget-2"):
            await provision(stub, device, uuid_subdomain=device)
            await wait_for(stub, device, is_active)
        await provision(stub, "acme-budget-3", uuid_subdomain="acme-budget-3")
        waiting = await wait_for(
            stub, "acme-budget-3", lambda c: "order budget" in c.pending_issuance.last_error
        )
        assert waiting.status == PENDING
        assert waiting.pending_issuance.attempts == 0
        # The next order is 30 minutes away (2 per hour).
        wait = waiting.pending_issuance.next_attempt_time.seconds - service.clock.now().timestamp()
        assert 1700 < wait <= 1800


async def test_a_replica_resumes_the_order_another_one_placed(
    acme_servers: StartServers, start_cert_service: StartCertService
) -> None:
    servers = acme_servers()
    env = servers.env()
    first = await start_cert_service(**env)
    worker = first.app.acme_worker
    assert isinstance(worker, AcmeWorker)
    servers.knot.stop()  # orders are placed, then the DNS update fails and is retried
    async with internal_tls.channel(first.address) as channel:
        stub = cert_pb2_grpc.CertificateServiceStub(channel)
        before = orders_placed()
        await provision(stub, "acme-lease-1", uuid_subdomain="acme-lease")
        await wait_for(
            stub,
            "acme-lease-1",
            lambda c: c.pending_issuance.attempts >= 1 and c.pending_issuance.last_error != "",
        )
    await first.stop()  # the replica goes away with the order placed
    servers.knot.start()
    second = await start_cert_service(**env)
    async with internal_tls.channel(second.address) as channel:
        stub = cert_pb2_grpc.CertificateServiceStub(channel)
        await wait_for(stub, "acme-lease-1", is_active)
    assert orders_placed() - before == 1


def ca_status(servers: AcmeServers, serial_hex: str) -> str:
    """What Pebble says of a certificate (its management interface): Valid or Revoked."""
    reply = httpx.get(
        f"{servers.pebble.management_url}/cert-status-by-serial/{serial_hex}",
        verify=ssl.create_default_context(cafile=str(servers.pebble.ca_bundle)),
        timeout=5,
    )
    reply.raise_for_status()
    return str(reply.json()["Status"])


async def test_revocation_and_deletion_reach_the_ca(
    acme_stub: tuple[AcmeServers, RunningCertService, Stub],
) -> None:
    servers, _, stub = acme_stub
    serials = {}
    for device in ("acme-ca-revoke", "acme-ca-delete"):
        await provision(stub, device, uuid_subdomain=device)
        serials[device] = (await wait_for(stub, device, is_active)).serial_number
        assert ca_status(servers, serials[device]) == "Valid"

    await stub.RevokeCertificate(
        cert_pb2.RevokeCertificateRequest(
            device_id="acme-ca-revoke", reason=cert_pb2.REVOCATION_REASON_KEY_COMPROMISE
        )
    )
    await stub.DeleteDevice(cert_pb2.DeleteDeviceRequest(device_id="acme-ca-delete"))
    deadline = time.monotonic() + 30
    while {ca_status(servers, serial) for serial in serials.values()} != {"Revoked"}:
        assert time.monotonic() < deadline, [ca_status(servers, s) for s in serials.values()]
        await asyncio.sleep(0.1)


async def test_a_retried_provision_gets_a_fresh_key_and_the_certificate_is_for_it(
    acme_stub: tuple[AcmeServers, RunningCertService, Stub],
) -> None:
    _, _, stub = acme_stub
    request_id = "4c0ffee0-1234-4abc-8def-0123456789ab"
    first = await provision(
        stub, "acme-retry-1", uuid_subdomain="acme-retry", request_id=request_id
    )
    again = await provision(
        stub, "acme-retry-1", uuid_subdomain="acme-retry", request_id=request_id
    )
    # The first reply's key reached nobody (it is never stored): the retry's key is the one
    # the certificate is issued for.
    assert again.private_key_pem
    assert again.private_key_pem != first.private_key_pem
    active = await wait_for(stub, "acme-retry-1", is_active)
    leaf = x509.load_pem_x509_certificates(active.certificate_chain_pem.encode())[0]
    key = serialization.load_pem_private_key(again.private_key_pem.encode(), None)
    assert leaf.public_key() == key.public_key()


async def test_the_lifecycle_follows_the_cas_renewal_window_when_it_gave_one(
    acme_stub: tuple[AcmeServers, RunningCertService, Stub],
) -> None:
    # Pebble 2.4 offers no ARI: the window a CA would suggest is recorded as the worker
    # records it, and the lifecycle must renew by it rather than by RENEW_AT_FRACTION.
    _, service, stub = acme_stub
    worker = service.app.acme_worker
    assert isinstance(worker, AcmeWorker)
    for device in ("acme-ari-early", "acme-ari-late"):
        await provision(stub, device, uuid_subdomain=device)
    early = await wait_for(stub, "acme-ari-early", is_active)
    late = await wait_for(stub, "acme-ari-late", is_active)
    now = service.clock.now()
    await worker.queue.set_renewal_time("acme-ari-early", early.serial_number, now)
    await worker.queue.set_renewal_time(
        "acme-ari-late", late.serial_number, now + timedelta(days=3650)
    )
    # A device that asks is told the same moment the worker goes by.
    info = await stub.GetRenewalInfo(cert_pb2.GetRenewalInfoRequest(device_id="acme-ari-late"))
    suggested = (now + timedelta(days=3650)).timestamp()
    assert suggested <= info.suggested_window.start.seconds < suggested + 1
    assert info.suggested_window.end.seconds == info.suggested_window.start.seconds + 1

    # Long past two thirds of the lifetime: only the CA's window counts.
    service.clock.advance(seconds=(late.not_after.seconds - late.not_before.seconds) * 0.9)
    await service.app.lifecycle.run_once()
    renewed = await wait_for(
        stub, "acme-ari-early", lambda c: is_active(c) and c.serial_number != early.serial_number
    )
    assert renewed.renewal_count == 1
    unchanged = await stub.GetCertificate(cert_pb2.GetCertificateRequest(device_id="acme-ari-late"))
    assert unchanged.certificate.serial_number == late.serial_number
    assert not unchanged.certificate.HasField("pending_issuance")


async def test_stopping_gives_up_orders_in_progress_and_another_replica_resumes_them(
    acme_servers: StartServers, start_cert_service: StartCertService
) -> None:
    # Pebble waits up to a minute before each validation: orders are in progress for long.
    servers = acme_servers(PEBBLE_VA_NOSLEEP="0", PEBBLE_VA_SLEEPTIME="60")
    env = servers.env(ACME_LEASE="3")
    first = await start_cert_service(**env)
    devices = [f"acme-stop-{i}" for i in range(3)]
    async with internal_tls.channel(first.address) as channel:
        stub = cert_pb2_grpc.CertificateServiceStub(channel)
        for device in devices:
            await provision(stub, device, uuid_subdomain=device)
        for device in devices:
            await wait_for(stub, device, lambda c: c.pending_issuance.attempts >= 1)
    worker = first.app.acme_worker
    assert isinstance(worker, AcmeWorker)
    stopping = time.monotonic()
    await first.stop()
    # Not held up by the orders' waits: they give up and their leases run out.
    assert time.monotonic() - stopping < 10
    # The stop does not wait for its order threads: one may still be waiting for Pebble's
    # answer to a request, and an order placed by it is counted. Once every thread has ended,
    # the count read next is final.
    async with asyncio.timeout(60):
        await asyncio.to_thread(worker._executor.shutdown, wait=True)
    before = orders_placed()

    servers.restart_pebble(PEBBLE_VA_NOSLEEP="1")  # it forgets the accounts and orders too
    second = await start_cert_service(**servers.env())
    async with internal_tls.channel(second.address) as channel:
        stub = cert_pb2_grpc.CertificateServiceStub(channel)
        for device in devices:
            await wait_for(stub, device, is_active)
    # Each order the stopped replica placed was looked up again; Pebble had forgotten them,
    # so one new order per certificate, never two.
    assert orders_placed() - before == len(devices)


async def test_listing_by_status_pending_shows_only_certificates_not_yet_issued(
    acme_stub: tuple[AcmeServers, RunningCertService, Stub],
) -> None:
    servers, service, stub = acme_stub
    await provision(stub, "acme-list-issued", uuid_subdomain="acme-list-issued")
    await wait_for(stub, "acme-list-issued", is_active)
    servers.knot.stop()  # nothing completes from now on
    await provision(stub, "acme-list-waiting", uuid_subdomain="acme-list-waiting")

    async def listed(**fields: Any) -> list[str]:
        reply = await stub.ListCertificates(cert_pb2.ListCertificatesRequest(**fields))
        return [c.device_id for c in reply.certificates]

    assert await listed(status=PENDING) == ["acme-list-waiting"]
    assert await listed(status=ACTIVE) == ["acme-list-issued"]
    # A pending certificate has no expiry: no "expires before" filter matches it.
    far = service.clock.now() + timedelta(days=36_500)
    assert await listed(expire_before=to_pb_timestamp(far)) == ["acme-list-issued"]


async def test_a_devices_acme_client_sees_processing_until_the_cas_certificate_is_issued(
    acme_servers: StartServers, start_cert_service: StartCertService, tmp_path: Path
) -> None:
    """The ACME server in front of the ACME issuer: finalize queues the order with the CA (the
    API's renewal path), the device's client polls `processing` with Retry-After, and gets the
    CA's chain once the device's certificate is ACTIVE again."""
    from acme import client as acme_client
    from acme import messages
    from josepy import jwa, jwk

    servers = acme_servers()
    service = await start_cert_service(**servers.env(), ACME_SERVER_PORT="0")
    fqdn = "acme-behind.myl.zip"
    async with internal_tls.channel(service.address) as channel:
        stub = cert_pb2_grpc.CertificateServiceStub(channel)
        await provision(stub, "acme-behind", uuid_subdomain="acme-behind")
        await wait_for(stub, "acme-behind", is_active)
        eab = await stub.CreateAcmeEabCredentials(
            cert_pb2.CreateAcmeEabCredentialsRequest(device_id="acme-behind")
        )
        assert service.app.acme_http is not None
        # The ACME port directly, as the gateway reaches it: TLS with the gateway's identity.
        url = f"https://127.0.0.1:{service.app.acme_http.port}/acme/directory"

        def obtain() -> tuple[list[str], str]:
            key = jwk.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
            net = acme_client.ClientNetwork(key, alg=jwa.ES256, user_agent="myl-tests")
            net.session.mount("https://", _AsGateway())
            directory = acme_client.ClientV2.get_directory(url, net)
            client = acme_client.ClientV2(directory, net)
            binding = messages.ExternalAccountBinding.from_data(
                account_public_key=key.public_key(),
                kid=eab.kid,
                hmac_key=eab.hmac_key,
                directory=directory,
            )
            client.new_account(
                messages.NewRegistration.from_data(
                    terms_of_service_agreed=True, external_account_binding=binding
                )
            )
            order = client.new_order(make_csr([fqdn, f"*.{fqdn}"], common_name=fqdn).encode())
            client.begin_finalization(order)
            polls: list[str] = []
            deadline = time.monotonic() + 60
            while True:
                response = client._post_as_get(order.uri)
                status = response.json()["status"]
                polls.append(f"{status} {response.headers.get('Retry-After')}")
                if status != "processing":
                    break
                assert time.monotonic() < deadline, polls
                time.sleep(0.05)
            assert status == "valid", response.json()
            chain = client._post_as_get(response.json()["certificate"]).text
            return polls, chain

        polls, chain = await asyncio.to_thread(obtain)
        assert polls[0] == "processing 1", polls
        current = await wait_for(stub, "acme-behind", is_active)
        leaf = x509.load_pem_x509_certificates(chain.encode())[0]
        assert format(leaf.serial_number, "x") in current.serial_number
        verified = openssl_verify(servers.pebble.root_pem(), chain, tmp_path)
        assert verified.returncode == 0, verified.stdout + verified.stderr


class _AsGateway(requests.adapters.HTTPAdapter):
    """HTTPS as the gateway: its internal identity, the internal CA trusted, and no host name
    check (the service's certificate names it, not 127.0.0.1)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        gateway = internal_tls.identity(GATEWAY)
        context = ssl.create_default_context(cafile=str(gateway.ca_file))
        context.check_hostname = False
        context.load_cert_chain(gateway.cert_file, gateway.key_file)
        kwargs["ssl_context"] = context
        kwargs["assert_hostname"] = False
        super().init_poolmanager(*args, **kwargs)
