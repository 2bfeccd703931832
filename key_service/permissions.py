"""The permission vocabulary and how grants are checked.

- `ssl:read`, `ssl:write`: read / provision, renew and revoke certificates.
- `device:read`, `device:write`: read / manage a device's keys, delete devices.
- `api:access`: may be used through the public gateway at all. Every call that
  the gateway authorizes needs it in addition to the method's own permission,
  so a key can be parked (kept, but unusable publicly) by leaving it out.
- `admin`: operator rights. It satisfies every permission check, including
  `api:access`, and may be granted to operator keys only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

SSL_READ: Final = "ssl:read"
SSL_WRITE: Final = "ssl:write"
DEVICE_READ: Final = "device:read"
DEVICE_WRITE: Final = "device:write"
API_ACCESS: Final = "api:access"
ADMIN: Final = "admin"

VOCABULARY: Final = (SSL_READ, SSL_WRITE, DEVICE_READ, DEVICE_WRITE, API_ACCESS, ADMIN)
KNOWN: Final = frozenset(VOCABULARY)
DEFAULT_PERMISSIONS: Final = (SSL_READ, DEVICE_READ, API_ACCESS)
CERTIFICATE_PERMISSIONS: Final = (SSL_READ, SSL_WRITE, API_ACCESS)
_ORDER: Final = {name: index for index, name in enumerate(VOCABULARY)}


def canonical(permissions: Iterable[str]) -> tuple[str, ...]:
    """Known permissions, deduplicated, in vocabulary order."""
    return tuple(sorted(set(permissions), key=_ORDER.__getitem__))


def grants(granted: frozenset[str], required: Iterable[str]) -> bool:
    """True when `granted` covers every permission in `required`."""
    if ADMIN in granted:
        return True
    return all(p in granted for p in required)
