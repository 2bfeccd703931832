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

A device that authenticates with its certificate (the gateway's device TLS listener, mutual
TLS, no key and no key check) arrives instead with the names Envoy verified in its certificate:

- `x-myl-cert-names`: the certificate's DNS names, comma-separated as Envoy writes them
  (`label.myl.zip,*.label.myl.zip` for a WILDCARD certificate)
- `x-myl-cert-serial`: its serial number (hex), for the audit trail
- `x-myl-permissions`, `x-myl-operator` and `x-myl-method` as for a key; the permissions are
  the certificate grant (`key_service.permissions.CERTIFICATE_PERMISSIONS`).

A certificate names the device (`label.zone`), not its device id: a service finds the device
of a certificate caller by that name (`Caller.device_name`), which is unique among devices.

Only the gateway sets any `x-myl-*` header: it drops every client-sent one on both listeners
before anything reads it. A call without `x-myl-key-id` and without `x-myl-cert-names` comes
from inside the platform (a gRPC stub of another service, or an operator on the service port)
and is trusted: the service ports speak mutual TLS with the platform's own identities only, and
each identity may call only the methods `shared.tls.CALLERS` gives it. A call with either came
through the gateway, and a device key or certificate may act only on its own device.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from google.protobuf import descriptor_pool

from myl.auth.v1 import auth_pb2
from shared.errors import permission_denied

KEY_ID_HEADER = "x-myl-key-id"
DEVICE_ID_HEADER = "x-myl-device-id"
PERMISSIONS_HEADER = "x-myl-permissions"
OPERATOR_HEADER = "x-myl-operator"
AUTHORIZED_METHOD_HEADER = "x-myl-method"
CERT_NAMES_HEADER = "x-myl-cert-names"
CERT_SERIAL_HEADER = "x-myl-cert-serial"
IDENTITY_HEADERS = (
    KEY_ID_HEADER,
    CERT_NAMES_HEADER,
    CERT_SERIAL_HEADER,
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
    # A certificate caller: the device name its certificate was issued for, and its serial.
    device_name: str | None = None
    cert_serial: str | None = None

    @property
    def internal(self) -> bool:
        return self.key_id is None and self.device_name is None

    @property
    def actor(self) -> str:
        """How the audit trail names this caller."""
        if self.device_name is not None:
            return f"device-certificate:{self.cert_serial or self.device_name}"
        if self.key_id is None:
            return "internal"
        return f"{'operator' if self.operator else 'device'}-key:{self.key_id}"

    def may_act_on(self, device_id: str) -> bool:
        """A certificate caller knows its device by name only: a service that serves
        certificate callers resolves the name first (`with_device`)."""
        return self.internal or self.operator or self.device_id == device_id

    def with_device(self, device_id: str) -> Caller:
        """This certificate caller, its device id resolved from its name."""
        return replace(self, device_id=device_id)

    def require_device(self, device_id: str) -> None:
        """PERMISSION_DENIED unless this caller may act on `device_id`."""
        if not self.may_act_on(device_id):
            who = "certificate" if self.device_name is not None else "key"
            raise permission_denied(f"this {who} may act only on its own device", "DEVICE_MISMATCH")


def certificate_device_name(names: str) -> str | None:
    """The device name among a certificate's DNS names (Envoy's comma-separated list): the
    one that is not a wildcard."""
    return next((n for n in names.split(",") if n and not n.startswith("*.")), None)


_NOBODY = Caller(None, None, frozenset(), operator=False)


def caller_from_metadata(metadata: Iterable[tuple[str, Any]] | None) -> Caller:
    headers = {k: v for k, v in metadata or () if isinstance(v, str)}
    key_id = headers.get(KEY_ID_HEADER) or None
    permissions = frozenset(p for p in headers.get(PERMISSIONS_HEADER, "").split(",") if p)
    if key_id is None:
        names = headers.get(CERT_NAMES_HEADER)
        if names is None:
            return _NOBODY
        # A certificate without a usable name acts on nothing (an empty name matches no
        # device), and is never taken for an internal caller.
        return Caller(
            None,
            None,
            permissions,
            operator=False,
            device_name=certificate_device_name(names) or "",
            cert_serial=headers.get(CERT_SERIAL_HEADER) or None,
        )
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
