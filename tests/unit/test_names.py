"""Unit tests for cert_service.names."""

from __future__ import annotations

import re
import uuid

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from cert_service.names import (
    RESERVED_LABELS,
    SubdomainError,
    certificate_names,
    new_uuid_subdomain,
    normalize_subdomain,
    validate_device_id,
)

ZONE = "myl.zip"
VALID_FQDN = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.myl\.zip", re.ASCII)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("test-device.myl.zip", "test-device.myl.zip"),
        ("test-device", "test-device.myl.zip"),
        ("TEST-device.myl.zip.", "test-device.myl.zip"),
        ("Test-Device.MYL.ZIP", "test-device.myl.zip"),
        ("test", "test.myl.zip"),
        ("a", "a.myl.zip"),
        ("0", "0.myl.zip"),
        ("a" * 63, "a" * 63 + ".myl.zip"),
        (
            "6f1c2a3e-8a4b-4c8d-9e0f-123456789abc.myl.zip",
            "6f1c2a3e-8a4b-4c8d-9e0f-123456789abc.myl.zip",
        ),
    ],
)
def test_normalize_accepts(value: str, expected: str) -> None:
    assert normalize_subdomain(value, ZONE) == expected


def test_normalize_accepts_zone_with_trailing_dot_and_case() -> None:
    assert normalize_subdomain("dev-1", "MYL.ZIP.") == "dev-1.myl.zip"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "empty"),
        ("www", "reserved"),
        ("WWW.myl.zip", "reserved"),
        ("api.myl.zip.", "reserved"),
        ("a.b.myl.zip", "more than one label"),
        ("a" * 64, "at most 63"),
        ("a" * 64 + ".myl.zip", "at most 63"),
        ("-abc", "hyphen"),
        ("abc-", "hyphen"),
        ("evil.com", "not a name directly under myl.zip"),
        ("test-device.myl.zip.evil.com", "not a name directly under"),
        ("myl.zip", "zone"),
        ("myl.zip.", "zone"),
        (".myl.zip", "empty"),
        ("*.myl.zip", "wildcard"),
        ("*.test-device.myl.zip", "wildcard"),
        ("*", "wildcard"),
        ("test device", "whitespace"),
        (" test-device", "whitespace"),
        ("test-device\n", "whitespace"),
        ("tëst", "ASCII"),
        ("\u212aelvin", "ASCII"),  # KELVIN SIGN lowercases to ASCII 'k'
        ("under_score", "letters a-z"),
        ("a..myl.zip", "more than one label"),
        ("xn--abc", "reserved"),
        (".", "not a name directly under"),
        ("..", "not a name directly under"),
        ("test-device.", "not a name directly under"),
        ("zip.", "not a name directly under"),
        ("a" * 300, "at most"),
    ],
)
def test_normalize_refuses(value: str, message: str) -> None:
    with pytest.raises(SubdomainError, match=re.escape(message)):
        normalize_subdomain(value, ZONE)


def test_reserved_labels_exclude_test() -> None:
    assert "test" not in RESERVED_LABELS
    assert "test-device" not in RESERVED_LABELS
    assert {"www", "api", "admin", "mail", "ns1", "localhost"} <= RESERVED_LABELS


def test_invalid_zone_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="zone") as info:
        normalize_subdomain("device", "bad_zone.zip")
    assert not isinstance(info.value, SubdomainError)


def test_subdomain_error_is_value_error_with_message() -> None:
    with pytest.raises(ValueError, match="reserved") as info:
        normalize_subdomain("www", ZONE)
    assert isinstance(info.value, SubdomainError)
    assert "www" in info.value.message


def test_new_uuid_subdomain() -> None:
    first = new_uuid_subdomain(ZONE)
    second = new_uuid_subdomain(ZONE)
    assert first != second
    label, _, zone = first.partition(".")
    assert zone == ZONE
    assert str(uuid.UUID(label)) == label
    assert normalize_subdomain(first, ZONE) == first


def test_certificate_names() -> None:
    assert certificate_names("d.myl.zip", wildcard=True) == ["d.myl.zip", "*.d.myl.zip"]
    assert certificate_names("d.myl.zip", wildcard=False) == ["d.myl.zip"]


@pytest.mark.parametrize(
    "value", ["device-1", "a", "0", "A.b_c:d-e", "x" * 128, "urn:dev:ops:12-34", "9abc"]
)
def test_validate_device_id_accepts(value: str) -> None:
    assert validate_device_id(value) == value


@pytest.mark.parametrize(
    "value", ["", "x" * 129, "-dev", ".dev", "_dev", "dev ice", "dev/1", "dév", "dev\n", " dev"]
)
def test_validate_device_id_refuses(value: str) -> None:
    with pytest.raises(ValueError, match="device id"):
        validate_device_id(value)


_label_chars = st.sampled_from("abcxyzXYZ019-_.*é \t")
_candidates = st.one_of(
    st.text(max_size=80),
    st.text(_label_chars, max_size=70),
    st.text(_label_chars, max_size=70).map(lambda label: label + ".myl.zip"),
    st.text(_label_chars, max_size=70).map(lambda label: label + ".MYL.zip."),
    st.from_regex(r"[A-Za-z0-9-]{0,70}(\.myl\.zip\.?)?", fullmatch=True),
    st.sampled_from(sorted(RESERVED_LABELS)),
)


@given(_candidates)
@example("test-device.myl.zip")
@example("xn--bcher-kva.myl.zip")
def test_normalize_property(value: str) -> None:
    try:
        result = normalize_subdomain(value, ZONE)
    except SubdomainError:
        return
    assert VALID_FQDN.fullmatch(result) is not None
    assert result.endswith(".myl.zip")
    label = result.removesuffix(".myl.zip")
    assert label not in RESERVED_LABELS
    assert label[2:4] != "--"
    assert result == value.lower().removesuffix(".") or result == value.lower() + ".myl.zip"
    assert normalize_subdomain(result, ZONE) == result
