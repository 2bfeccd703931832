"""The CA key in a PKCS#11 token (an HSM; SoftHSM2 in development and tests): ``CA_KEY_URI``.

The key is named by an RFC 7512 URI, e.g.
``pkcs11:token=myl-ca;object=ca;type=private?module-path=/usr/lib/softhsm/libsofthsm2.so``,
and never leaves the token: the service hands it digests and gets signatures back.

Decisions:

* What the URI may say. Which token: ``token`` (label), ``serial``, ``manufacturer``,
  ``model``, ``slot-id``; which key: ``object`` (label) and/or ``id``; ``type`` only
  ``private``. Query: ``module-path`` (required: the PKCS#11 library) and ``pin-source`` (a
  file holding the PIN). Anything else is refused rather than ignored, so a URI never matches
  more than it says. ``pin-value`` is refused too: the URI is configuration, echoed in errors;
  the PIN comes from a file (``pin-source``, ``CA_KEY_PIN_FILE``) or ``CA_KEY_PIN``.
* python-pkcs11 rather than PyKCS11: it ships type information (mypy strict checks every
  call here) and raises one exception class per PKCS#11 return code (``PinIncorrect``,
  ``NoSuchToken``, ...), from which the start-up errors below are made; PyKCS11 is an
  untyped SWIG wrapper with one exception carrying the code.
* The digest is computed here and the token signs it: CKM_ECDSA, and CKM_RSA_PKCS over the
  DigestInfo (PKCS#1 v1.5), as Boulder's pkcs11key does. Every token has these two
  (SoftHSM2 2.6 has no CKM_ECDSA_SHA256), and only the digest crosses to the token. An
  ECDSA signature comes back as r||s and is DER-encoded here (X.509 wants
  ``Ecdsa-Sig-Value``).
* cryptography signs certificates and CRLs only with a key object of its own. So each is
  built and signed with a stand-in key of the same kind (made once, never stored; it only
  decides the algorithm identifier, which sits inside the signed part as well), and that
  signature is replaced by the token's over the same to-be-signed bytes. The stand-in's
  signature costs a fraction of the token's (`make bench`, bench_ca_key).
* One session, logged in at start, for the life of the process; signatures on it are
  serialized (a session runs one operation at a time). A signature the token fails gets one
  new login and one more try (a reset token, a network HSM that dropped the session); failing
  again, the call is UNAVAILABLE (CA_TOKEN_UNAVAILABLE) and the error is logged. At start one
  signature is made and verified with the CA certificate's public key, so a key that does
  not match the certificate, or a token that cannot sign, stops the start instead of the
  first issuance.
* Start-up errors say what is wrong in the words of the URI: no such module, no such token
  (with the labels present), a refused PIN, no such key. The PIN is in none of them.
* A key the token would let out (CKA_EXTRACTABLE, or not CKA_SENSITIVE) is used, with a
  warning in the log: the point of the token is that it would not.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import unquote_to_bytes

import pkcs11
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass, TokenFlag

from cert_service.ca import (
    CaPublicKey,
    CertificateAuthorityError,
    HashAlgorithm,
    ca_hash_algorithm,
)
from shared.errors import unavailable
from shared.logging import get_logger

__all__ = ["Pkcs11Signer", "Pkcs11Uri"]

log = get_logger(__name__)

_TOKEN_ATTRIBUTES: Final = ("token", "serial", "manufacturer", "model", "slot-id")
_PATH_ATTRIBUTES: Final = frozenset({*_TOKEN_ATTRIBUTES, "object", "id", "type"})
_QUERY_ATTRIBUTES: Final = frozenset({"module-path", "pin-source"})

# DER of DigestInfo up to the digest (RFC 8017, 9.2, note 1).
_DIGEST_INFO: Final = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
# The stand-in RSA key only fixes the algorithm identifier; its size is not in the result.
_STAND_IN_RSA_BITS: Final = 1024

Signed = TypeVar("Signed", x509.Certificate, x509.CertificateRevocationList)


@dataclass(frozen=True)
class Pkcs11Uri:
    """A parsed RFC 7512 URI naming a private key; ``text`` is the URI as given."""

    text: str
    module_path: str
    token: str | None = None
    serial: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    slot_id: int | None = None
    object: str | None = None
    id: bytes | None = None
    pin_source: Path | None = field(default=None)

    @classmethod
    def parse(cls, text: str) -> Pkcs11Uri:
        """Raises ``ValueError`` saying what is wrong (never echoing a ``pin-value``)."""
        scheme, colon, rest = text.partition(":")
        if scheme.lower() != "pkcs11" or not colon:
            raise ValueError("a URI starting with pkcs11:")
        path, _, query = rest.partition("?")
        attributes = _attributes(path, ";", _PATH_ATTRIBUTES)
        attributes.update(_attributes(query, "&", _QUERY_ATTRIBUTES))
        if attributes.get("type", b"private") != b"private":
            raise ValueError("type=private (the URI names the CA's private key)")
        if "object" not in attributes and "id" not in attributes:
            raise ValueError("object=<label> and/or id=<bytes> naming the key")
        if "module-path" not in attributes:
            raise ValueError("module-path=<the PKCS#11 library>, e.g. module-path=/usr/lib/...")
        slot_id = attributes.get("slot-id")
        if slot_id is not None and not slot_id.isdigit():
            raise ValueError("slot-id as a decimal number")
        pin_source = attributes.get("pin-source")
        return cls(
            text=text,
            module_path=_text(attributes["module-path"]),
            token=_optional_text(attributes.get("token")),
            serial=_optional_text(attributes.get("serial")),
            manufacturer=_optional_text(attributes.get("manufacturer")),
            model=_optional_text(attributes.get("model")),
            slot_id=None if slot_id is None else int(slot_id),
            object=_optional_text(attributes.get("object")),
            id=attributes.get("id"),
            pin_source=None if pin_source is None else _pin_file(_text(pin_source)),
        )

    def __str__(self) -> str:
        return self.text


def _attributes(part: str, separator: str, known: frozenset[str]) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for item in filter(None, part.split(separator)):
        name, equals, value = item.partition("=")
        if name == "pin-value":
            raise ValueError("no pin-value: the PIN comes from a file or CA_KEY_PIN")
        if not equals or name not in known:
            raise ValueError(f"attributes among {', '.join(sorted(known))}, not {name!r}")
        if name in found:
            raise ValueError(f"{name} once")
        found[name] = unquote_to_bytes(value)
    return found


def _text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("UTF-8 attribute values (only id holds raw bytes)") from None


def _optional_text(value: bytes | None) -> str | None:
    return None if value is None else _text(value)


def _pin_file(source: str) -> Path:
    path = source.removeprefix("file://").removeprefix("file:")
    if not path.startswith("/"):
        raise ValueError("pin-source as an absolute path or file: URI")
    return Path(path)


# -- DER: a signed structure with its signature replaced -----------------------------------------


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def _header_length(der: bytes, offset: int) -> int:
    first = der[offset + 1]
    return 2 if first < 0x80 else 2 + (first & 0x7F)


def _element_end(der: bytes, offset: int) -> int:
    first = der[offset + 1]
    if first < 0x80:
        return offset + 2 + first
    count = first & 0x7F
    return offset + 2 + count + int.from_bytes(der[offset + 2 : offset + 2 + count], "big")


def _with_signature(draft: bytes, tbs: bytes, signature: bytes) -> bytes:
    """``draft`` (SEQUENCE { tbs, signatureAlgorithm, signatureValue }: a certificate or a
    CRL) with ``signature`` as its signatureValue."""
    start = _header_length(draft, 0)
    algorithm_at = start + len(tbs)
    if draft[start:algorithm_at] != tbs:
        raise ValueError("the draft does not begin with its to-be-signed bytes")
    algorithm = draft[algorithm_at : _element_end(draft, algorithm_at)]
    return _der(0x30, tbs + algorithm + _der(0x03, b"\x00" + signature))


# -- the signer ----------------------------------------------------------------------------------


class Pkcs11Signer:
    """A :class:`~cert_service.ca.CaSigner` whose key is in a PKCS#11 token."""

    def __init__(self, uri: Pkcs11Uri, pin: str, public_key: CaPublicKey) -> None:
        """Logged in, the key found; :meth:`open` also checks it against the certificate."""
        self._uri = uri
        self._pin = pin
        self._public_key = public_key
        self._lock = threading.Lock()
        self._closed = False
        self._ec = isinstance(public_key, ec.EllipticCurvePublicKey)
        self._stand_in: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
            ec.generate_private_key(ec.SECP256R1())
            if self._ec
            else rsa.generate_private_key(public_exponent=65537, key_size=_STAND_IN_RSA_BITS)
        )
        self._session, self._key = self._login()

    @classmethod
    def open(cls, uri: Pkcs11Uri, pin: str, public_key: CaPublicKey) -> Pkcs11Signer:
        """Log in to the URI's token and find its key; checked with one signature that
        ``public_key`` (the CA certificate's) verifies. Raises
        :class:`CertificateAuthorityError` saying what is wrong."""
        if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise CertificateAuthorityError(f"unsupported CA key type {type(public_key).__name__}")
        signer = cls(uri, pin, public_key)
        try:
            signer._check()
            if signer._key[Attribute.EXTRACTABLE] or not signer._key[Attribute.SENSITIVE]:
                log.warning("the CA key can leave its token", uri=uri.text)
        except BaseException:
            signer.close()
            raise
        return signer

    def _login(self) -> tuple[Any, Any]:
        """A session logged in to the URI's token, and the key in it."""
        uri = self._uri
        try:
            library = pkcs11.lib(uri.module_path)
        except (RuntimeError, OSError) as exc:
            raise CertificateAuthorityError(
                f"cannot load the PKCS#11 module {uri.module_path} ({exc})"
            ) from exc
        token = _find_token(library, uri)
        label = token.label
        try:
            session = token.open(user_pin=self._pin)
        except pkcs11.UserAlreadyLoggedIn:
            # Login is per process and token: an earlier signer of this process (a second
            # service in one test process) logged in with its PIN and still holds a session.
            session = token.open()
        except pkcs11.PinIncorrect:
            raise CertificateAuthorityError(f"token {label!r} refused the PIN") from None
        except (pkcs11.PinLocked, pkcs11.PinExpired) as exc:
            raise CertificateAuthorityError(
                f"token {label!r}: the PIN is {type(exc).__name__.removeprefix('Pin').lower()}"
            ) from None
        except pkcs11.PKCS11Error as exc:
            raise CertificateAuthorityError(
                f"cannot log in to token {label!r} ({type(exc).__name__})"
            ) from None
        try:
            key = _find_key(session, uri, label)
            wanted = KeyType.EC if self._ec else KeyType.RSA
            if key.key_type != wanted:
                raise CertificateAuthorityError(
                    f"the key in token {label!r} is {key.key_type.name}, the CA certificate's "
                    f"is {wanted.name}"
                )
        except BaseException:
            session.close()
            raise
        return session, key

    def public_key(self) -> CaPublicKey:
        return self._public_key

    def sign_certificate(
        self, builder: x509.CertificateBuilder, algorithm: HashAlgorithm
    ) -> x509.Certificate:
        draft = builder.sign(self._stand_in, algorithm)
        der = self._resigned(draft, draft.tbs_certificate_bytes, algorithm)
        return x509.load_der_x509_certificate(der)

    def sign_crl(
        self, builder: x509.CertificateRevocationListBuilder, algorithm: HashAlgorithm
    ) -> x509.CertificateRevocationList:
        draft = builder.sign(self._stand_in, algorithm)
        der = self._resigned(draft, draft.tbs_certlist_bytes, algorithm)
        return x509.load_der_x509_crl(der)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._session.close()

    def _resigned(self, draft: Signed, tbs: bytes, algorithm: HashAlgorithm) -> bytes:
        signature = self.signature(tbs, algorithm)
        return _with_signature(draft.public_bytes(serialization.Encoding.DER), tbs, signature)

    def signature(self, data: bytes, algorithm: HashAlgorithm) -> bytes:
        """``data``'s signature by the token's key, as X.509 carries it.

        A token that fails (reset, or a network HSM that dropped the session) gets one new
        login and one more try; if that fails too the signature is UNAVAILABLE (a retry may
        find the token back), and the failure is logged for the operator.
        """
        digest = hashlib.new(algorithm.name, data).digest()
        with self._lock:
            if self._closed:
                raise CertificateAuthorityError(f"{self._uri}: the token's session is closed")
            try:
                raw = self._raw_signature(digest, algorithm)
            except pkcs11.PKCS11Error as first:
                log.warning("CA token failed a signature", error=type(first).__name__)
                raw = self._signature_after_login(digest, algorithm)
        return self._encoded(raw)

    def _signature_after_login(self, digest: bytes, algorithm: HashAlgorithm) -> bytes:
        with contextlib.suppress(pkcs11.PKCS11Error):
            self._session.close()
        try:
            self._session, self._key = self._login()
            return self._raw_signature(digest, algorithm)
        except (pkcs11.PKCS11Error, CertificateAuthorityError) as exc:
            reason = type(exc).__name__ if isinstance(exc, pkcs11.PKCS11Error) else str(exc)
            log.error("CA token unavailable", uri=self._uri.text, error=reason)
            raise unavailable(
                "the CA's signing token is unavailable", "CA_TOKEN_UNAVAILABLE"
            ) from None

    def _raw_signature(self, digest: bytes, algorithm: HashAlgorithm) -> bytes:
        """What the token returns for ``digest`` (under the lock)."""
        if self._ec:
            raw: bytes = self._key.sign(digest, mechanism=Mechanism.ECDSA)
            return raw
        signed: bytes = self._key.sign(
            _DIGEST_INFO[algorithm.name] + digest, mechanism=Mechanism.RSA_PKCS
        )
        return signed

    def _encoded(self, raw: bytes) -> bytes:
        """X.509's form of a token's signature: ECDSA's r||s as Ecdsa-Sig-Value (DER)."""
        if not self._ec:
            return raw
        half = len(raw) // 2
        r, s = int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
        return encode_dss_signature(r, s)

    def _check(self) -> None:
        """One signature (no second login), verified with the CA certificate's public key."""
        public_key = self._public_key
        data = b"myl CA key check " + os.urandom(16)
        algorithm = ca_hash_algorithm(public_key)
        digest = hashlib.new(algorithm.name, data).digest()
        try:
            with self._lock:
                signature = self._encoded(self._raw_signature(digest, algorithm))
            if isinstance(public_key, ec.EllipticCurvePublicKey):
                public_key.verify(signature, data, ec.ECDSA(algorithm))
            else:
                public_key.verify(signature, data, padding.PKCS1v15(), algorithm)
        except InvalidSignature:
            raise CertificateAuthorityError(
                f"the key {self._uri} names does not match the CA certificate"
            ) from None
        except pkcs11.PKCS11Error as exc:
            raise CertificateAuthorityError(
                f"the token cannot sign with the key {self._uri} names ({type(exc).__name__})"
            ) from None


def _find_token(library: Any, uri: Pkcs11Uri) -> Any:
    present: list[str] = []
    matches: list[Any] = []
    try:
        for slot in library.get_slots(token_present=True):
            token = slot.get_token()
            if not token.flags & TokenFlag.TOKEN_INITIALIZED:
                continue  # a free slot (SoftHSM2 always offers one)
            present.append(token.label)
            wanted = (uri.token, uri.serial, uri.manufacturer, uri.model, uri.slot_id)
            actual = (
                token.label,
                bytes(token.serial).decode("ascii", "replace").strip(),
                token.manufacturer_id,
                token.model,
                slot.slot_id,
            )
            if all(w is None or w == a for w, a in zip(wanted, actual, strict=True)):
                matches.append(token)
    except pkcs11.PKCS11Error as exc:
        raise CertificateAuthorityError(
            f"cannot list the tokens of {uri.module_path} ({type(exc).__name__})"
        ) from None
    if not matches:
        shown = ", ".join(repr(label) for label in present) or "none"
        raise CertificateAuthorityError(f"no token matches {uri} (tokens present: {shown})")
    if len(matches) > 1:
        raise CertificateAuthorityError(
            f"{len(matches)} tokens match {uri}; name one (token=, serial= or slot-id=)"
        )
    return matches[0]


def _find_key(session: Any, uri: Pkcs11Uri, label: str) -> Any:
    template: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PRIVATE_KEY}
    if uri.object is not None:
        template[Attribute.LABEL] = uri.object
    if uri.id is not None:
        template[Attribute.ID] = uri.id
    keys = list(session.get_objects(template))
    if not keys:
        raise CertificateAuthorityError(f"token {label!r} has no private key {uri} names")
    if len(keys) > 1:
        raise CertificateAuthorityError(
            f"token {label!r} has {len(keys)} private keys {uri} names; add id= or object="
        )
    return keys[0]
