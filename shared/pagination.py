"""Page sizes and opaque page tokens for keyset pagination (AIP-158), for both services.

A token is URL-safe base64 of `<kind>.<position...>.<filter fingerprint>`. The kind says which
list it pages; the fingerprint ties it to the filters of the request that produced it. A token
used with other filters, edited or made up is INVALID_ARGUMENT naming `page_token`, never an
error deeper down: the caller checks each position part it gets back the same way.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Final

from shared.errors import DomainError, invalid_argument

DEFAULT_PAGE_SIZE: Final = 100
MAX_PAGE_SIZE: Final = 1000
_MAX_TOKEN_LENGTH: Final = 512


def page_size(value: int, field: str = "page_size") -> int:
    """0 means the default; above the maximum is coerced to it (AIP-158); negative is refused."""
    if value < 0:
        raise invalid_argument(field, "must not be negative")
    if value == 0:
        return DEFAULT_PAGE_SIZE
    return min(value, MAX_PAGE_SIZE)


def fingerprint(*filters: str) -> str:
    """What binds a token to its request's filters."""
    return hashlib.sha256("\x00".join(filters).encode()).hexdigest()[:12]


def bad_page_token() -> DomainError:
    return invalid_argument("page_token", "is not a page token from this service")


def encode_page_token(kind: str, filters: str, *position: str) -> str:
    """Only the last part of `position` may contain a dot."""
    text = ".".join((kind, *position, filters))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_page_token(token: str, kind: str, count: int, filters: str) -> list[str] | None:
    """The `count` position parts of a token of `kind` for `filters`; None for no token (the
    first page)."""
    if not token:
        return None
    if len(token) > _MAX_TOKEN_LENGTH or not token.isascii():
        raise bad_page_token()
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        raise bad_page_token() from None
    head, _, rest = text.partition(".")
    rest, _, bound = rest.rpartition(".")
    position = rest.split(".", count - 1)
    if head != kind or len(position) != count:
        raise bad_page_token()
    if bound != filters:
        raise invalid_argument(
            "page_token", "was issued for different filters; repeat the first request"
        )
    return position
