"""AIP-155 request ids: what a retry of a mutating request is recognised by.

A client sends the same `request_id` (a UUID it chose) with every retry of one request. The
services remember it, with a fingerprint of the request, for `WINDOW`; a retry within it gets
the outcome of the first attempt (each method's contract comment says exactly what that is
when the first answer carried a secret that is never stored), and the same id sent with a
different request is refused, naming the field.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from google.protobuf.message import Message

from shared.errors import DomainError, invalid_argument

WINDOW: Final = timedelta(hours=24)


@dataclass(frozen=True)
class RequestKey:
    """A request's id and the fingerprint of what it asked."""

    request_id: uuid.UUID
    fingerprint: bytes

    def matches(self, fingerprint: bytes | None) -> bool:
        """Whether a stored request with `fingerprint` is this one; INVALID_ARGUMENT when
        the id was used for another request."""
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise reused_for_another_request()
        return True


def recent(created_at: datetime, now: datetime) -> bool:
    """Whether a request recorded at `created_at` is still recognised at `now`."""
    return now - created_at < WINDOW


def request_key(method: str, request: Message) -> RequestKey | None:
    """The request's key, or None when it carries no request_id."""
    request_id = parse_request_id(getattr(request, "request_id", ""))
    if request_id is None:
        return None
    return RequestKey(request_id, fingerprint(method, request))


def parse_request_id(value: str) -> uuid.UUID | None:
    """None when absent; INVALID_ARGUMENT naming `request_id` when it is not a UUID."""
    if not value:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise invalid_argument("request_id", "must be a UUID (AIP-155)") from None


def fingerprint(method: str, request: Message) -> bytes:
    """SHA-256 of the method and the request without its request_id."""
    copy = type(request)()
    copy.CopyFrom(request)
    copy.ClearField("request_id")
    digest = hashlib.sha256(method.encode())
    digest.update(b"\0")
    digest.update(copy.SerializeToString(deterministic=True))
    return digest.digest()


def reused_for_another_request() -> DomainError:
    return invalid_argument(
        "request_id", "was used within the last 24 hours for a different request"
    )
