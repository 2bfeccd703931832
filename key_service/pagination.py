"""key_service's page tokens (`shared.pagination`): keys by (created_at, id), audit events
by sequence number."""

from __future__ import annotations

import uuid
from datetime import datetime

from shared.clock import from_micros, to_micros
from shared.pagination import (
    bad_page_token,
    decode_page_token,
    encode_page_token,
    fingerprint,
    page_size,
)

__all__ = ["page_size"]


def key_page_token(created_at: datetime, key_id: uuid.UUID, *filters: str) -> str:
    return encode_page_token("k1", fingerprint(*filters), str(to_micros(created_at)), key_id.hex)


def parse_key_page_token(token: str, *filters: str) -> tuple[datetime, uuid.UUID] | None:
    position = decode_page_token(token, "k1", 2, fingerprint(*filters))
    if position is None:
        return None
    micros, key_hex = position
    try:
        return from_micros(int(micros)), uuid.UUID(hex=key_hex)
    except (ValueError, OverflowError):
        raise bad_page_token() from None


def audit_page_token(seq: int, *filters: str) -> str:
    return encode_page_token("a1", fingerprint(*filters), str(seq))


def parse_audit_page_token(token: str, *filters: str) -> int | None:
    position = decode_page_token(token, "a1", 1, fingerprint(*filters))
    if position is None:
        return None
    (seq,) = position
    if not seq.isdigit() or len(seq) > 19:
        raise bad_page_token()
    return int(seq)
