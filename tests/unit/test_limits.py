"""shared.limits, the pure parts: durations, the overrides file, GCRA and the local fallback."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import ConfigError, EnvReader
from shared.limits import (
    DAY_US,
    DEFAULT_LIMITS,
    HOUR_US,
    SECOND_US,
    Bucket,
    Limit,
    LimitName,
    LimitSet,
    LocalBuckets,
    gcra,
    limits_from_env,
    parse_duration,
)


def test_durations_are_go_style() -> None:
    assert parse_duration("1h") == HOUR_US
    assert parse_duration("168h") == 7 * DAY_US
    assert parse_duration("1h30m") == HOUR_US + 30 * 60 * SECOND_US
    assert parse_duration("90s") == 90 * SECOND_US
    assert parse_duration("250ms") == 250_000
    for bad in ("", "1d", "h", "10", "-1h", "1h 30m", "0s"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)


def test_documented_defaults() -> None:
    limits = LimitSet.builtin()
    assert limits.limit(LimitName.NEW_DEVICES_PER_OPERATOR_KEY, "k") == Limit(1000, 1000, HOUR_US)
    assert limits.limit(LimitName.CERTIFICATES_PER_DEVICE_NAME, "n") == Limit(5, 5, 7 * DAY_US)
    assert limits.limit(LimitName.NEW_API_KEYS_PER_DEVICE, "d") == Limit(20, 20, DAY_US)
    failures = limits.limit(LimitName.FAILED_VERIFICATIONS_PER_ADDRESS, "192.0.2.1")
    assert failures.interval_us == SECOND_US  # one failure a second, sustained


def test_overrides_apply_to_their_ids_only() -> None:
    limits = LimitSet.parse(
        {
            "defaults": {"NewApiKeysPerDevice": {"burst": 2, "count": 10, "period": "24h"}},
            "overrides": [
                {
                    "NewDevicesPerOperatorKey": {
                        "burst": 5000,
                        "count": 5000,
                        "period": "1h",
                        "ids": ["big-key", "other-key"],
                    }
                }
            ],
        }
    )
    big = limits.limit(LimitName.NEW_DEVICES_PER_OPERATOR_KEY, "big-key")
    assert big == Limit(5000, 5000, HOUR_US)
    assert limits.limit(LimitName.NEW_DEVICES_PER_OPERATOR_KEY, "other-key") == big
    assert (
        limits.limit(LimitName.NEW_DEVICES_PER_OPERATOR_KEY, "small-key")
        == DEFAULT_LIMITS[LimitName.NEW_DEVICES_PER_OPERATOR_KEY]
    )
    assert limits.limit(LimitName.NEW_API_KEYS_PER_DEVICE, "d") == Limit(2, 10, DAY_US)


@pytest.mark.parametrize(
    ("document", "complaint"),
    [
        (
            {
                "overrides": [
                    {"NoSuchLimit": {"burst": 1, "count": 1, "period": "1h", "ids": ["x"]}}
                ]
            },
            "unknown limit",
        ),
        (
            {"overrides": [{"NewApiKeysPerDevice": {"burst": 1, "count": 1, "period": "1h"}}]},
            "missing 'ids'",
        ),
        (
            {"defaults": {"NewApiKeysPerDevice": {"burst": 1, "count": 1, "period": "1 day"}}},
            "not a duration",
        ),
        (
            {"defaults": {"NewApiKeysPerDevice": {"burst": 0, "count": 1, "period": "1h"}}},
            "at least 1",
        ),
        (
            {"defaults": {"NewApiKeysPerDevice": {"burst": 1, "count": 1, "period": "1h", "x": 1}}},
            "unknown settings x",
        ),
        ({"limits": {}}, "unknown sections"),
    ],
)
def test_bad_files_are_refused_with_the_reason(document: object, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        LimitSet.parse(document)


def test_a_bad_limits_file_stops_start_up_naming_the_variable(tmp_path: Path) -> None:
    path = tmp_path / "limits.yaml"
    path.write_text("overrides: [{NewApiKeysPerDevice: {burst: 1}}]\n")
    with pytest.raises(ConfigError, match="KEY_SERVICE_LIMITS_FILE"):
        limits_from_env(EnvReader("KEY_SERVICE", {"KEY_SERVICE_LIMITS_FILE": str(path)}))
    with pytest.raises(ConfigError, match="LIMITS_FILE"):
        limits_from_env(EnvReader("KEY_SERVICE", {"LIMITS_FILE": str(tmp_path / "missing")}))
    assert limits_from_env(EnvReader("KEY_SERVICE", {})) == LimitSet.builtin()


def test_gcra_admits_the_burst_then_the_steady_rate() -> None:
    limit = Limit(burst=3, count=6, period_us=60 * SECOND_US)  # one every 10 s, burst 3
    now = 1_000 * SECOND_US
    tat: int | None = None
    for expected_remaining in (2, 1, 0):
        tat, decision = gcra(tat, now, limit, 1, spend=True)
        assert decision.allowed
        assert decision.remaining == expected_remaining
    stored, refused = gcra(tat, now, limit, 1, spend=True)
    assert stored is None
    assert not refused.allowed
    assert refused.retry_after_us == 10 * SECOND_US
    tat2, later = gcra(tat, now + 10 * SECOND_US, limit, 1, spend=True)
    assert later.allowed
    assert tat2 is not None


def test_local_fallback_seeds_unseen_buckets_with_their_burst_spent() -> None:
    local = LocalBuckets()
    limit = Limit(burst=5, count=5, period_us=5 * HOUR_US)  # one an hour
    bucket = Bucket(LimitName.CERTIFICATES_PER_DEVICE_NAME, "a.myl.zip")
    now = 10 * DAY_US
    assert local.spend(bucket, limit, now).allowed
    refused = local.spend(bucket, limit, now)
    assert not refused.allowed
    assert refused.retry_after_us == HOUR_US
    local.refund(bucket, limit, now)
    assert local.spend(bucket, limit, now).allowed
    assert local.spend(bucket, limit, now + HOUR_US).allowed


def test_bucket_keys_carry_the_whole_bucket_as_hash_tag() -> None:
    bucket = Bucket(LimitName.NEW_API_KEYS_PER_DEVICE, "device-1")
    assert bucket.key == "myl:limit:{NewApiKeysPerDevice:device-1}"
    assert LimitName.NEW_API_KEYS_PER_DEVICE.reason == "NEW_API_KEYS_PER_DEVICE_EXCEEDED"
