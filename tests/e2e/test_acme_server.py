"""Real ACME clients, unmodified, against cert_service's RFC 8555 server through the real gateway:
certbot (PyPI) and lego (Debian) enroll a device with its EAB credentials, obtain a wildcard and
a single-name certificate for it, renew, and revoke; the chain verifies with `openssl verify`
against the CA the API serves, the revocation is on the CRL, and a client holding another
device's credentials is refused this device's names.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from tests.e2e.conftest import Gateway
from tests.e2e.test_gateway import operator_key, provision
from tests.fixtures.cert import RunningCertService, StartCertService
from tests.fixtures.key import RunningKeyService

CERTBOT = Path(sys.executable).parent / "certbot"
LEGO = shutil.which("lego")
OPENSSL = shutil.which("openssl")


@pytest.fixture
async def cert_service(start_cert_service: StartCertService) -> RunningCertService:
    """cert_service with its ACME server on a free port (the gateway routes /acme/ to it)."""
    return await start_cert_service(ACME_SERVER_PORT="0")


async def eab_credentials(
    client: httpx.AsyncClient, gw: Gateway, key: str, device: str
) -> dict[str, Any]:
    reply = await client.post(
        f"{gw.url}/api/v1/devices/{device}/acmeEabCredentials",
        headers={"X-API-Key": key},
        json={},
    )
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


async def run(*argv: str | Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *map(str, argv),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    output, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


async def openssl_verify(ca_pem: str, chain: Path) -> str:
    """`openssl verify` of the chain's leaf against the CA the API serves."""
    assert OPENSSL is not None
    ca = chain.parent / "api-ca.pem"
    ca.write_text(ca_pem)
    code, output = await run(OPENSSL, "verify", "-CAfile", ca, chain)
    assert code == 0, output
    return output


def names_of(path: Path) -> set[str]:
    leaf = x509.load_pem_x509_certificates(path.read_bytes())[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.DNSName))


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificates(path.read_bytes())[0].serial_number


async def api_certificate(
    client: httpx.AsyncClient, gw: Gateway, key: str, device: str
) -> dict[str, Any]:
    reply = await client.get(
        f"{gw.url}/api/v1/devices/{device}/certificate", headers={"X-API-Key": key}
    )
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()["certificate"]
    return body


async def ca_chain(client: httpx.AsyncClient, gw: Gateway, key: str) -> str:
    reply = await client.get(f"{gw.url}/api/v1/ssl/ca", headers={"X-API-Key": key})
    assert reply.status_code == 200, reply.text
    return str(reply.json()["caChainPem"])


@pytest.mark.skipif(not CERTBOT.exists(), reason="certbot is not installed (dev extra)")
async def test_certbot_enrolls_with_eab_obtains_renews_and_revokes(
    gateway: Gateway, key_service: RunningKeyService, tmp_path: Path
) -> None:
    admin = await operator_key(key_service)
    async with httpx.AsyncClient(timeout=30) as client:
        await provision(client, gateway, admin, "certbot-device")
        await provision(client, gateway, admin, "other-device")
        eab = await eab_credentials(client, gateway, admin, "certbot-device")
        other_eab = await eab_credentials(client, gateway, admin, "other-device")
        ca_pem = await ca_chain(client, gateway, admin)

        name = "certbot-device.myl.zip"
        directory = f"{gateway.url}{eab['directoryPath']}"

        def certbot(config: Path, *args: str) -> list[str | Path]:
            return [
                CERTBOT,
                *args,
                "--non-interactive",
                "--server",
                directory,
                "--config-dir",
                config,
                "--work-dir",
                config / "work",
                "--logs-dir",
                config / "logs",
            ]

        config = tmp_path / "certbot"
        obtain = [
            "--agree-tos",
            "--register-unsafely-without-email",
            "--manual",
            "--preferred-challenges",
            "dns",
            "--manual-auth-hook",
            "true",
        ]
        code, output = await run(
            *certbot(config, "register", "--agree-tos", "--register-unsafely-without-email"),
            "--eab-kid",
            eab["kid"],
            "--eab-hmac-key",
            eab["hmacKey"],
        )
        assert code == 0, output
        # A wildcard certificate, then a single-name one, for the device's own name.
        code, output = await run(
            *certbot(config, "certonly", *obtain),
            "--cert-name",
            "wild",
            "-d",
            name,
            "-d",
            f"*.{name}",
        )
        assert code == 0, output
        wild = config / "live" / "wild" / "fullchain.pem"
        assert names_of(wild) == {name, f"*.{name}"}
        await openssl_verify(ca_pem, wild)
        code, output = await run(
            *certbot(config, "certonly", *obtain), "--cert-name", "single", "-d", name
        )
        assert code == 0, output
        single = config / "live" / "single" / "fullchain.pem"
        assert names_of(single) == {name}
        await openssl_verify(ca_pem, single)
        # The API sees what the device's ACME client obtained.
        current = await api_certificate(client, gateway, admin, "certbot-device")
        assert current["certificateType"] == "CERTIFICATE_TYPE_SINGLE"

        first = serial_of(single)
        code, output = await run(
            *certbot(
                config,
                "renew",
                "--force-renewal",
                "--no-random-sleep-on-renew",
                "--cert-name",
                "single",
            )
        )
        assert code == 0, output
        assert serial_of(single) != first
        await openssl_verify(ca_pem, single)

        code, output = await run(
            *certbot(config, "revoke", "--cert-name", "single", "--no-delete-after-revoke"),
            "--reason",
            "keycompromise",
        )
        assert code == 0, output
        current = await api_certificate(client, gateway, admin, "certbot-device")
        assert current["status"] == "CERTIFICATE_STATUS_REVOKED"
        assert current["revocationReason"] == "REVOCATION_REASON_KEY_COMPROMISE"

        # Another device's credentials bind an account that may not order this name.
        intruder = tmp_path / "intruder"
        code, output = await run(
            *certbot(intruder, "register", "--agree-tos", "--register-unsafely-without-email"),
            "--eab-kid",
            other_eab["kid"],
            "--eab-hmac-key",
            other_eab["hmacKey"],
        )
        assert code == 0, output
        code, output = await run(*certbot(intruder, "certonly", *obtain), "-d", name)
        assert code != 0
        log = (intruder / "logs" / "letsencrypt.log").read_text()
        assert "urn:ietf:params:acme:error:rejectedIdentifier" in log, output


@pytest.mark.skipif(LEGO is None, reason="lego is not installed (deploy/system-deps.sh)")
async def test_lego_enrolls_with_eab_obtains_renews_and_revokes(
    gateway: Gateway, key_service: RunningKeyService, tmp_path: Path
) -> None:
    assert LEGO is not None
    admin = await operator_key(key_service)
    async with httpx.AsyncClient(timeout=30) as client:
        await provision(client, gateway, admin, "lego-device")
        await provision(client, gateway, admin, "other-device")
        eab = await eab_credentials(client, gateway, admin, "lego-device")
        other_eab = await eab_credentials(client, gateway, admin, "other-device")
        ca_pem = await ca_chain(client, gateway, admin)
        name = "lego-device.myl.zip"
        directory = f"{gateway.url}{eab['directoryPath']}"
        # lego needs a challenge solver named; the authorizations are valid already, so it is
        # never run.
        env = {"PATH": "/usr/bin:/bin", "EXEC_PATH": "/bin/true", "HOME": str(tmp_path)}

        def lego(path: Path, credentials: dict[str, Any], *domains: str) -> list[str | Path]:
            argv: list[str | Path] = [
                LEGO,
                "--server",
                directory,
                "--accept-tos",
                "--email",
                "device@example.com",
                "--eab",
                "--kid",
                credentials["kid"],
                "--hmac",
                credentials["hmacKey"],
                "--dns",
                "exec",
                "--path",
                path,
            ]
            for domain in domains:
                argv += ["-d", domain]
            return argv

        path = tmp_path / "lego"
        code, output = await run(*lego(path, eab, name, f"*.{name}"), "run", env=env)
        assert code == 0, output
        chain = path / "certificates" / f"{name}.crt"
        assert names_of(chain) == {name, f"*.{name}"}
        await openssl_verify(ca_pem, chain)

        code, output = await run(*lego(path, eab, name), "run", env=env)
        assert code == 0, output
        assert names_of(chain) == {name}
        first = serial_of(chain)
        code, output = await run(
            *lego(path, eab, name), "renew", "--days", "3650", "--no-random-sleep", env=env
        )
        assert code == 0, output
        assert serial_of(chain) != first
        await openssl_verify(ca_pem, chain)

        code, output = await run(*lego(path, eab, name), "revoke", "--reason", "4", env=env)
        assert code == 0, output
        current = await api_certificate(client, gateway, admin, "lego-device")
        assert current["status"] == "CERTIFICATE_STATUS_REVOKED"
        assert current["revocationReason"] == "REVOCATION_REASON_SUPERSEDED"

        intruder = tmp_path / "intruder"
        code, output = await run(*lego(intruder, other_eab, name), "run", env=env)
        assert code != 0
        assert "rejectedIdentifier" in output, output
