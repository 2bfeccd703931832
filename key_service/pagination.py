"""Opaque page tokens for keyset pagination.

A token is URL-safe base64 of `<kind>.<position...>.<filter fingerprint>`.
The fingerprint ties a token to the filters of the request that produced it;
a token used with other filters, edited or made up is INVALID_ARGUMENT.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import uuid
from datetime import datetime
from typing import Final

from shared.clock import from_micros, to_micros
from shared.errors import invalid_argument

DEFAULT_PAGE_SIZE: Final = 100
MAX_PAGE_SIZE: Final = 1000
_MAX_TOKEN_LENGTH: Final = 512


def page_size(value: int, field: str = "page_size") -> int:
    """0 means the default; above the maximum is coerced to it (AIP-158)."""
    if value < 0:
        raise invalid_argument(field, "must not be negative")
    if value == 0:
        return DEFAULT_PAGE_SIZE
    return min(value, MAX_PAGE_SIZE)


def _fingerprint(*filters: str) -> str:
    return hashlib.sha256("\x00".join(filters).encode()).hexdigest()[:12]


def _encode(*parts: str) -> str:
    return base64.urlsafe_b64encode(".".join(parts).encode()).decode().rstrip("=")


def _decode(token: str, kind: str, count: int, fingerprint: str) -> list[str]:
    def bad() -> Exception:
        return invalid_argument("page_token", "not a page token of this request")

    if len(token) > _MAX_TOKEN_LENGTH or not token.isascii():
        raise bad()
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        raise bad() from None
    parts = text.split(".")
    if len(parts) != count + 2 or parts[0] != kind or parts[-1] != fingerprint:
        raise bad()
    return parts[1:-1]


def key_page_token(created_at: datetime, key_id: uuid.UUID, *filters: str) -> str:
    return _encode("k1", str(to_micros(created_at)), key_id.hex, _fingerprint(*filters))


def parse_key_page_token(token: str, *filters: str) -> tuple[datetime, uuid.UUID] | None:
    if not token:
        return None
    micros, key_hex = _decode(token, "k1", 2, _fingerprint(*filters))
    try:
        return from_micros(int(micros)), uuid.UUID(hex=key_hex)
    except (ValueError, OverflowError):
        raise invalid_argument("page_token", "not a page token of this request") from None


def audit_page_token(seq: int, *filters: str) -> str:
    return _encode("a1", str(seq), _fingerprint(*filters))


def parse_audit_page_token(token: str, *filters: str) -> int | None:
    if not token:
        return None
    (seq,) = _decode(token, "a1", 1, _fingerprint(*filters))
    if not seq.isdigit() or len(seq) > 19:
        raise invalid_argument("page_token", "not a page token of this request")
    return int(seq)
