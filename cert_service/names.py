"""Device DNS names and device identifiers.

Every device gets exactly one DNS label directly under the service zone (``label.zone``). A
certificate of type WILDCARD additionally covers ``*.label.zone``; the wildcard is always added by
the service, never accepted from the caller.

Decisions:

* Input is checked for ASCII before any case folding, so look-alike characters whose lowercase is
  ASCII (for example U+212A KELVIN SIGN, which lowercases to ``k``) can never slip through.
* Labels follow RFC 1123 (letters, digits, hyphen; 1-63 characters; no leading or trailing
  hyphen). Labels with ``--`` in positions 3-4 (``xn--`` and other reserved "R-LDH" labels) are
  refused: the service cannot vouch for their IDNA validity and public ACME CAs reject malformed
  ones.
* Names are limited to 251 characters so that the wildcard form ``*.label.zone`` still fits the
  253-character DNS limit.
* Labels that look like infrastructure (``www``, ``mail``, ``ns1``, ...) are reserved; a device
  must never obtain a certificate that could be mistaken for a service of the platform itself.
"""

from __future__ import annotations

import functools
import re
from typing import Final

from cert_service.randomness import uuid4

__all__ = [
    "DEVICE_ID_PATTERN",
    "MAX_NAME_LENGTH",
    "RESERVED_LABELS",
    "SubdomainError",
    "certificate_names",
    "new_uuid_subdomain",
    "normalize_lookup_name",
    "normalize_subdomain",
    "validate_device_id",
]

# A 253-character DNS name minus the two characters of the "*." wildcard prefix.
MAX_NAME_LENGTH: Final = 251

RESERVED_LABELS: Final[frozenset[str]] = frozenset(
    {
        "abuse",
        "acme",
        "admin",
        "administrator",
        "api",
        "app",
        "assets",
        "auth",
        "autoconfig",
        "autodiscover",
        "billing",
        "blog",
        "ca",
        "cdn",
        "console",
        "dashboard",
        "dev",
        "dns",
        "docs",
        "ftp",
        "git",
        "grpc",
        "help",
        "hostmaster",
        "id",
        "identity",
        "imap",
        "internal",
        "ldap",
        "localhost",
        "login",
        "mail",
        "metrics",
        "mx",
        "ns",
        "ns1",
        "ns2",
        "ns3",
        "ns4",
        "ocsp",
        "pki",
        "pop",
        "pop3",
        "portal",
        "postmaster",
        "prod",
        "root",
        "security",
        "smtp",
        "sso",
        "stage",
        "staging",
        "static",
        "status",
        "support",
        "vpn",
        "webmail",
        "webmaster",
        "wpad",
        "www",
    }
)

_LABEL_RE: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.ASCII)

DEVICE_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}", re.ASCII)
"""Device identifiers: 1-128 characters of letters, digits, ``.``, ``_``, ``:`` and ``-``, starting
with a letter or digit. Use with ``fullmatch``."""


class SubdomainError(ValueError):
    """A requested device name is not acceptable; ``str(error)`` is a message for the caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _label_problem(label: str) -> str | None:
    """Return why ``label`` (ASCII, lowercase) is not a valid RFC 1123 label, or None."""
    if not label:
        return "a DNS label must not be empty"
    if len(label) > 63:
        return f"a DNS label must be at most 63 characters (got {len(label)})"
    if label.startswith("-") or label.endswith("-"):
        return "a DNS label must not start or end with a hyphen"
    if _LABEL_RE.fullmatch(label) is None:
        return "a DNS label may contain only letters a-z, digits 0-9 and hyphens"
    if label[2:4] == "--":
        return "labels with '--' in the third and fourth positions (such as 'xn--') are reserved"
    return None


@functools.lru_cache(maxsize=16)
def _normalize_zone(zone: str) -> str:
    """Lowercase the zone and drop a trailing dot; a bad zone is a configuration error."""
    if not zone.isascii():
        raise ValueError(f"zone {zone!r} must be ASCII")
    folded = zone.lower().removesuffix(".")
    if not folded or len(folded) > MAX_NAME_LENGTH - 2:
        raise ValueError(f"zone {zone!r} has an invalid length")
    for label in folded.split("."):
        problem = _label_problem(label)
        if problem is not None:
            raise ValueError(f"zone {zone!r} is not a valid DNS name: {problem}")
    return folded


def normalize_subdomain(value: str, zone: str) -> str:
    """Return the lowercase FQDN ``label.zone`` for a bare label or a name directly under ``zone``.

    Accepts ``test-device``, ``test-device.myl.zip`` and ``TEST-device.myl.zip.`` alike. Raises
    :class:`SubdomainError` for anything else: empty input, whitespace, non-ASCII, wildcards,
    names in another zone or more than one label deep, invalid or reserved labels. Raises plain
    :class:`ValueError` if ``zone`` itself is invalid (a configuration error, not a caller error).
    """
    normalized_zone = _normalize_zone(zone)
    if not isinstance(value, str):
        raise SubdomainError("the subdomain must be a string")
    if not value:
        raise SubdomainError("the subdomain must not be empty")
    if len(value) > MAX_NAME_LENGTH + 1:
        raise SubdomainError(f"the subdomain must be at most {MAX_NAME_LENGTH} characters")
    if not value.isascii():
        raise SubdomainError(
            "the subdomain must be ASCII; internationalized names are not supported"
        )
    if any(char.isspace() for char in value):
        raise SubdomainError("the subdomain must not contain whitespace")
    if "*" in value:
        raise SubdomainError(
            "wildcards are not accepted; request a WILDCARD certificate for the plain name instead"
        )

    name = value.lower()
    absolute = name.endswith(".")
    if absolute:
        name = name[:-1]
    if name == normalized_zone:
        raise SubdomainError(f"the zone {normalized_zone} itself cannot be a device name")

    suffix = "." + normalized_zone
    if name.endswith(suffix):
        label = name[: -len(suffix)]
    elif "." in name or absolute:
        raise SubdomainError(
            f"{value!r} is not a name directly under {normalized_zone}; "
            f"use a single label such as 'my-device' or 'my-device.{normalized_zone}'"
        )
    else:
        label = name

    if "." in label:
        raise SubdomainError(
            f"{value!r} is more than one label deep; only names directly under "
            f"{normalized_zone} are allowed"
        )
    problem = _label_problem(label)
    if problem is not None:
        raise SubdomainError(f"invalid subdomain {value!r}: {problem}")
    if label in RESERVED_LABELS:
        raise SubdomainError(f"the label {label!r} is reserved")

    fqdn = label + suffix
    if len(fqdn) > MAX_NAME_LENGTH:
        raise SubdomainError(f"the full name must be at most {MAX_NAME_LENGTH} characters")
    return fqdn


def normalize_lookup_name(value: str, zone: str) -> tuple[str, bool]:
    """Return ``(fqdn, via_wildcard)`` for a name a client or an SNI router looks up.

    Accepts everything :func:`normalize_subdomain` accepts, and also ``child.label.zone``, a name
    that only a WILDCARD certificate of ``label.zone`` covers (``via_wildcard`` is then True).
    Reserved labels are not refused here: they are never allocated, so they are simply not found.
    Raises :class:`SubdomainError` for anything that cannot be a device name.
    """
    normalized_zone = _normalize_zone(zone)
    if not isinstance(value, str):
        raise SubdomainError("the name must be a string")
    if not value:
        raise SubdomainError("the name must not be empty")
    if len(value) > MAX_NAME_LENGTH + 3:
        raise SubdomainError(f"the name must be at most {MAX_NAME_LENGTH} characters")
    if not value.isascii():
        raise SubdomainError("the name must be ASCII; internationalized names are not supported")
    if any(char.isspace() for char in value):
        raise SubdomainError("the name must not contain whitespace")
    if "*" in value:
        raise SubdomainError("wildcards are not accepted in a look-up; ask for a concrete name")

    name = value.lower()
    absolute = name.endswith(".")
    if absolute:
        name = name[:-1]
    suffix = "." + normalized_zone
    if name == normalized_zone:
        raise SubdomainError(f"the zone {normalized_zone} itself is not a device name")
    if name.endswith(suffix):
        labels = name[: -len(suffix)].split(".")
    elif "." in name or absolute:
        raise SubdomainError(f"{value!r} is not a name under {normalized_zone}")
    else:
        labels = [name]
    if len(labels) > 2:
        raise SubdomainError(
            f"{value!r} is too deep under {normalized_zone}; device names are one label deep "
            "and their wildcard certificates cover one more"
        )
    for label in labels:
        problem = _label_problem(label)
        if problem is not None:
            raise SubdomainError(f"invalid name {value!r}: {problem}")
    fqdn = labels[-1] + suffix
    if len(fqdn) > MAX_NAME_LENGTH:
        raise SubdomainError(f"the full name must be at most {MAX_NAME_LENGTH} characters")
    return fqdn, len(labels) == 2


def new_uuid_subdomain(zone: str) -> str:
    """Return a fresh random name ``<uuid4>.zone`` (36-character label, never reserved)."""
    return f"{uuid4()}.{_normalize_zone(zone)}"


def certificate_names(fqdn: str, wildcard: bool) -> list[str]:
    """DNS names a device certificate covers: ``[fqdn, "*." + fqdn]`` or ``[fqdn]``."""
    return [fqdn, "*." + fqdn] if wildcard else [fqdn]


def validate_device_id(value: str) -> str:
    """Return ``value`` unchanged if it is a valid device id, otherwise raise ``ValueError``.

    No trimming or case folding: a device id is opaque and compared byte for byte.
    """
    if not isinstance(value, str) or DEVICE_ID_PATTERN.fullmatch(value) is None:
        raise ValueError(
            "device id must be 1-128 characters of letters, digits, '.', '_', ':' or '-', "
            "starting with a letter or digit"
        )
    return value
