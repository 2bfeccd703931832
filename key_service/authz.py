"""Envoy external authorization (`envoy.service.auth.v3.Authorization/Check`).

The gateway asks about every request before the gRPC-JSON transcoder (so a call without a key
is 401 whatever its body): native gRPC callers on their method path
(`/myl.cert.v1.CertificateService/GetCertificate`), REST callers on their REST path and HTTP
method, which the check maps to the method with the contracts' own `google.api.http` rules
(`shared.httprules`). Rules:

- a REST path that is not canonical (an empty or dot segment, such as a trailing slash, a
  percent escape, `;`): 400 naming `path`, so no path reaches the transcoder that it could
  read as another method than the check did;
- a path with no `required_permission` in the contracts (unknown, internal
  like VerifyApiKey, Check itself, health, reflection): 404;
- no `x-api-key`: 401; unknown, malformed, expired or revoked key: 401;
- the key lacks the method's permission or `api:access` (a key holding
  `admin` passes every permission check): 403;
- rate limited: 429 with `retry-after` (whole seconds, at least 1);
- a REST body that is not strict JSON, has a field the method does not have, or a body or
  query field that names another object than the path (`{"deviceId": "B"}` sent to
  `/devices/A/...`): 400 naming the field;
- too many failed verifications from the client's address (`FailedVerificationsPerAddress`,
  see `shared.limits`): 429 with `retry-after`, also for a request whose key is good, until
  the address may try again. Failures (401s for an unknown, expired or revoked key) spend from
  the address's bucket; an address refused once is refused by this replica without any I/O
  until its retry time, so a guesser costs no database reads. The address is Envoy's view of
  the client (`attributes.source.address`, which honours `use_remote_address` and trusted
  hops), else the last `x-forwarded-for` entry; IPv6 clients are counted per /64.

Every decision is counted in `myl_gateway_decisions_total` by result (allowed, unauthenticated,
forbidden, rate_limited, not_found (no such route or method), invalid_argument (unknown JSON
fields)): the RPC itself answers OK whatever it decided.

On success the upstream request gets the identity headers (overwriting any
the client sent), among them the method authorized (`x-myl-method`), and loses `x-api-key`.
The services refuse a call whose executed method is not the authorized one, and enforce
device scoping (a device key acts only on its own device) from those headers.
"""

from __future__ import annotations

import base64
import ipaddress
import math
from dataclasses import dataclass
from typing import Any, Final

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor
from google.rpc import code_pb2, status_pb2  # type: ignore[attr-defined]

from key_service.metrics import GATEWAY_DECISIONS
from key_service.permissions import API_ACCESS, grants
from key_service.verify import (
    EXPIRED,
    INSUFFICIENT_PERMISSIONS,
    NOT_FOUND,
    RATE_LIMITED,
    REVOKED,
    KeyRecord,
    Verifier,
)

# Imported for their descriptors: method_policy looks the services up by name.
from myl.cert.v1 import cert_pb2
from myl.envoy.config.core.v3 import base_pb2
from myl.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from myl.envoy.type.v3 import http_status_pb2
from myl.key.v1 import key_pb2
from shared.clock import micros_source
from shared.errors import (
    DomainError,
    ErrorKind,
    FieldViolation,
    invalid_argument,
    permission_denied,
)
from shared.httprules import (
    HttpRoutes,
    RequestProblem,
    RouteMatch,
    UnknownFields,
    check_rest_request,
)
from shared.identity import (
    AUTHORIZED_METHOD_HEADER,
    DEVICE_ID_HEADER,
    KEY_ID_HEADER,
    OPERATOR_HEADER,
    PERMISSIONS_HEADER,
    method_policy,
)
from shared.limits import Bucket, Limiter, LimitName

API_KEY_HEADER: Final = "x-api-key"
# Set by the transcoder on REST calls only (Envoy strips a client-sent one).
ORIGINAL_PATH_HEADER: Final = "x-envoy-original-path"
_OVERWRITE: Final = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_POLICY_CACHE_LIMIT: Final = 4096
# The services the gateway exposes; their REST routes come from the contracts.
PUBLIC_SERVICES: Final = (
    cert_pb2.DESCRIPTOR.services_by_name["CertificateService"].full_name,
    key_pb2.DESCRIPTOR.services_by_name["ApiKeyService"].full_name,
)

CheckResponse = external_auth_pb2.CheckResponse


def _header(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value),
        append_action=_OVERWRITE,
        keep_empty_value=True,
    )


@dataclass(frozen=True)
class Denial:
    """One refusal, rendered for both kinds of caller.

    REST callers (transcoded: Envoy adds `x-envoy-original-path`) get the
    HTTP status and a JSON body in the shape of `google.rpc.Status`, the
    same shape the gateway gives errors from the services. Native gRPC
    callers get `grpc-status` and `grpc-status-details-bin` (with the same
    ErrorInfo), so a refusal reads as UNAUTHENTICATED, PERMISSION_DENIED or
    RESOURCE_EXHAUSTED rather than a status Envoy derives from HTTP (which
    would turn 429 into UNAVAILABLE, a code clients retry at once).
    """

    rest: CheckResponse
    grpc: CheckResponse

    def respond(self, http: Any) -> CheckResponse:
        headers = http.headers
        if ORIGINAL_PATH_HEADER in headers or not headers.get("content-type", "").startswith(
            "application/grpc"
        ):
            return self.rest
        return self.grpc


def deny(http_status: int, error: DomainError, headers: dict[str, str] | None = None) -> Denial:
    """`error` refused with `http_status`: its Status (`shared.errors`) as the JSON body or
    the gRPC status details, and a RetryInfo delay also as `retry-after`."""
    status = error.to_status()
    extra = (
        []
        if error.retry_after is None
        else [_header("retry-after", str(math.ceil(error.retry_after)))]
    )
    extra += [_header(name, value) for name, value in (headers or {}).items()]
    rest = CheckResponse(
        status=status,
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_status),  # type: ignore[arg-type]
            headers=[_header("content-type", "application/json"), *extra],
            body=error.to_json(),
        ),
    )
    status_bin = base64.b64encode(status.SerializeToString()).decode()
    grpc_denial = CheckResponse(
        status=status,
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_status),  # type: ignore[arg-type]
            headers=[
                _header("grpc-status", str(error.code)),
                _header("grpc-status-details-bin", status_bin),
                *extra,
            ],
            body=error.message,
        ),
    )
    return Denial(rest, grpc_denial)


# Request headers (Envoy's own included) a checked request may carry: the identity headers
# added on success must keep it within Envoy's limit of 100, which Envoy applies again after
# the check (and answers with a bare 500 when a mutation crosses it).
MAX_REQUEST_HEADERS: Final = 80
TOO_MANY_HEADERS: Final = deny(
    431,
    DomainError(
        ErrorKind.INVALID_ARGUMENT,
        "request headers too large: at most 80 headers and 8 KiB with the request line",
        "REQUEST_HEADERS_TOO_LARGE",
        metadata={"max_headers": str(MAX_REQUEST_HEADERS), "max_bytes": "8192"},
    ),
)
NO_ROUTE: Final = deny(404, DomainError(ErrorKind.NOT_FOUND, "no such method", "METHOD_NOT_FOUND"))


def _unauthenticated(message: str, reason: str) -> Denial:
    return deny(401, DomainError(ErrorKind.UNAUTHENTICATED, message, reason))


MISSING_KEY: Final = _unauthenticated("missing x-api-key header", "API_KEY_MISSING")
UNKNOWN_KEY: Final = _unauthenticated("invalid API key", "API_KEY_INVALID")
EXPIRED_KEY: Final = _unauthenticated("API key expired", "API_KEY_EXPIRED")
REVOKED_KEY: Final = _unauthenticated("API key revoked", "API_KEY_REVOKED")
_REFUSALS: Final[dict[int, Denial]] = {
    NOT_FOUND: UNKNOWN_KEY,
    EXPIRED: EXPIRED_KEY,
    REVOKED: REVOKED_KEY,
}
# Verification failures that count against the client address.
_FAILURES: Final = frozenset({NOT_FOUND, EXPIRED, REVOKED})
_BLOCKED_LIMIT: Final = 100_000

_ALLOWED = GATEWAY_DECISIONS.labels("allowed")
_UNAUTHENTICATED = GATEWAY_DECISIONS.labels("unauthenticated")
_FORBIDDEN = GATEWAY_DECISIONS.labels("forbidden")
_RATE_LIMITED = GATEWAY_DECISIONS.labels("rate_limited")
_NOT_ROUTED = GATEWAY_DECISIONS.labels("not_found")
_INVALID_ARGUMENT = GATEWAY_DECISIONS.labels("invalid_argument")


def client_address(request: external_auth_pb2.CheckRequest) -> str | None:
    """The bucket id of the client: its IPv4 address, or its IPv6 /64; None if unknown."""
    text = request.attributes.source.address.socket_address.address
    if not text:
        forwarded = request.attributes.request.http.headers.get("x-forwarded-for", "")
        text = forwarded.rsplit(",", 1)[-1].strip()
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return (
        str(address.ipv4_mapped or address)
        if isinstance(address, ipaddress.IPv6Address)
        else str(address)
    )


def _limit_denial(refusal: DomainError) -> Denial:
    seconds = max(1, int(refusal.retry_after or 1))
    return deny(
        429,
        DomainError(
            ErrorKind.RESOURCE_EXHAUSTED,
            refusal.message,
            refusal.reason,
            metadata=refusal.metadata,
            retry_after=seconds,
        ),
    )


def forbidden(missing: tuple[str, ...]) -> Denial:
    """403 PERMISSION_MISSING naming what the key lacks (ErrorInfo metadata `permissions`)."""
    names = ", ".join(missing)
    noun = "permission" if len(missing) == 1 else "permissions"
    return deny(
        403,
        permission_denied(
            f"API key lacks the {noun} this method needs: {names}",
            "PERMISSION_MISSING",
            permissions=",".join(missing),
        ),
    )


def method_not_allowed(allowed: tuple[str, ...]) -> Denial:
    """405 with `Allow` for a REST path that exists with other HTTP methods."""
    names = ", ".join(allowed)
    return deny(
        405,
        DomainError(ErrorKind.UNIMPLEMENTED, f"this path takes {names}", "METHOD_NOT_ALLOWED"),
        headers={"allow": names},
    )


def unknown_fields(fields: list[str]) -> Denial:
    """400 for a REST body with fields the method does not have (the transcoder would
    silently drop them, and the caller would believe it had set them)."""
    return deny(
        400,
        DomainError(
            ErrorKind.INVALID_ARGUMENT,
            "unknown field(s) in the request body: " + ", ".join(fields),
            "UNKNOWN_FIELD",
            violations=[FieldViolation(f, "unknown field") for f in fields],
        ),
    )


def bad_request(problem: RequestProblem) -> Denial:
    """400 INVALID_ARGUMENT naming the field (or `path`, `body`) that is wrong."""
    return deny(400, invalid_argument(problem.field, problem.description))


def non_canonical_path(problem: RequestProblem) -> Denial:
    """400 for a REST path the check will not resolve (see `shared.httprules`)."""
    return deny(
        400,
        DomainError(
            ErrorKind.INVALID_ARGUMENT,
            f"invalid {problem.field} in the URL path: it {problem.description}; send the path"
            " exactly as the API documents it",
            "NON_CANONICAL_PATH",
            violations=[FieldViolation(problem.field, problem.description)],
            metadata={"field": problem.field},
        ),
    )


def _input_type(method_path: str) -> Descriptor:
    service, _, method = method_path[1:].partition("/")
    found: Descriptor = (
        descriptor_pool.Default().FindServiceByName(service).methods_by_name[method].input_type
    )
    return found


def _is_grpc_path(path: str) -> bool:
    """`/package.Service/Method`: two segments, the first a qualified name."""
    service, slash, method = path[1:].partition("/")
    return bool(slash) and "." in service and bool(method) and "/" not in method


def allow(record: KeyRecord, method_path: str) -> CheckResponse:
    headers = [
        _header(KEY_ID_HEADER, record.key_id),
        _header(AUTHORIZED_METHOD_HEADER, method_path),
        _header(PERMISSIONS_HEADER, record.permissions_header),
        _header(OPERATOR_HEADER, "true" if record.operator else "false"),
    ]
    remove = ["x-api-key"]
    if record.device_id:
        headers.insert(1, _header(DEVICE_ID_HEADER, record.device_id))
    else:
        remove.append(DEVICE_ID_HEADER)
    return CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK),
        ok_response=external_auth_pb2.OkHttpResponse(headers=headers, headers_to_remove=remove),
    )


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(self, verifier: Verifier, limiter: Limiter | None = None) -> None:
        self.verifier = verifier
        self.limiter = limiter
        self._now_us = micros_source(verifier.clock)
        # Addresses refused by FailedVerificationsPerAddress: (until_us, denial), per replica.
        self._blocked: dict[str, tuple[int, Denial]] = {}
        self._policies: dict[str, tuple[str, ...] | None] = {}
        self._allowed: dict[tuple[KeyRecord, str], CheckResponse] = {}
        self.routes = HttpRoutes.build(PUBLIC_SERVICES)
        # One per set of missing permissions; the vocabulary is small.
        self._forbidden: dict[tuple[str, ...], Denial] = {}
        self._wrong_method: dict[tuple[str, ...], Denial] = {}

    def _not_allowed(self, allowed: tuple[str, ...]) -> Denial:
        denial = self._wrong_method.get(allowed)
        if denial is None:
            denial = self._wrong_method[allowed] = method_not_allowed(allowed)
        return denial

    def _route(self, path: str, http_method: str) -> tuple[str | None, RouteMatch | None]:
        """(method path, the REST route when the call is REST); `RequestProblem` for a REST
        path that is not canonical."""
        if _is_grpc_path(path):
            return path, None
        found = self.routes.resolve(http_method, path)
        return (None, None) if found is None else (found.grpc_path, found)

    def required_permissions(self, path: str) -> tuple[str, ...] | None:
        """What a key needs for the gRPC method `path`, or None when it has no public route."""
        cached = self._policies.get(path, ())
        if cached != ():
            return cached
        policy = method_policy(path)
        required = None if policy is None else tuple(dict.fromkeys((policy.permission, API_ACCESS)))
        if len(self._policies) >= _POLICY_CACHE_LIMIT:
            self._policies.clear()
        self._policies[path] = required
        return required

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> CheckResponse:
        http = request.attributes.request.http
        if len(http.headers) > MAX_REQUEST_HEADERS:
            _INVALID_ARGUMENT.inc()
            return TOO_MANY_HEADERS.respond(http)
        path, _, query = http.path.partition("?")
        try:
            method_path, route = self._route(path, http.method)
        except RequestProblem as problem:
            _INVALID_ARGUMENT.inc()
            return non_canonical_path(problem).respond(http)
        required = None if method_path is None else self.required_permissions(method_path)
        if method_path is None or required is None:
            _NOT_ROUTED.inc()
            allowed = self.routes.allowed_methods(path) if method_path is None else []
            if allowed:
                return self._not_allowed(tuple(allowed)).respond(http)
            return NO_ROUTE.respond(http)
        api_key = http.headers.get(API_KEY_HEADER)
        if not api_key:
            _UNAUTHENTICATED.inc()
            return MISSING_KEY.respond(http)
        # The address is read only when it matters (an address is blocked, or this call
        # fails): parsing it is a tenth of a cache hit's time in the handler.
        if self._blocked:
            address = client_address(request)
            blocked = None if address is None else self._blocked.get(address)
            if address is not None and blocked is not None:
                if self._now_us() < blocked[0]:
                    _RATE_LIMITED.inc()
                    return blocked[1].respond(http)
                del self._blocked[address]
        verdict = await self.verifier.verify(api_key, required, dry_run=False)
        record = verdict.record
        if record is None or verdict.result != key_pb2.VERIFY_RESULT_VALID:
            address = None
            if self.limiter is not None and verdict.result in _FAILURES:
                address = client_address(request)
            if address is not None:
                refused = await self._count_failure(address)
                if refused is not None:
                    _RATE_LIMITED.inc()
                    return refused.respond(http)
            if verdict.result == INSUFFICIENT_PERMISSIONS:
                _FORBIDDEN.inc()
            elif verdict.result == RATE_LIMITED:
                _RATE_LIMITED.inc()
            else:
                _UNAUTHENTICATED.inc()
            if verdict.result == RATE_LIMITED and verdict.decision is not None:
                seconds = max(1, -(-verdict.decision.retry_after_us // 1_000_000))
                return deny(
                    429,
                    DomainError(
                        ErrorKind.RESOURCE_EXHAUSTED,
                        "rate limit exceeded",
                        "RATE_LIMITED",
                        retry_after=seconds,
                    ),
                ).respond(http)
            if verdict.result == INSUFFICIENT_PERMISSIONS and record is not None:
                missing = tuple(p for p in required if not grants(record.permissions, (p,)))
                denial = self._forbidden.get(missing)
                if denial is None:
                    denial = self._forbidden[missing] = forbidden(missing)
                return denial.respond(http)
            return _REFUSALS.get(verdict.result, UNKNOWN_KEY).respond(http)
        if route is not None and (http.body or query):
            try:
                check_rest_request(_input_type(method_path), route, query, http.body)
            except UnknownFields as unknown:
                _INVALID_ARGUMENT.inc()
                return unknown_fields(unknown.fields).respond(http)
            except RequestProblem as problem:
                _INVALID_ARGUMENT.inc()
                return bad_request(problem).respond(http)
        response = self._allowed.get((record, method_path))
        if response is None:
            response = allow(record, method_path)
            if len(self._allowed) >= _POLICY_CACHE_LIMIT:
                self._allowed.clear()
            self._allowed[(record, method_path)] = response
        _ALLOWED.inc()
        return response

    async def _count_failure(self, address: str) -> Denial | None:
        """Spend a failure from the address's bucket; the denial when it is refused."""
        assert self.limiter is not None
        try:
            await self.limiter.spend(Bucket(LimitName.FAILED_VERIFICATIONS_PER_ADDRESS, address))
        except DomainError as refusal:
            denial = _limit_denial(refusal)
            if len(self._blocked) >= _BLOCKED_LIMIT:
                self._blocked.clear()
            until = self._now_us() + int((refusal.retry_after or 1) * 1_000_000)
            self._blocked[address] = (until, denial)
            return denial
        return None
