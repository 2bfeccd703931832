"""The CA key in a PKCS#11 token (SoftHSM2): what it signs verifies and lints like what the
file key signs, the key cannot be read out, and a token that cannot be used stops the start
with an error naming CA_KEY_URI."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11.util.rsa import encode_rsa_public_key

from cert_service.app import load_ca
from cert_service.ca import CaSubject, LocalCertificateAuthority, ca_certificate
from cert_service.config import CertServiceConfig
from cert_service.crl import sign_crl
from cert_service.hsm import Pkcs11Signer, Pkcs11Uri
from cert_service.issuer import generate_private_key
from cert_service.storage import RevokedEntry
from deploy.devstack.softhsm import TOKEN_LABEL, TokenCa
from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from shared.config import ConfigError
from tests.fixtures import gateway_identity, internal_tls
from tests.fixtures.cert import StartCertService, error_reason, make_csr, token_ca_env
from tests.integration.test_cert_lint import errors, lint_all

ROOT = Path(__file__).resolve().parents[2]


async def openssl_verify(ca: Path, crl_pem: Path, leaf: Path) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        "openssl",
        "verify",
        "-crl_check",
        "-CAfile",
        str(ca),
        "-CRLfile",
        str(crl_pem),
        str(leaf),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    return process.returncode or 0, out.decode()


def pem_crl(der: bytes, path: Path) -> Path:
    path.write_bytes(
        x509.load_der_x509_crl(der).public_bytes(serialization.Encoding.PEM),
    )
    return path


async def test_certificates_and_crls_are_signed_by_the_key_in_the_token(
    start_cert_service: StartCertService, token_ca: TokenCa, tmp_path: Path
) -> None:
    service = await start_cert_service(**token_ca_env(token_ca))
    assert service.config.ca_key_uri is not None
    assert service.config.ca_key_file == Path()
    async with gateway_identity.channel(service.address) as channel:
        stub = cert_pb2_grpc.CertificateServiceStub(channel)
        kept = await stub.ProvisionCertificate(
            cert_pb2.ProvisionCertificateRequest(
                device_id="kept",
                uuid_subdomain="kept",
                certificate_type=cert_pb2.CERTIFICATE_TYPE_SINGLE,
                csr_pem=make_csr(
                    ["kept.myl.zip"], rsa.generate_private_key(public_exponent=65537, key_size=2048)
                ),
            )
        )
        revoked = await stub.ProvisionCertificate(
            cert_pb2.ProvisionCertificateRequest(device_id="revoked")
        )
        await stub.RevokeCertificate(
            cert_pb2.RevokeCertificateRequest(
                device_id="revoked", reason=cert_pb2.REVOCATION_REASON_KEY_COMPROMISE
            )
        )
    publisher = service.app.crl_publisher
    assert publisher is not None
    await publisher.run_once()

    ca = x509.load_pem_x509_certificate(token_ca.cert_path.read_bytes())
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    leaves: dict[str, Path] = {}
    for name, reply in (("kept", kept), ("revoked", revoked)):
        chain = reply.certificate.certificate_chain_pem
        leaf = x509.load_pem_x509_certificates(chain.encode())[0]
        leaf.verify_directly_issued_by(ca)
        leaves[name] = tmp_path / f"{name}.pem"
        leaves[name].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    serial = revoked.certificate.serial_number
    crls = [await publisher.current(s) for s in range(service.config.pki.crl_shards)]
    listing = [c for c in crls if c is not None and c.entries]
    assert len(listing) == 1
    crl = x509.load_der_x509_crl(listing[0].der)
    assert crl.is_signature_valid(ca_key)
    assert crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None

    # openssl, as a relying party: each leaf against the CA and the CRL of its shard.
    for name, path in leaves.items():
        leaf = x509.load_pem_x509_certificate(path.read_bytes())
        point = leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        url = point[0].full_name[0].value
        number = int(url.rsplit("/", 1)[1].removesuffix(".crl"))
        own = await publisher.current(number)
        assert own is not None
        code, out = await openssl_verify(
            token_ca.cert_path, pem_crl(own.der, tmp_path / f"{name}.crl.pem"), path
        )
        if name == "kept":
            assert code == 0, out
        else:
            assert code != 0
            assert "certificate revoked" in out, out

    # pkilint, as an auditor: the leaves, the CA and the CRL.
    crl_path = tmp_path / "shard.crl"
    crl_path.write_bytes(listing[0].der)
    checks = [
        ("lint_cabf_serverauth_cert", leaves["revoked"], ("-t", "DV-FINAL-CERTIFICATE")),
        ("lint_cabf_serverauth_cert", token_ca.cert_path, ("-t", "ROOT-CA")),
        ("lint_crl", crl_path, ("-t", "CRL", "-p", "BR")),
    ]
    reports = await lint_all(checks)
    for check, findings in zip(checks, reports, strict=True):
        assert errors(findings) == [], (check, findings)


async def test_a_reset_token_is_logged_in_again_and_a_lost_one_is_unavailable(
    start_cert_service: StartCertService, token_ca: TokenCa
) -> None:
    service = await start_cert_service(**token_ca_env(token_ca))
    library = pkcs11.lib(token_ca.module)
    pin = token_ca.pin_path.read_text()
    async with gateway_identity.channel(service.address) as channel:
        stub = cert_pb2_grpc.CertificateServiceStub(channel)

        async def provision(device_id: str) -> None:
            await stub.ProvisionCertificate(
                cert_pb2.ProvisionCertificateRequest(device_id=device_id)
            )

        await provision("before")
        # Every session of this process is gone, as after the token's reset.
        library.reinitialize()
        await provision("after-reset")

        # And now the service's next login fails too: its PIN was changed meanwhile.
        library.reinitialize()
        token = library.get_token(token_label=TOKEN_LABEL)
        with token.open(rw=True, user_pin=pin) as session:
            session.set_pin(pin, pin + "-changed")
        try:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await provision("while-lost")
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_reason(info.value) == "CA_TOKEN_UNAVAILABLE"
        finally:
            with token.open(rw=True, user_pin=pin + "-changed") as session:
                session.set_pin(pin + "-changed", pin)
        await provision("while-lost")


def test_the_key_never_leaves_the_token(token_ca: TokenCa) -> None:
    token = pkcs11.lib(token_ca.module).get_token(token_label=TOKEN_LABEL)
    with token.open(user_pin=token_ca.pin_path.read_text()) as session:
        key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="ca")
        # Made inside the token and never extractable since: not an imported file key.
        assert key[Attribute.LOCAL] is True
        assert key[Attribute.NEVER_EXTRACTABLE] is True
        assert key[Attribute.ALWAYS_SENSITIVE] is True
        assert key[Attribute.EXTRACTABLE] is False
        with pytest.raises(pkcs11.AttributeSensitive):
            key[Attribute.VALUE]
    # Nor is it anywhere in the CA's directory.
    for path in token_ca.directory.glob("*"):
        if path.is_file():
            assert b"PRIVATE KEY" not in path.read_bytes(), path


def test_an_rsa_key_in_the_token_signs_certificates_and_crls(
    token_ca: TokenCa, tmp_path: Path
) -> None:
    pin = token_ca.pin_path.read_text()
    token = pkcs11.lib(token_ca.module).get_token(token_label=TOKEN_LABEL)
    with token.open(rw=True, user_pin=pin) as session:
        public, _ = session.generate_keypair(
            KeyType.RSA,
            2048,
            label=f"rsa-{tmp_path.name}",
            store=True,
            private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
        )
        public_key = serialization.load_der_public_key(encode_rsa_public_key(public))
    assert isinstance(public_key, rsa.RSAPublicKey)
    uri = Pkcs11Uri.parse(
        f"pkcs11:token={TOKEN_LABEL};object=rsa-{tmp_path.name}?module-path={token_ca.module}"
    )
    signer = Pkcs11Signer.open(uri, pin, public_key)
    try:
        ca_cert = ca_certificate(signer, CaSubject(common_name="myl RSA CA"))
        ca = LocalCertificateAuthority(ca_cert, signer)
        now = datetime.now(UTC)
        leaf = ca.issue(generate_private_key()[0], ["rsa.myl.zip"], now, now + timedelta(days=1))
        entry = RevokedEntry("0a1b", now, "key_compromise")
        assert leaf.crl_shard is not None
        der = sign_crl(ca, leaf.crl_shard, 1, now, now + timedelta(days=1), [entry])
    finally:
        signer.close()
    issued = x509.load_pem_x509_certificate(leaf.leaf_pem.encode())
    issued.verify_directly_issued_by(ca_cert)
    assert x509.load_der_x509_crl(der).is_signature_valid(public_key)
    ca_path, leaf_path = tmp_path / "ca.pem", tmp_path / "leaf.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    leaf_path.write_text(leaf.leaf_pem)
    done = subprocess.run(
        ["openssl", "verify", "-crl_check", "-CAfile", str(ca_path), "-CRLfile",
         str(pem_crl(der, tmp_path / "crl.pem")), str(leaf_path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def _config(token_ca: TokenCa, **env: str) -> CertServiceConfig:
    return CertServiceConfig.from_env({**token_ca_env(token_ca), **env})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"CA_KEY_PIN_FILE": "", "CA_KEY_PIN": "not-the-pin"}, "refused the PIN"),
        ({"CA_KEY_URI": "pkcs11:token=absent;object=ca?module-path={module}"}, "no token"),
        ({"CA_KEY_URI": f"pkcs11:token={TOKEN_LABEL};object=absent?module-path={{module}}"},
         "no private key"),
        ({"CA_KEY_URI": "pkcs11:object=ca?module-path=/nonexistent/libpkcs11.so"},
         "cannot load the PKCS#11 module"),
    ],
    ids=["wrong-pin", "no-token", "no-key", "no-module"],
)  # fmt: skip
def test_an_unusable_token_is_a_start_up_error_naming_ca_key_uri(
    token_ca: TokenCa, change: dict[str, str], message: str
) -> None:
    change = {name: value.format(module=token_ca.module) for name, value in change.items()}
    with pytest.raises(Exception, match=message) as info:
        load_ca(_config(token_ca, **change))
    assert "CA_KEY_URI" in str(info.value)
    assert "not-the-pin" not in str(info.value)


def test_a_key_that_does_not_match_the_certificate_is_refused(
    token_ca: TokenCa, ca_files: tuple[Path, Path]
) -> None:
    with pytest.raises(Exception, match="does not match the CA certificate") as info:
        load_ca(_config(token_ca, CA_CERT_FILE=str(ca_files[0])))
    assert "CA_KEY_URI" in str(info.value)


def test_config_refuses_a_pin_in_the_uri_without_showing_it(token_ca: TokenCa) -> None:
    uri = f"pkcs11:token={TOKEN_LABEL};object=ca?module-path={token_ca.module}&pin-value=1234"
    with pytest.raises(ConfigError, match="CA_KEY_URI") as info:
        _config(token_ca, CA_KEY_URI=uri)
    assert "1234" not in str(info.value)
    with pytest.raises(ConfigError, match="CA_KEY_FILE"):
        _config(token_ca, CA_KEY_FILE="/ca/ca.key")
    with pytest.raises(ConfigError, match="CA_KEY_PIN_FILE"):
        _config(token_ca, CA_KEY_PIN_FILE="")
    config = _config(token_ca)
    assert config.ca_key_pin == token_ca.pin_path.read_text()
    assert config.ca_key_pin not in repr(config)
    # The ACME server's EAB keys cannot derive from a key nobody can read.
    with pytest.raises(ConfigError, match="ACME_EAB_SECRET_FILE"):
        _config(token_ca, ACME_SERVER_PORT="0")


def test_serve_with_a_wrong_pin_exits_2_naming_ca_key_uri(token_ca: TokenCa) -> None:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CA_", "CERT_SERVICE_", "DB_", "REDIS_"))
    }
    env.update(token_ca_env(token_ca), CA_KEY_PIN_FILE="", CA_KEY_PIN="not-the-pin")
    env.update(internal_tls.service_env("cert_service"))
    done = subprocess.run(
        [sys.executable, "-m", "cert_service", "serve"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "CA_KEY_URI" in done.stderr
    assert "refused the PIN" in done.stderr
    assert "Traceback" not in done.stderr
    assert "not-the-pin" not in done.stderr
