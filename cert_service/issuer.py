"""Certificate issuance: CSR and public key checks, and the built-in certificate authority.

Decisions:

* Only the public key of a CSR is used. Subject, extensions and attributes of the CSR are never
  copied into the certificate; the service builds them from the names it allocated. The CSR's
  names are still checked so that a device asking for a name it does not own gets a clear error
  instead of a certificate for something else.
* Accepted keys: EC P-256 and P-384, RSA 2048-8192 bits. Everything else (Ed25519, P-521, DSA,
  short or huge RSA) is refused. CSR signatures must use SHA-256, SHA-384 or SHA-512.
* PEM input is capped at 16 KiB before parsing.
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
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, Protocol, TypeAlias

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cert_service.randomness import serial_number

__all__ = [
    "MAX_PEM_LENGTH",
    "CertificateAuthorityError",
    "CsrError",
    "IssuedCertificate",
    "Issuer",
    "LocalCertificateAuthority",
    "PublicKey",
    "PublicKeyError",
    "create_development_ca",
    "generate_private_key",
    "load_csr",
    "load_public_key",
]

PublicKey: TypeAlias = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
"""Public key types accepted for device certificates."""

CaPrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

MAX_PEM_LENGTH: Final = 16 * 1024
_MIN_RSA_BITS: Final = 2048
_MAX_RSA_BITS: Final = 8192
_MAX_COMMON_NAME_LENGTH: Final = 64
_CSR_HASHES: Final = (hashes.SHA256, hashes.SHA384, hashes.SHA512)
_DEVELOPMENT_CA_VALIDITY: Final = timedelta(days=3650)


class CsrError(ValueError):
    """A certificate signing request was refused; ``str(error)`` is a message for the caller."""


class PublicKeyError(ValueError):
    """A public key (renewal path) is unparsable or of an unsupported type."""


class CertificateAuthorityError(Exception):
    """The CA certificate or key cannot be used (missing, unreadable, invalid or mismatched)."""


@dataclass(frozen=True)
class IssuedCertificate:
    """An issued end-entity certificate with everything worth storing about it.

    ``public_key_pem`` is the leaf's SubjectPublicKeyInfo; storing it allows renewal without ever
    holding the private key. Hex strings are lowercase; datetimes are timezone-aware UTC.
    """

    chain_pem: str
    leaf_pem: str
    serial_hex: str
    fingerprint_sha256: str
    public_key_sha256: str
    public_key_pem: str
    issuer: str
    dns_names: list[str]
    not_before: datetime
    not_after: datetime


class Issuer(Protocol):
    """Something that turns a public key and names into a certificate (local CA, ACME, ...)."""

    def issue(
        self,
        public_key: PublicKey,
        dns_names: Sequence[str],
        not_before: datetime,
        not_after: datetime,
    ) -> IssuedCertificate: ...

    def ca_chain_pem(self) -> str: ...


def _key_problem(key: object) -> str | None:
    """Return why ``key`` is not acceptable for a device certificate, or None."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1):
            return None
        return f"EC curve {key.curve.name} is not supported; use P-256 or P-384"
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            return f"RSA key of {key.key_size} bits is too short; at least {_MIN_RSA_BITS} required"
        if key.key_size > _MAX_RSA_BITS:
            return f"RSA key of {key.key_size} bits is too long; at most {_MAX_RSA_BITS} allowed"
        return None
    return f"{type(key).__name__} keys are not supported; use EC P-256, P-384 or RSA >= 2048 bits"


def _checked_key(key: object, error: type[ValueError], prefix: str = "") -> PublicKey:
    """Return ``key`` typed as :data:`PublicKey`, or raise ``error`` saying why it is refused."""
    problem = _key_problem(key)
    if problem is not None or not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise error(prefix + (problem or "unsupported key"))
    return key


def _pem_bytes(pem: str, what: str, error: type[ValueError]) -> bytes:
    if not isinstance(pem, str) or not pem.strip():
        raise error(f"{what} is empty")
    if len(pem) > MAX_PEM_LENGTH:
        raise error(f"{what} is larger than {MAX_PEM_LENGTH} bytes")
    if not pem.isascii():
        raise error(f"{what} must be ASCII PEM")
    return pem.encode("ascii")


def _fold_name(name: object) -> str | None:
    """Lowercase an ASCII name for comparison; anything else cannot match."""
    if isinstance(name, str) and name.isascii():
        return name.lower()
    return None


def load_csr(pem: str, allowed_names: Sequence[str]) -> PublicKey:
    """Validate a PEM CSR and return its public key.

    The signature must verify (proof of possession), the key type must be supported, and every
    name in the CSR (subjectAltName DNS names and subject common names) must be one of
    ``allowed_names`` (case-insensitive). Any other subjectAltName type (IP, e-mail, URI, ...) is
    refused. A CSR without any name is accepted: the certificate's names come from the service.
    """
    if isinstance(allowed_names, str):
        raise TypeError("allowed_names must be a sequence of names, not a single string")
    data = _pem_bytes(pem, "CSR", CsrError)
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise CsrError("CSR is not a valid PEM certificate signing request") from exc

    try:
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CsrError("CSR public key is unsupported or malformed") from exc
    key = _checked_key(key, CsrError, "CSR key refused: ")

    try:
        hash_algorithm = csr.signature_hash_algorithm
        signature_ok = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CsrError("CSR signature algorithm is not supported") from exc
    if not isinstance(hash_algorithm, _CSR_HASHES):
        raise CsrError("CSR must be signed with SHA-256, SHA-384 or SHA-512")
    if not signature_ok:
        raise CsrError("CSR signature is invalid")

    allowed = {folded for folded in map(_fold_name, allowed_names) if folded is not None}
    try:
        requested: list[object] = [
            attribute.value for attribute in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
        extensions = csr.extensions
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise CsrError("CSR subject or extensions are malformed") from exc
    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        pass
    else:
        for general_name in san:
            if not isinstance(general_name, x509.DNSName):
                raise CsrError(
                    f"CSR subjectAltName of type {type(general_name).__name__} is not allowed; "
                    "only DNS names are accepted"
                )
            requested.append(general_name.value)
    for name in requested:
        if _fold_name(name) not in allowed:
            raise CsrError(
                f"CSR requests the name {repr(name)[:100]}, which is not allowed; "
                f"allowed names: {', '.join(allowed_names)}"
            )
    return key


def load_public_key(pem: str) -> PublicKey:
    """Load a SubjectPublicKeyInfo PEM (as stored in ``IssuedCertificate.public_key_pem``)."""
    data = _pem_bytes(pem, "public key", PublicKeyError)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise PublicKeyError("not a valid PEM public key") from exc
    return _checked_key(key, PublicKeyError)


def generate_private_key() -> tuple[PublicKey, str]:
    """Generate a P-256 key; return its public key and the unencrypted PKCS#8 PEM private key.

    The PEM is meant to be handed to the caller once and never stored.
    """
    private_key = ec.generate_private_key(ec.SECP256R1())
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")
    return private_key.public_key(), pem


def _ca_hash(key: CaPrivateKey) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if isinstance(key.curve, ec.SECP384R1):
            return hashes.SHA384()
        if isinstance(key.curve, ec.SECP521R1):
            return hashes.SHA512()
    return hashes.SHA256()


def _spki_der(key: PublicKey | x509.Certificate) -> bytes:
    public_key = key.public_key() if isinstance(key, x509.Certificate) else key
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


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
            if private_key.key_size < _MIN_RSA_BITS:
                raise CertificateAuthorityError("CA RSA key is shorter than 2048 bits")
        else:
            raise CertificateAuthorityError(f"unsupported CA key type {type(private_key).__name__}")
        if _spki_der(private_key.public_key()) != _spki_der(certificate):
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
        _checked_key(public_key, ValueError)
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
        spki = _spki_der(public_key)
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
