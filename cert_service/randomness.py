"""Cryptographically secure random bytes, fetched from the kernel in blocks.

Every `os.urandom` call is a system call, and system calls are a measurable part of a
provisioning request (a UUID label and a certificate serial each need one). This hands out
slices of one 4 KiB `os.urandom` block instead. The bytes are the kernel CSPRNG's output all the
same: a serial made from them still carries the 64+ bits of CSPRNG output CA/Browser Forum rules
ask for.
"""

from __future__ import annotations

import os
import threading
import uuid
from typing import Final

_BLOCK: Final = 4096
_lock = threading.Lock()
_buffer = b""
_offset = 0


def random_bytes(n: int) -> bytes:
    """`n` (at most 4096) bytes from the kernel CSPRNG, each byte handed out once."""
    global _buffer, _offset
    if not 0 < n <= _BLOCK:
        raise ValueError(f"between 1 and {_BLOCK} bytes, not {n}")
    with _lock:
        if _offset + n > len(_buffer):
            _buffer, _offset = os.urandom(_BLOCK), 0
        chunk = _buffer[_offset : _offset + n]
        _offset += n
    return chunk


def uuid4() -> uuid.UUID:
    """A random (version 4) UUID."""
    return uuid.UUID(bytes=random_bytes(16), version=4)


def serial_number() -> int:
    """A positive 159-bit certificate serial, as `x509.random_serial_number()` makes."""
    return int.from_bytes(random_bytes(20), "big") >> 1
