"""An RFC 8555 client for the `acme` issuer, on certbot's `acme` and `josepy` libraries.

Blocking code: the ACME worker (`cert_service.acme_worker`) runs each order in a thread. One
`AcmeClient` serves a process; each thread gets its own `ClientV2` and HTTP session (the
library's nonce pool and last response are per connection), all signing with the one account
key and using the one account URL.

An order, `obtain(csr, order_url, on_order)`:

1. Resume the order at `order_url` when a previous attempt placed one (its status says where
   to go on), or place a new one for the CSR's names; `on_order(url)` records it before any
   other step, so a replica taking over never places a second order for the certificate.
2. For each pending authorization: its dns-01 challenge's TXT value goes to
   `_acme-challenge.<name>` (`cert_service.dns01`), every value is checked to be served by
   the authoritative server, then the challenges are answered and the authorizations polled
   (at the CA's `Retry-After`, else from 50 ms doubling to 1 s) until none is pending. The
   records are removed afterwards, whatever happened.
3. Finalize with the CSR as the device or the service made it, poll the order until it is
   valid, download the chain.

Every failure is an `AcmeFailure` saying what the worker should do: when to try again (the
CA's `Retry-After` when it sent one), whether the order is dead (a new one is needed), whether
nothing can help without a new request (a CSR or identifier the CA refuses), or whether the
account is gone (registered again, e.g. after the CA lost its state).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import requests
from acme import challenges, crypto_util, errors, messages
from acme.client import ClientNetwork, ClientV2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from josepy import b64, jwa, jwk
from josepy import errors as jose_errors

from cert_service.dns01 import DnsUpdateError, DnsUpdater, challenge_name
from shared.logging import get_logger

log = get_logger(__name__)

_T = TypeVar("_T")
# How long a failed attempt keeps challenge records for validations in flight.
SETTLE_SECONDS: Final = 10.0

USER_AGENT: Final = "myl-cert-service"
# Problem types no retry of the same request can fix: the device must send another CSR.
_PERMANENT: Final = frozenset(
    {"badCSR", "badPublicKey", "rejectedIdentifier", "unsupportedIdentifier"}
)
_ACCOUNT_LOST: Final = frozenset({"accountDoesNotExist"})
# Problems that say nothing about an order being looked up: the look-up is tried again.
_TRANSIENT: Final = frozenset({"accountDoesNotExist", "badNonce", "rateLimited", "serverInternal"})
# RFC 5280 CRLReason codes of our revocation reasons.
_REASON_CODES: Final = {
    "unspecified": 0,
    "key_compromise": 1,
    "affiliation_changed": 3,
    "superseded": 4,
    "cessation_of_operation": 5,
}


@dataclass(frozen=True)
class AcmeSettings:
    """The CA and the account (`CertServiceConfig.acme`)."""

    directory_url: str
    account_key_file: Path
    contact: str = ""
    eab_kid: str = ""
    eab_hmac_key: str = field(default="", repr=False)
    # PEM bundle to trust for the directory's TLS ("" = the system's).
    ca_bundle: str = ""
    network_timeout: float = 10.0
    # One attempt's limit: authorizations, finalization and download.
    order_timeout: float = 120.0
    # Orders worked on at once by one process (threads: the HTTP and JOSE work holds the
    # GIL, so more than a few per core slows the process's own requests down).
    concurrency: int = 4
    # A claimed job's lease, renewed while it is worked on.
    lease: float = 20.0
    retry_min: float = 2.0
    retry_max: float = 900.0
    # The order budget: `orders` per `order_period` seconds, all at once at most.
    orders: int = 300
    order_period: float = 10_800.0


class AcmeFailure(Exception):
    """An attempt failed; `str()` is the error shown on the certificate."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        order_invalid: bool = False,
        permanent: bool = False,
        account_lost: bool = False,
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.order_invalid = order_invalid
        self.permanent = permanent
        self.account_lost = account_lost


# Tries of one request answered badNonce (RFC 8555 section 6.5: retry with a fresh nonce). The
# library tries twice; CAs reject good nonces at random (Pebble 5 % of them), so two misses in a
# row are seen often enough over a fleet's orders to end attempts for no reason.
NONCE_TRIES: Final = 6


class _Network(ClientNetwork):
    """The library's network, remembering the last response's `Retry-After` and trying a
    request answered badNonce up to `NONCE_TRIES` times."""

    retry_after: float | None = None

    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        for attempt in range(1, NONCE_TRIES + 1):
            try:
                return self._post_once(*args, **kwargs)
            except messages.Error as error:
                if error.code != "badNonce" or attempt == NONCE_TRIES:
                    raise
        raise AssertionError("unreachable")

    def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        response = super()._send_request(method, url, *args, **kwargs)
        self.retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return response


def parse_retry_after(value: str | None, now: dt.datetime | None = None) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - (now or dt.datetime.now(dt.UTC))).total_seconds())


def load_account_key(path: Path) -> tuple[jwk.JWK, jwa.JWASignature]:
    """The account key (PEM: EC P-256/P-384 or RSA) as a JWK and its JWS algorithm."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        algorithm = {"secp256r1": jwa.ES256, "secp384r1": jwa.ES384}.get(key.curve.name)
        if algorithm is None:
            raise ValueError(f"EC curve {key.curve.name} is not usable; use P-256 or P-384")
        return jwk.JWKEC(key=key), algorithm
    if isinstance(key, rsa.RSAPrivateKey):
        return jwk.JWKRSA(key=key), jwa.RS256
    raise ValueError(f"{type(key).__name__} account keys are not supported; use EC or RSA")


class AcmeClient:
    def __init__(self, settings: AcmeSettings, dns: DnsUpdater) -> None:
        self.settings = settings
        self.dns = dns
        self.key, self.algorithm = load_account_key(settings.account_key_file)
        self.thumbprint = b64.b64encode(self.key.thumbprint()).decode("ascii")
        self.account_url: str | None = None
        self._directory: messages.Directory | None = None
        self._lock = threading.Lock()
        self._local = threading.local()

    def close(self) -> None:
        """Make every order in progress give up at its next wait (the service is stopping:
        its job's lease runs out and a replica resumes the order)."""
        self.dns.stopping.set()

    # -- plumbing -----------------------------------------------------------------------------

    def _new_network(self) -> _Network:
        return _Network(
            self.key,
            alg=self.algorithm,
            verify_ssl=self.settings.ca_bundle or True,  # type: ignore[arg-type]
            user_agent=USER_AGENT,
            timeout=int(max(1, self.settings.network_timeout)),
        )

    def _network(self) -> _Network:
        net: _Network | None = getattr(self._local, "net", None)
        if net is None:
            net = self._new_network()
            self._local.net = net
        url = self.account_url  # read once: another thread may replace it
        if url is None:
            raise AcmeFailure("no ACME account yet", retry_after=0)
        net.account = messages.RegistrationResource(uri=url, body=messages.Registration())
        return net

    def _client(self, net: _Network | None = None) -> tuple[ClientV2, _Network]:
        net = net or self._network()
        with self._lock:
            if self._directory is None:
                self._directory = ClientV2.get_directory(self.settings.directory_url, net)
            directory = self._directory
        return ClientV2(directory, net), net

    def register(self) -> str:
        """Register the account (or find the one this key has); returns its URL."""
        return _failures(self._register, self._local)

    def _register(self) -> str:
        # Its own network, without an account: the threads working on orders keep signing
        # with the account URL they have until the new one replaces it.
        net = self._new_network()
        self._local.net = net
        client, _ = self._client(net)
        binding = None
        if self.settings.eab_kid:
            binding = messages.ExternalAccountBinding.from_data(
                account_public_key=self.key.public_key(),
                kid=self.settings.eab_kid,
                hmac_key=self.settings.eab_hmac_key,
                directory=client.directory,
            )
        registration = messages.NewRegistration.from_data(
            email=self.settings.contact or None,
            terms_of_service_agreed=True,
            external_account_binding=binding,
        )
        try:
            return str(client.new_account(registration).uri)
        except errors.ConflictError as existing:
            return str(existing.location)
        finally:
            del self._local.net  # this thread's next order gets a network with the account

    # -- one order ----------------------------------------------------------------------------

    def obtain(self, csr_pem: str, order_url: str | None, on_order: Callable[[str], None]) -> str:
        """The full chain PEM for `csr_pem`; raises AcmeFailure."""
        return _failures(lambda: self._obtain(csr_pem, order_url, on_order), self._local)

    def _obtain(self, csr_pem: str, order_url: str | None, on_order: Callable[[str], None]) -> str:
        client, net = self._client()
        self._local.net.retry_after = None
        deadline = time.monotonic() + self.settings.order_timeout
        csr = csr_pem.encode("ascii")
        order = self._resume(client, order_url, csr) if order_url else None
        if order is None:
            if self.dns.stopping.is_set():
                raise AcmeFailure("the service is stopping")
            order = self._new_order(client, csr, on_order)
        status = order.body.status
        if status == messages.STATUS_INVALID:
            raise AcmeFailure(
                f"order invalid: {_problem(order.body.error)}", order_invalid=True, retry_after=0
            )
        if status == messages.STATUS_PENDING:
            self._authorize(client, order, deadline)
            status = messages.STATUS_READY
        if status == messages.STATUS_READY:
            try:
                order = client.begin_finalization(order)
            except messages.Error as error:
                if error.code != "orderNotReady":
                    raise
        return self._certificate(client, net, order, deadline)

    def _resume(self, client: ClientV2, url: str, csr: bytes) -> messages.OrderResource | None:
        try:
            response = client._post_as_get(url)
        except messages.Error as error:
            if error.code in _TRANSIENT:
                raise
            return None  # the CA does not know it (any more): place another
        except errors.ClientError:
            return None
        body = messages.Order.from_json(response.json())
        if body.status == messages.STATUS_INVALID:
            return None
        return _order_resource(client, url, body, csr)

    def _new_order(
        self, client: ClientV2, csr: bytes, on_order: Callable[[str], None]
    ) -> messages.OrderResource:
        """The library's `new_order`, recording the order as soon as the CA has placed it
        (before its authorizations are fetched), so no failure leaves an order unrecorded."""
        request = x509.load_pem_x509_csr(csr)
        names, _ = crypto_util.get_identifiers_from_x509(request.subject, request.extensions)
        identifiers = [messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=n) for n in names]
        response = client._post(
            client.directory["newOrder"], messages.NewOrder(identifiers=identifiers)
        )
        url = response.headers.get("Location")
        if not url:
            raise AcmeFailure("the CA placed an order without a Location")
        on_order(url)
        return _order_resource(client, url, messages.Order.from_json(response.json()), csr)

    def _authorize(self, client: ClientV2, order: messages.OrderResource, deadline: float) -> None:
        records: dict[str, list[str]] = {}
        pending: list[tuple[messages.AuthorizationResource, messages.ChallengeBody]] = []
        for authz in order.authorizations:
            if authz.body.status == messages.STATUS_VALID:
                continue  # the CA reuses an earlier validation
            if authz.body.status != messages.STATUS_PENDING:
                raise AcmeFailure(
                    f"authorization for {authz.body.identifier.value} is {authz.body.status}",
                    order_invalid=True,
                )
            challenge = next(
                (c for c in authz.body.challenges if isinstance(c.chall, challenges.DNS01)),
                None,
            )
            if challenge is None:
                raise AcmeFailure(
                    f"the CA offers no dns-01 challenge for {authz.body.identifier.value}",
                    permanent=True,
                )
            name = challenge_name(authz.body.identifier.value)
            records.setdefault(name, []).append(challenge.chall.validation(self.key))
            pending.append((authz, challenge))
        if not pending:
            return
        added: list[tuple[str, list[str]]] = []
        # Challenges the CA may be validating: answered now, or by an earlier attempt.
        in_flight = [a for a, c in pending if c.status != messages.STATUS_PENDING]
        settled = False
        try:
            for name, values in records.items():
                self.dns.add(name, values)
                added.append((name, values))
            for name, values in records.items():
                self.dns.wait_served(name, values)
            for authz, challenge in pending:
                if challenge.status == messages.STATUS_PENDING:
                    client.answer_challenge(challenge, challenge.chall.response(self.key))
                    in_flight.append(authz)
            for authz, _ in pending:
                self._wait_authorization(client, authz, deadline)
            settled = True
        finally:
            if not settled and added:
                self._settle(client, in_flight)
            for name, values in added:
                self._remove(name, values)

    def _settle(self, client: ClientV2, in_flight: list[messages.AuthorizationResource]) -> None:
        """An attempt ending while the CA validates: the records stay until it has looked
        (at most `SETTLE_SECONDS`), so the next attempt finds the authorizations valid
        instead of failed against a removed record, which would cost a new order."""
        deadline = time.monotonic() + SETTLE_SECONDS
        for authz in in_flight:
            with contextlib.suppress(
                AcmeFailure, messages.Error, errors.Error, requests.RequestException
            ):
                self._wait_authorization(client, authz, deadline)

    def _remove(self, name: str, values: list[str]) -> None:
        """Delete challenge records, trying three times: a stale value proves nothing to
        anyone (it is bound to one authorization), but the zone should not collect them."""
        for attempt in range(3):
            try:
                self.dns.remove(name, values)
                return
            except DnsUpdateError as exc:
                if attempt == 2:
                    log.warning("challenge record not removed", name=name, error=str(exc))
                    return
                if self.dns.stopping.wait(0.2 * (attempt + 1)):
                    return

    def _wait_authorization(
        self, client: ClientV2, authz: messages.AuthorizationResource, deadline: float
    ) -> None:
        pause = 0.05
        while True:
            updated, response = client.poll(authz)
            status = updated.body.status
            if status == messages.STATUS_VALID:
                return
            if status != messages.STATUS_PENDING:
                problems = [
                    _problem(c.error) for c in updated.body.challenges if c.error is not None
                ]
                raise AcmeFailure(
                    f"validation of {updated.body.identifier.value} failed: "
                    + ("; ".join(problems) or str(status)),
                    order_invalid=True,
                )
            wait = parse_retry_after(response.headers.get("Retry-After"))
            self._sleep(wait if wait is not None else pause, deadline, "authorization")
            pause = min(pause * 2, 1.0)

    def _certificate(
        self, client: ClientV2, net: _Network, order: messages.OrderResource, deadline: float
    ) -> str:
        pause = 0.05
        body = order.body
        while True:
            if body.status == messages.STATUS_VALID and body.certificate is not None:
                chain: str = client._post_as_get(body.certificate).text
                return chain
            if body.status == messages.STATUS_INVALID:
                raise AcmeFailure(
                    f"order invalid: {_problem(body.error)}", order_invalid=True, retry_after=0
                )
            if body.status == messages.STATUS_READY:
                order = client.begin_finalization(order.update(body=body))
                body = order.body
                continue
            wait = net.retry_after
            self._sleep(wait if wait is not None else pause, deadline, "finalization")
            pause = min(pause * 2, 1.0)
            body = messages.Order.from_json(client._post_as_get(order.uri).json())

    def revoke(self, certificate_pem: str, reason: str) -> None:
        """Revoke at the CA (RFC 8555 7.6) with the account that ordered it; a certificate
        the CA has revoked already counts as done. Raises AcmeFailure."""
        leaf = x509.load_pem_x509_certificates(certificate_pem.encode("ascii"))[0]
        code = _REASON_CODES.get(reason, 0)

        def send() -> None:
            client, _ = self._client()
            try:
                client.revoke(leaf, code)
            except messages.Error as error:
                if error.code != "alreadyRevoked":
                    raise

        _failures(send, self._local)

    def _sleep(self, seconds: float, deadline: float, what: str) -> None:
        if time.monotonic() + seconds > deadline:
            raise AcmeFailure(f"{what} not complete within the order timeout")
        if self.dns.stopping.wait(seconds):
            raise AcmeFailure("the service is stopping")

    def renewal_time(self, chain_pem: str) -> dt.datetime | None:
        """The CA's suggested renewal time (ARI, RFC 9773) when its directory offers
        renewal information; None otherwise or when it cannot be had now."""
        try:
            client, _ = self._client()
            try:
                client.directory["renewalInfo"]
            except KeyError:
                return None  # the CA offers no ARI
            leaf = chain_pem.split("-----END CERTIFICATE-----", 1)[0]
            when, _ = client.renewal_time((leaf + "-----END CERTIFICATE-----\n").encode())
        except (errors.Error, messages.Error, requests.RequestException, ValueError):
            return None
        if when is not None and when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        return when


def _order_resource(
    client: ClientV2, url: str, body: messages.Order, csr: bytes
) -> messages.OrderResource:
    authorizations = [
        client._authzr_from_response(client._post_as_get(authz), uri=authz)
        for authz in body.authorizations
    ]
    return messages.OrderResource(body=body, uri=url, authorizations=authorizations, csr_pem=csr)


def _problem(error: messages.Error | None) -> str:
    if error is None:
        return "no reason given"
    return f"{error.typ}: {error.detail or error.title or ''}".strip()


def _failures(work: Callable[[], _T], local: threading.local | None) -> _T:
    """Run `work`, turning the library's and the network's errors into AcmeFailure."""
    try:
        return work()
    except AcmeFailure:
        raise
    except messages.Error as error:
        net = getattr(local, "net", None) if local is not None else None
        retry_after = getattr(net, "retry_after", None)
        if error.code == "badNonce":
            retry_after = 0.0  # tried NONCE_TRIES times already: another attempt, at once
        raise AcmeFailure(
            _problem(error),
            retry_after=retry_after,
            permanent=error.code in _PERMANENT,
            account_lost=error.code in _ACCOUNT_LOST,
        ) from error
    except DnsUpdateError as exc:
        raise AcmeFailure(f"dns-update: {exc}") from exc
    except errors.TimeoutError as exc:
        raise AcmeFailure("the CA did not finish in time") from exc
    except (errors.Error, requests.RequestException, jose_errors.Error, ValueError) as exc:
        raise AcmeFailure(f"acme: {type(exc).__name__}: {exc}"[:500]) from exc


def device_csr(private_key_pem: str, names: Sequence[str]) -> str:
    """A CSR for `names` signed by the (service-generated) device key: what the CA finalizes
    the order with, now and at every renewal, since the key itself is never stored."""
    key = serialization.load_pem_private_key(private_key_pem.encode("ascii"), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError("unsupported device key")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def csr_names_problem(csr_pem: str, names: Sequence[str]) -> str | None:
    """Why the CA would not finalize an order for `names` with this (already validated) CSR,
    or None: its subjectAltName must hold exactly those names."""
    csr = x509.load_pem_x509_csr(csr_pem.encode("ascii"))
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        requested = {name.lower() for name in san.get_values_for_type(x509.DNSName)}
    except x509.ExtensionNotFound:
        requested = set()
    wanted = {name.lower() for name in names}
    if requested == wanted:
        return None
    return (
        "with the ACME issuer the CSR's subjectAltName must name exactly "
        f"{', '.join(sorted(wanted))} (the CA signs the CSR as sent)"
    )
