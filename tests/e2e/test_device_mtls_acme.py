"""Devices calling the real gateway over mutual TLS with the certificate a public CA issued them
(CERT_ISSUER=acme, against the real Pebble and Knot): the listener trusts that CA and matches
the zone's names, cert_service matches the device and, since the gateway can hold no CRL of that
CA, refuses every certificate but the device's current, ACTIVE one (`cert_service.service`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cert_service.edge_trust import TRUST_FILE, EdgeTrustWriter
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
from tests.fixtures.cert import StartCertService
from tests.fixtures.key import RunningKeyService
from tests.integration.test_acme_issuer import (  # noqa: F401 (acme_servers: a fixture)
    StartServers,
    acme_servers,
    is_active,
    wait_for,
)


@dataclass
class AcmeDeviceGateway:
    port: int
    ca_pem: Path
    stub: cert_pb2_grpc.CertificateServiceAsyncStub
    tmp: Path


@pytest.fixture
async def acme_device_gateway(
    acme_servers: StartServers,  # noqa: F811
    start_cert_service: StartCertService,
    key_service: RunningKeyService,
    tmp_path: Path,
) -> AsyncIterator[AcmeDeviceGateway]:
    servers = acme_servers()
    cert_service = await start_cert_service(**servers.env())
    channel = gateway_identity.channel(cert_service.address)
    stub = cert_pb2_grpc.CertificateServiceStub(channel)
    # What an operator gives the writer: the CA's root, which Pebble makes up as it starts.
    trust = tmp_path / "trust"
    writer = EdgeTrustWriter(
        stub,
        trust,
        shards=cert_service.config.pki.crl_shards,
        zone="myl.zip",
        public_ca_pem=servers.pebble.root_pem().encode(),
    )
    assert await writer.run_once()
    secret = (trust / TRUST_FILE).read_text()
    assert '"crl"' not in secret
    server = create_gateway_certificate(tmp_path / "gw")
    ports = GatewayPorts(
        free_port(), free_port(), cert_service.port, int(key_service.address.rsplit(":", 1)[1])
    )
    device_port = free_port()
    config_path = tmp_path / "envoy.yaml"
    config_path.write_text(
        render_envoy_config(
            ports,
            listen_address="127.0.0.1",
            access_log_path=tmp_path / "access.log",
            device_tls=DeviceTls(device_port, server.cert, server.key, trust),
            upstream_tls=internal_tls.upstream_tls(),
        )
    )
    process = _start_envoy(config_path, tmp_path / "envoy.log")
    gateway = Gateway(
        ports.listen_port, ports.admin_port, config_path, tmp_path / "access.log", process
    )
    try:
        await _wait_healthy(gateway)
        yield AcmeDeviceGateway(device_port, server.ca, stub, tmp_path)
    finally:
        await channel.close(None)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        await asyncio.to_thread(process.wait, 10)


@dataclass
class Device:
    device_id: str
    cert: Path
    key: Path


async def provision(dg: AcmeDeviceGateway, device_id: str) -> Device:
    """A device whose certificate Pebble issued (the service generated its key)."""
    reply = await dg.stub.ProvisionCertificate(
        cert_pb2.ProvisionCertificateRequest(device_id=device_id, uuid_subdomain=device_id),
        timeout=10,
    )
    certificate = await wait_for(dg.stub, device_id, is_active)
    cert, key = dg.tmp / f"{device_id}.crt", dg.tmp / f"{device_id}.key"
    cert.write_text(certificate.certificate_chain_pem)  # the leaf and Pebble's intermediate
    key.write_text(reply.private_key_pem)
    return Device(device_id, cert, key)


async def curl(dg: AcmeDeviceGateway, device: Device, path: str) -> tuple[int, str]:
    """(curl's exit code, `<body>\\n<status>`)."""
    process = await asyncio.create_subprocess_exec(
        "curl", "-s", "--cacert", str(dg.ca_pem), "--cert", str(device.cert),
        "--key", str(device.key), "-w", "\n%{http_code}", f"https://127.0.0.1:{dg.port}{path}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace")


def reason(out: str) -> str:
    found: str = json.loads(out.rsplit("\n", 1)[0])["details"][0]["reason"]
    return found


async def test_an_acme_certificate_works_on_its_own_device_until_it_is_revoked(
    acme_device_gateway: AcmeDeviceGateway,
) -> None:
    dg = acme_device_gateway
    alice, bob = await asyncio.gather(provision(dg, "alice"), provision(dg, "bob"))

    code, out = await curl(dg, alice, "/api/v1/devices/alice/certificate")
    assert code == 0, out
    body, status = out.rsplit("\n", 1)
    assert status == "200", out
    assert json.loads(body)["certificate"]["uuidSubdomain"] == "alice.myl.zip"

    # Another device's resources: 403, whether its certificate is current or not.
    code, out = await curl(dg, alice, "/api/v1/devices/bob/certificate")
    assert out.endswith("\n403"), out
    assert reason(out) == "DEVICE_MISMATCH"

    # Revoked through the API: refused from the next request on, the handshake still
    # succeeding (the gateway holds no CRL of the public CA; cert_service decides).
    await dg.stub.RevokeCertificate(
        cert_pb2.RevokeCertificateRequest(
            device_id="alice", reason=cert_pb2.REVOCATION_REASON_KEY_COMPROMISE
        ),
        timeout=10,
    )
    for path in ("/api/v1/devices/alice/certificate", "/api/v1/ssl/certificates/alice.myl.zip"):
        code, out = await curl(dg, alice, path)
        assert out.endswith("\n403"), out
        assert reason(out) == "CERTIFICATE_NOT_CURRENT"
    # Bob's is untouched.
    code, out = await curl(dg, bob, "/api/v1/devices/bob/certificate")
    assert out.endswith("\n200"), out


async def test_a_certificate_the_acme_ca_did_not_issue_is_refused_in_the_handshake(
    acme_device_gateway: AcmeDeviceGateway,
) -> None:
    """A name under the zone, from a CA other than the ACME CA (the gateway's local one)."""
    dg = acme_device_gateway
    other = create_gateway_certificate(dg.tmp / "other", names=("mallory.myl.zip",))
    code, out = await curl(dg, Device("mallory", other.cert, other.key), "/api/v1/ssl/ca")
    assert code != 0, out  # no HTTP answer: the connection ended in the handshake
