"""A REST caller's error body says what a gRPC caller's status details say."""

from __future__ import annotations

import json

from google.protobuf import json_format

from shared.errors import DomainError, ErrorKind, FieldViolation, invalid_argument, not_found


def test_the_json_body_is_the_status_in_proto3_json() -> None:
    errors = [
        invalid_argument("page_token", "is not a page token from this service"),
        not_found("certificate", "CERTIFICATE_NOT_FOUND", device_id="device-1"),
        DomainError(
            ErrorKind.RESOURCE_EXHAUSTED,
            "rate limit exceeded",
            "RATE_LIMITED",
            violations=[FieldViolation("deviceId", "names another device")],
            metadata={"limit": "NewApiKeysPerDevice"},
            retry_after=1.5,
        ),
    ]
    for error in errors:
        assert json.loads(error.to_json()) == json_format.MessageToDict(error.to_status())
