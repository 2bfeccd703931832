"""Relying parties and devices through the real gateway: CRLs and the CA certificate over plain
HTTP without a key, `openssl verify -crl_check` with the CRL named in the certificate, and
renewal information over REST.

Certificates name `http://pki.myl.zip/...` (the test services' PKI_BASE_URL); the test resolves
that host to the gateway, as `curl --resolve` would, and keeps the certificate's path and Host.
"""

from __future__ import annotations

import asyncio
import shutil
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.e2e.conftest import Gateway
from tests.e2e.test_gateway import device_key, operator_key, provision
from tests.fixtures.cert import RunningCertService
from tests.fixtures.key import RunningKeyService

OPENSSL = shutil.which("openssl")


async def fetch_public(client: httpx.AsyncClient, gw: Gateway, url: str) -> httpx.Response:
    """GET a URL taken from a certificate, through the gateway, without any API key."""
    parts = urlsplit(url)
    assert parts.scheme == "http"
    return await client.get(f"{gw.url}{parts.path}", headers={"Host": parts.netloc})


def leaf_of(certificate: Any) -> x509.Certificate:
    return x509.load_pem_x509_certificates(certificate["certificateChainPem"].encode())[0]


def crl_url(leaf: x509.Certificate) -> str:
    points = leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    [point] = list(points)
    assert point.full_name is not None
    return str(point.full_name[0].value)


def ca_issuers_url(leaf: x509.Certificate) -> str:
    access = leaf.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    [description] = list(access)
    return str(description.access_location.value)


async def openssl_verify(tmp: Path, ca_pem: bytes, crl_pem: bytes, leaf: x509.Certificate) -> str:
    assert OPENSSL is not None
    (tmp / "ca.pem").write_bytes(ca_pem)
    (tmp / "crl.pem").write_bytes(crl_pem)
    (tmp / "leaf.pem").write_bytes(leaf.public_bytes(Encoding.PEM))
    process = await asyncio.create_subprocess_exec(
        OPENSSL,
        "verify",
        "-crl_check",
        "-CAfile",
        str(tmp / "ca.pem"),
        "-CRLfile",
        str(tmp / "crl.pem"),
        str(tmp / "leaf.pem"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    return output.decode()


@pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
async def test_revoked_certificate_is_on_the_crl_in_its_distribution_point(
    gateway: Gateway,
    cert_service: RunningCertService,
    key_service: RunningKeyService,
    tmp_path: Path,
) -> None:
    admin = await operator_key(key_service)
    async with httpx.AsyncClient() as client:
        kept = leaf_of((await provision(client, gateway, admin, "kept-device"))["certificate"])
        gone = leaf_of((await provision(client, gateway, admin, "gone-device"))["certificate"])
        revoked = await client.post(
            f"{gateway.url}/api/v1/devices/gone-device/certificate:revoke",
            headers={"X-API-Key": admin},
            json={"reason": "REVOCATION_REASON_KEY_COMPROMISE"},
        )
        assert revoked.status_code == 200, revoked.text
        assert cert_service.app.crl_publisher is not None
        await cert_service.app.crl_publisher.run_once()

        # The CA certificate, from the AIA caIssuers URL: DER, no key needed.
        issuer = await fetch_public(client, gateway, ca_issuers_url(kept))
        assert issuer.status_code == 200, issuer.text
        assert issuer.headers["content-type"] == "application/pkix-cert"
        # Plain HTTP for relying parties: none of the gRPC plumbing shows.
        for plumbing in ("grpc-status", "grpc-message", "grpc-accept-encoding"):
            assert plumbing not in issuer.headers, issuer.headers
        assert "x-envoy-upstream-service-time" not in issuer.headers
        queried = await client.get(f"{gateway.url}{urlsplit(ca_issuers_url(kept)).path}?x=1")
        assert queried.status_code == 400  # documented: the repository takes no query
        assert "max-age=" in issuer.headers["cache-control"]
        ca = x509.load_der_x509_certificate(issuer.content)
        assert ca.subject == kept.issuer
        ca_pem = ca.public_bytes(Encoding.PEM)

        for leaf, expected in ((kept, ": OK"), (gone, "certificate revoked")):
            reply = await fetch_public(client, gateway, crl_url(leaf))
            assert reply.status_code == 200, reply.text
            assert reply.headers["content-type"] == "application/pkix-crl"
            crl = x509.load_der_x509_crl(reply.content)
            assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
            # Caches keep it no longer than its nextUpdate.
            assert crl.next_update_utc is not None
            max_age = int(reply.headers["cache-control"].split("max-age=")[1])
            remaining = (crl.next_update_utc - datetime.now(UTC)).total_seconds()
            assert 0 < max_age <= remaining + 5
            assert parsedate_to_datetime(reply.headers["expires"]) == crl.next_update_utc
            output = await openssl_verify(tmp_path, ca_pem, crl.public_bytes(Encoding.PEM), leaf)
            assert expected in output, output


async def test_public_repository_errors_are_plain(gateway: Gateway) -> None:
    async with httpx.AsyncClient() as client:
        bad = await client.get(f"{gateway.url}/pki/crls/seven.crl")
        assert bad.status_code == 400
        assert "file_name" in bad.text
        missing = await client.get(f"{gateway.url}/pki/crls/999.crl")
        assert missing.status_code == 404
        explanation = await client.get(f"{gateway.url}/pki/renewal")
        assert explanation.status_code == 200
        assert explanation.headers["content-type"].startswith("text/plain")


async def test_renewal_info_over_rest_is_device_scoped(
    gateway: Gateway, key_service: RunningKeyService
) -> None:
    admin = await operator_key(key_service)
    async with httpx.AsyncClient() as client:
        certificate = (await provision(client, gateway, admin, "ari-device"))["certificate"]
        await provision(client, gateway, admin, "other-device")
        own = (await device_key(client, gateway, admin, "ari-device"))["apiKey"]

        url = f"{gateway.url}/api/v1/devices/ari-device/certificate/renewalInfo"
        assert (await client.get(url)).status_code == 401
        other = f"{gateway.url}/api/v1/devices/other-device/certificate/renewalInfo"
        assert (await client.get(other, headers={"X-API-Key": own})).status_code == 403

        reply = await client.get(url, headers={"X-API-Key": own})
        assert reply.status_code == 200, reply.text
        info = reply.json()
        start = datetime.fromisoformat(info["suggestedWindow"]["start"])
        end = datetime.fromisoformat(info["suggestedWindow"]["end"])
        not_before = datetime.fromisoformat(certificate["notBefore"])
        not_after = datetime.fromisoformat(certificate["notAfter"])
        # Two thirds into the lifetime, closing before expiry; not urgent.
        assert abs((start - not_before) / (not_after - not_before) - 2 / 3) < 0.001
        assert start < end < not_after
        assert info["explanationUrl"] == ""
        assert info["serialNumber"] == certificate["serialNumber"]

        await client.post(
            f"{gateway.url}/api/v1/devices/ari-device/certificate:revoke",
            headers={"X-API-Key": admin},
            json={},
        )
        urgent = (await client.get(url, headers={"X-API-Key": own})).json()
        assert datetime.fromisoformat(urgent["suggestedWindow"]["end"]) < datetime.now(UTC)
        assert urgent["explanationUrl"] == "http://pki.myl.zip/pki/renewal"
