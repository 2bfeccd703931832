"""One domain error type, mapped to gRPC status codes in one place.

Handlers raise `DomainError`; the server interceptor turns it into a gRPC
status carrying `google.rpc.ErrorInfo` (AIP-193) and, for bad input,
`google.rpc.BadRequest` field violations. Handlers never call
`context.abort` themselves.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2  # type: ignore[attr-defined]

ERROR_DOMAIN = "myl.zip"


class ErrorKind(enum.Enum):
    INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
    NOT_FOUND = grpc.StatusCode.NOT_FOUND
    ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS
    FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
    PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
    UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
    RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
    UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED
    ABORTED = grpc.StatusCode.ABORTED
    UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
    INTERNAL = grpc.StatusCode.INTERNAL

    @property
    def grpc_code(self) -> grpc.StatusCode:
        code: grpc.StatusCode = self.value
        return code


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


@dataclass
class DomainError(Exception):
    """An error a caller can act on.

    `reason` is the stable machine-readable ErrorInfo reason (UPPER_SNAKE_CASE).
    """

    kind: ErrorKind
    message: str
    reason: str
    violations: Sequence[FieldViolation] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    retry_after: float | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message

    def to_status(self) -> status_pb2.Status:
        """The `google.rpc.Status` a gRPC caller gets (in `grpc-status-details-bin`)."""
        details = [packed for packed, _ in self._details()]
        return status_pb2.Status(code=self.code, message=self.message, details=details)

    def to_json(self) -> str:
        """The same Status as the JSON body the gateway gives a REST caller (proto3 JSON
        names: `fieldViolations`, `retryDelay`)."""
        details = [rendered for _, rendered in self._details()]
        return json.dumps({"code": self.code, "message": self.message, "details": details})

    @property
    def code(self) -> int:
        """The `google.rpc.Code` of the kind."""
        return int(code_pb2.Code.Value(self.kind.grpc_code.name))

    def _details(self) -> list[tuple[any_pb2.Any, dict[str, Any]]]:
        """AIP-193 ErrorInfo, then BadRequest for field violations and RetryInfo for a
        retry delay: each packed, and in its JSON form."""
        info = _pack(
            error_details_pb2.ErrorInfo(
                reason=self.reason, domain=ERROR_DOMAIN, metadata=dict(self.metadata)
            )
        )
        metadata = {"metadata": dict(self.metadata)} if self.metadata else {}
        details: list[tuple[any_pb2.Any, dict[str, Any]]] = [
            (
                info,
                {"@type": info.type_url, "reason": self.reason, "domain": ERROR_DOMAIN, **metadata},
            )
        ]
        if self.violations:
            bad = _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description
                        )
                        for v in self.violations
                    ]
                )
            )
            violations = [{"field": v.field, "description": v.description} for v in self.violations]
            details.append((bad, {"@type": bad.type_url, "fieldViolations": violations}))
        if self.retry_after is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after * 1e9))
            retry = _pack(error_details_pb2.RetryInfo(retry_delay=delay))
            details.append((retry, {"@type": retry.type_url, "retryDelay": delay.ToJsonString()}))
        return details


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def invalid_argument(field_name: str, description: str) -> DomainError:
    """Bad input in one field: INVALID_ARGUMENT with a BadRequest violation."""
    return DomainError(
        ErrorKind.INVALID_ARGUMENT,
        f"invalid {field_name}: {description}",
        "INVALID_ARGUMENT",
        violations=[FieldViolation(field_name, description)],
        metadata={"field": field_name},
    )


def not_found(what: str, reason: str, **metadata: str) -> DomainError:
    return DomainError(ErrorKind.NOT_FOUND, f"{what} not found", reason, metadata=metadata)


def already_exists(message: str, reason: str, **metadata: str) -> DomainError:
    return DomainError(ErrorKind.ALREADY_EXISTS, message, reason, metadata=metadata)


def failed_precondition(message: str, reason: str, **metadata: str) -> DomainError:
    return DomainError(ErrorKind.FAILED_PRECONDITION, message, reason, metadata=metadata)


def permission_denied(message: str, reason: str, **metadata: str) -> DomainError:
    return DomainError(ErrorKind.PERMISSION_DENIED, message, reason, metadata=metadata)


def unavailable(message: str, reason: str = "BACKEND_UNAVAILABLE") -> DomainError:
    return DomainError(ErrorKind.UNAVAILABLE, message, reason)


def internal_error() -> DomainError:
    """What a client sees for a bug: no traceback, no internals."""
    return DomainError(ErrorKind.INTERNAL, "internal error", "INTERNAL")
