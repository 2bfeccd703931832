"""CA_KEY_URI: what an RFC 7512 URI may say, and what is refused before any token is asked."""

from __future__ import annotations

from pathlib import Path

import pytest

from cert_service.hsm import Pkcs11Uri

MODULE = "module-path=/usr/lib/softhsm/libsofthsm2.so"


def test_a_uri_names_the_module_the_token_and_the_key() -> None:
    uri = Pkcs11Uri.parse(
        "pkcs11:token=My%20CA;serial=0123;manufacturer=SoftHSM%20project;model=SoftHSM%20v2;"
        f"slot-id=7;object=ca;id=%01%ff;type=private?{MODULE}&pin-source=file:/run/ca-pin"
    )
    assert uri.module_path == "/usr/lib/softhsm/libsofthsm2.so"
    assert (uri.token, uri.serial, uri.manufacturer, uri.model) == (
        "My CA",
        "0123",
        "SoftHSM project",
        "SoftHSM v2",
    )
    assert uri.slot_id == 7
    assert (uri.object, uri.id) == ("ca", b"\x01\xff")
    assert uri.pin_source == Path("/run/ca-pin")
    assert str(uri).startswith("pkcs11:token=My%20CA;")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (f"file:/ca.key?{MODULE}", "pkcs11:"),
        ("pkcs11:object=ca", "module-path"),
        (f"pkcs11:token=ca?{MODULE}", "object=<label> and/or id"),
        (f"pkcs11:object=ca;type=public?{MODULE}", "type=private"),
        (f"pkcs11:object=ca;colour=blue?{MODULE}", "not 'colour'"),
        (f"pkcs11:object=ca;object=other?{MODULE}", "object once"),
        (f"pkcs11:object=ca;slot-id=one?{MODULE}", "slot-id"),
        (f"pkcs11:object=%ff?{MODULE}", "UTF-8"),
        (f"pkcs11:object=ca?{MODULE}&pin-source=relative/pin", "absolute path"),
        (f"pkcs11:object=ca?{MODULE}&pin-value=123456", "no pin-value"),
    ],
    ids=[
        "scheme", "no-module", "no-key", "public", "unknown", "twice", "slot-id", "not-utf8",
        "relative-pin", "pin-value",
    ],
)  # fmt: skip
def test_a_uri_that_says_too_little_or_too_much_is_refused(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as info:
        Pkcs11Uri.parse(text)
    assert "123456" not in str(info.value)
