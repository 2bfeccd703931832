"""The API key format: `myl_<body><checksum>`, recognisable offline.

- `myl_`: a fixed prefix, so secret scanners and people can spot a key.
- body: 32 random bytes (256 bits) in base62, left-padded to 43 characters.
- checksum: CRC32 of the body's ASCII, in base62, left-padded to 6 characters.

A key is 53 characters in all. The checksum lets anyone (a secret scanner, the
service's hot path) tell a well-formed key from a typo or random string
without a lookup; it is not a secret and adds no security. Only the SHA-256 of
the whole key string is stored, with a display prefix (`myl_` and the first 8
body characters) that identifies the key to humans.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

PREFIX: Final = "myl_"
ALPHABET: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
RANDOM_BYTES: Final = 32
BODY_LENGTH: Final = 43  # ceil(256 / log2(62))
CHECKSUM_LENGTH: Final = 6  # 62**6 > 2**32
KEY_LENGTH: Final = len(PREFIX) + BODY_LENGTH + CHECKSUM_LENGTH
DISPLAY_BODY_CHARS: Final = 8

_SHAPE: Final = re.compile(rf"{PREFIX}[0-9A-Za-z]{{{BODY_LENGTH + CHECKSUM_LENGTH}}}", re.ASCII)
_BODY_END: Final = len(PREFIX) + BODY_LENGTH


def base62(value: int, width: int) -> str:
    """`value` in base62, left-padded with zeros to `width` characters."""
    if value < 0:
        raise ValueError("base62 encodes non-negative integers")
    digits = []
    while value:
        value, digit = divmod(value, 62)
        digits.append(ALPHABET[digit])
    if len(digits) > width:
        raise ValueError(f"value needs more than {width} base62 digits")
    return "".join(reversed(digits)).rjust(width, "0")


def checksum(body: str) -> str:
    return base62(zlib.crc32(body.encode("ascii")), CHECKSUM_LENGTH)


@dataclass(frozen=True)
class NewKey:
    """A freshly generated key. `plaintext` goes to the caller once, never to storage."""

    plaintext: str
    key_hash: bytes
    display_prefix: str


def generate(random_bytes: Callable[[int], bytes] = secrets.token_bytes) -> NewKey:
    body = base62(int.from_bytes(random_bytes(RANDOM_BYTES), "big"), BODY_LENGTH)
    plaintext = PREFIX + body + checksum(body)
    return NewKey(plaintext, hash_key(plaintext), display_prefix(plaintext))


def is_well_formed(key: str) -> bool:
    """Prefix, length, alphabet and checksum: no I/O, a few hundred nanoseconds."""
    if len(key) != KEY_LENGTH or _SHAPE.fullmatch(key) is None:
        return False
    body = key[len(PREFIX) : _BODY_END]
    return key[_BODY_END:] == base62(zlib.crc32(body.encode("ascii")), CHECKSUM_LENGTH)


def hash_key(key: str) -> bytes:
    """What storage and the cache know a key by: SHA-256 of the whole key string."""
    return hashlib.sha256(key.encode("utf-8")).digest()


def display_prefix(key: str) -> str:
    return key[: len(PREFIX) + DISPLAY_BODY_CHARS]
