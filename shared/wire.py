"""Requests that do not parse: say which field is wrong instead of failing with UNKNOWN.

grpcio answers a request it cannot deserialize with UNKNOWN ("Unexpected DecodeError") and
logs a traceback. The commonest cause is not a broken client but a REST caller: the gateway's
transcoder copies a percent-decoded path or query value such as `%ff` into a proto3 `string`
field as is, and proto3 strings must be valid UTF-8. The server builder therefore wraps every
request deserializer (`tolerant_deserializer`): a request that does not parse becomes an
`Undecodable` placeholder, and the handler wrapper answers it with INVALID_ARGUMENT naming the
field (`undecodable_error`), found by walking the wire format. Only failed requests pay for
the walk.

A request message larger than `MAX_REQUEST_BYTES` is refused the same way, with
RESOURCE_EXHAUSTED: the same limit as a REST body at the gateway, so native gRPC and REST
callers meet one limit with one code.

`timestamp` reads a google.protobuf.Timestamp field, refusing what is not a moment (outside
years 1 to 9999, or nanos out of range) as INVALID_ARGUMENT on that field.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from google.protobuf import timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

from shared.errors import DomainError, ErrorKind, invalid_argument

_LENGTH_DELIMITED: Final = 2
# Request messages on the public methods: the gateway's REST body limit.
MAX_REQUEST_BYTES: Final = 64 * 1024


class Undecodable:
    """Stands in for a request whose bytes did not parse as `descriptor`."""

    __slots__ = ("data", "descriptor", "too_large")

    def __init__(self, descriptor: Descriptor | None, data: bytes, too_large: bool = False) -> None:
        self.descriptor = descriptor
        self.data = data
        self.too_large = too_large


def tolerant_deserializer(
    deserialize: Callable[[bytes], Any] | None, max_bytes: int | None = None
) -> Callable[[bytes], Any] | None:
    """`deserialize`, returning an `Undecodable` instead of raising DecodeError, or for a
    message larger than `max_bytes`."""
    if deserialize is None:
        return None
    message_class = getattr(deserialize, "__self__", None)
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    known = descriptor if isinstance(descriptor, Descriptor) else None

    def parse(data: bytes) -> Any:
        if max_bytes is not None and len(data) > max_bytes:
            return Undecodable(known, b"", too_large=True)
        try:
            return deserialize(data)
        except DecodeError:
            return Undecodable(known, data)

    return parse


def undecodable_error(request: Undecodable) -> DomainError:
    """INVALID_ARGUMENT naming the field that is not valid UTF-8, or the whole request;
    RESOURCE_EXHAUSTED for a request over the size limit."""
    if request.too_large:
        return DomainError(
            ErrorKind.RESOURCE_EXHAUSTED,
            f"request message larger than {MAX_REQUEST_BYTES // 1024} KiB",
            "REQUEST_TOO_LARGE",
            metadata={"limit_bytes": str(MAX_REQUEST_BYTES)},
        )
    if request.descriptor is not None:
        field = _invalid_utf8_field(request.descriptor, request.data, "")
        if field is not None:
            return invalid_argument(field, "must be valid UTF-8 text")
    name = request.descriptor.full_name if request.descriptor is not None else "request"
    return DomainError(
        ErrorKind.INVALID_ARGUMENT,
        f"the request is not a valid {name} message",
        "MALFORMED_REQUEST",
    )


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _invalid_utf8_field(descriptor: Descriptor, data: bytes, prefix: str) -> str | None:
    """The first string field (dotted path) in `data` that is not UTF-8, if any."""
    pos = 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 5:
                pos += 4
            elif wire_type == _LENGTH_DELIMITED:
                size, pos = _varint(data, pos)
                chunk, pos = data[pos : pos + size], pos + size
                field = descriptor.fields_by_number.get(number)
                if field is None:
                    continue
                if field.type == FieldDescriptor.TYPE_STRING:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError:
                        return prefix + field.name
                elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type:
                    inner = _invalid_utf8_field(field.message_type, chunk, f"{prefix}{field.name}.")
                    if inner is not None:
                        return inner
            else:
                return None
    except ValueError:
        return None
    return None


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
# google.protobuf.Timestamp's valid range: 0001-01-01 to 9999-12-31.
TIMESTAMP_MIN_SECONDS: Final = -62_135_596_800
TIMESTAMP_MAX_SECONDS: Final = 253_402_300_799


def timestamp(value: timestamp_pb2.Timestamp, field: str) -> datetime:
    """The moment a Timestamp field names, in UTC, to the microsecond."""
    seconds_ok = TIMESTAMP_MIN_SECONDS <= value.seconds <= TIMESTAMP_MAX_SECONDS
    if not seconds_ok or not 0 <= value.nanos < 1_000_000_000:
        raise invalid_argument(field, "is not a valid timestamp (years 1 to 9999)")
    return _EPOCH + timedelta(seconds=value.seconds, microseconds=value.nanos // 1000)
