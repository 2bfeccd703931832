"""AIP-155 request ids: what a retry of a mutating request is recognised by.

A client sends the same `request_id` (a UUID it chose) with every retry of one request. The
services remember it, with a fingerprint of the request, for `WINDOW`; the same id sent with a
different request is refused, naming the field (INVALID_ARGUMENT).

The rule for a retry ("replay"): it returns the first attempt's recorded outcome, and it never
creates, revives or extends a credential that the current state would refuse. A replay never
runs the method a second time against state the first attempt did not see; it re-reads what
that attempt created or changed, and answers from it:

- Still as the first attempt left it (the key it created still live, the certificate it issued
  still the device's current, active one): the first outcome. Where that outcome carried a
  secret that is never stored (GenerateApiKey's and RotateApiKey's key, a provisioned
  certificate's generated private key), the secret is issued again: the credential the first
  attempt created is revoked and a replacement with the same attributes and the same or an
  earlier expiry takes its place, in one transaction, so one request id names one working
  credential. A replacement is never usable for longer than the credential it replaces.
- Moved on since (revoked, expired, rotated, renewed, its device deleted, or the device
  provisioned again by another request): FAILED_PRECONDITION with ErrorInfo reason
  `REQUEST_SUPERSEDED` (`superseded`). The first attempt did succeed; nothing is done again.
- Revocations and deletions: their recorded outcome stays true (the key revoked, the count of
  a device's keys revoked, OK for a deletion), so a replay returns it, and revokes or deletes
  nothing that appeared after the first attempt. A certificate revocation's outcome is the
  certificate it revoked: once the device has a newer one, REQUEST_SUPERSEDED.

A duplicate that arrives while another attempt with the same id is still running does not
run in parallel: it gets ABORTED with reason `REQUEST_IN_PROGRESS` and a RetryInfo
(`in_progress`; 409 over REST), and its retry with the same id then gets the outcome; or,
where the first attempt's outcome can be read back, it waits for that and returns it. Never
INVALID_ARGUMENT (the request is not wrong) and never a second execution. Within a replica,
the server turns a duplicate of a request it is serving away at once, until that answer is
sent (`shared.server.RpcInterceptor`). Between replicas the database decides: a
transaction-scoped advisory lock on the request id (`claim_lock_id`) taken without waiting,
or a unique request key written in the statement or transaction that does the work.

A failed attempt records nothing, so its retry runs afresh; except a GenerateApiKey whose
device was deleted while its key was stored: that key is revoked at once and keeps the id, so
the retry is REQUEST_SUPERSEDED, as a fresh request would be refused (the device is gone).
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from google.protobuf.message import Message

from shared.errors import DomainError, ErrorKind, failed_precondition, invalid_argument

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


def claim_lock_id(request_id: uuid.UUID) -> int:
    """The transaction-scoped advisory lock (PostgreSQL's one-bigint key space) that the
    attempt running a request holds: the first 64 bits of its id."""
    return int.from_bytes(request_id.bytes[:8], "big", signed=True)


def in_progress(request_id: uuid.UUID) -> DomainError:
    """A duplicate of an attempt that is still running: ABORTED, retry with the same id."""
    return DomainError(
        ErrorKind.ABORTED,
        "a request with this request_id is in progress; retry with the same request_id",
        "REQUEST_IN_PROGRESS",
        metadata={"request_id": str(request_id)},
        retry_after=1.0,
    )


def superseded(request_id: uuid.UUID, what: str, **metadata: str) -> DomainError:
    """A replay whose first attempt succeeded, but whose result `what` (e.g. "the key it
    created was revoked") is no longer current: nothing is done again."""
    return failed_precondition(
        f"this request_id was completed earlier, and {what} since; nothing was done again "
        "(send a new request with a new request_id)",
        "REQUEST_SUPERSEDED",
        request_id=str(request_id),
        **metadata,
    )


def reused_for_another_request() -> DomainError:
    return invalid_argument(
        "request_id", "was used within the last 24 hours for a different request"
    )
