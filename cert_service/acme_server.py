"""The RFC 8555 (ACME) server devices get their certificates from with the clients they already
run (certbot, lego, ...), behind the gateway at `/acme/`. docs/acme-server.md has the design.

* Enrollment is External Account Binding (section 7.3.4): `CreateAcmeEabCredentials` hands
  out a kid and an HMAC key for one device, single use and expiring. The key is never stored:
  it is derived from the service's secret and the kid (`EabKeys`). The account bound with it
  may order only that device's names, `<label>.<zone>` and `*.<label>.<zone>`.
* Authorizations are valid when the order is created (sections 7.1.4 and 7.4 allow
  pre-authorized identifiers): the platform allocated the name to the device, and the EAB
  proved the account speaks for that device; no challenge could prove more.
* Finalize renews the device's certificate through `DeviceCertificates.renew`, the API's own
  path: the same issuer (signing now, or an order queued with a CA: `processing` with
  Retry-After until the row is ACTIVE), limits, logs and metrics. revokeCert revokes through
  `DeviceCertificates.revoke`, so the CRL lists it, and an API revocation shows here (ARI's
  urgent window, `alreadyRevoked`).
* Every piece of state (used nonces, accounts, orders) is in PostgreSQL, so any replica answers
  any request; a nonce carries its own MAC, so issuing one writes nothing (`Nonces`). An
  account whose device was deleted is deactivated at its next use.

This is plain HTTP/1.1 (aiohttp): ACME needs 201s, Location, Replay-Nonce and Link headers and
problem documents, which the gRPC-JSON transcoder cannot give.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cert_service.acme_jws import (
    MAX_BODY,
    Jws,
    Problem,
    PublicKey,
    b64decode,
    b64encode,
    header_text,
    inner_jws,
    load_jwk,
    malformed,
    parse_jws,
    public_jwk,
    thumbprint,
    verify_hs256,
    verify_signature,
)
from cert_service.ari import RenewalPolicy
from cert_service.certificates import DeviceCertificates
from cert_service.issuer import serial_hex
from cert_service.metrics import ACME_REQUESTS
from cert_service.names import certificate_names
from cert_service.pki import issuer_key_id
from cert_service.storage.acme_server import AcmeServerStore, DeviceAccount, DeviceOrder
from shared.clock import Clock
from shared.errors import DomainError, ErrorKind, not_found
from shared.logging import REQUEST_CONTEXT, get_logger
from shared.tasks import BackgroundTask, run_periodically
from shared.tls import GATEWAY, InternalTls, peer_identity_of

log = get_logger(__name__)

PREFIX: Final = "/acme"
NONCE_LIFETIME: Final = timedelta(minutes=10)
ORDER_LIFETIME: Final = timedelta(days=7)
EAB_LIFETIME: Final = timedelta(hours=24)
_RETRY_AFTER: Final = "1"
_ARI_RETRY_AFTER: Final = "21600"
_ORDERS_LISTED: Final = 100
_JOSE: Final = "application/jose+json"
_PROBLEM: Final = "application/problem+json"
# RFC 5280 reason codes an ACME client may send (section 7.6), as the API names them.
_REASONS: Final = {
    0: "unspecified",
    1: "key_compromise",
    3: "affiliation_changed",
    4: "superseded",
    5: "cessation_of_operation",
}


class EabKeys:
    """EAB credentials whose HMAC key is never stored: HMAC-SHA256(secret, kid). A reader of
    the database (or a backup) learns kids, never a key that binds an account; the secret is
    the service's own (derived from its CA or ACME account key in `create_app`)."""

    def __init__(self, secret: bytes) -> None:
        self._root = secret
        self._secret = hmac.new(b"myl acme eab", secret, hashlib.sha256).digest()

    def derive(self, purpose: bytes) -> bytes:
        """Another key from the same secret, for another purpose (the nonces' MAC)."""
        return hmac.new(purpose, self._root, hashlib.sha256).digest()

    def new_kid(self) -> str:
        """A fresh key id whose HMAC key does not begin with `-` once encoded: a client's
        command line would read such a key as an option (`certbot --eab-hmac-key -Qx...`
        stops at "expected one argument"), one enrolment in 64."""
        while True:
            kid = "eab_" + secrets.token_urlsafe(18)
            if not b64encode(self.hmac_key(kid)).startswith("-"):
                return kid

    def hmac_key(self, kid: str) -> bytes:
        return hmac.new(self._secret, kid.encode("utf-8"), hashlib.sha256).digest()


class Nonces:
    """Replay nonces (RFC 8555 section 6.5) that any replica checks without a shared store of
    issued ones: a nonce is 16 random bytes, its expiry and a MAC over both under a key every
    replica derives alike. Issuing one writes nothing (newNonce needs no database); using one
    writes it into `acme_nonces`, whose primary key refuses the second use on every replica.
    Used nonces are kept until they expire, and swept as new ones are written."""

    _RANDOM: Final = 16
    _MAC: Final = 16

    def __init__(self, key: bytes, store: AcmeServerStore, clock: Clock) -> None:
        self._key = key
        self.store = store
        self.clock = clock

    def issue(self) -> str:
        expires = int((self.clock.now() + NONCE_LIFETIME).timestamp())
        body = secrets.token_bytes(self._RANDOM) + expires.to_bytes(8, "big")
        return b64encode(body + self._mac(body))

    async def use(self, nonce: str) -> bool:
        """True once for a nonce this service issued that has not expired."""
        try:
            raw = b64decode(nonce, "nonce")
        except Problem:
            return False
        body, mac = raw[: -self._MAC], raw[-self._MAC :]
        if len(body) != self._RANDOM + 8 or not hmac.compare_digest(mac, self._mac(body)):
            return False
        expires = datetime.fromtimestamp(int.from_bytes(body[self._RANDOM :], "big"), UTC)
        now = self.clock.now()
        if expires <= now:
            return False
        return await self.store.spend_nonce(nonce, expires, now)

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()[: self._MAC]


@dataclass(frozen=True)
class EabCredentials:
    kid: str
    hmac_key: str
    expires_at: datetime


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class AcmeServer:
    """The ACME resources (section 7.1) as aiohttp handlers."""

    def __init__(
        self,
        store: AcmeServerStore,
        certificates: DeviceCertificates,
        eab: EabKeys,
        clock: Clock,
        renewal: RenewalPolicy,
        *,
        terms_url: str,
    ) -> None:
        self.store = store
        self.certificates = certificates
        self.eab = eab
        self.clock = clock
        self.renewal = renewal
        self.terms_url = terms_url
        self.nonces = Nonces(eab.derive(b"myl acme nonces"), store, clock)

    # -- the API side: enrollment ---------------------------------------------------------------

    async def create_eab_credentials(self, device_id: str) -> EabCredentials:
        """A kid and HMAC key (base64url) for one device, for the life of its current row."""
        record = await self.certificates.store.get_by_device(device_id)
        if record is None:
            raise not_found("certificate", "CERTIFICATE_NOT_FOUND", device_id=device_id)
        now = self.clock.now()
        kid = self.eab.new_kid()
        expires = now + EAB_LIFETIME
        await self.store.add_eab_key(kid, device_id, record.created_at, now, expires)
        log.info("acme eab credentials created", device_id=device_id, kid=kid)
        return EabCredentials(kid, b64encode(self.eab.hmac_key(kid)), expires)

    # -- HTTP -----------------------------------------------------------------------------------

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._problems], client_max_size=MAX_BODY + 1)
        routes = [
            web.get(f"{PREFIX}/directory", self.directory),
            web.route("*", f"{PREFIX}/new-nonce", self.new_nonce),
            web.post(f"{PREFIX}/new-account", self.new_account),
            web.post(f"{PREFIX}/new-order", self.new_order),
            web.post(f"{PREFIX}/acct/{{account}}", self.account),
            web.post(f"{PREFIX}/acct/{{account}}/orders", self.account_orders),
            web.post(f"{PREFIX}/order/{{order}}", self.order),
            web.post(f"{PREFIX}/order/{{order}}/finalize", self.finalize),
            web.post(f"{PREFIX}/authz/{{order}}/{{index}}", self.authorization),
            web.post(f"{PREFIX}/chall/{{order}}/{{index}}", self.challenge),
            web.post(f"{PREFIX}/cert/{{order}}", self.certificate),
            web.post(f"{PREFIX}/revoke-cert", self.revoke_cert),
            web.post(f"{PREFIX}/key-change", self.key_change),
            web.get(f"{PREFIX}/renewal-info/{{cert_id}}", self.renewal_info),
        ]
        app.add_routes(routes)
        return app

    @web.middleware
    async def _problems(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        # Log lines of this request carry Envoy's request id, as an RPC's do (each request
        # runs in a task of its own).
        REQUEST_CONTEXT.set((request.headers.get("X-Request-Id", ""), f"acme/{_resource(request)}"))
        problem: Problem | None = None
        allowed: set[str] = set()
        try:
            response = await handler(request)
        except Problem as raised:
            problem = raised
        except DomainError as error:
            problem = _from_domain(error)
        except web.HTTPMethodNotAllowed as exc:
            problem = Problem("malformed", f"{request.method} is not allowed here", status=405)
            allowed = set(exc.allowed_methods)
        except web.HTTPNotFound:
            problem = Problem("malformed", "no such ACME resource", status=404)
        except web.HTTPRequestEntityTooLarge:
            problem = Problem("malformed", f"a request body is at most {MAX_BODY} bytes", 413)
        except web.HTTPException:
            raise
        except Exception:
            log.exception("acme request failed", path=request.path)
            problem = Problem("serverInternal", "the server failed; retry later", status=500)
        if problem is not None:
            response = self._problem_response(problem)
            if allowed:
                response.headers["Allow"] = ", ".join(sorted(allowed))
        ACME_REQUESTS.labels(_resource(request), problem.kind if problem else "ok").inc()
        base = _base_url(request)
        response.headers["Link"] = f'<{base}{PREFIX}/directory>;rel="index"'
        response.headers.setdefault("Cache-Control", "no-store")
        if request.method == "POST" or request.path.endswith("/new-nonce"):
            response.headers["Replay-Nonce"] = self.nonces.issue()
        return response

    def _problem_response(self, problem: Problem) -> web.Response:
        response = web.Response(
            status=problem.status,
            body=json.dumps(problem.document()).encode("utf-8"),
            content_type=_PROBLEM,
        )
        response.headers.update(problem.headers)
        return response

    # -- request checks (section 6.2) -----------------------------------------------------------

    async def _body(self, request: web.Request) -> bytes:
        if request.content_type != _JOSE:
            raise Problem("malformed", f"Content-Type must be {_JOSE}", status=415)
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise Problem("malformed", f"a request body is at most {MAX_BODY} bytes", status=413)
        body = bytearray()
        while chunk := await request.content.read(MAX_BODY + 1 - len(body)):
            body += chunk
            if len(body) > MAX_BODY:
                raise Problem(
                    "malformed", f"a request body is at most {MAX_BODY} bytes", status=413
                )
        return bytes(body)

    async def _verified(
        self, request: web.Request, *, key_from: str = "kid"
    ) -> tuple[Jws, DeviceAccount | None, PublicKey]:
        """The request's JWS, checked: the url header is this request's URL, the signature
        verifies with the account's key (`key_from="kid"`) or the enclosed one ("jwk"), or
        either ("any"), and its nonce is one we issued, unused. Then the nonce is used."""
        jws = parse_jws(await self._body(request))
        url = header_text(jws, "url")
        if url != _base_url(request) + request.path:
            raise Problem("unauthorized", "the JWS url header is not this request's URL", 401)
        nonce = header_text(jws, "nonce")
        has_jwk, has_kid = "jwk" in jws.header, "kid" in jws.header
        if has_jwk == has_kid:
            raise malformed("the protected header must carry exactly one of jwk and kid")
        if has_jwk and key_from == "kid":
            raise malformed("this resource is requested with kid (an account URL), not jwk")
        if has_kid and key_from == "jwk":
            raise malformed("this resource is requested with jwk, not kid")
        account: DeviceAccount | None = None
        if has_kid:
            account = await self._account(request, header_text(jws, "kid"))
            key = load_jwk(account.jwk)
        else:
            key = load_jwk(jws.header["jwk"])
        verify_signature(jws, key)
        if not await self.nonces.use(nonce):
            raise Problem("badNonce", "the nonce was used already, expired, or never issued")
        return jws, account, key

    async def _account(self, request: web.Request, kid: str) -> DeviceAccount:
        prefix = f"{_base_url(request)}{PREFIX}/acct/"
        account_id = kid.removeprefix(prefix)
        if account_id == kid or "/" in account_id:
            raise Problem("accountDoesNotExist", "kid is not an account URL of this server")
        account = await self.store.account(account_id)
        if account is None:
            raise Problem("accountDoesNotExist", "no such account")
        if account.status != "valid":
            raise Problem("unauthorized", f"the account is {account.status}", 401)
        if not account.device_alive:
            await self.store.deactivate_accounts(account.device_id, account.device_created_at)
            log.info("acme account deactivated: device gone", account=account.account_id)
            raise Problem("unauthorized", "the account is deactivated: its device was deleted", 401)
        return account

    def _urls(self, request: web.Request) -> str:
        return _base_url(request) + PREFIX

    # -- resources ------------------------------------------------------------------------------

    async def directory(self, request: web.Request) -> web.Response:
        base = self._urls(request)
        return web.json_response(
            {
                "newNonce": f"{base}/new-nonce",
                "newAccount": f"{base}/new-account",
                "newOrder": f"{base}/new-order",
                "revokeCert": f"{base}/revoke-cert",
                "keyChange": f"{base}/key-change",
                "renewalInfo": f"{base}/renewal-info",
                "meta": {"termsOfService": self.terms_url, "externalAccountRequired": True},
            }
        )

    async def new_nonce(self, request: web.Request) -> web.Response:
        if request.method not in ("GET", "HEAD"):
            raise web.HTTPMethodNotAllowed(request.method, ["GET", "HEAD"])
        return web.Response(status=204 if request.method == "GET" else 200)

    async def new_account(self, request: web.Request) -> web.Response:
        jws, _, key = await self._verified(request, key_from="jwk")
        payload = jws.payload_object()
        jwk = public_jwk(key)
        print_ = thumbprint(jwk)
        existing = await self.store.account_by_key(print_)
        if existing is not None:
            if existing.status != "valid":
                raise Problem("unauthorized", f"the account is {existing.status}", 401)
            return self._account_response(request, existing, status=200)
        if payload.get("onlyReturnExisting") is True:
            raise Problem("accountDoesNotExist", "no account has this key")
        contact = _contact(payload.get("contact", []))
        binding = payload.get("externalAccountBinding")
        if binding is None:
            raise Problem(
                "externalAccountRequired",
                "this server needs External Account Binding: ask the API for EAB "
                "credentials for the device",
            )
        eab = inner_jws(binding, "externalAccountBinding")
        if eab.alg != "HS256":
            raise Problem("badSignatureAlgorithm", "externalAccountBinding alg must be HS256")
        if "nonce" in eab.header:
            raise malformed("externalAccountBinding must not carry a nonce")
        if eab.header.get("url") != header_text(jws, "url"):
            raise malformed("externalAccountBinding url must be the newAccount URL")
        kid = header_text(eab, "kid")
        try:
            bound_key = load_jwk(eab.payload_object())
        except Problem:
            raise malformed("externalAccountBinding payload must be the account key") from None
        if public_jwk(bound_key) != jwk:
            raise malformed("externalAccountBinding payload must be the account key")
        row = await self.store.eab_key(kid)
        now = self.clock.now()
        if row is None or not verify_hs256(eab, self.eab.hmac_key(kid)):
            raise Problem("unauthorized", "the external account binding does not verify", 401)
        if row.used_at is not None:
            raise Problem("unauthorized", "these EAB credentials were used already", 401)
        if row.expires_at <= now:
            raise Problem("unauthorized", "these EAB credentials have expired", 401)
        account_id = secrets.token_urlsafe(12)
        if not await self.store.create_account(account_id, print_, jwk, row, contact, now):
            raise Problem(
                "unauthorized",
                "these EAB credentials were used meanwhile, or their device was deleted",
                401,
            )
        account = await self.store.account(account_id)
        assert account is not None
        log.info("acme account created", device_id=account.device_id, account=account_id)
        return self._account_response(request, account, status=201)

    def _account_response(
        self, request: web.Request, account: DeviceAccount, *, status: int
    ) -> web.Response:
        url = f"{self._urls(request)}/acct/{account.account_id}"
        response = web.json_response(
            {"status": account.status, "contact": account.contact, "orders": f"{url}/orders"},
            status=status,
        )
        response.headers["Location"] = url
        return response

    async def account(self, request: web.Request) -> web.Response:
        jws, account, _ = await self._verified(request)
        assert account is not None
        if account.account_id != request.match_info["account"]:
            raise Problem("unauthorized", "this is not the requesting account", 401)
        if not jws.post_as_get:
            payload = jws.payload_object()
            status = payload.get("status")
            if status is not None and status != "deactivated":
                raise malformed("an account's status may only be set to deactivated")
            contact = _contact(payload["contact"]) if "contact" in payload else None
            changed = await self.store.update_account(
                account.account_id, status=status, contact=contact
            )
            if changed is None:
                raise Problem("unauthorized", "the account is no longer valid", 401)
            if status is not None:
                log.info("acme account deactivated", account=account.account_id)
            account = changed
        return self._account_response(request, account, status=200)

    async def account_orders(self, request: web.Request) -> web.Response:
        _, account, _ = await self._verified(request)
        assert account is not None
        if account.account_id != request.match_info["account"]:
            raise Problem("unauthorized", "this is not the requesting account", 401)
        orders = await self.store.orders_of(account.account_id, _ORDERS_LISTED)
        base = self._urls(request)
        return web.json_response({"orders": [f"{base}/order/{order}" for order in orders]})

    async def new_order(self, request: web.Request) -> web.Response:
        jws, account, _ = await self._verified(request)
        assert account is not None
        payload = jws.payload_object()
        if "notBefore" in payload or "notAfter" in payload:
            raise malformed("notBefore and notAfter are not supported: the validity is the CA's")
        identifiers = payload.get("identifiers")
        if not isinstance(identifiers, list) or not identifiers or len(identifiers) > 10:
            raise malformed("identifiers must be a list of 1 to 10 identifier objects")
        record = await self.certificates.store.get_by_device(account.device_id)
        if record is None:
            raise Problem("unauthorized", "the account's device has no name", 401)
        allowed = set(certificate_names(record.uuid_subdomain, True))
        names: list[str] = []
        refused: list[dict[str, Any]] = []
        for identifier in identifiers:
            if not isinstance(identifier, dict) or not isinstance(identifier.get("value"), str):
                raise malformed("each identifier must be an object with a type and a value")
            value = identifier["value"].lower().removesuffix(".")
            if identifier.get("type") != "dns":
                raise Problem("unsupportedIdentifier", "only dns identifiers are supported")
            if value not in allowed:
                refused.append(
                    {
                        "type": "urn:ietf:params:acme:error:rejectedIdentifier",
                        "detail": f"{value} is not a name of this account's device",
                        "identifier": {"type": "dns", "value": identifier["value"][:255]},
                    }
                )
            elif value not in names:
                names.append(value)
        if refused:
            raise Problem(
                "rejectedIdentifier",
                f"this account may order only {' and '.join(sorted(allowed))}",
                subproblems=refused,
            )
        certificate_type = "wildcard" if any(n.startswith("*.") for n in names) else "single"
        now = self.clock.now()
        order = await self.store.add_order(
            secrets.token_urlsafe(12),
            account,
            names,
            certificate_type,
            now,
            now + ORDER_LIFETIME,
        )
        response = self._order_response(request, order, status=201)
        response.headers["Location"] = f"{self._urls(request)}/order/{order.order_id}"
        return response

    def _order_response(
        self, request: web.Request, order: DeviceOrder, *, status: int = 200
    ) -> web.Response:
        base = self._urls(request)
        body: dict[str, Any] = {
            "status": order.status,
            "expires": _rfc3339(order.expires_at),
            "identifiers": [{"type": "dns", "value": name} for name in order.identifiers],
            "authorizations": [
                f"{base}/authz/{order.order_id}/{index}" for index in range(len(order.identifiers))
            ],
            "finalize": f"{base}/order/{order.order_id}/finalize",
        }
        if order.status == "valid":
            body["certificate"] = f"{base}/cert/{order.order_id}"
        if order.error is not None:
            body["error"] = order.error
        response = web.json_response(body, status=status)
        if order.status == "processing":
            response.headers["Retry-After"] = _RETRY_AFTER
        return response

    async def _own_order(self, request: web.Request, account: DeviceAccount) -> DeviceOrder:
        order = await self.store.order(request.match_info["order"])
        if order is None or order.account_id != account.account_id:
            raise Problem("malformed", "no such order", status=404)
        if order.status == "processing":
            order = await self._progress(order)
        return order

    async def order(self, request: web.Request) -> web.Response:
        _, account, _ = await self._verified(request)
        assert account is not None
        order = await self._own_order(request, account)
        response = self._order_response(request, order)
        response.headers["Location"] = f"{self._urls(request)}/order/{order.order_id}"
        return response

    async def _progress(self, order: DeviceOrder) -> DeviceOrder:
        """A processing order whose certificate an asynchronous issuer completed since."""
        record = await self.certificates.store.get_by_device(order.device_id)
        if record is None:
            finished = await self.store.finish_order(
                order.order_id,
                error=Problem("unauthorized", "the device was deleted").document(),
            )
        elif (
            record.status == "active"
            and record.issuance_requested_at is None
            and record.serial_number
            and record.serial_number != order.previous_serial
        ):
            finished = await self.store.finish_order(
                order.order_id, serial_number=record.serial_number, certificate_pem=record.chain_pem
            )
        elif record.issuance_requested_at is None and record.status != "pending":
            finished = await self.store.finish_order(
                order.order_id,
                error=Problem(
                    "serverInternal", "the order was cancelled (revoked or replaced meanwhile)"
                ).document(),
            )
        else:
            return order
        return finished or await self.store.order(order.order_id) or order

    async def finalize(self, request: web.Request) -> web.Response:
        jws, account, _ = await self._verified(request)
        assert account is not None
        order = await self._own_order(request, account)
        payload = jws.payload_object()
        if order.status != "ready":
            raise Problem("orderNotReady", f"the order is {order.status}", status=403)
        if order.expires_at <= self.clock.now():
            raise Problem("orderNotReady", "the order has expired: place a new one", status=403)
        csr_pem = _csr_pem(payload.get("csr"), order.identifiers)
        record = await self.certificates.store.get_by_device(order.device_id)
        if record is None:
            raise Problem("unauthorized", "the account's device was deleted", 401)
        if not await self.store.start_order(order.order_id, record.serial_number):
            raise Problem("orderNotReady", "the order is being finalized already", status=403)
        try:
            certificate = await self.certificates.renew(
                order.device_id, csr_pem, certificate_type=order.certificate_type
            )
        except DomainError as error:
            problem = _from_domain(error, csr=True)
            await self.store.finish_order(order.order_id, error=problem.document())
            raise problem from None
        if certificate.HasField("pending_issuance") or not certificate.serial_number:
            finished = await self.store.order(order.order_id)
        else:
            finished = await self.store.finish_order(
                order.order_id,
                serial_number=certificate.serial_number,
                certificate_pem=certificate.certificate_chain_pem,
            )
        assert finished is not None
        log.info("acme order finalized", device_id=order.device_id, order=order.order_id)
        response = self._order_response(request, finished)
        response.headers["Location"] = f"{self._urls(request)}/order/{order.order_id}"
        return response

    async def authorization(self, request: web.Request) -> web.Response:
        _, account, _ = await self._verified(request)
        assert account is not None
        order, name = await self._identifier(request, account)
        wildcard = name.startswith("*.")
        body: dict[str, Any] = {
            "identifier": {"type": "dns", "value": name.removeprefix("*.")},
            "status": "valid",
            "expires": _rfc3339(order.expires_at),
            "challenges": [self._challenge(request, order, int(request.match_info["index"]))],
        }
        if wildcard:
            body["wildcard"] = True
        return web.json_response(body)

    async def challenge(self, request: web.Request) -> web.Response:
        _, account, _ = await self._verified(request)
        assert account is not None
        order, _ = await self._identifier(request, account)
        index = int(request.match_info["index"])
        response = web.json_response(self._challenge(request, order, index))
        response.headers["Link"] = (
            f'<{self._urls(request)}/authz/{order.order_id}/{index}>;rel="up"'
        )
        return response

    def _challenge(self, request: web.Request, order: DeviceOrder, index: int) -> dict[str, Any]:
        token = hashlib.sha256(f"{order.order_id}/{index}".encode()).digest()
        return {
            "type": "dns-01",
            "url": f"{self._urls(request)}/chall/{order.order_id}/{index}",
            "status": "valid",
            "token": b64encode(token),
            "validated": _rfc3339(order.created_at),
        }

    async def _identifier(
        self, request: web.Request, account: DeviceAccount
    ) -> tuple[DeviceOrder, str]:
        order = await self._own_order(request, account)
        index = request.match_info["index"]
        if not index.isdigit() or int(index) >= len(order.identifiers):
            raise Problem("malformed", "no such authorization", status=404)
        return order, order.identifiers[int(index)]

    async def certificate(self, request: web.Request) -> web.Response:
        _, account, _ = await self._verified(request)
        assert account is not None
        order = await self._own_order(request, account)
        if order.status != "valid" or order.certificate_pem is None:
            raise Problem("malformed", "the order has no certificate (yet)", status=404)
        return web.Response(
            body=order.certificate_pem.encode("ascii"),
            content_type="application/pem-certificate-chain",
        )

    async def revoke_cert(self, request: web.Request) -> web.Response:
        jws, account, key = await self._verified(request, key_from="any")
        payload = jws.payload_object()
        der = b64decode(payload.get("certificate"), "certificate")
        try:
            leaf = x509.load_der_x509_certificate(der)
        except ValueError:
            raise malformed("certificate is not a DER X.509 certificate") from None
        reason_code = payload.get("reason", 0)
        if type(reason_code) is not int or reason_code not in _REASONS:
            raise Problem(
                "badRevocationReason",
                f"reason must be one of {', '.join(map(str, sorted(_REASONS)))}",
            )
        serial = serial_hex(leaf.serial_number)
        order = await self.store.order_by_serial(serial)
        if order is None or (order.certificate_pem or "").find(_pem(leaf)) != 0:
            raise Problem("unauthorized", "this certificate was not issued through this server")
        if account is not None:
            if account.device_id != order.device_id:
                raise Problem("unauthorized", "the certificate is another device's", 403)
        elif _spki(key) != _spki(leaf.public_key()):
            raise Problem("unauthorized", "jwk must be the certificate's key", 403)
        record = await self.certificates.store.get_by_device(order.device_id)
        if record is None or record.serial_number != serial:
            raise Problem(
                "unauthorized",
                "only the device's current certificate can be revoked; this one was replaced",
                403,
            )
        if record.status == "revoked":
            raise Problem("alreadyRevoked", "the certificate is revoked already")
        await self.certificates.revoke(order.device_id, _REASONS[reason_code])
        log.info("acme certificate revoked", device_id=order.device_id, serial=serial)
        return web.Response(status=200)

    async def key_change(self, request: web.Request) -> web.Response:
        jws, account, _ = await self._verified(request)
        assert account is not None
        inner = inner_jws(jws.payload_object(), "the keyChange payload")
        if "jwk" not in inner.header or "kid" in inner.header:
            raise malformed("the inner JWS must carry jwk (the new key) and no kid")
        if inner.header.get("url") != header_text(jws, "url"):
            raise malformed("the inner JWS url must be the outer one")
        new_key = load_jwk(inner.header["jwk"])
        verify_signature(inner, new_key)
        body = inner.payload_object()
        if body.get("account") != header_text(jws, "kid"):
            raise malformed("the inner payload's account must be the outer kid")
        try:
            old = public_jwk(load_jwk(body.get("oldKey")))
        except Problem:
            raise malformed("the inner payload's oldKey must be the account key") from None
        if old != public_jwk(load_jwk(account.jwk)):
            raise malformed("the inner payload's oldKey must be the account key")
        new_jwk = public_jwk(new_key)
        new_print = thumbprint(new_jwk)
        other = await self.store.account_by_key(new_print)
        if other is not None:
            problem = Problem("malformed", "another account has this key", status=409)
            problem.headers["Location"] = f"{self._urls(request)}/acct/{other.account_id}"
            raise problem
        if not await self.store.change_key(
            account.account_id, account.key_thumbprint, new_print, new_jwk
        ):
            raise Problem("malformed", "the account's key changed meanwhile", status=409)
        changed = await self.store.account(account.account_id)
        assert changed is not None
        log.info("acme account key changed", account=account.account_id)
        return self._account_response(request, changed, status=200)

    async def renewal_info(self, request: web.Request) -> web.Response:
        """RFC 9773: the window of a certificate issued through this server, by the rule the
        API's GetRenewalInfo answers with (`cert_service.ari`)."""
        cert_id = request.match_info["cert_id"]
        aki, _, serial_part = cert_id.partition(".")
        b64decode(aki, "the certID's key identifier")
        serial_bytes = b64decode(serial_part, "the certID's serial")
        if not serial_bytes:
            raise malformed("the certID must be base64url(AKI).base64url(serial)")
        serial = serial_hex(int.from_bytes(serial_bytes, "big"))
        order = await self.store.order_by_serial(serial)
        if order is None or order.certificate_pem is None:
            raise Problem("malformed", "no certificate with this certID", status=404)
        leaf = x509.load_pem_x509_certificates(order.certificate_pem.encode("ascii"))[0]
        if b64decode(aki, "the certID's key identifier") != issuer_key_id(order.certificate_pem):
            raise Problem("malformed", "no certificate with this certID", status=404)
        record = await self.certificates.store.get_by_device(order.device_id)
        current = record is not None and record.serial_number == serial
        now = self.clock.now()
        suggested = (
            await self.certificates.ca_renewal_time(order.device_id, serial) if current else None
        )
        window = self.renewal.window(
            leaf.not_valid_before_utc,
            leaf.not_valid_after_utc,
            revoked=current and record is not None and record.status == "revoked",
            now=now,
            ca_suggested=suggested,
        )
        body: dict[str, Any] = {
            "suggestedWindow": {"start": _rfc3339(window.start), "end": _rfc3339(window.end)}
        }
        if window.explanation_url:
            body["explanationURL"] = window.explanation_url
        response = web.json_response(body)
        response.headers["Retry-After"] = _ARI_RETRY_AFTER
        return response


def _resource(request: web.Request) -> str:
    """The metric label of a request: the resource's first path segment (a fixed set)."""
    route = request.match_info.route.resource
    if route is None:
        return "unknown"
    segments = (route.canonical.removeprefix(PREFIX + "/") or "unknown").split("/")
    if segments[0] in ("acct", "order") and len(segments) == 3:
        return f"{segments[0]}-{segments[2]}"  # acct-orders, order-finalize
    return segments[0]


def _base_url(request: web.Request) -> str:
    """scheme://host as the client addressed us (Envoy sets X-Forwarded-Proto)."""
    proto = request.headers.get("X-Forwarded-Proto", request.scheme)
    return f"{'https' if proto == 'https' else 'http'}://{request.host}"


def _contact(value: object) -> list[str]:
    if not isinstance(value, list) or len(value) > 4:
        raise malformed("contact must be a list of at most 4 URLs")
    for item in value:
        if not isinstance(item, str) or not item.startswith("mailto:") or len(item) > 255:
            raise Problem("unsupportedContact", "contacts must be mailto: URLs")
    return list(value)


def _csr_pem(value: object, identifiers: list[str]) -> str:
    """The finalize CSR as PEM; `badCSR` unless it names exactly the order's identifiers."""
    der = b64decode(value, "csr")
    try:
        csr = x509.load_der_x509_csr(der)
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = {name.lower() for name in san.get_values_for_type(x509.DNSName)}
        except x509.ExtensionNotFound:
            names = set()
        common = [
            str(attribute.value).lower()
            for attribute in csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        ]
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        raise Problem("badCSR", "csr is not a valid DER certificate signing request") from None
    if names | set(common) != set(identifiers) or not names >= set(common):
        raise Problem(
            "badCSR", f"the CSR must name exactly the order's identifiers: {', '.join(identifiers)}"
        )
    pem = base64.encodebytes(der).decode("ascii")
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{pem}-----END CERTIFICATE REQUEST-----\n"


def _pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _spki(key: Any) -> bytes:
    der: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def _from_domain(error: DomainError, *, csr: bool = False) -> Problem:
    """The API's refusal as an ACME problem: what the client did wrong is a 4xx."""
    kind = error.kind
    if kind is ErrorKind.RESOURCE_EXHAUSTED:
        headers = {"Retry-After": str(max(1, round(error.retry_after or 1)))}
        return Problem("rateLimited", error.message, status=429, headers=headers)
    if kind in (ErrorKind.INVALID_ARGUMENT, ErrorKind.FAILED_PRECONDITION):
        return Problem("badCSR" if csr else "malformed", error.message)
    if kind in (ErrorKind.NOT_FOUND, ErrorKind.PERMISSION_DENIED):
        return Problem("unauthorized", error.message, status=403)
    if kind in (ErrorKind.UNAVAILABLE, ErrorKind.ABORTED):
        retry = str(max(1, round(error.retry_after or 1)))
        return Problem("serverInternal", error.message, status=503, headers={"Retry-After": retry})
    return Problem("serverInternal", "the server failed; retry later", status=500)


class AcmeHttpServer:
    """The aiohttp runner of `AcmeServer` on its own port (the gateway routes `/acme/` to it).

    With internal TLS (`tls.enabled`, shared/tls.py) the port speaks TLS 1.3 and takes only
    the gateway's internal identity: a connection without a certificate from the internal CA
    is refused in the handshake, and one with another identity gets 403 (docs/security.md).
    Renewed identity files are loaded every `REFRESH_SECONDS` without a restart."""

    REFRESH_SECONDS: Final = 5.0

    def __init__(
        self, server: AcmeServer, host: str, port: int, tls: InternalTls | None = None
    ) -> None:
        self.server = server
        self.host = host
        self.port = port
        self.tls = tls if tls is not None and tls.enabled else None
        self._runner: web.AppRunner | None = None
        self._context: ssl.SSLContext | None = None
        self._refresher = BackgroundTask("acme server identity", self._refresh)

    async def start(self) -> int:
        application = self.server.application()
        context = None
        if self.tls is not None:
            context = self.tls.ssl_context()
            application.middlewares.insert(0, _only_the_gateway)
        runner = web.AppRunner(application, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True, ssl_context=context)
        await site.start()
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        if context is not None:
            self._context = context
            self._refresher.start()
        return self.port

    async def _refresh(self) -> None:
        tls, context = self.tls, self._context
        assert tls is not None
        assert context is not None
        seen = tls.stamp()

        async def look() -> None:
            nonlocal seen
            seen = tls.refresh(context, seen)

        await run_periodically("acme server identity", look, self.REFRESH_SECONDS, wait_first=True)

    async def stop(self) -> None:
        await self._refresher.stop()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()


@web.middleware
async def _only_the_gateway(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The ACME port answers the gateway alone (its internal identity, shared/tls.py)."""
    transport = request.transport
    peer = transport.get_extra_info("peercert") if transport is not None else None
    if peer_identity_of(peer) != GATEWAY:
        return web.json_response(
            {
                "type": "urn:ietf:params:acme:error:unauthorized",
                "detail": "this port answers the gateway only",
                "status": 403,
            },
            status=403,
            content_type="application/problem+json",
        )
    return await handler(request)
