"""Devices calling the real gateway with the certificate the platform issued them (mutual TLS
on the device listener): curl `--cert/--key`, a Python gRPC channel with client credentials,
`openssl s_client`; revocation and an expired CRL enforced by Envoy in the handshake."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cert_service.ca import LocalCertificateAuthority, create_development_ca
from cert_service.edge_trust import NEXT_UPDATE, EdgeTrustWriter
from deploy.devstack.gateway import (
    DeviceTls,
    GatewayPorts,
    create_gateway_certificate,
    render_envoy_config,
)
from deploy.devstack.servers import free_port
from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from tests.e2e.conftest import Gateway, _start_envoy, _wait_healthy
from tests.fixtures import gateway_identity, internal_tls
from tests.fixtures.cert import RunningCertService, StartCertService
from tests.fixtures.clock import FakeClock
from tests.fixtures.key import RunningKeyService


@dataclass
class DeviceGateway:
    gateway: Gateway
    port: int
    ca_pem: Path
    cert_service: RunningCertService
    writer: EdgeTrustWriter
    stub: cert_pb2_grpc.CertificateServiceAsyncStub
    tmp: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def sds_updates(self) -> int:
        async with httpx.AsyncClient() as client:
            reply = await client.get(
                f"http://127.0.0.1:{self.gateway.admin_port}/stats",
                params={"filter": "server_ssl_socket_factory.ssl_context_update_by_sds"},
            )
        return sum(int(line.rsplit(":", 1)[1]) for line in reply.text.splitlines() if line)

    async def refresh(self) -> None:
        """Sign what is due, write the trust files, and wait until Envoy has reloaded them."""
        publisher = self.cert_service.app.crl_publisher
        assert publisher is not None
        await publisher.run_once()
        before = await self.sds_updates()
        if await self.writer.run_once():
            await _until(lambda: self._reloaded(before), "envoy reloads the device CA")

    async def _reloaded(self, before: int) -> bool:
        return await self.sds_updates() > before


async def _until(check: Callable[[], Awaitable[bool]], what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not in {limit} s: {what}")
        await asyncio.sleep(0.02)


@dataclass
class Device:
    device_id: str
    name: str
    cert: Path
    key: Path
    serial: str


async def provision(dg: DeviceGateway, device_id: str) -> Device:
    reply = await dg.stub.ProvisionCertificate(
        cert_pb2.ProvisionCertificateRequest(device_id=device_id, uuid_subdomain=device_id)
    )
    cert, key = dg.tmp / f"{device_id}.crt", dg.tmp / f"{device_id}.key"
    cert.write_text(reply.certificate.certificate_chain_pem)
    key.write_text(reply.private_key_pem)
    return Device(
        device_id, reply.certificate.uuid_subdomain, cert, key, reply.certificate.serial_number
    )


async def run(*argv: str, stdin: bytes = b"") -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await process.communicate(stdin)
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace")


async def curl(dg: DeviceGateway, cert: Path, key: Path, path: str, *extra: str) -> tuple[int, str]:
    """(exit code, output): 0 and `<status>\\n<body>` when the request was answered."""
    return await run(
        "curl", "-s", "--cacert", str(dg.ca_pem), "--cert", str(cert), "--key", str(key),
        "-w", "\n%{http_code}", *extra, dg.url + path,
    )  # fmt: skip


async def handshake(dg: DeviceGateway, cert: Path, key: Path, *extra: str) -> tuple[bool, str]:
    """Whether `openssl s_client` completes a TLS 1.3 handshake and a request with this
    certificate (TLS 1.3 reports a refused client certificate after the handshake)."""
    code, out = await run(
        "openssl", "s_client", "-connect", f"127.0.0.1:{dg.port}", "-CAfile", str(dg.ca_pem),
        "-cert", str(cert), "-key", str(key), "-verify_return_error", "-ign_eof", *extra,
        stdin=b"GET /api/v1/ssl/ca HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )  # fmt: skip
    return code == 0 and "HTTP/1.1 200" in out, out


@pytest.fixture
async def device_gateway(
    start_cert_service: StartCertService,
    key_service: RunningKeyService,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> AsyncIterator[DeviceGateway]:
    env = dict(getattr(request, "param", {}))
    # CRLs signed this far in the past (`clock_offset` seconds), as by a clock behind.
    offset = float(env.pop("clock_offset", 0))
    clock = FakeClock(datetime.now(UTC) - timedelta(seconds=offset), frozen=False)
    cert_service = await start_cert_service(clock, **env)
    stub_channel = gateway_identity.channel(cert_service.address)
    stub = cert_pb2_grpc.CertificateServiceStub(stub_channel)
    trust = tmp_path / "trust"
    writer = EdgeTrustWriter(
        stub, trust, shards=cert_service.config.pki.crl_shards, zone="myl.zip", interval=0.2
    )
    assert cert_service.app.crl_publisher is not None
    await cert_service.app.crl_publisher.run_once()
    await writer.run_once()
    server = create_gateway_certificate(tmp_path / "gw")
    ports = GatewayPorts(
        free_port(), free_port(), cert_service.port, int(key_service.address.rsplit(":", 1)[1])
    )
    device_port = free_port()
    config_path = tmp_path / "envoy.yaml"
    access_log = tmp_path / "access.log"
    config_path.write_text(
        render_envoy_config(
            ports,
            listen_address="127.0.0.1",
            access_log_path=access_log,
            device_tls=DeviceTls(device_port, server.cert, server.key, trust),
            upstream_tls=internal_tls.upstream_tls(),
        )
    )
    process = _start_envoy(config_path, tmp_path / "envoy.log")
    gateway = Gateway(ports.listen_port, ports.admin_port, config_path, access_log, process)
    try:
        await _wait_healthy(gateway)
        yield DeviceGateway(gateway, device_port, server.ca, cert_service, writer, stub, tmp_path)
    finally:
        await stub_channel.close(None)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        await asyncio.to_thread(process.wait, 10)


async def test_a_device_calls_with_its_certificate_on_its_own_device_only(
    device_gateway: DeviceGateway,
) -> None:
    dg = device_gateway
    alice, bob = await provision(dg, "alice"), await provision(dg, "bob")
    await dg.refresh()  # the new devices' shards have CRLs

    code, out = await curl(dg, alice.cert, alice.key, "/api/v1/devices/alice/certificate")
    assert code == 0, out
    body, status = out.rsplit("\n", 1)
    assert status == "200", out
    assert json.loads(body)["certificate"]["uuidSubdomain"] == "alice.myl.zip"

    # Another device's resources, and a header claiming to be that device: 403.
    for extra in ((), ("-H", "x-myl-cert-names: bob.myl.zip")):
        code, out = await curl(dg, alice.cert, alice.key, "/api/v1/devices/bob/certificate", *extra)
        assert out.endswith("\n403"), out
        assert json.loads(out.rsplit("\n", 1)[0])["details"][0]["reason"] == "DEVICE_MISMATCH"
    # A device that does not exist reads the same as another device's.
    code, out = await curl(dg, alice.cert, alice.key, "/api/v1/devices/nobody/certificate")
    assert out.endswith("\n403"), out
    # What the certificate grant does not cover: 403 from Envoy, naming the permission.
    code, out = await curl(dg, alice.cert, alice.key, "/api/v1/devices/alice", "-X", "DELETE")
    assert out.endswith("\n403"), out
    assert "device:write" in out
    code, out = await curl(dg, alice.cert, alice.key, "/api/v1/devices/alice/keys")
    assert out.endswith("\n403"), out

    # The same over native gRPC, with a client certificate on the channel.
    credentials = grpc.ssl_channel_credentials(
        root_certificates=dg.ca_pem.read_bytes(),
        private_key=alice.key.read_bytes(),
        certificate_chain=alice.cert.read_bytes(),
    )
    async with grpc.aio.secure_channel(f"127.0.0.1:{dg.port}", credentials) as channel:
        stub = cert_pb2_grpc.CertificateServiceStub(channel)
        reply = await stub.GetCertificate(cert_pb2.GetCertificateRequest(device_id="alice"))
        assert reply.certificate.device_id == "alice"
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub.GetCertificate(cert_pb2.GetCertificateRequest(device_id="bob"))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.DeleteDevice(cert_pb2.DeleteDeviceRequest(device_id="alice"))
        assert missing.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # The device revokes its own certificate with it.
        revoked = await stub.RevokeCertificate(cert_pb2.RevokeCertificateRequest(device_id="alice"))
        assert revoked.certificate.status == cert_pb2.CERTIFICATE_STATUS_REVOKED

    # The access log names the certificate that called.
    async def logged() -> bool:
        lines = (
            dg.gateway.access_log.read_text().splitlines() if dg.gateway.access_log.exists() else []
        )
        return any(json.loads(line).get("device_certificate") == alice.serial for line in lines)

    await _until(logged, "the access log names alice's certificate")

    # A TLS session alice could resume later, and that resumes while nothing changed.
    session = dg.tmp / "alice.session"
    assert (await handshake(dg, alice.cert, alice.key, "-sess_out", str(session)))[0]
    resumed, out = await handshake(dg, alice.cert, alice.key, "-sess_in", str(session))
    assert resumed, out
    assert "Reused, TLSv1.3" in out, out

    # Revoked: refused in the handshake once the CRL is at the edge, a resumed session
    # included (the reload replaced the ticket keys); bob still gets in.
    await dg.refresh()
    assert not (await handshake(dg, alice.cert, alice.key))[0]
    accepted, out = await handshake(dg, alice.cert, alice.key, "-sess_in", str(session))
    assert not accepted, out
    assert "Reused" not in out, out
    assert (await handshake(dg, bob.cert, bob.key))[0]


async def test_certificates_that_are_not_a_current_device_certificate_are_refused(
    device_gateway: DeviceGateway, ca_files: tuple[Path, Path]
) -> None:
    dg = device_gateway
    ca = LocalCertificateAuthority.from_files(*ca_files, locations=dg.cert_service.config.pki)
    now = datetime.now(UTC).replace(microsecond=0)

    def issue(name: str, names: list[str], start: datetime, end: datetime) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        issued = ca.issue(key.public_key(), names, start, end)
        return _write(dg.tmp, name, issued.chain_pem, key)

    expired = issue(
        "expired", ["expired.myl.zip"], now - timedelta(days=2), now - timedelta(days=1)
    )
    outside = issue("outside", ["device.example.com"], now - timedelta(hours=1), now + timedelta(1))
    other_ca_cert, other_ca_key = create_development_ca(dg.tmp / "other-ca")
    other = LocalCertificateAuthority.from_files(other_ca_cert, other_ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    stranger = _write(
        dg.tmp,
        "stranger",
        other.issue(key.public_key(), ["carol.myl.zip"], now, now + timedelta(1)).chain_pem,
        key,
    )
    self_signed = _self_signed(dg.tmp, "carol.myl.zip")
    good = await provision(dg, "dave")
    await dg.refresh()

    assert (await handshake(dg, good.cert, good.key))[0]
    for cert, key_path in (expired, outside, stranger, self_signed):
        accepted, out = await handshake(dg, cert, key_path)
        assert not accepted, (cert.name, out)
    # No certificate at all: refused too.
    code, out = await run("curl", "-s", "--cacert", str(dg.ca_pem), dg.url + "/api/v1/ssl/ca")
    assert code != 0, out


def _write(
    tmp: Path, name: str, chain_pem: str, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert, key_path = tmp / f"{name}.crt", tmp / f"{name}.key"
    cert.write_text(chain_pem)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, key_path


def _self_signed(tmp: Path, name: str) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write(
        tmp, "self-signed", certificate.public_bytes(serialization.Encoding.PEM).decode(), key
    )


@pytest.mark.parametrize("device_gateway", [{"CRL_INTERVAL": "1"}], indirect=True)
async def test_a_revoked_certificate_is_refused_within_the_crl_interval_and_two_seconds(
    device_gateway: DeviceGateway,
) -> None:
    """The publisher (every CRL_INTERVAL = 1 s) and the writer (every second) run on their
    own, as deployed; nothing here drives them."""
    dg = device_gateway
    erin = await provision(dg, "erin")
    dg.writer.interval = 1.0
    writer = asyncio.create_task(dg.writer.run())
    try:
        await _until(lambda: _accepted(dg, erin), "the new device is admitted")
        await dg.stub.RevokeCertificate(cert_pb2.RevokeCertificateRequest(device_id="erin"))
        revoked_at = time.monotonic()
        bound = 1.0 + 2.0
        await _until(lambda: _refused(dg, erin), "the revoked certificate is refused", bound)
        print(f"revocation refused at the edge after {time.monotonic() - revoked_at:.2f} s")
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer


async def _accepted(dg: DeviceGateway, device: Device) -> bool:
    return (await handshake(dg, device.cert, device.key))[0]


async def _refused(dg: DeviceGateway, device: Device) -> bool:
    return not (await handshake(dg, device.cert, device.key))[0]


@pytest.mark.parametrize(
    "device_gateway", [{"CRL_VALIDITY": "60", "clock_offset": "65"}], indirect=True
)
async def test_a_crl_past_its_next_update_fails_closed_and_recovers_when_refreshed(
    device_gateway: DeviceGateway,
) -> None:
    """Envoy holds CRLs whose nextUpdate passed (signed 65 s ago, valid 60 s): every device
    is refused, and the alert's metric says so; a fresh CRL lets them in again."""
    dg = device_gateway
    frank = await provision(dg, "frank")
    await dg.refresh()
    assert NEXT_UPDATE._value.get() < time.time()  # MylEdgeCrlExpired's expression holds
    accepted, out = await handshake(dg, frank.cert, frank.key)
    assert not accepted
    assert "expired" in out.lower(), out

    dg.cert_service.clock.set(datetime.now(UTC))
    await dg.refresh()
    assert NEXT_UPDATE._value.get() > time.time()
    assert (await handshake(dg, frank.cert, frank.key))[0]
