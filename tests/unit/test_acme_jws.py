"""The ACME server's JWS checks (cert_service.acme_jws), pure logic: every algorithm it takes
verifies what its key signed and nothing else, RFC 7638's thumbprint, and malformed input is
always a `Problem`, never another exception."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from cert_service.acme_jws import (
    Problem,
    b64encode,
    load_jwk,
    parse_jws,
    public_jwk,
    thumbprint,
    verify_hs256,
    verify_signature,
)
from cert_service.acme_server import EabKeys


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
_EC = {
    "ES256": (ec.SECP256R1(), hashes.SHA256(), 32),
    "ES384": (ec.SECP384R1(), hashes.SHA384(), 48),
    "ES512": (ec.SECP521R1(), hashes.SHA512(), 66),
}
KEYS: dict[str, PrivateKey] = {
    alg: ec.generate_private_key(curve) for alg, (curve, _, _) in _EC.items()
}
KEYS["RS256"] = rsa.generate_private_key(65537, 2048)


def jws(alg: str, payload: bytes, header: dict[str, Any] | None = None) -> bytes:
    key = KEYS[alg]
    protected = b64(json.dumps({"alg": alg, **(header or {})}).encode())
    signing_input = f"{protected}.{b64(payload)}".encode()
    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    else:
        _, digest, size = _EC[alg]
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(digest)))
        signature = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    return json.dumps(
        {"protected": protected, "payload": b64(payload), "signature": b64(signature)}
    ).encode()


@pytest.mark.parametrize("alg", sorted(KEYS))
def test_each_algorithm_verifies_its_own_signature_and_the_jwk_round_trips(alg: str) -> None:
    key = KEYS[alg].public_key()
    jwk = public_jwk(key)
    assert public_jwk(load_jwk(jwk)) == jwk
    verify_signature(parse_jws(jws(alg, b'{"a": 1}')), load_jwk(jwk))


@settings(max_examples=50, deadline=None)
@given(
    alg=st.sampled_from(sorted(KEYS)), payload=st.binary(max_size=64), flip=st.integers(0, 10**6)
)
def test_any_changed_byte_is_refused_as_a_problem(alg: str, payload: bytes, flip: int) -> None:
    body = json.loads(jws(alg, payload))
    signature = bytearray(base64.urlsafe_b64decode(body["signature"] + "=="))
    signature[flip % len(signature)] ^= 1 + flip % 255
    body["signature"] = b64(bytes(signature))
    with pytest.raises(Problem) as refused:
        verify_signature(parse_jws(json.dumps(body).encode()), KEYS[alg].public_key())
    assert refused.value.kind == "malformed"


@pytest.mark.parametrize(
    ("alg", "key"), [("ES384", "ES256"), ("RS256", "ES256"), ("ES256", "RS256"), ("none", "ES256")]
)
def test_an_algorithm_that_does_not_fit_the_key_is_bad_signature_algorithm(
    alg: str, key: str
) -> None:
    body = json.loads(jws(key, b""))
    body["protected"] = b64(json.dumps({"alg": alg}).encode())
    with pytest.raises(Problem) as refused:
        verify_signature(parse_jws(json.dumps(body).encode()), KEYS[key].public_key())
    assert refused.value.kind == "badSignatureAlgorithm"
    assert "ES256" in refused.value.document()["algorithms"]


def test_rfc_7638_thumbprint_example() -> None:
    # RFC 7638 section 3.1.
    jwk = {
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFx"
        "uhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5"
        "v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrd"
        "kt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        "e": "AQAB",
    }
    assert thumbprint(public_jwk(load_jwk(jwk))) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_hs256_binding_compares_the_mac() -> None:
    secret = b"k" * 32
    protected = b64(json.dumps({"alg": "HS256"}).encode())
    mac = hmac.new(secret, f"{protected}.{b64(b'x')}".encode(), hashlib.sha256).digest()
    good = json.dumps({"protected": protected, "payload": b64(b"x"), "signature": b64(mac)})
    assert verify_hs256(parse_jws(good.encode()), secret)
    assert not verify_hs256(parse_jws(good.encode()), b"j" * 32)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=16,
)


@settings(max_examples=300, deadline=None)
@given(body=st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode())))
def test_any_body_parses_or_is_a_problem(body: bytes) -> None:
    problem = problem_of(lambda: parse_jws(body))
    if problem is None:
        problem = problem_of(lambda: verify_signature(parse_jws(body), KEYS["ES256"].public_key()))
    assert problem is None or 400 <= problem.status < 500


@settings(max_examples=200, deadline=None)
@given(jwk=json_values)
def test_any_jwk_loads_or_is_a_problem(jwk: Any) -> None:
    problem = problem_of(lambda: load_jwk(jwk))
    assert problem is None or problem.kind in ("malformed", "badPublicKey")


def problem_of(call: Callable[[], object]) -> Problem | None:
    """The Problem `call` raised, or None; any other exception fails the test."""
    try:
        call()
    except Problem as problem:
        return problem
    return None


def test_no_eab_hmac_key_begins_with_a_dash_that_a_command_line_reads_as_an_option() -> None:
    """One base64url key in 64 begins with `-`; certbot's `--eab-hmac-key KEY` then fails."""
    keys = EabKeys(b"a test secret")
    encoded = [b64encode(keys.hmac_key(keys.new_kid())) for _ in range(2000)]
    assert not [key for key in encoded if key.startswith("-")]
    assert len({key[0] for key in encoded}) > 32  # every other first character still occurs
