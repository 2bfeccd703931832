"""Request field checks: each returns the typed value or raises INVALID_ARGUMENT naming the field.

Field names in errors are the proto field names (`device_id`, `uuid_subdomain`, `csr_pem`, ...),
so a BadRequest violation points at exactly what the client sent.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

from cert_service.config import MAX_VALIDITY_DAYS
from cert_service.issuer import MAX_PEM_LENGTH, CsrError, PublicKey, load_csr
from cert_service.names import (
    SubdomainError,
    certificate_names,
    new_uuid_subdomain,
    normalize_lookup_name,
    normalize_subdomain,
    validate_device_id,
)
from cert_service.storage import REASON_FROM_PB, STATUS_FROM_PB
from myl.cert.v1 import cert_pb2
from shared import pagination
from shared.clock import from_micros, to_micros
from shared.errors import invalid_argument
from shared.wire import TIMESTAMP_MAX_SECONDS, TIMESTAMP_MIN_SECONDS

_TYPES: Final = {
    cert_pb2.CERTIFICATE_TYPE_UNSPECIFIED: "wildcard",
    cert_pb2.CERTIFICATE_TYPE_WILDCARD: "wildcard",
    cert_pb2.CERTIFICATE_TYPE_SINGLE: "single",
}
# Printable ASCII plus the whitespace PEM uses.
_PEM_CHARACTERS: Final = frozenset(map(chr, range(0x20, 0x7F))) | {"\n", "\r", "\t"}


def device_id(value: str, field: str = "device_id") -> str:
    if not value:
        raise invalid_argument(field, "is required")
    try:
        return validate_device_id(value)
    except ValueError as exc:
        raise invalid_argument(field, str(exc)) from None


def provision_subdomain(value: str, zone: str) -> str:
    """The FQDN to allocate: the requested one, or a fresh UUID name when empty."""
    if not value:
        return new_uuid_subdomain(zone)
    try:
        return normalize_subdomain(value, zone)
    except SubdomainError as exc:
        raise invalid_argument("uuid_subdomain", exc.message) from None


def lookup_name(value: str, zone: str) -> tuple[str, bool]:
    """(device FQDN, whether only a WILDCARD certificate covers the name)."""
    if not value:
        raise invalid_argument("uuid_subdomain", "is required")
    try:
        return normalize_lookup_name(value, zone)
    except SubdomainError as exc:
        raise invalid_argument("uuid_subdomain", exc.message) from None


def certificate_type(value: int) -> str:
    try:
        return _TYPES[value]  # type: ignore[index]
    except KeyError:
        raise invalid_argument(
            "certificate_type", f"unknown certificate type {value}; use WILDCARD or SINGLE"
        ) from None


def csr_text(value: str) -> str | None:
    """Structural checks of a CSR field; None when empty (no CSR)."""
    if not value:
        return None
    if len(value) > MAX_PEM_LENGTH:
        raise invalid_argument(
            "csr_pem",
            f"the CSR is {len(value)} bytes long, more than the {MAX_PEM_LENGTH} accepted",
        )
    if not _PEM_CHARACTERS.issuperset(value):
        raise invalid_argument("csr_pem", "must be PEM text (printable ASCII)")
    return value


def csr_public_key(pem: str, fqdn: str, certificate_type: str) -> PublicKey:
    """The CSR's key, after its signature, key type and names were checked."""
    try:
        return load_csr(pem, certificate_names(fqdn, certificate_type == "wildcard"))
    except CsrError as exc:
        raise invalid_argument("csr_pem", str(exc)) from None


def validity_days(value: int, default: int) -> int:
    if value == 0:
        return default
    if not 1 <= value <= MAX_VALIDITY_DAYS:
        raise invalid_argument(
            "validity_days", f"must be from 1 to {MAX_VALIDITY_DAYS} (0: the default)"
        )
    return value


def status_filter(value: int) -> str | None:
    if value == cert_pb2.CERTIFICATE_STATUS_UNSPECIFIED:
        return None
    try:
        return STATUS_FROM_PB[value]  # type: ignore[index]
    except KeyError:
        raise invalid_argument("status", f"unknown certificate status {value}") from None


def revocation_reason(value: int) -> str:
    try:
        return REASON_FROM_PB[value]  # type: ignore[index]
    except KeyError:
        raise invalid_argument("reason", f"unknown revocation reason {value}") from None


# -- page tokens --------------------------------------------------------------------------------


def query_fingerprint(status: str | None, expire_before: datetime | None) -> str:
    """Ties a page token to the filters it was issued for."""
    return pagination.fingerprint(status or "", expire_before.isoformat() if expire_before else "")


def encode_page_token(created_at: datetime, device: str, fingerprint: str) -> str:
    return pagination.encode_page_token("c1", fingerprint, str(to_micros(created_at)), device)


def decode_page_token(token: str, fingerprint: str) -> tuple[datetime, str] | None:
    """The keyset position after which the next page starts; None for the first page."""
    position = pagination.decode_page_token(token, "c1", 2, fingerprint)
    if position is None:
        return None
    text, device = position
    try:
        micros = int(text)
        if not TIMESTAMP_MIN_SECONDS * 1_000_000 <= micros <= TIMESTAMP_MAX_SECONDS * 1_000_000:
            raise ValueError(micros)
        return from_micros(micros), validate_device_id(device)
    except ValueError:
        raise pagination.bad_page_token() from None
