"""Who is calling: identity headers set by the gateway, and method permissions.

The gateway asks key_service's external authorization check about every
request. On success it overwrites these headers on the upstream request (a
client-sent copy never reaches a service) and removes `x-api-key`:

- `x-myl-key-id`: the verified key's id
- `x-myl-device-id`: the key's device (empty for an operator key)
- `x-myl-permissions`: the key's permissions, comma-separated
- `x-myl-operator`: `true` for an operator key, else `false`
- `x-myl-method`: the gRPC method the check authorized (`/package.Service/Method`). The
  server refuses a gateway call whose executed method is another one (`shared.server`), so
  the permission checked is always the one the method that runs requires, however the
  transcoder and the check might read a REST path differently.

A call without `x-myl-key-id` comes from inside the platform (a gRPC stub of
another service, or an operator on the service port) and is trusted: the
service ports listen on internal addresses only. A call with it came through
the gateway with a device or operator key, and a device key may act only on
its own device.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pool

from myl.auth.v1 import auth_pb2
from shared.errors import permission_denied

KEY_ID_HEADER = "x-myl-key-id"
DEVICE_ID_HEADER = "x-myl-device-id"
PERMISSIONS_HEADER = "x-myl-permissions"
OPERATOR_HEADER = "x-myl-operator"
AUTHORIZED_METHOD_HEADER = "x-myl-method"
IDENTITY_HEADERS = (
    KEY_ID_HEADER,
    DEVICE_ID_HEADER,
    PERMISSIONS_HEADER,
    OPERATOR_HEADER,
    AUTHORIZED_METHOD_HEADER,
)


@dataclass(frozen=True)
class Caller:
    key_id: str | None
    device_id: str | None
    permissions: frozenset[str]
    operator: bool

    @property
    def internal(self) -> bool:
        return self.key_id is None

    @property
    def actor(self) -> str:
        """How the audit trail names this caller."""
        if self.key_id is None:
            return "internal"
        return f"{'operator' if self.operator else 'device'}-key:{self.key_id}"

    def may_act_on(self, device_id: str) -> bool:
        return self.internal or self.operator or self.device_id == device_id

    def require_device(self, device_id: str) -> None:
        """PERMISSION_DENIED unless this caller may act on `device_id`."""
        if not self.may_act_on(device_id):
            raise permission_denied("this key may act only on its own device", "DEVICE_MISMATCH")


def caller_from_metadata(metadata: Iterable[tuple[str, Any]] | None) -> Caller:
    headers = {k: v for k, v in metadata or () if isinstance(v, str)}
    key_id = headers.get(KEY_ID_HEADER) or None
    if key_id is None:
        return Caller(None, None, frozenset(), operator=False)
    permissions = frozenset(p for p in headers.get(PERMISSIONS_HEADER, "").split(",") if p)
    return Caller(
        key_id=key_id,
        device_id=headers.get(DEVICE_ID_HEADER) or None,
        permissions=permissions,
        operator=headers.get(OPERATOR_HEADER) == "true",
    )


@dataclass(frozen=True)
class MethodPolicy:
    """What the gateway requires to call one gRPC method."""

    full_method: str
    permission: str
    device_scoped: bool


def method_policy(path: str) -> MethodPolicy | None:
    """The policy for `/package.Service/Method`, or None when it has no public route.

    Read from the `myl.auth.v1` options in the contracts, so the permission
    sits beside the REST route in the .proto file.
    """
    service_name, _, method_name = path.lstrip("/").partition("/")
    try:
        service = descriptor_pool.Default().FindServiceByName(service_name)
    except KeyError:
        return None
    method = service.methods_by_name.get(method_name)
    if method is None:
        return None
    options = method.GetOptions()
    permission = options.Extensions[auth_pb2.required_permission]
    if not permission:
        return None
    return MethodPolicy(path, permission, bool(options.Extensions[auth_pb2.device_scoped]))
