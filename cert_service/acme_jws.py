"""The JOSE side of the RFC 8555 server: problem documents, and JWS requests checked as
section 6.2 says, before anything reads their payload.

A request body is a flattened JWS (RFC 7515 section 7.2.2) with exactly `protected`, `payload`
and `signature`. Its protected header names `alg` (ES256, ES384, ES512 or RS256; never `none`
nor a MAC), `nonce`, `url`, and exactly one of `jwk` (newAccount, revokeCert by certificate key)
or `kid` (an account URL). Everything that is wrong about a request is a `Problem`: an RFC 8555
error type with its HTTP status, never a 5xx.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

ERROR_NS: Final = "urn:ietf:params:acme:error:"
# A JWS body: the gateway refuses nothing below its request limits, so the server bounds it.
MAX_BODY: Final = 64 * 1024
_MIN_RSA_BITS: Final = 2048
_MAX_RSA_BITS: Final = 8192
_EC_ALGS: Final[dict[str, tuple[type[ec.EllipticCurve], hashes.HashAlgorithm, int]]] = {
    "ES256": (ec.SECP256R1, hashes.SHA256(), 32),
    "ES384": (ec.SECP384R1, hashes.SHA384(), 48),
    "ES512": (ec.SECP521R1, hashes.SHA512(), 66),
}
_RSA_ALGS: Final[dict[str, hashes.HashAlgorithm]] = {"RS256": hashes.SHA256()}
SIGNATURE_ALGORITHMS: Final = (*_EC_ALGS, *_RSA_ALGS)
_CURVES: Final[dict[str, type[ec.EllipticCurve]]] = {
    "P-256": ec.SECP256R1,
    "P-384": ec.SECP384R1,
    "P-521": ec.SECP521R1,
}
_CURVE_NAMES: Final = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


@dataclass
class Problem(Exception):
    """An RFC 7807 problem document with an RFC 8555 error type (section 6.7)."""

    kind: str
    detail: str
    status: int = 400
    headers: dict[str, str] = field(default_factory=dict)
    subproblems: list[dict[str, Any]] = field(default_factory=list)
    # Further members of the document (badSignatureAlgorithm's `algorithms`).
    extra: dict[str, Any] = field(default_factory=dict)

    def document(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": ERROR_NS + self.kind,
            "detail": self.detail,
            "status": self.status,
        }
        if self.subproblems:
            body["subproblems"] = self.subproblems
        return {**body, **self.extra}


def malformed(detail: str) -> Problem:
    return Problem("malformed", detail)


def b64decode(value: object, what: str) -> bytes:
    """base64url without padding (RFC 7515 section 2); `malformed` naming `what` otherwise."""
    if not isinstance(value, str) or "=" in value:
        raise malformed(f"{what} must be base64url without padding")
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise malformed(f"{what} must be base64url without padding") from None


def b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise malformed(f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise malformed(f"{what} must be a JSON object")
    return value


@dataclass(frozen=True)
class Jws:
    """A parsed flattened JWS whose signature has not been checked yet."""

    header: dict[str, Any]
    payload: bytes
    signing_input: bytes
    signature: bytes

    @property
    def alg(self) -> str:
        return str(self.header.get("alg"))

    def payload_object(self) -> dict[str, Any]:
        return json_object(self.payload, "payload")

    @property
    def post_as_get(self) -> bool:
        return self.payload == b""


def parse_jws(body: bytes) -> Jws:
    if len(body) > MAX_BODY:
        raise Problem("malformed", f"a request body is at most {MAX_BODY} bytes", status=413)
    outer = json_object(body, "the request body")
    if set(outer) != {"protected", "payload", "signature"}:
        raise malformed(
            "the body must be a flattened JWS with exactly protected, payload and signature"
        )
    protected, payload = outer["protected"], outer["payload"]
    header = json_object(b64decode(protected, "protected"), "the protected header")
    signature = b64decode(outer["signature"], "signature")
    raw_payload = b64decode(payload, "payload")
    return Jws(header, raw_payload, f"{protected}.{payload}".encode("ascii"), signature)


def header_text(jws: Jws, name: str) -> str:
    value = jws.header.get(name)
    if not isinstance(value, str) or not value:
        raise malformed(f"the protected header must carry {name!r}, a string")
    return value


def load_jwk(jwk: object) -> PublicKey:
    """The account public key of a JWK (EC P-256/384/521 or RSA 2048-8192 bits)."""
    if not isinstance(jwk, dict):
        raise Problem("malformed", "jwk must be a JSON object")
    kty = jwk.get("kty")
    try:
        if kty == "EC":
            curve = _CURVES.get(jwk.get("crv"))  # type: ignore[arg-type]
            if curve is None:
                raise Problem("badPublicKey", "EC keys must be on P-256, P-384 or P-521")
            x = int.from_bytes(b64decode(jwk.get("x"), "jwk.x"), "big")
            y = int.from_bytes(b64decode(jwk.get("y"), "jwk.y"), "big")
            return ec.EllipticCurvePublicNumbers(x, y, curve()).public_key()
        if kty == "RSA":
            n = int.from_bytes(b64decode(jwk.get("n"), "jwk.n"), "big")
            e = int.from_bytes(b64decode(jwk.get("e"), "jwk.e"), "big")
            if not _MIN_RSA_BITS <= n.bit_length() <= _MAX_RSA_BITS:
                raise Problem("badPublicKey", "RSA keys must have 2048 to 8192 bits")
            return rsa.RSAPublicNumbers(e, n).public_key()
    except ValueError:
        raise Problem("badPublicKey", "the jwk is not a valid public key") from None
    raise Problem("badPublicKey", "jwk.kty must be EC or RSA")


def public_jwk(key: PublicKey) -> dict[str, str]:
    """The JWK with only the required members (RFC 7638 section 3.2), what is stored."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        numbers = key.public_numbers()
        size = (key.curve.key_size + 7) // 8
        return {
            "crv": _CURVE_NAMES[key.curve.name],
            "kty": "EC",
            "x": b64encode(numbers.x.to_bytes(size, "big")),
            "y": b64encode(numbers.y.to_bytes(size, "big")),
        }
    rsa_numbers = key.public_numbers()
    return {
        "e": b64encode(rsa_numbers.e.to_bytes((rsa_numbers.e.bit_length() + 7) // 8, "big")),
        "kty": "RSA",
        "n": b64encode(rsa_numbers.n.to_bytes((rsa_numbers.n.bit_length() + 7) // 8, "big")),
    }


def thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638 SHA-256 thumbprint of a `public_jwk`."""
    canonical = json.dumps(jwk, sort_keys=True, separators=(",", ":"))
    return b64encode(hashlib.sha256(canonical.encode("ascii")).digest())


def verify_signature(jws: Jws, key: PublicKey) -> None:
    """`badSignatureAlgorithm` for an alg we do not take or that does not fit the key,
    `malformed` for a signature that does not verify."""
    alg = jws.alg
    if isinstance(key, ec.EllipticCurvePublicKey) and alg in _EC_ALGS:
        curve, digest, size = _EC_ALGS[alg]
        if not isinstance(key.curve, curve):
            raise Problem(
                "badSignatureAlgorithm",
                f"{alg} does not fit a key on {_CURVE_NAMES.get(key.curve.name, key.curve.name)}",
                extra={"algorithms": list(SIGNATURE_ALGORITHMS)},
            )
        if len(jws.signature) != 2 * size:
            raise malformed("the JWS signature does not verify")
        der = encode_dss_signature(
            int.from_bytes(jws.signature[:size], "big"),
            int.from_bytes(jws.signature[size:], "big"),
        )
        try:
            key.verify(der, jws.signing_input, ec.ECDSA(digest))
        except InvalidSignature:
            raise malformed("the JWS signature does not verify") from None
        return
    if isinstance(key, rsa.RSAPublicKey) and alg in _RSA_ALGS:
        try:
            key.verify(jws.signature, jws.signing_input, padding.PKCS1v15(), _RSA_ALGS[alg])
        except InvalidSignature:
            raise malformed("the JWS signature does not verify") from None
        return
    raise Problem(
        "badSignatureAlgorithm",
        f"alg must be one of {', '.join(SIGNATURE_ALGORITHMS)}, and fit the key",
        extra={"algorithms": list(SIGNATURE_ALGORITHMS)},
    )


def verify_hs256(jws: Jws, secret: bytes) -> bool:
    """The External Account Binding's MAC (RFC 8555 section 7.3.4), compared in constant
    time."""
    if jws.alg != "HS256":
        return False
    expected = hmac.new(secret, jws.signing_input, hashlib.sha256).digest()
    return hmac.compare_digest(expected, jws.signature)


def inner_jws(value: object, what: str) -> Jws:
    """A JWS nested in a payload (the EAB, keyChange's inner JWS), as a JSON object."""
    if not isinstance(value, dict):
        raise malformed(f"{what} must be a flattened JWS object")
    return parse_jws(json.dumps(value).encode("utf-8"))
