"""The built-in certificate authority: signs device certificates with a CA key the service holds.

Decisions:

* Time is always supplied by the caller; nothing here reads the clock except
  :func:`create_development_ca`.
* Validity is truncated to whole seconds (X.509 resolution) and ``not_after`` is clipped to the
  CA's own expiry; :class:`IssuedCertificate` reports the values actually in the certificate.
* If the first DNS name is longer than the 64 characters allowed in a common name, the subject is
  left empty and the subjectAltName extension is marked critical (RFC 5280, 4.2.1.6).
* Everything that does not depend on the leaf (issuer name, authority key identifier, CA PEM,
  hash algorithm, CRL and AIA URLs, policies) is computed once per CA, keeping ``issue`` at a
  single ECDSA signature plus encoding work.
* Every leaf names where relying parties learn about it (see :class:`PkiLocations`): a CRL
  distribution point for one CRL shard, and an AIA caIssuers URL serving this CA's certificate.
  The shard is chosen here, at issuance, from the (random) serial number: ``serial % shards``.
  It is written into the certificate and into :class:`IssuedCertificate`, and never changes for
  that certificate, even when the shard count does (Boulder's design).
* Every leaf carries two certificate policies: the CA/Browser Forum's domain-validated policy
  (2.23.140.1.2.1; the platform allocates every name itself under its own zone, so control of
  the name is established by construction) and the operator's own policy (configuration;
  :data:`DEVICE_POLICY_OID` by default), which asserts: the names were allocated by this
  platform to the device that holds the key, and nothing about any person or organisation was
  validated.
* The CA key is behind :class:`CaSigner`: a key in memory (:class:`KeySigner`, loaded from
  ``CA_KEY_FILE``) or one that never leaves a PKCS#11 token (``cert_service.hsm``,
  ``CA_KEY_URI``). Certificates and CRLs are built here and handed to the signer whole, so
  the two differ only in who computes the signature.
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
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from cert_service.issuer import (
    MIN_RSA_BITS,
    IssuedCertificate,
    PublicKey,
    checked_key,
    private_key_pem,
    serial_hex,
    spki_der,
)
from cert_service.randomness import serial_number

__all__ = [
    "DEVICE_POLICY_OID",
    "DOMAIN_VALIDATED_POLICY_OID",
    "CaPublicKey",
    "CaSigner",
    "CaSubject",
    "CertificateAuthorityError",
    "HashAlgorithm",
    "KeySigner",
    "LocalCertificateAuthority",
    "PkiLocations",
    "ca_certificate",
    "ca_hash_algorithm",
    "create_development_ca",
    "load_ca_certificate",
]

CaPrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
CaPublicKey: TypeAlias = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
HashAlgorithm: TypeAlias = hashes.SHA256 | hashes.SHA384 | hashes.SHA512

_MAX_COMMON_NAME_LENGTH: Final = 64
_DEVELOPMENT_CA_VALIDITY: Final = timedelta(days=3650)


DOMAIN_VALIDATED_POLICY_OID: Final = x509.ObjectIdentifier("2.23.140.1.2.1")
"""CA/Browser Forum Baseline Requirements: domain validated."""

DEVICE_POLICY_OID: Final = x509.ObjectIdentifier("1.3.6.1.4.1.32473.1.1")
"""The default of the device certificate policy, version 1: the subject names were allocated by
the platform to the device holding the key; no person or organisation was validated. It lies
under IANA's enterprise number for documentation (32473, RFC 5612), which no organisation owns:
right for the built-in development CA, and meant to be replaced (``CERTIFICATE_POLICY_OID``) by
an OID under the operator's own arc. (A UUID OID, 2.25.<uuid>, would be ours by construction,
but common X.509 tooling, pkilint among them, cannot decode arcs above 32 bits, nor the
example arc 2.999.)"""


class CertificateAuthorityError(Exception):
    """The CA certificate or key cannot be used (missing, unreadable, invalid or mismatched)."""


@dataclass(frozen=True)
class PkiLocations:
    """Where relying parties fetch CRLs and the CA certificate: plain HTTP, no key needed.

    ``base_url`` is the public gateway (``PKI_BASE_URL``), e.g. ``http://pki.myl.zip``; the
    gateway serves ``/pki/crls/<shard>.crl`` and ``/pki/ca.cer`` under it. ``crl_shards`` is how
    many CRL shards new certificates are spread over.
    """

    base_url: str = "http://127.0.0.1:8080"
    crl_shards: int = 128
    policy_oid: str = DEVICE_POLICY_OID.dotted_string

    def __post_init__(self) -> None:
        if not self.base_url.startswith("http://") or self.base_url != self.base_url.strip():
            # RFC 5280 and the CA/Browser Forum want CRLs and caIssuers over plain HTTP (a
            # relying party must not need TLS, and so a CRL, to fetch a CRL).
            raise ValueError(f"base_url must be an http:// URL, got {self.base_url!r}")
        if not 1 <= self.crl_shards <= 100_000:
            raise ValueError(f"crl_shards must be 1-100000, got {self.crl_shards}")

    def crl_url(self, shard: int) -> str:
        return f"{self.base_url.rstrip('/')}/pki/crls/{shard}.crl"

    def ca_issuer_url(self) -> str:
        return f"{self.base_url.rstrip('/')}/pki/ca.cer"


@dataclass(frozen=True)
class CaSubject:
    """The distinguished name of a CA this project creates: country, organisation, common name."""

    country: str = "XX"
    organization: str = "myl device identity"
    common_name: str = "myl development CA"

    def __post_init__(self) -> None:
        if len(self.country) != 2 or not self.country.isascii() or not self.country.isalpha():
            raise ValueError(f"country must be a two-letter ISO 3166 code, got {self.country!r}")
        for what, value in (("organization", self.organization), ("common_name", self.common_name)):
            if not 1 <= len(value) <= 64:
                raise ValueError(f"{what} must be 1-64 characters, got {value!r}")

    def name(self) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.COUNTRY_NAME, self.country.upper()),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.organization),
                x509.NameAttribute(NameOID.COMMON_NAME, self.common_name),
            ]
        )


class CaSigner(Protocol):
    """What holds the CA key and signs with it; nothing else about the key is asked.

    The certificate or CRL arrives built (every field but the signature); the signer returns
    it signed with ``algorithm`` (the CA's hash: :func:`ca_hash_algorithm`).
    """

    def public_key(self) -> CaPublicKey: ...

    def sign_certificate(
        self, builder: x509.CertificateBuilder, algorithm: HashAlgorithm
    ) -> x509.Certificate: ...

    def sign_crl(
        self, builder: x509.CertificateRevocationListBuilder, algorithm: HashAlgorithm
    ) -> x509.CertificateRevocationList: ...

    def close(self) -> None:
        """Let go of the key (a token session); the signer is not used afterwards."""


class KeySigner:
    """A CA key in this process's memory (``CA_KEY_FILE``, the development CA)."""

    def __init__(self, private_key: CaPrivateKey) -> None:
        self._key = private_key

    def public_key(self) -> CaPublicKey:
        return self._key.public_key()

    def sign_certificate(
        self, builder: x509.CertificateBuilder, algorithm: HashAlgorithm
    ) -> x509.Certificate:
        return builder.sign(self._key, algorithm)

    def sign_crl(
        self, builder: x509.CertificateRevocationListBuilder, algorithm: HashAlgorithm
    ) -> x509.CertificateRevocationList:
        return builder.sign(self._key, algorithm)

    def close(self) -> None:
        return None


def ca_hash_algorithm(key: CaPublicKey) -> HashAlgorithm:
    """The hash a CA key signs with: the curve's own size for EC keys, SHA-256 for RSA."""
    if isinstance(key, ec.EllipticCurvePublicKey):
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
    """The built-in CA: signs device certificates with the CA key (:class:`CaSigner`).

    Implements :class:`Issuer`. The CA certificate must be a CA (basicConstraints CA=true, and
    keyCertSign if keyUsage is present) and must match the key. Supported CA keys: EC P-256
    (SHA-256), P-384 (SHA-384), P-521 (SHA-512) and RSA >= 2048 bits (SHA-256). ``key`` is a
    signer, or a private key in memory (wrapped in a :class:`KeySigner`).
    """

    def __init__(
        self,
        certificate: x509.Certificate,
        key: CaSigner | CaPrivateKey,
        locations: PkiLocations | None = None,
    ) -> None:
        signer = (
            KeySigner(key)
            if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
            else key
        )
        public_key = signer.public_key()
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            if not isinstance(public_key.curve, ec.SECP256R1 | ec.SECP384R1 | ec.SECP521R1):
                raise CertificateAuthorityError(f"unsupported CA curve {public_key.curve.name}")
        elif isinstance(public_key, rsa.RSAPublicKey):
            if public_key.key_size < MIN_RSA_BITS:
                raise CertificateAuthorityError("CA RSA key is shorter than 2048 bits")
        else:
            raise CertificateAuthorityError(f"unsupported CA key type {type(public_key).__name__}")
        if spki_der(public_key) != spki_der(certificate):
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
        self._signer = signer
        self._hash = ca_hash_algorithm(public_key)
        self._ca_pem = certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
        self._issuer_name = certificate.subject
        self._issuer_string = certificate.subject.rfc4514_string()
        self._not_after = certificate.not_valid_after_utc
        ski_value: x509.SubjectKeyIdentifier | None
        try:
            ski_value = certificate.extensions.get_extension_for_class(
                x509.SubjectKeyIdentifier
            ).value
        except x509.ExtensionNotFound:
            ski_value = None
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key)
        else:
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski_value)
        self._locations = locations or PkiLocations()
        self._key_id = (
            x509.SubjectKeyIdentifier.from_public_key(public_key).digest
            if ski_value is None
            else ski_value.digest
        )
        self._aia = x509.AuthorityInformationAccess(
            [
                x509.AccessDescription(
                    AuthorityInformationAccessOID.CA_ISSUERS,
                    x509.UniformResourceIdentifier(self._locations.ca_issuer_url()),
                )
            ]
        )
        self._policies = x509.CertificatePolicies(
            [
                x509.PolicyInformation(DOMAIN_VALIDATED_POLICY_OID, None),
                x509.PolicyInformation(x509.ObjectIdentifier(self._locations.policy_oid), None),
            ]
        )
        self._crl_points = [
            x509.CRLDistributionPoints(
                [
                    x509.DistributionPoint(
                        full_name=[x509.UniformResourceIdentifier(self._locations.crl_url(shard))],
                        relative_name=None,
                        reasons=None,
                        crl_issuer=None,
                    )
                ]
            )
            for shard in range(self._locations.crl_shards)
        ]
        self._basic_constraints = x509.BasicConstraints(ca=False, path_length=None)
        self._leaf_key_usage = {is_rsa: leaf_key_usage(rsa=is_rsa) for is_rsa in (False, True)}
        self._eku = x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        )

    @classmethod
    def from_files(
        cls,
        cert_path: Path,
        key_path: Path,
        *,
        password: bytes | None = None,
        locations: PkiLocations | None = None,
    ) -> LocalCertificateAuthority:
        """Load a PEM CA certificate and PEM private key; errors name the offending path."""
        certificate = load_ca_certificate(cert_path)
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
            return cls(certificate, private_key, locations)
        except CertificateAuthorityError as exc:
            raise CertificateAuthorityError(
                f"{exc} (certificate {cert_path}, key {key_path})"
            ) from exc

    @property
    def certificate(self) -> x509.Certificate:
        return self._certificate

    def sign_crl(self, builder: x509.CertificateRevocationListBuilder) -> bytes:
        """A CRL built by `cert_service.crl`, signed with the CA key; DER."""
        crl = self._signer.sign_crl(builder, self._hash)
        return crl.public_bytes(serialization.Encoding.DER)

    def close(self) -> None:
        """Let go of the CA key (a token's session); nothing is signed afterwards."""
        self._signer.close()

    @property
    def hash_algorithm(self) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512:
        return self._hash

    @property
    def key_id(self) -> bytes:
        """The CA's key identifier (its subjectKeyIdentifier): the AKI of what it signs."""
        return self._key_id

    @property
    def locations(self) -> PkiLocations:
        return self._locations

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
        shard = serial % self._locations.crl_shards
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
            .add_extension(self._aia, critical=False)
            .add_extension(self._policies, critical=False)
            .add_extension(self._crl_points[shard], critical=False)
        )
        certificate = self._signer.sign_certificate(builder, self._hash)

        leaf_pem = certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
        spki = spki_der(public_key)
        return IssuedCertificate(
            chain_pem=leaf_pem + self._ca_pem,
            leaf_pem=leaf_pem,
            serial_hex=serial_hex(serial),
            fingerprint_sha256=certificate.fingerprint(hashes.SHA256()).hex(),
            public_key_sha256=hashlib.sha256(spki).hexdigest(),
            public_key_pem=public_key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ).decode("ascii"),
            issuer=self._issuer_string,
            dns_names=names,
            not_before=start,
            not_after=end,
            crl_shard=shard,
            issuer_key_id=self._key_id.hex(),
        )


def leaf_key_usage(*, rsa: bool = False) -> x509.KeyUsage:
    """What a TLS certificate's key is for: signing its handshakes, and for an RSA key also
    key encipherment (TLS 1.2's RSA key exchange)."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=rsa,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def load_ca_certificate(path: Path) -> x509.Certificate:
    """A PEM CA certificate (``CA_CERT_FILE``); errors name the path."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CertificateAuthorityError(
            f"cannot read CA certificate {path}: {exc.strerror or exc}"
        ) from exc
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise CertificateAuthorityError(
            f"CA certificate {path} is not a valid PEM certificate"
        ) from exc


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` exclusively with ``mode`` (never widened by a permissive umask)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as file:
        os.fchmod(fd, mode)
        file.write(data)
        file.flush()
        os.fsync(fd)


def ca_certificate(
    signer: CaSigner, subject: CaSubject, now: datetime | None = None
) -> x509.Certificate:
    """A self-signed root for ``signer``'s key: subject C, O and CN from ``subject``, CA=true
    (no path length: a root that may later sign an intermediate), keyCertSign and cRLSign,
    valid for 10 years from one hour before ``now``."""
    public_key = signer.public_key()
    now = (now or datetime.now(UTC)).replace(microsecond=0)
    builder = self_signed_ca(
        subject.name(),
        public_key,
        now - timedelta(hours=1),
        now + _DEVELOPMENT_CA_VALIDITY,
        path_length=None,
    ).add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False)
    return signer.sign_certificate(builder, ca_hash_algorithm(public_key))


def self_signed_ca(
    name: x509.Name,
    public_key: CaPublicKey,
    not_before: datetime,
    not_after: datetime,
    *,
    path_length: int | None,
) -> x509.CertificateBuilder:
    """A self-signed CA certificate up to its signature: `name` as subject and issuer, a
    random serial, CA=true with `path_length`, keyCertSign and cRLSign only (both critical)
    and its subjectKeyIdentifier. Every CA the project makes (the development CA, the local
    stack's internal and ACME TLS CAs) starts from it, so they agree on what a CA key is for."""
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
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
    )


def create_development_ca(directory: Path, subject: CaSubject | None = None) -> tuple[Path, Path]:
    """Create ``ca.crt`` and ``ca.key`` in ``directory`` unless both already exist.

    P-256 key (PKCS#8, mode 0600), the certificate :func:`ca_certificate`'s. Existing files
    are kept untouched; if only one of the two exists, :class:`CertificateAuthorityError` is
    raised rather than overwriting it.
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
    certificate = ca_certificate(KeySigner(private_key), subject or CaSubject())
    key_pem = private_key_pem(private_key)
    # Key first: a crash in between leaves a key without a certificate, which is refused above
    # instead of silently pairing a new certificate with an old key.
    _write_new_file(key_path, key_pem, 0o600)
    _write_new_file(cert_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path
