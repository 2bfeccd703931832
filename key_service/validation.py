"""Request field checks. Each raises INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Final

from google.protobuf import duration_pb2, timestamp_pb2

from key_service.permissions import ADMIN, KNOWN, VOCABULARY, canonical
from shared.errors import invalid_argument
from shared.wire import timestamp

# The same rule cert_service applies to device ids.
DEVICE_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}", re.ASCII)
KEY_ID: Final = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", re.ASCII
)
_DNS_LABEL: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.ASCII)

MAX_DEVICE_NAME: Final = 255
MAX_USER_INITIALS: Final = 16
MAX_REASON: Final = 500
MAX_SUBDOMAIN: Final = 251
MAX_PERMISSIONS: Final = 32
MAX_GRACE: Final = timedelta(days=30)


def device_id(value: str, field: str = "device_id") -> str:
    if not value:
        raise invalid_argument(field, "is required")
    if DEVICE_ID.fullmatch(value) is None:
        raise invalid_argument(
            field,
            "must be 1-128 characters of letters, digits, '.', '_', ':' or '-', "
            "starting with a letter or digit",
        )
    return value


def optional_device_id(value: str, field: str = "device_id") -> str | None:
    return device_id(value, field) if value else None


def key_id(value: str, field: str = "key_id") -> uuid.UUID:
    if not value:
        raise invalid_argument(field, "is required")
    if KEY_ID.fullmatch(value) is None:
        raise invalid_argument(field, "must be a UUID such as 2f1c...-...")
    return uuid.UUID(value)


def optional_key_id(value: str, field: str = "key_id") -> uuid.UUID | None:
    return key_id(value, field) if value else None


def text(value: str, field: str, max_length: int) -> str:
    """Free text: at most `max_length` characters, printable (no control characters)."""
    if len(value) > max_length:
        raise invalid_argument(field, f"must be at most {max_length} characters")
    if not value.isprintable():
        raise invalid_argument(field, "must not contain control or unprintable characters")
    return value


def subdomain(value: str, field: str = "uuid_subdomain") -> str:
    """A DNS name or single label, lowercase letters, digits and hyphens."""
    if len(value) > MAX_SUBDOMAIN:
        raise invalid_argument(field, f"must be at most {MAX_SUBDOMAIN} characters")
    labels = value.rstrip(".").split(".")
    if not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise invalid_argument(field, "must be a DNS name of lowercase letters, digits and hyphens")
    return value.rstrip(".")


def permissions(values: Sequence[str], field: str = "permissions") -> tuple[str, ...]:
    """Known permission names, deduplicated; empty stays empty."""
    if len(values) > MAX_PERMISSIONS:
        raise invalid_argument(field, f"must have at most {MAX_PERMISSIONS} entries")
    for index, value in enumerate(values):
        if value not in KNOWN:
            raise invalid_argument(
                f"{field}[{index}]", "unknown permission; known: " + ", ".join(VOCABULARY)
            )
    return canonical(values)


def device_key_permissions(values: Sequence[str], field: str = "permissions") -> tuple[str, ...]:
    granted = permissions(values, field)
    if ADMIN in granted:
        raise invalid_argument(
            f"{field}[{list(values).index(ADMIN)}]",
            "admin may be granted to operator keys only (python -m key_service admin)",
        )
    return granted


def rate_limit(value: int, default: int, maximum: int, field: str = "rate_limit") -> int:
    if value == 0:
        return default
    if not 1 <= value <= maximum:
        raise invalid_argument(field, f"must be from 1 to {maximum} requests per minute")
    return value


def expire_time(
    value: timestamp_pb2.Timestamp, *, now: datetime, maximum: timedelta, field: str = "expire_time"
) -> datetime:
    moment = timestamp(value, field)
    if moment <= now:
        shown = moment.isoformat().replace("+00:00", "Z")
        if value.seconds == 0 and value.nanos == 0:
            # What `{}` for a timestamp becomes: not a moment anyone meant.
            raise invalid_argument(
                field,
                f"must lie in the future, got {shown} (the zero timestamp); write it as an "
                'RFC 3339 string, e.g. "2030-01-01T00:00:00Z"',
            )
        raise invalid_argument(field, f"must lie in the future, got {shown}")
    if moment > now + maximum:
        raise invalid_argument(field, f"must lie at most {maximum.days} days ahead")
    return moment


def grace_period(value: duration_pb2.Duration, field: str = "grace_period") -> timedelta:
    seconds, nanos = value.seconds, value.nanos
    if not -999_999_999 <= nanos <= 999_999_999 or (seconds > 0 > nanos or seconds < 0 < nanos):
        raise invalid_argument(field, "is not a valid duration")
    if seconds < 0 or nanos < 0:
        raise invalid_argument(field, "must not be negative")
    limit = int(MAX_GRACE.total_seconds())
    if seconds > limit or (seconds == limit and nanos > 0):
        raise invalid_argument(field, f"must be at most {MAX_GRACE.days} days")
    return timedelta(seconds=seconds, microseconds=nanos // 1000)
