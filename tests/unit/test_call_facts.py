"""What the server wrapper reads from a call's metadata (shared/server.py `_call_facts`)."""

from __future__ import annotations

import re

from shared.identity import AUTHORIZED_METHOD_HEADER, KEY_ID_HEADER
from shared.server import _call_facts


def test_a_call_without_a_request_id_gets_one_of_its_own_never_repeated() -> None:
    made = [_call_facts((("user-agent", "grpc-c"),))[0] for _ in range(10_000)]
    assert len(set(made)) == len(made)
    assert all(re.fullmatch(r"[0-9a-f]{32}", request_id) for request_id in made)


def test_a_callers_request_id_and_the_gateways_authorization_are_read() -> None:
    metadata = (
        ("x-request-id", "from-the-gateway"),
        (KEY_ID_HEADER, "a-key-id"),
        (AUTHORIZED_METHOD_HEADER, "/myl.cert.v1.CertificateService/GetCertificate"),
    )
    assert _call_facts(metadata) == (
        "from-the-gateway",
        True,
        "/myl.cert.v1.CertificateService/GetCertificate",
    )
    # An id too long to log is replaced, not trusted.
    assert _call_facts((("x-request-id", "x" * 129),))[0] != "x" * 129
