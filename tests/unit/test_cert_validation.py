from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf import timestamp_pb2
from hypothesis import given
from hypothesis import strategies as st

from cert_service import validation
from cert_service.certcache import device_key, name_key
from cert_service.names import SubdomainError, normalize_lookup_name
from cert_service.storage import to_pb_timestamp
from shared import pagination, wire
from shared.errors import DomainError


def field_of(error: DomainError) -> str:
    assert len(error.violations) == 1
    return error.violations[0].field


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("test-device", ("test-device.myl.zip", False)),
        ("Test-Device.MYL.zip.", ("test-device.myl.zip", False)),
        ("api.test-device.myl.zip", ("test-device.myl.zip", True)),
        ("www", ("www.myl.zip", False)),  # reserved: never allocated, so simply not found
    ],
)
def test_lookup_names(value: str, expected: tuple[str, bool]) -> None:
    assert normalize_lookup_name(value, "myl.zip") == expected


@pytest.mark.parametrize(
    "value",
    ["", "myl.zip", "a.b.c.myl.zip", "x.example.com", "*.a.myl.zip", "a b", "é.myl.zip", "-a"],
)
def test_lookup_names_refused(value: str) -> None:
    with pytest.raises(SubdomainError):
        normalize_lookup_name(value, "myl.zip")


def test_provision_subdomain_defaults_to_a_uuid_and_names_the_field() -> None:
    assert validation.provision_subdomain("", "myl.zip").endswith(".myl.zip")
    assert validation.provision_subdomain("Test-Device.myl.zip", "myl.zip") == (
        "test-device.myl.zip"
    )
    with pytest.raises(DomainError) as caught:
        validation.provision_subdomain("admin", "myl.zip")
    assert field_of(caught.value) == "uuid_subdomain"
    assert "reserved" in caught.value.message


@pytest.mark.parametrize(
    ("check", "field"),
    [
        (lambda: validation.device_id(""), "device_id"),
        (lambda: validation.device_id("a/b"), "device_id"),
        (lambda: validation.certificate_type(3), "certificate_type"),
        (lambda: validation.validity_days(826, 90), "validity_days"),
        (lambda: validation.validity_days(-5, 90), "validity_days"),
        (lambda: validation.csr_text("x" * 20_000), "csr_pem"),
        (lambda: validation.csr_text("PEM\x00"), "csr_pem"),
        (lambda: pagination.page_size(-1), "page_size"),
        (lambda: validation.status_filter(99), "status"),
        (lambda: validation.revocation_reason(5), "reason"),
        (
            lambda: wire.timestamp(timestamp_pb2.Timestamp(nanos=-1), "expire_before"),
            "expire_before",
        ),
    ],
)
def test_bad_values_name_their_field(check: object, field: str) -> None:
    with pytest.raises(DomainError) as caught:
        check()  # type: ignore[operator]
    assert field_of(caught.value) == field


def test_defaults_and_limits() -> None:
    assert validation.validity_days(0, 90) == 90
    assert validation.validity_days(825, 90) == 825
    assert validation.certificate_type(0) == "wildcard"
    assert validation.certificate_type(2) == "single"
    assert pagination.page_size(0) == 100
    assert pagination.page_size(5000) == 1000
    assert validation.status_filter(0) is None
    assert validation.revocation_reason(0) == "unspecified"
    assert validation.csr_text("") is None


@given(
    created=st.datetimes(
        min_value=datetime(1970, 1, 1), max_value=datetime(9000, 1, 1), timezones=st.just(UTC)
    ),
    device=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}", fullmatch=True),
)
def test_page_tokens_round_trip(created: datetime, device: str) -> None:
    fingerprint = validation.query_fingerprint("active", None)
    token = validation.encode_page_token(created, device, fingerprint)
    assert validation.decode_page_token(token, fingerprint) == (created, device)


def test_page_tokens_are_bound_to_their_filters_and_checked() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    token = validation.encode_page_token(now, "device-1", validation.query_fingerprint(None, None))
    other = validation.query_fingerprint("revoked", now + timedelta(days=1))
    with pytest.raises(DomainError) as caught:
        validation.decode_page_token(token, other)
    assert field_of(caught.value) == "page_token"
    forged = base64.urlsafe_b64encode(b'{"t": 1, "d": "a\\u0000b", "q": ""}').decode()
    for bad in ("%%%", "e30", forged, "x" * 2000):
        with pytest.raises(DomainError):
            validation.decode_page_token(bad, validation.query_fingerprint(None, None))
    assert validation.decode_page_token("", "anything") is None


def test_timestamps_and_cache_keys() -> None:
    moment = datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    stamp = to_pb_timestamp(moment)
    assert stamp.ToDatetime(tzinfo=UTC) == moment
    assert wire.timestamp(stamp, "expire_before") == moment
    assert device_key("dev-1") == "myl:cert:{dev-1}:device"
    assert name_key("a.myl.zip") == "myl:cert:{a.myl.zip}:name"
