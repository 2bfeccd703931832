"""What a signer is, and the checks on what devices send: CSRs and public keys.

:class:`Issuer` is what signs a certificate in the request: the built-in CA
(`cert_service.ca`). Whether certificates are signed so or ordered from an ACME CA in the
background is chosen at start-up (`CERT_ISSUER`; `cert_service.issuance`).

Decisions:

* Only the public key of a CSR is used. Subject, extensions and attributes of the CSR are never
  copied into the certificate; the service builds them from the names it allocated. The CSR's
  names are still checked so that a device asking for a name it does not own gets a clear error
  instead of a certificate for something else.
* Accepted keys: EC P-256 and P-384, RSA 2048-8192 bits. Everything else (Ed25519, P-521, DSA,
  short or huge RSA) is refused. CSR signatures must use SHA-256, SHA-384 or SHA-512.
* PEM input is capped at 16 KiB before parsing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Protocol, TypeAlias

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

__all__ = [
    "MAX_PEM_LENGTH",
    "MIN_RSA_BITS",
    "CsrError",
    "IssuedCertificate",
    "Issuer",
    "PublicKey",
    "PublicKeyError",
    "checked_key",
    "generate_private_key",
    "load_csr",
    "load_public_key",
    "serial_hex",
    "spki_der",
]

PublicKey: TypeAlias = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
"""Public key types accepted for device certificates."""

MAX_PEM_LENGTH: Final = 16 * 1024
MIN_RSA_BITS: Final = 2048
_MAX_RSA_BITS: Final = 8192
_CSR_HASHES: Final = (hashes.SHA256, hashes.SHA384, hashes.SHA512)


class CsrError(ValueError):
    """A certificate signing request was refused; ``str(error)`` is a message for the caller."""


class PublicKeyError(ValueError):
    """A public key (renewal path) is unparsable or of an unsupported type."""


def serial_hex(serial: int) -> str:
    """A certificate serial as the API shows it: lowercase hex, two digits per byte, the
    digits openssl prints (`openssl x509 -serial`, the CRL's `Serial Number`, uppercase
    there). Without the leading zero a user comparing the two would find no match."""
    digits = format(serial, "x")
    return digits.zfill(len(digits) + len(digits) % 2)


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
    # The CRL shard named in the certificate's CRL distribution point (None: the issuer
    # publishes no CRL of ours), and the issuing CA's key identifier, lowercase hex.
    crl_shard: int | None = None
    issuer_key_id: str = ""


class Issuer(Protocol):
    """Something that turns a public key and names into a certificate now (the built-in CA)."""

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
        if key.key_size < MIN_RSA_BITS:
            return f"RSA key of {key.key_size} bits is too short; at least {MIN_RSA_BITS} required"
        if key.key_size > _MAX_RSA_BITS:
            return f"RSA key of {key.key_size} bits is too long; at most {_MAX_RSA_BITS} allowed"
        return None
    return f"{type(key).__name__} keys are not supported; use EC P-256, P-384 or RSA >= 2048 bits"


def checked_key(key: object, error: type[ValueError], prefix: str = "") -> PublicKey:
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
    key = checked_key(key, CsrError, "CSR key refused: ")

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
    return checked_key(key, PublicKeyError)


def private_key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    """The unencrypted PKCS#8 PEM of `key`: what the service hands out with a generated key,
    and what every key file it and the local stack write holds (protected by the file's mode)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def generate_private_key() -> tuple[PublicKey, str]:
    """Generate a P-256 key; return its public key and the unencrypted PKCS#8 PEM private key.

    The PEM is meant to be handed to the caller once and never stored.
    """
    private_key = ec.generate_private_key(ec.SECP256R1())
    return private_key.public_key(), private_key_pem(private_key).decode("ascii")


def spki_der(key: PublicKey | x509.Certificate) -> bytes:
    """The DER SubjectPublicKeyInfo of a key, or of a certificate's key."""
    public_key = key.public_key() if isinstance(key, x509.Certificate) else key
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
