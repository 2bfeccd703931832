"""Mutual TLS on the service ports: who gets a handshake, who may call what, and renewal.

The services run with the tests' internal CA (tests/fixtures/internal_tls.py), as every
service in the suite does; the doors are tried as a local process would try them.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Awaitable
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from deploy.devstack.internal_ca import Identity, InternalCa
from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from myl.key.v1 import key_pb2, key_pb2_grpc
from shared.config import ConfigError, ServerConfig, require_internal_tls
from shared.tls import CERT_SERVICE, KEY_SERVICE, InternalChannel, InternalTls, server_name
from tests.fixtures import internal_tls
from tests.fixtures.cert import RunningCertService, StartCertService, error_reason
from tests.fixtures.key import RunningKeyService

# An HTTP/2 client's first bytes: the preface and an empty SETTINGS frame.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _handshake(
    address: str, caller: Identity | None, trusted: Path
) -> tuple[x509.Certificate, bool]:
    """A TLS connection as `caller` (or without a certificate) that speaks first: the
    server's certificate, and whether the server answered (False: it closed the connection
    or sent an alert, which TLS 1.3 delivers after the client's side of the handshake)."""
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context(cafile=str(trusted))
    context.check_hostname = False
    context.set_alpn_protocols(["h2"])
    if caller is not None:
        context.load_cert_chain(caller.cert_file, caller.key_file)
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        try:
            tls.sendall(_H2_PREFACE)
            answered = bool(tls.recv(9))
        except (ssl.SSLError, ConnectionError):
            answered = False
    assert der is not None
    return x509.load_der_x509_certificate(der), answered


async def test_a_caller_without_an_internal_certificate_is_refused_in_the_handshake(
    cert_service: RunningCertService, tmp_path: Path
) -> None:
    ca_file = internal_tls.identity("operator").ca_file
    # No certificate at all, or one of another CA with the very same name and SPIFFE id:
    # the server ends the connection before a byte of HTTP/2 is read.
    stranger = InternalCa(tmp_path / "stranger").issue("operator")
    for caller in (None, stranger):
        assert not _handshake(cert_service.address, caller, ca_file)[1]
    # The operator's certificate: in.
    assert _handshake(cert_service.address, internal_tls.identity("operator"), ca_file)[1]

    # gRPC clients: plaintext (h2c), TLS without a certificate, another CA's certificate.
    request = cert_pb2.GetCertificateRequest(device_id="device-1")
    name = ("grpc.ssl_target_name_override", server_name(CERT_SERVICE))
    channels = [
        grpc.aio.insecure_channel(cert_service.address),
        grpc.aio.secure_channel(
            cert_service.address,
            grpc.ssl_channel_credentials(ca_file.read_bytes()),
            options=[name],
        ),
        grpc.aio.secure_channel(
            cert_service.address,
            grpc.ssl_channel_credentials(
                ca_file.read_bytes(),
                stranger.key_file.read_bytes(),
                stranger.cert_file.read_bytes(),
            ),
            options=[name],
        ),
    ]
    for channel in channels:
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await cert_pb2_grpc.CertificateServiceStub(channel).GetCertificate(
                    request, timeout=5
                )
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_each_service_answers_only_the_methods_its_callers_need(
    cert_service: RunningCertService, key_service: RunningKeyService
) -> None:
    # cert_service's identity: the delete cascade to key_service, nothing else there.
    async with internal_tls.channel(key_service.address, as_identity=CERT_SERVICE) as channel:
        keys = key_pb2_grpc.ApiKeyServiceStub(channel)
        revoked = await keys.RevokeDeviceApiKeys(
            key_pb2.RevokeDeviceApiKeysRequest(device_id="device-1", reason="deleted")
        )
        assert revoked.revoked_count == 0
        calls: list[Awaitable[object]] = [
            keys.ListAuditEvents(key_pb2.ListAuditEventsRequest()),
            keys.VerifyApiKey(key_pb2.VerifyApiKeyRequest(api_key="myl_x")),
            keys.GenerateApiKey(key_pb2.GenerateApiKeyRequest(device_id="device-1")),
        ]
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert error_reason(caught.value) == "CALLER_NOT_ALLOWED"
            assert "cert_service may not call" in (caught.value.details() or "")
    # key_service's identity: whether a device has an active certificate, nothing more.
    async with internal_tls.channel(cert_service.address, as_identity=KEY_SERVICE) as channel:
        certs = cert_pb2_grpc.CertificateServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await certs.GetCertificate(cert_pb2.GetCertificateRequest(device_id="device-1"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await certs.ListCertificates(cert_pb2.ListCertificatesRequest())
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # The gateway's identity: the public methods and the check, not the internal VerifyApiKey.
    async with internal_tls.channel(key_service.address, as_identity="gateway") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await key_pb2_grpc.ApiKeyServiceStub(channel).VerifyApiKey(
                key_pb2.VerifyApiKeyRequest(api_key="myl_x")
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_renewed_certificates_are_taken_without_a_restart(
    start_cert_service: StartCertService, tmp_path: Path
) -> None:
    ca = InternalCa(tmp_path / "internal-ca")
    served = ca.issue(CERT_SERVICE)
    operator = ca.issue("operator")
    caller = ca.issue(KEY_SERVICE)
    running = await start_cert_service(**served.env())
    first = _handshake(running.address, operator, ca.cert_file)[0].serial_number
    assert first == served.serial()

    renewed = ca.issue(CERT_SERVICE)
    assert renewed.serial() != first
    # The next handshake presents the new certificate; the process is the same.
    assert _handshake(running.address, operator, ca.cert_file)[0].serial_number == renewed.serial()

    # A client follows its own renewed files: a new channel, still let in.
    tls = InternalTls(True, caller.cert_file, caller.key_file, caller.ca_file)
    client = InternalChannel(running.address, tls, CERT_SERVICE, check_interval=0)
    try:
        request = cert_pb2.GetCertificateRequest(device_id="device-1")
        before = client.get()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await cert_pb2_grpc.CertificateServiceStub(before).GetCertificate(request)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        ca.issue(KEY_SERVICE)
        after = client.get()
        assert after is not before
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await cert_pb2_grpc.CertificateServiceStub(after).GetCertificate(request)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await client.close()


def test_internal_tls_is_off_only_outside_production() -> None:
    config = ServerConfig.from_env("demo", 0, 0, {"INTERNAL_TLS": "off"})
    assert not config.tls.enabled
    with pytest.raises(ConfigError, match="INTERNAL_TLS"):
        ServerConfig.from_env("demo", 0, 0, {"INTERNAL_TLS": "off", "ENVIRONMENT": "production"})
    with pytest.raises(ConfigError, match="INTERNAL_TLS_CERT_FILE"):
        require_internal_tls(ServerConfig.from_env("demo", 0, 0, {}).tls)


def test_a_service_without_its_identity_does_not_start() -> None:
    env = {k: v for k, v in os.environ.items() if "INTERNAL_TLS" not in k}
    done = subprocess.run(
        [sys.executable, "-m", "key_service", "serve"],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "INTERNAL_TLS_CERT_FILE" in done.stderr
