"""The built-in certificate authority: signs device certificates with a CA key the service holds.

Decisions:

* Time is always supplied by the caller; nothing here reads the clock except
  :func:`create_development_ca`.
* Validity is truncated to whole seconds (X.509 resolution) and ``not_after`` is clipped to the
  CA's own expiry; :class:`IssuedCertificate` reports the values actually in the certificate.
* If the first DNS name is longer than the 64 characters allowed in a common name, the subject is
  left empty and the subjectAltName extension is marked critical (RFC 5280, 4.2.1.6).
* Everything that does not depend on the leaf (issuer name, authority key identifier, CA PEM,
  hash algorithm) is computed once per CA, keeping ``issue`` at a single ECDSA signature plus
  encoding work.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, TypeAlias

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cert_service.issuer import MIN_RSA_BITS, IssuedCertificate, PublicKey, checked_key, spki_der
from cert_service.randomness import serial_number

__all__ = [
    "CertificateAuthorityError",
    "LocalCertificateAuthority",
    "create_development_ca",
]

CaPrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

_MAX_COMMON_NAME_LENGTH: Final = 64
_DEVELOPMENT_CA_VALIDITY: Final = timedelta(days=3650)


class CertificateAuthorityError(Exception):
    """The CA certificate or key cannot be used (missing, unreadable, invalid or mismatched)."""


def _ca_hash(key: CaPrivateKey) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if isinstance(key.curve, ec.SECP384R1):
            return hashes.SHA384()
        if isinstance(key.curve, ec.SECP521R1):
            return hashes.SHA512()
    return hashes.SHA256()


def _utc_seconds(value: datetime, what: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware")
    return value.astimezone(UTC).replace(microsecond=0)


class LocalCertificateAuthority:
    """The built-in CA: signs device certificates with a CA key held by the service.

    Implements :class:`Issuer`. The CA certificate must be a CA (basicConstraints CA=true, and
    keyCertSign if keyUsage is present) and must match the private key. Supported CA keys: EC
    P-256 (SHA-256), P-384 (SHA-384), P-521 (SHA-512) and RSA >= 2048 bits (SHA-256).
    """

    def __init__(self, certificate: x509.Certificate, private_key: CaPrivateKey) -> None:
        if isinstance(private_key, ec.EllipticCurvePrivateKey):
            if not isinstance(private_key.curve, ec.SECP256R1 | ec.SECP384R1 | ec.SECP521R1):
                raise CertificateAuthorityError(f"unsupported CA curve {private_key.curve.name}")
        elif isinstance(private_key, rsa.RSAPrivateKey):
            if private_key.key_size < MIN_RSA_BITS:
                raise CertificateAuthorityError("CA RSA key is shorter than 2048 bits")
        else:
            raise CertificateAuthorityError(f"unsupported CA key type {type(private_key).__name__}")
        if spki_der(private_key.public_key()) != spki_der(certificate):
            raise CertificateAuthorityError("CA private key does not match the CA certificate")
        try:
            constraints = certificate.extensions.get_extension_for_class(
                x509.BasicConstraints
            ).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise CertificateAuthorityError("CA certificate is not a CA (basicConstraints CA=true)")
        try:
            usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            usage = None
        if usage is not None and not usage.key_cert_sign:
            raise CertificateAuthorityError("CA certificate keyUsage lacks keyCertSign")

        self._certificate = certificate
        self._private_key = private_key
        self._hash = _ca_hash(private_key)
        self._ca_pem = certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
        self._issuer_name = certificate.subject
        self._issuer_string = certificate.subject.rfc4514_string()
        self._not_after = certificate.not_valid_after_utc
        try:
            ski = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        except x509.ExtensionNotFound:
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(private_key.public_key())
        else:
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        self._basic_constraints = x509.BasicConstraints(ca=False, path_length=None)
        self._leaf_key_usage = {
            is_rsa: x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=is_rsa,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            )
            for is_rsa in (False, True)
        }
        self._eku = x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        )

    @classmethod
    def from_files(
        cls, cert_path: Path, key_path: Path, *, password: bytes | None = None
    ) -> LocalCertificateAuthority:
        """Load a PEM CA certificate and PEM private key; errors name the offending path."""
        try:
            cert_data = Path(cert_path).read_bytes()
        except OSError as exc:
            raise CertificateAuthorityError(
                f"cannot read CA certificate {cert_path}: {exc.strerror or exc}"
            ) from exc
        try:
            certificate = x509.load_pem_x509_certificate(cert_data)
        except ValueError as exc:
            raise CertificateAuthorityError(
                f"CA certificate {cert_path} is not a valid PEM certificate"
            ) from exc
        try:
            key_data = Path(key_path).read_bytes()
        except OSError as exc:
            raise CertificateAuthorityError(
                f"cannot read CA key {key_path}: {exc.strerror or exc}"
            ) from exc
        try:
            private_key = serialization.load_pem_private_key(key_data, password=password)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise CertificateAuthorityError(
                f"CA key {key_path} is not a usable PEM private key ({exc})"
            ) from exc
        if not isinstance(private_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise CertificateAuthorityError(
                f"CA key {key_path} has unsupported type {type(private_key).__name__}"
            )
        try:
            return cls(certificate, private_key)
        except CertificateAuthorityError as exc:
            raise CertificateAuthorityError(
                f"{exc} (certificate {cert_path}, key {key_path})"
            ) from exc

    @property
    def certificate(self) -> x509.Certificate:
        return self._certificate

    def ca_chain_pem(self) -> str:
        """PEM of the CA certificate that clients need to trust device certificates."""
        return self._ca_pem

    def issue(
        self,
        public_key: PublicKey,
        dns_names: Sequence[str],
        not_before: datetime,
        not_after: datetime,
    ) -> IssuedCertificate:
        """Sign an end-entity certificate for ``public_key`` covering ``dns_names``.

        Names are lowercased and de-duplicated (order kept); they are expected to be validated
        already (see ``cert_service.names``). Raises ``ValueError`` for an unsupported key, no
        names, naive datetimes or an empty validity window.
        """
        checked_key(public_key, ValueError)
        names = list(dict.fromkeys(name.lower() for name in dns_names))
        if not names:
            raise ValueError("at least one DNS name is required")
        start = _utc_seconds(not_before, "not_before")
        end = min(_utc_seconds(not_after, "not_after"), self._not_after)
        if end <= start:
            raise ValueError("not_after must be later than not_before (and the CA's expiry)")

        if len(names[0]) <= _MAX_COMMON_NAME_LENGTH:
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
            san_critical = False
        else:
            subject = x509.Name([])
            san_critical = True
        is_rsa = isinstance(public_key, rsa.RSAPublicKey)
        serial = serial_number()
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._issuer_name)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(self._basic_constraints, critical=True)
            .add_extension(self._leaf_key_usage[is_rsa], critical=True)
            .add_extension(self._eku, critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(name) for name in names]),
                critical=san_critical,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(self._aki, critical=False)
        )
        certificate = builder.sign(self._private_key, self._hash)

        leaf_pem = certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
        spki = spki_der(public_key)
        return IssuedCertificate(
            chain_pem=leaf_pem + self._ca_pem,
            leaf_pem=leaf_pem,
            serial_hex=format(serial, "x"),
            fingerprint_sha256=certificate.fingerprint(hashes.SHA256()).hex(),
            public_key_sha256=hashlib.sha256(spki).hexdigest(),
            public_key_pem=public_key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ).decode("ascii"),
            issuer=self._issuer_string,
            dns_names=names,
            not_before=start,
            not_after=end,
        )


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` exclusively with ``mode`` (never widened by a permissive umask)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as file:
        os.fchmod(fd, mode)
        file.write(data)
        file.flush()
        os.fsync(fd)


def create_development_ca(
    directory: Path, common_name: str = "myl development CA"
) -> tuple[Path, Path]:
    """Create ``ca.crt`` and ``ca.key`` in ``directory`` unless both already exist.

    P-256 key (PKCS#8, mode 0600), self-signed, CA=true with path length 0, keyCertSign and
    cRLSign, valid for 10 years from one hour ago. Existing files are kept untouched; if only one
    of the two exists, :class:`CertificateAuthorityError` is raised rather than overwriting it.
    Intended for development and tests, not for concurrent first runs.
    """
    directory = Path(directory)
    cert_path = directory / "ca.crt"
    key_path = directory / "ca.key"
    cert_exists, key_exists = cert_path.exists(), key_path.exists()
    if cert_exists and key_exists:
        return cert_path, key_path
    if cert_exists or key_exists:
        present, missing = (cert_path, key_path) if cert_exists else (key_path, cert_path)
        raise CertificateAuthorityError(
            f"{present} exists but {missing} does not; refusing to replace a partial CA"
        )

    directory.mkdir(parents=True, exist_ok=True)
    private_key = ec.generate_private_key(ec.SECP256R1())
    public_key = private_key.public_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC).replace(microsecond=0)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + _DEVELOPMENT_CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False
        )
        .sign(private_key, hashes.SHA256())
    )
    key_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Key first: a crash in between leaves a key without a certificate, which is refused above
    # instead of silently pairing a new certificate with an old key.
    _write_new_file(key_path, key_pem, 0o600)
    _write_new_file(cert_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path
