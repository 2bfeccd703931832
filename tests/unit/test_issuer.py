"""Unit tests for cert_service.issuer: CSR checks, key checks and the local CA."""

from __future__ import annotations

import hashlib
import ipaddress
import stat
import subprocess
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from cert_service.ca import (
    CaSubject,
    CertificateAuthorityError,
    LocalCertificateAuthority,
    PkiLocations,
    create_development_ca,
)
from cert_service.issuer import (
    CsrError,
    IssuedCertificate,
    Issuer,
    PublicKeyError,
    generate_private_key,
    load_csr,
    load_public_key,
    serial_hex,
)

NAME = "test-device.myl.zip"
WILDCARD_NAMES = [NAME, "*." + NAME]

CsrKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


# --- helpers and fixtures -------------------------------------------------------------------


def make_csr(
    key: CsrKey,
    dns_names: Sequence[str] = (NAME,),
    common_name: str | None = NAME,
    extra: Sequence[x509.GeneralName] = (),
    algorithm: hashes.SHA224 | hashes.SHA256 | None = None,
) -> str:
    subject = (
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        if common_name is not None
        else x509.Name([])
    )
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    general_names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    general_names.extend(extra)
    if general_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(general_names), critical=False)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        csr = builder.sign(key, None)
    else:
        csr = builder.sign(key, algorithm or hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def spki(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def make_ca(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    not_after: datetime,
    *,
    ca: bool = True,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unit test CA")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime(2020, 1, 1, tzinfo=UTC))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return create_development_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def ca(ca_dir: tuple[Path, Path]) -> LocalCertificateAuthority:
    return LocalCertificateAuthority.from_files(*ca_dir)


@pytest.fixture(scope="module")
def now(ca: LocalCertificateAuthority) -> datetime:
    """A fixed instant inside the CA's validity, with sub-second noise."""
    return ca.certificate.not_valid_before_utc + timedelta(days=1, microseconds=654321)


@pytest.fixture(scope="module")
def p256_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def rsa2048_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


# --- issuing --------------------------------------------------------------------------------


def test_local_ca_satisfies_issuer_protocol(ca: LocalCertificateAuthority) -> None:
    issuer: Issuer = ca
    assert issuer.ca_chain_pem() == ca.certificate.public_bytes(serialization.Encoding.PEM).decode(
        "ascii"
    )


def test_leaf_names_its_crl_shard_issuer_url_and_policies(
    ca_dir: tuple[Path, Path], p256_key: ec.EllipticCurvePrivateKey, now: datetime
) -> None:
    locations = PkiLocations("http://pki.example.net:8080", crl_shards=7, policy_oid="1.2.3.4")
    ca = LocalCertificateAuthority.from_files(*ca_dir, locations=locations)
    shards = set()
    for _ in range(40):
        issued = ca.issue(p256_key.public_key(), [NAME], now, now + timedelta(days=90))
        cert = x509.load_pem_x509_certificate(issued.leaf_pem.encode())
        assert issued.crl_shard is not None
        assert issued.crl_shard == int(issued.serial_hex, 16) % 7
        shards.add(issued.crl_shard)
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        [point] = list(points)
        assert point.full_name == [
            x509.UniformResourceIdentifier(
                f"http://pki.example.net:8080/pki/crls/{issued.crl_shard}.crl"
            )
        ]
        access = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
        assert [(a.access_method, a.access_location.value) for a in access] == [
            (AuthorityInformationAccessOID.CA_ISSUERS, "http://pki.example.net:8080/pki/ca.cer")
        ]
        policies = cert.extensions.get_extension_for_class(x509.CertificatePolicies).value
        assert [p.policy_identifier.dotted_string for p in policies] == [
            "2.23.140.1.2.1",
            "1.2.3.4",
        ]
        assert issued.issuer_key_id == ca.key_id.hex()
    assert len(shards) > 3  # spread over the shards


def test_pki_locations_refuse_https_and_bad_shard_counts() -> None:
    with pytest.raises(ValueError, match="http://"):
        PkiLocations("https://pki.example.net")
    with pytest.raises(ValueError, match="crl_shards"):
        PkiLocations("http://pki.example.net", crl_shards=0)


def test_issue_wildcard_certificate(
    ca: LocalCertificateAuthority, p256_key: ec.EllipticCurvePrivateKey, now: datetime
) -> None:
    public_key = p256_key.public_key()
    issued = ca.issue(public_key, WILDCARD_NAMES, now, now + timedelta(days=90))
    cert = x509.load_pem_x509_certificate(issued.leaf_pem.encode())
    ca_cert = ca.certificate

    cert.verify_directly_issued_by(ca_cert)
    ca_public_key = ca_cert.public_key()
    assert isinstance(ca_public_key, ec.EllipticCurvePublicKey)
    assert cert.signature_hash_algorithm is not None
    ca_public_key.verify(
        cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
    )
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == WILDCARD_NAMES
    assert not san.critical
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == NAME
    assert cert.issuer == ca_cert.subject
    assert (
        issued.issuer
        == ca_cert.subject.rfc4514_string()
        == "CN=myl development CA,O=myl device identity,C=XX"
    )
    assert issued.dns_names == WILDCARD_NAMES

    expected_start = now.replace(microsecond=0)
    assert cert.not_valid_before_utc == issued.not_before == expected_start
    assert cert.not_valid_after_utc == issued.not_after == expected_start + timedelta(days=90)
    assert issued.not_before.tzinfo is not None
    assert issued.not_before.utcoffset() == timedelta(0)

    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not usage.value.key_encipherment
    assert not usage.value.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(public_key)
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest

    assert int(issued.serial_hex, 16) == cert.serial_number
    assert issued.serial_hex == issued.serial_hex.lower()
    assert len(issued.serial_hex) % 2 == 0
    assert 0 < cert.serial_number < 2**159
    der = cert.public_bytes(serialization.Encoding.DER)
    assert issued.fingerprint_sha256 == hashlib.sha256(der).hexdigest()
    assert issued.public_key_sha256 == hashlib.sha256(spki(public_key)).hexdigest()
    assert spki(load_public_key(issued.public_key_pem)) == spki(public_key)

    chain = x509.load_pem_x509_certificates(issued.chain_pem.encode())
    assert chain == [cert, ca_cert]
    assert issued.chain_pem == issued.leaf_pem + ca.ca_chain_pem()


def test_issue_single_name(
    ca: LocalCertificateAuthority, p256_key: ec.EllipticCurvePrivateKey, now: datetime
) -> None:
    issued = ca.issue(p256_key.public_key(), [NAME], now, now + timedelta(days=30))
    cert = x509.load_pem_x509_certificate(issued.leaf_pem.encode())
    cert.verify_directly_issued_by(ca.certificate)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [NAME]
    assert issued.dns_names == [NAME]


def test_issue_rsa_leaf_gets_key_encipherment(
    ca: LocalCertificateAuthority, rsa2048_key: rsa.RSAPrivateKey, now: datetime
) -> None:
    issued = ca.issue(rsa2048_key.public_key(), [NAME], now, now + timedelta(days=1))
    cert = x509.load_pem_x509_certificate(issued.leaf_pem.encode())
    cert.verify_directly_issued_by(ca.certificate)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature
    assert usage.key_encipherment


def test_issue_serials_are_unique(
    ca: LocalCertificateAuthority, p256_key: ec.EllipticCurvePrivateKey, now: datetime
) -> None:
    serials = {
        ca.issue(p256_key.public_key(), [NAME], now, now + timedelta(days=1)).serial_hex
        for _ in range(50)
    }
    assert len(serials) == 50


def test_issue_normalizes_names_and_time_zone(
    ca: LocalCertificateAuthority, p256_key: ec.EllipticCurvePrivateKey
) -> None:
    start = datetime(2030, 6, 1, 14, 30, 15, 999999, tzinfo=timezone(timedelta(hours=2)))
    issued = ca.issue(
        p256_key.public_key(), ["Test-Device.MYL.zip", NAME], start, start + timedelta(hours=1)
    )
    assert issued.dns_names == [NAME]
    assert issued.not_before == datetime(2030, 6, 1, 12, 30, 15, tzinfo=UTC)
    assert issued.not_before.tzinfo is UTC
    assert issued.not_after == datetime(2030, 6, 1, 13, 30, 15, tzinfo=UTC)


def test_issue_clips_to_ca_expiry(
    ca: LocalCertificateAuthority, p256_key: ec.EllipticCurvePrivateKey, now: datetime
) -> None:
    ca_end = ca.certificate.not_valid_after_utc
    issued = ca.issue(p256_key.public_key(), [NAME], now, ca_end + timedelta(days=365))
    cert = x509.load_pem_x509_certificate(issued.leaf_pem.encode())
    assert issued.not_after == cert.not_valid_after_utc == ca_end


def test_issue_long_name_has_no_common_name(
    ca: LocalCertificateAuthority, p256_key: ec.EllipticCurvePrivateKey, now: datetime
) -> None:
    long_name = "a" * 63 + ".myl.zip"
    issued = ca.issue(p256_key.public_key(), [long_name], now, now + timedelta(days=1))
    cert = x509.load_pem_x509_certificate(issued.leaf_pem.encode())
    cert.verify_directly_issued_by(ca.certificate)
    assert len(cert.subject) == 0
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.DNSName) == [long_name]


def test_issue_rejects_bad_arguments(
    ca: LocalCertificateAuthority, p256_key: ec.EllipticCurvePrivateKey, now: datetime
) -> None:
    key = p256_key.public_key()
    later = now + timedelta(days=1)
    with pytest.raises(ValueError, match="timezone-aware"):
        ca.issue(key, [NAME], now.replace(tzinfo=None), later)
    with pytest.raises(ValueError, match="timezone-aware"):
        ca.issue(key, [NAME], now, later.replace(tzinfo=None))
    with pytest.raises(ValueError, match="later than"):
        ca.issue(key, [NAME], later, now)
    with pytest.raises(ValueError, match="later than"):
        ca.issue(key, [NAME], now, now + timedelta(microseconds=10))
    with pytest.raises(ValueError, match="DNS name"):
        ca.issue(key, [], now, later)
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    with pytest.raises(ValueError, match="too short"):
        ca.issue(small, [NAME], now, later)


def test_p384_ca_signs_with_sha384(p256_key: ec.EllipticCurvePrivateKey) -> None:
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = make_ca(ca_key, datetime(2040, 1, 1, tzinfo=UTC))
    authority = LocalCertificateAuthority(ca_cert, ca_key)
    start = datetime(2030, 1, 1, tzinfo=UTC)
    issued = authority.issue(p256_key.public_key(), [NAME], start, start + timedelta(days=1))
    cert = x509.load_pem_x509_certificate(issued.leaf_pem.encode())
    cert.verify_directly_issued_by(ca_cert)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA384)
    # No subjectKeyIdentifier on this CA: the authority key id comes from its public key.
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    expected = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    assert aki.key_identifier == expected.key_identifier


def test_rsa_ca(rsa2048_key: rsa.RSAPrivateKey, p256_key: ec.EllipticCurvePrivateKey) -> None:
    ca_cert = make_ca(rsa2048_key, datetime(2040, 1, 1, tzinfo=UTC))
    authority = LocalCertificateAuthority(ca_cert, rsa2048_key)
    start = datetime(2030, 1, 1, tzinfo=UTC)
    issued = authority.issue(p256_key.public_key(), [NAME], start, start + timedelta(days=1))
    cert = x509.load_pem_x509_certificate(issued.leaf_pem.encode())
    assert cert.signature_hash_algorithm is not None
    rsa2048_key.public_key().verify(
        cert.signature,
        cert.tbs_certificate_bytes,
        padding.PKCS1v15(),
        cert.signature_hash_algorithm,
    )


def test_ca_constructor_refuses_mismatch_and_non_ca(
    p256_key: ec.EllipticCurvePrivateKey,
) -> None:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = make_ca(ca_key, datetime(2040, 1, 1, tzinfo=UTC))
    with pytest.raises(CertificateAuthorityError, match="does not match"):
        LocalCertificateAuthority(ca_cert, p256_key)
    leaf_like = make_ca(ca_key, datetime(2040, 1, 1, tzinfo=UTC), ca=False)
    with pytest.raises(CertificateAuthorityError, match="not a CA"):
        LocalCertificateAuthority(leaf_like, ca_key)


# --- CSRs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["p256", "p384", "rsa2048"])
def test_load_csr_accepts_supported_keys(kind: str, rsa2048_key: rsa.RSAPrivateKey) -> None:
    key: CsrKey
    if kind == "p256":
        key = ec.generate_private_key(ec.SECP256R1())
    elif kind == "p384":
        key = ec.generate_private_key(ec.SECP384R1())
    else:
        key = rsa2048_key
    public_key = load_csr(make_csr(key, WILDCARD_NAMES), WILDCARD_NAMES)
    assert spki(public_key) == spki(key.public_key())


def test_load_csr_name_variants(p256_key: ec.EllipticCurvePrivateKey) -> None:
    expected = spki(p256_key.public_key())
    # Subset of the allowed names, different case, CN only, and no names at all.
    assert spki(load_csr(make_csr(p256_key, [NAME.upper()]), WILDCARD_NAMES)) == expected
    assert spki(load_csr(make_csr(p256_key, []), [NAME])) == expected
    assert spki(load_csr(make_csr(p256_key, [], common_name=None), [NAME])) == expected
    pem = make_csr(p256_key, ["*." + NAME], common_name=None)
    assert spki(load_csr(pem, WILDCARD_NAMES)) == expected
    reordered = load_csr(make_csr(p256_key, sorted(WILDCARD_NAMES)), WILDCARD_NAMES)
    assert spki(reordered) == expected


def test_load_csr_end_to_end(
    ca: LocalCertificateAuthority, p256_key: ec.EllipticCurvePrivateKey, now: datetime
) -> None:
    public_key = load_csr(make_csr(p256_key, WILDCARD_NAMES), WILDCARD_NAMES)
    issued: IssuedCertificate = ca.issue(public_key, WILDCARD_NAMES, now, now + timedelta(days=1))
    cert = x509.load_pem_x509_certificate(issued.leaf_pem.encode())
    cert.verify_directly_issued_by(ca.certificate)
    assert spki(cert.public_key()) == spki(p256_key.public_key())


@pytest.mark.parametrize(
    ("dns_names", "common_name", "extra", "message"),
    [
        (["evil.com"], NAME, [], "'evil.com'"),
        ([NAME, "other.myl.zip"], NAME, [], "'other.myl.zip'"),
        (["*." + NAME], NAME, [], "'*.test-device.myl.zip'"),  # wildcard not allowed here
        ([NAME], "other.myl.zip", [], "'other.myl.zip'"),
        ([NAME + "."], NAME, [], "not allowed"),
        ([NAME], NAME, [x509.IPAddress(ipaddress.ip_address("10.0.0.1"))], "IPAddress"),
        ([NAME], NAME, [x509.RFC822Name("a@myl.zip")], "RFC822Name"),
        ([NAME], NAME, [x509.UniformResourceIdentifier("https://x")], "UniformResource"),
    ],
)
def test_load_csr_refuses_foreign_names(
    p256_key: ec.EllipticCurvePrivateKey,
    dns_names: list[str],
    common_name: str,
    extra: list[x509.GeneralName],
    message: str,
) -> None:
    pem = make_csr(p256_key, dns_names, common_name=common_name, extra=extra)
    with pytest.raises(CsrError, match=message.replace("*", r"\*").replace(".", r"\.")):
        load_csr(pem, [NAME])


def test_load_csr_refuses_bad_signature(p256_key: ec.EllipticCurvePrivateKey) -> None:
    pem = make_csr(p256_key)
    der = bytearray(x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # last byte of the signature value
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CsrError, match="signature is invalid"):
        load_csr(tampered.decode(), [NAME])


def test_load_csr_refuses_csr_signed_by_other_key(p256_key: ec.EllipticCurvePrivateKey) -> None:
    """Public key of one CSR with the signature of another: no proof of possession."""
    other = ec.generate_private_key(ec.SECP256R1())
    first = x509.load_pem_x509_csr(make_csr(p256_key).encode())
    second = x509.load_pem_x509_csr(make_csr(other).encode())
    first_der = first.public_bytes(serialization.Encoding.DER)
    spliced = first_der.replace(spki(p256_key.public_key()), spki(other.public_key()))
    assert spliced != first_der
    assert second.is_signature_valid
    pem = x509.load_der_x509_csr(spliced).public_bytes(serialization.Encoding.PEM).decode()
    with pytest.raises(CsrError, match="signature is invalid"):
        load_csr(pem, [NAME])


@pytest.mark.parametrize(
    ("key_factory", "message"),
    [
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024), "too short"),
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=1536), "too short"),
        (lambda: ec.generate_private_key(ec.SECP521R1()), "secp521r1"),
        (lambda: ec.generate_private_key(ec.SECP256K1()), "secp256k1"),
        (ed25519.Ed25519PrivateKey.generate, "Ed25519"),
    ],
    ids=["rsa1024", "rsa1536", "p521", "secp256k1", "ed25519"],
)
def test_load_csr_refuses_key_types(key_factory: Callable[[], CsrKey], message: str) -> None:
    key = key_factory()
    with pytest.raises(CsrError, match=message):
        load_csr(make_csr(key), [NAME])


def _der(tag: int, body: bytes) -> bytes:
    if len(body) < 0x80:
        return bytes([tag, len(body)]) + body
    length = len(body).to_bytes((len(body).bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + body


def test_load_csr_refuses_sha1_signature(p256_key: ec.EllipticCurvePrivateKey) -> None:
    """cryptography no longer signs CSRs with SHA-1, so the request is assembled by hand."""
    tbs = x509.load_pem_x509_csr(make_csr(p256_key).encode()).tbs_certrequest_bytes
    ecdsa_with_sha1 = _der(0x30, _der(0x06, bytes.fromhex("2a8648ce3d0401")))
    signature = p256_key.sign(tbs, ec.ECDSA(hashes.SHA1()))
    csr = x509.load_der_x509_csr(_der(0x30, tbs + ecdsa_with_sha1 + _der(0x03, b"\0" + signature)))
    assert isinstance(csr.signature_hash_algorithm, hashes.SHA1)
    pem = csr.public_bytes(serialization.Encoding.PEM).decode()
    with pytest.raises(CsrError, match="SHA-256"):
        load_csr(pem, [NAME])


def test_load_csr_refuses_sha224_signature(p256_key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(CsrError, match="SHA-256"):
        load_csr(make_csr(p256_key, algorithm=hashes.SHA224()), [NAME])


@pytest.mark.parametrize(
    ("pem", "message"),
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("not a csr", "not a valid PEM"),
        ("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "valid"),
        ("x" * (16 * 1024 + 1), "larger than"),
        ("-----BEGIN CERTIFICATE REQUEST-----\né\n-----END CERTIFICATE REQUEST-----\n", "ASCII"),
    ],
)
def test_load_csr_refuses_garbage(pem: str, message: str) -> None:
    with pytest.raises(CsrError, match=message):
        load_csr(pem, [NAME])


def test_load_csr_refuses_certificate_pem(ca: LocalCertificateAuthority) -> None:
    with pytest.raises(CsrError, match="not a valid PEM"):
        load_csr(ca.ca_chain_pem(), [NAME])


# --- public keys ----------------------------------------------------------------------------


def test_load_public_key_roundtrip(rsa2048_key: rsa.RSAPrivateKey) -> None:
    for key in (rsa2048_key.public_key(), ec.generate_private_key(ec.SECP384R1()).public_key()):
        pem = key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
        assert spki(load_public_key(pem)) == spki(key)


def test_load_public_key_refuses_oversized_rsa() -> None:
    modulus = (1 << 8199) | 0xFFFF  # 8200 bits, odd; only the size matters here
    key = rsa.RSAPublicNumbers(65537, modulus).public_key()
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    with pytest.raises(PublicKeyError, match="too long"):
        load_public_key(pem)


def test_load_public_key_refuses_ed25519_and_garbage() -> None:
    pem = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    with pytest.raises(PublicKeyError, match="Ed25519"):
        load_public_key(pem)
    with pytest.raises(PublicKeyError, match="not a valid PEM"):
        load_public_key("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    with pytest.raises(PublicKeyError, match="empty"):
        load_public_key("")


def test_generate_private_key() -> None:
    public_key, pem = generate_private_key()
    assert pem.startswith("-----BEGIN PRIVATE KEY-----\n")  # PKCS#8, unencrypted
    private_key = serialization.load_pem_private_key(pem.encode(), password=None)
    assert isinstance(private_key, ec.EllipticCurvePrivateKey)
    assert isinstance(private_key.curve, ec.SECP256R1)
    assert spki(private_key.public_key()) == spki(public_key)
    assert spki(generate_private_key()[0]) != spki(public_key)


# --- development CA and files ---------------------------------------------------------------


def test_create_development_ca(tmp_path: Path) -> None:
    directory = tmp_path / "nested" / "ca"
    cert_path, key_path = create_development_ca(
        directory, CaSubject(country="DE", organization="Example GmbH", common_name="dev CA")
    )
    assert (cert_path, key_path) == (directory / "ca.crt", directory / "ca.key")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    cert_bytes, key_bytes = cert_path.read_bytes(), key_path.read_bytes()

    cert = x509.load_pem_x509_certificate(cert_bytes)
    cert.verify_directly_issued_by(cert)
    assert cert.subject.rfc4514_string() == "CN=dev CA,O=Example GmbH,C=DE"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert usage.crl_sign
    validity = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=3650) <= validity <= timedelta(days=3651)
    key = serialization.load_pem_private_key(key_bytes, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)

    # Idempotent: a second call keeps both files byte for byte.
    assert create_development_ca(directory, CaSubject(common_name="other")) == (
        cert_path,
        key_path,
    )
    assert cert_path.read_bytes() == cert_bytes
    assert key_path.read_bytes() == key_bytes
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    LocalCertificateAuthority.from_files(cert_path, key_path)


def test_create_development_ca_refuses_partial_state(tmp_path: Path) -> None:
    cert_path, key_path = create_development_ca(tmp_path)
    key_path.unlink()
    with pytest.raises(CertificateAuthorityError, match="refusing"):
        create_development_ca(tmp_path)
    assert not key_path.exists()
    assert cert_path.exists()


def test_from_files_errors_name_the_path(tmp_path: Path, ca_dir: tuple[Path, Path]) -> None:
    cert_path, key_path = ca_dir
    missing = tmp_path / "missing.crt"
    with pytest.raises(CertificateAuthorityError, match=str(missing)):
        LocalCertificateAuthority.from_files(missing, key_path)
    with pytest.raises(CertificateAuthorityError, match=str(missing)):
        LocalCertificateAuthority.from_files(cert_path, missing)

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("nonsense")
    with pytest.raises(CertificateAuthorityError, match=str(garbage)):
        LocalCertificateAuthority.from_files(garbage, key_path)
    with pytest.raises(CertificateAuthorityError, match=str(garbage)):
        LocalCertificateAuthority.from_files(cert_path, garbage)

    _other_cert, other_key = create_development_ca(tmp_path / "other")
    with pytest.raises(CertificateAuthorityError, match="does not match") as info:
        LocalCertificateAuthority.from_files(cert_path, other_key)
    assert str(other_key) in str(info.value)


def _der_length(n: int) -> bytes:
    if n < 128:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def test_csr_with_a_duplicated_extension_is_a_csr_error() -> None:
    """A validly signed CSR carrying subjectAltName twice (the builder refuses to
    make one, so the second extension's OID is patched in and the CSR re-signed)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dup.myl.zip")]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("dup.myl.zip")]), False)
        .add_extension(x509.IssuerAlternativeName([x509.DNSName("dup.myl.zip")]), False)
        .sign(key, hashes.SHA256())
    )
    tbs = csr.tbs_certrequest_bytes.replace(b"\x06\x03\x55\x1d\x12", b"\x06\x03\x55\x1d\x11")
    signature = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    algorithm = b"\x30\x0a\x06\x08\x2a\x86\x48\xce\x3d\x04\x03\x02"
    bits = b"\x03" + _der_length(len(signature) + 1) + b"\x00" + signature
    body = tbs + algorithm + bits
    der = b"\x30" + _der_length(len(body)) + body
    pem = x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM).decode()
    with pytest.raises(CsrError, match="malformed"):
        load_csr(pem, ["dup.myl.zip", "*.dup.myl.zip"])


@pytest.mark.parametrize("serial", [0x0862ED3B1F, 0x862ED3B1F0, 0x80, 0x7F, 1])
def test_serial_number_shows_the_digits_openssl_prints(serial: int, tmp_path: Path) -> None:
    """The API's serialNumber is what `openssl x509 -serial` shows, leading zero included
    (in lowercase), so a user finds the certificate in the CRL's text by its serial."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "serial")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    pem = tmp_path / "cert.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    shown = subprocess.run(
        ["openssl", "x509", "-in", str(pem), "-noout", "-serial"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert shown == "serial=" + serial_hex(serial).upper()
