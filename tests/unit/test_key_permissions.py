"""Permission vocabulary, request validation and page tokens (pure logic)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from key_service import pagination, permissions, validation
from key_service.config import KeyServiceConfig
from shared.config import ConfigError
from shared.errors import DomainError, ErrorKind

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def violation(error: pytest.ExceptionInfo[DomainError]) -> str:
    assert error.value.kind is ErrorKind.INVALID_ARGUMENT
    return error.value.violations[0].field


def test_vocabulary_and_defaults() -> None:
    assert permissions.VOCABULARY == (
        "ssl:read", "ssl:write", "device:read", "device:write", "api:access", "admin",
    )  # fmt: skip
    assert permissions.DEFAULT_PERMISSIONS == ("ssl:read", "device:read", "api:access")
    assert permissions.canonical(["admin", "ssl:read", "ssl:read"]) == ("ssl:read", "admin")


def test_grants() -> None:
    held = frozenset({"ssl:read", "api:access"})
    assert permissions.grants(held, ["ssl:read"])
    assert permissions.grants(held, [])
    assert not permissions.grants(held, ["ssl:read", "ssl:write"])
    assert permissions.grants(frozenset({"admin"}), ["ssl:write", "api:access"])


def test_permission_validation_names_the_entry() -> None:
    assert validation.permissions(["device:read", "ssl:read"]) == ("ssl:read", "device:read")
    with pytest.raises(DomainError) as unknown:
        validation.permissions(["ssl:read", "root"])
    assert violation(unknown) == "permissions[1]"
    with pytest.raises(DomainError) as admin:
        validation.device_key_permissions(["ssl:read", "admin"])
    assert violation(admin) == "permissions[1]"
    with pytest.raises(DomainError) as many:
        validation.permissions(["ssl:read"] * 33)
    assert violation(many) == "permissions"


@pytest.mark.parametrize(
    ("value", "ok"),
    [("dev-1", True), ("A.b_c:d-9", True), ("x" * 128, True), ("x" * 129, False),
     ("-dev", False), ("dev 1", False), ("dév", False), ("dev\x00", False)],
)  # fmt: skip
def test_device_ids(value: str, ok: bool) -> None:
    if ok:
        assert validation.device_id(value) == value
    else:
        with pytest.raises(DomainError):
            validation.device_id(value)


def test_text_rejects_control_characters_and_long_values() -> None:
    assert validation.text("Kitchen sensor ✓", "device_name", 255) == "Kitchen sensor ✓"
    for bad in ["a\x00b", "line\nbreak", "x" * 256]:
        with pytest.raises(DomainError) as error:
            validation.text(bad, "device_name", 255)
        assert violation(error) == "device_name"


def test_expire_time() -> None:
    future = timestamp_pb2.Timestamp()
    future.FromDatetime(NOW + timedelta(days=1))
    assert validation.expire_time(future, now=NOW, maximum=timedelta(days=10)) == NOW + timedelta(
        days=1
    )
    past = timestamp_pb2.Timestamp(seconds=int(NOW.timestamp()))
    too_far = timestamp_pb2.Timestamp(seconds=int((NOW + timedelta(days=11)).timestamp()))
    broken = [timestamp_pb2.Timestamp(seconds=2**62), timestamp_pb2.Timestamp(nanos=-1)]
    for value in [past, too_far, *broken]:
        with pytest.raises(DomainError) as error:
            validation.expire_time(value, now=NOW, maximum=timedelta(days=10))
        assert violation(error) == "expire_time"


def test_grace_period() -> None:
    assert validation.grace_period(duration_pb2.Duration()) == timedelta(0)
    assert validation.grace_period(duration_pb2.Duration(seconds=90, nanos=500_000_000)) == (
        timedelta(seconds=90.5)
    )
    for bad in [(-1, 0), (1, -1), (0, 10**9), (30 * 86400, 1), (2**40, 0)]:
        with pytest.raises(DomainError) as error:
            validation.grace_period(duration_pb2.Duration(seconds=bad[0], nanos=bad[1]))
        assert violation(error) == "grace_period"


def test_page_tokens_round_trip_and_are_bound_to_filters() -> None:
    key_id = uuid.uuid4()
    token = pagination.key_page_token(NOW, key_id, "dev-1", "False")
    assert pagination.parse_key_page_token(token, "dev-1", "False") == (NOW, key_id)
    for filters in [("dev-2", "False"), ("dev-1", "True")]:
        with pytest.raises(DomainError):
            pagination.parse_key_page_token(token, *filters)
    for garbage in ["x", "!!!!", "a" * 600, token[:-2]]:
        with pytest.raises(DomainError):
            pagination.parse_key_page_token(garbage, "dev-1", "False")
    audit = pagination.audit_page_token(42, "", "")
    assert pagination.parse_audit_page_token(audit, "", "") == 42
    assert pagination.page_size(0) == 100
    assert pagination.page_size(5000) == 1000
    with pytest.raises(DomainError):
        pagination.page_size(-1)


def test_config_defaults_and_overrides() -> None:
    config = KeyServiceConfig.from_env({})
    assert config.server.port == 50052
    assert config.server.metrics_port == 9465
    assert config.cert_service_address == "127.0.0.1:50051"
    assert (config.default_rate_limit, config.default_key_ttl_days) == (1000, 365)
    tuned = KeyServiceConfig.from_env(
        {"CERT_SERVICE_ADDRESS": "cert:1", "KEY_SERVICE_CERT_SERVICE_ADDRESS": "cert:2",
         "KEY_SERVICE_CACHE_TTL": "30", "DEFAULT_RATE_LIMIT": "60"}
    )  # fmt: skip
    assert (tuned.cert_service_address, tuned.cache_ttl, tuned.default_rate_limit) == (
        "cert:2",
        30.0,
        60,
    )
    with pytest.raises(ConfigError, match="KEY_SERVICE_DEFAULT_RATE_LIMIT"):
        KeyServiceConfig.from_env({"KEY_SERVICE_DEFAULT_RATE_LIMIT": "0"})
