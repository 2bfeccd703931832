"""The device certificate operations, behind the gRPC servicer.

Reads go cache first, then PostgreSQL; every change is committed, then its cache entries are
updated (a provision's signed certificate) or fenced (every other change), then the call
returns. Where certificates come from, signed here or ordered from an ACME CA, is the issuer's
business (`cert_service.issuance`): these operations never ask which one it is.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial
from typing import Final

from cryptography.hazmat.primitives import serialization

from cert_service import certcache
from cert_service.access import AccessRecorder
from cert_service.batching import Coalescer
from cert_service.certcache import NOT_FOUND, CertificateCache
from cert_service.issuance import CertificateIssuer, Issued
from cert_service.issuer import (
    PublicKey,
    PublicKeyError,
    generate_private_key,
    load_public_key,
)
from cert_service.limits import CertificateLimits
from cert_service.metrics import CERTIFICATE_OPERATIONS
from cert_service.outbox import OutboxRelay
from cert_service.storage import (
    CertificateRecord,
    CertificateStore,
    CompletedRequest,
    ListQuery,
    NewRow,
    RenewalSource,
    RequestTaken,
)
from cert_service.validation import csr_public_key
from myl.cert.v1 import cert_pb2
from shared.clock import Clock
from shared.db import OUTCOME_UNKNOWN
from shared.errors import (
    DomainError,
    ErrorKind,
    already_exists,
    failed_precondition,
    internal_error,
    not_found,
)
from shared.idempotency import RequestKey, in_progress, recent, superseded
from shared.limits import Spend
from shared.logging import get_logger

log = get_logger(__name__)

_ACTIVE: Final = cert_pb2.CERTIFICATE_STATUS_ACTIVE
_EXPIRED: Final = cert_pb2.CERTIFICATE_STATUS_EXPIRED
_ATTEMPTS: Final = 3
# At most this many provisioning INSERTs in flight (each a pool connection), each for up to this
# many certificates.
_INSERTS_IN_FLIGHT: Final = 1
_INSERT_BATCH: Final = 64


def truthful_status(certificate: cert_pb2.Certificate, now_seconds: int) -> cert_pb2.Certificate:
    """An active certificate whose not_after has passed reads as EXPIRED (cached entries too)."""
    if certificate.status == _ACTIVE and certificate.not_after.seconds <= now_seconds:
        certificate.status = _EXPIRED
    return certificate


@dataclass(frozen=True)
class ProvisionRequest:
    device_id: str
    fqdn: str
    certificate_type: str
    public_key: PublicKey | None
    csr_pem: str | None
    auto_renewal: bool
    validity_days: int
    # True when the service chose the name (a fresh UUID label).
    generated_name: bool = False
    # AIP-155: the request id and fingerprint, when the caller sent one.
    request: RequestKey | None = None
    # The operator key asking through the gateway (NewDevicesPerOperatorKey), if one is.
    operator_key_id: str | None = None


@dataclass(frozen=True)
class CertificatePage:
    certificates: list[cert_pb2.Certificate]
    last: CertificateRecord | None


class DeviceCertificates:
    def __init__(
        self,
        store: CertificateStore,
        cache: CertificateCache,
        issuer: CertificateIssuer,
        access: AccessRecorder,
        outbox: OutboxRelay,
        clock: Clock,
        limits: CertificateLimits | None = None,
    ) -> None:
        self.limits = limits
        self.store = store
        self.cache = cache
        self.issuer = issuer
        self.access = access
        self.outbox = outbox
        self.clock = clock
        # Concurrent provisions share INSERT statements, and so commits (see
        # `cert_service.batching`).
        self._inserts: Coalescer[NewRow, CertificateRecord | None] = Coalescer(
            store.insert_batch, max_in_flight=_INSERTS_IN_FLIGHT, max_batch=_INSERT_BATCH
        )

    # -- reads --------------------------------------------------------------------------------

    async def get(self, device_id: str) -> cert_pb2.Certificate:
        key = certcache.device_key(device_id)
        cached = await self.cache.get(key)
        if cached is NOT_FOUND:
            raise _not_found(device_id=device_id)
        if isinstance(cached, cert_pb2.Certificate):
            certificate = truthful_status(cached, _seconds(self.clock.now()))
        else:
            started = time.monotonic()
            record = await self.store.get_by_device(device_id)
            certificate = await self._from_database(key, record, started, device_id=device_id)
        self.access.record(device_id, self.clock.now())
        return certificate

    async def lookup(
        self, fqdn: str, via_wildcard: bool, authorize: Callable[[str], None]
    ) -> cert_pb2.Certificate:
        """The certificate for `fqdn`; with `via_wildcard`, only if it is a WILDCARD one.

        `authorize(device_id)` raises when the caller may not see that device's
        certificate; a refused look-up is not counted as an access.
        """
        key = certcache.name_key(fqdn)
        cached = await self.cache.get(key)
        if cached is NOT_FOUND:
            raise _not_found(uuid_subdomain=fqdn)
        if isinstance(cached, cert_pb2.Certificate):
            certificate = truthful_status(cached, _seconds(self.clock.now()))
        else:
            started = time.monotonic()
            record = await self.store.get_by_subdomain(fqdn)
            certificate = await self._from_database(key, record, started, uuid_subdomain=fqdn)
        if via_wildcard and certificate.certificate_type != cert_pb2.CERTIFICATE_TYPE_WILDCARD:
            raise _not_found(uuid_subdomain=fqdn)
        authorize(certificate.device_id)
        self.access.record(certificate.device_id, self.clock.now())
        return certificate

    async def _from_database(
        self, key: str, record: CertificateRecord | None, started: float, **what: str
    ) -> cert_pb2.Certificate:
        if record is None:
            await self.cache.fill(key, None, started)
            raise _not_found(**what)
        # An expired status is as true in an hour as it is now, so the computed one is cached.
        # One with an order in progress is not: its attempts and errors change without a
        # logged invalidation, and it is read from PostgreSQL until the order completes.
        certificate = record.to_pb(self.clock.now())
        if not certificate.HasField("pending_issuance"):
            await self.cache.fill(key, certificate, started)
        return certificate

    async def list(
        self,
        limit: int,
        status: str | None,
        expire_before: datetime | None,
        after: tuple[datetime, str] | None,
    ) -> CertificatePage:
        """One page (at most `limit` rows); `last` is set when another page follows."""
        now = self.clock.now()
        query = ListQuery(limit + 1, status, expire_before, after)
        records = await self.store.list_certificates(query, now)
        more = len(records) > limit
        records = records[:limit]
        return CertificatePage(
            [record.to_pb(now) for record in records], records[-1] if more else None
        )

    async def ca_renewal_time(self, device_id: str, serial_number: str) -> datetime | None:
        """The renewal moment the CA suggested for this certificate (ARI), if any."""
        return await self.issuer.renewal_time(device_id, serial_number)

    def ca_chain_pem(self) -> str:
        return self.issuer.ca_chain_pem()

    # -- changes ------------------------------------------------------------------------------

    async def provision(self, request: ProvisionRequest) -> tuple[cert_pb2.Certificate, str]:
        """Issue and store the device's first certificate; returns it and, when the service
        generated the key, the private key PEM (returned once, never stored or logged).

        Spends from the provisioning limits once stored (`cert_service.limits`), and when
        the outcome is unknown (`OUTCOME_UNKNOWN`): a failed provision, or the retry of an
        earlier one, spends nothing."""
        replayed: set[str] = set()
        try:
            if self.limits is not None:
                await self._check_provision(request)
            result = await self._provision(request, replayed)
            if self.limits is not None and not replayed:
                await self.limits.spend_provision(request.fqdn, request.operator_key_id)
        except Exception as exc:
            if (
                self.limits is not None
                and not replayed
                and isinstance(exc, DomainError)
                and exc.reason == OUTCOME_UNKNOWN
            ):
                # The certificate may be stored, and a retry that finds it replays it without
                # counting: count it now, as if it were (an undone one is counted all the same).
                await self.limits.spend_provision(request.fqdn, request.operator_key_id)
            _count("provision", exc)
            raise
        _count("provision", None)
        return result

    async def _check_provision(self, request: ProvisionRequest) -> None:
        """Refuse a provision no limit has room for, unless the device or the name is taken
        already: that provision issues nothing new (it is refused as ALREADY_EXISTS, or is the
        retry of an earlier one), and a client should hear that rather than a limit."""
        assert self.limits is not None
        try:
            await self.limits.check_provision(request.fqdn, request.operator_key_id)
        except DomainError as refusal:
            if refusal.kind is not ErrorKind.RESOURCE_EXHAUSTED:
                raise
            conflict = await self.store.conflict(request.device_id, request.fqdn)
            if not (conflict.device_exists or conflict.subdomain_taken):
                raise

    async def _provision(
        self, request: ProvisionRequest, replayed: set[str]
    ) -> tuple[cert_pb2.Certificate, str]:
        private_key_pem = ""
        public_key = request.public_key
        if public_key is None:
            public_key, private_key_pem = generate_private_key()
        # Answered by then at the latest, however long its insert waits in a queue of others
        # (`cert_service.batching`) or for a lock (`shared.db`).
        deadline = time.monotonic() + self.store.db.operation_timeout
        for _ in range(_ATTEMPTS):
            now = self.clock.now()
            issued, record = await self.issuer.issue(
                public_key,
                private_key_pem,
                request.fqdn,
                request.certificate_type,
                request.validity_days,
                request.csr_pem,
                now,
                partial(self._insert, request, now, deadline),
            )
            key = request.request
            if record is not None:
                certificate = record.to_pb(now)
                keys = [certcache.device_key(request.device_id)]
                if not request.generated_name:
                    # Nobody can have looked up a name generated just now: nothing to replace.
                    keys.append(certcache.name_key(request.fqdn))
                if issued.pending:
                    # Not cached (see `_from_database`); a cached "not found" goes.
                    await self.cache.invalidate(*keys)
                else:
                    await self.cache.publish_new(certificate, *keys)
                log.info(
                    "certificate provisioned",
                    device_id=request.device_id,
                    uuid_subdomain=request.fqdn,
                    serial=record.serial_number,
                )
                return certificate, private_key_pem
            conflict = await self.store.conflict(request.device_id, request.fqdn)
            if key is not None and await self._recorded(key, "provision", request.device_id):
                # The insert skips a request id whose device was deleted since: a retry
                # never provisions the device again.
                raise superseded(
                    key.request_id,
                    "the device it provisioned was deleted",
                    device_id=request.device_id,
                )
            if conflict.device_exists:
                replay = await self._replay_provision(request, public_key, private_key_pem)
                if replay is not None:
                    replayed.add("replayed")  # the earlier attempt was counted already
                    return replay
                raise already_exists(
                    f"device {request.device_id} already has a certificate; renew it, or delete "
                    "the device first",
                    "DEVICE_ALREADY_PROVISIONED",
                    device_id=request.device_id,
                )
            if conflict.subdomain_taken:
                raise already_exists(
                    f"the subdomain {request.fqdn} is already allocated to another device",
                    "SUBDOMAIN_TAKEN",
                    uuid_subdomain=request.fqdn,
                )
            if conflict.deletion_pending:
                raise DomainError(
                    ErrorKind.UNAVAILABLE,
                    f"device {request.device_id} was deleted and its API keys are still being "
                    "revoked; retry shortly",
                    "DEVICE_DELETION_PENDING",
                    metadata={"device_id": request.device_id},
                    retry_after=1.0,
                )
            # The conflicting row went away between the insert and the check, or the
            # database ran the insert too late to tell its caller: try again.
        raise DomainError(
            ErrorKind.UNAVAILABLE,
            "the certificate could not be stored in time; retry",
            "WRITE_NOT_COMPLETED",
            metadata={"device_id": request.device_id},
            retry_after=1.0,
        )

    async def _insert(
        self, request: ProvisionRequest, now: datetime, deadline: float, issued: Issued
    ) -> CertificateRecord | None:
        """Store a provision's row (the issuer's `store`): the row, or None when the device
        or the name is taken."""
        key = request.request
        return await self._inserts.submit(
            NewRow(
                request.device_id,
                request.fqdn,
                request.certificate_type,
                request.auto_renewal,
                issued.certificate,
                now,
                key.request_id if key else None,
                key.fingerprint if key else None,
                issued.order_csr,
                deadline,
            )
        )

    async def _replay_provision(
        self, request: ProvisionRequest, public_key: PublicKey, private_key_pem: str
    ) -> tuple[cert_pb2.Certificate, str] | None:
        """The outcome of an earlier attempt of this provision (same AIP-155 request id), or
        None when the device was provisioned by another request or too long ago.

        Only while the certificate is as that attempt left it (active or pending, never
        renewed, not expired): else FAILED_PRECONDITION `REQUEST_SUPERSEDED`, and nothing is
        issued (shared/idempotency.py). With a CSR it is the stored certificate. Without one,
        the key generated then was never stored and cannot be sent again: the retry's fresh
        key gets a certificate, valid no longer than the earlier one, that supersedes it
        (its key reached nobody)."""
        key = request.request
        if key is None:
            return None
        earlier = await self.store.provision_request(request.device_id)
        now = self.clock.now()
        if (
            earlier is None
            or earlier.request_id != key.request_id
            or not recent(earlier.created_at, now)
        ):
            return None
        key.matches(bytes(earlier.request_hash))
        record = await self.store.get_by_device(request.device_id)
        if record is None or record.created_at != earlier.created_at:
            raise superseded(
                key.request_id, "the device it provisioned was deleted", device_id=request.device_id
            )
        moved_on = _moved_on(record, now)
        if moved_on is not None:
            raise superseded(key.request_id, moved_on, device_id=request.device_id)
        if not private_key_pem:
            if record.updated_at == record.created_at:
                # Untouched since its provision, which may be one whose caller heard
                # OUTCOME_UNKNOWN and that the service deletes unless a retry claims it
                # (shared/db.py): claim it, or learn that it is gone.
                claimed = await self.store.claim_provision(
                    request.device_id, key.request_id, record.serial_number, now
                )
                if claimed is None:
                    raise in_progress(key.request_id)
                record = claimed
            return record.to_pb(now), ""
        reissued = await self.issuer.reissue(
            record, request.validity_days, public_key, private_key_pem, key.request_id, now
        )
        return None if reissued is None else (reissued.to_pb(now), private_key_pem)

    async def renew(
        self,
        device_id: str,
        csr_pem: str | None,
        request: RequestKey | None = None,
        *,
        certificate_type: str | None = None,
    ) -> cert_pb2.Certificate:
        """Re-sign the stored public key, or the key of a new CSR.

        `certificate_type` (an ACME order's: what the device asked for) makes the device's
        certificate that type from now on; None keeps the type it has.

        An expired certificate can be renewed with its key. A revoked one needs a CSR with a
        different key: its key is never signed again. A retry of a renewal (same AIP-155
        request id) returns the device's certificate without renewing again. A renewal asked
        for before the renewal point spends from CertificatesPerDeviceName.
        """
        try:
            certificate = await self._renew(device_id, csr_pem, request, certificate_type)
        except Exception as exc:
            _count("renew", exc)
            raise
        _count("renew", None)
        return certificate

    async def _renew(
        self,
        device_id: str,
        csr_pem: str | None,
        request: RequestKey | None,
        certificate_type: str | None = None,
    ) -> cert_pb2.Certificate:
        if request is not None:
            done = await self._recorded(request, "renew", device_id)
            if done is not None:
                return await self._renewal_outcome(request, done)
        spend: Spend | None = None
        try:
            for _ in range(_ATTEMPTS):
                source = await self.store.renewal_source(device_id)
                if source is None:
                    raise _not_found(device_id=device_id)
                if certificate_type is not None:
                    source = replace(source, certificate_type=certificate_type)
                public_key = self._renewal_key(source, csr_pem)
                now = self.clock.now()
                if spend is None and self.limits is not None:
                    spend = await self.limits.for_renewal(source, now)
                renewed = await self.issuer.renew(source, public_key, csr_pem, request, now)
                if renewed is not None:
                    return renewed.to_pb(now)
        except RequestTaken:
            # A concurrent attempt of this request renewed first: its outcome is this one's.
            assert request is not None
            if spend is not None:
                await spend.refund()
            done = await self._recorded(request, "renew", device_id)
            if done is None:
                raise in_progress(request.request_id) from None
            return await self._renewal_outcome(request, done)
        except Exception:
            if spend is not None:
                await spend.refund()
            raise
        if spend is not None:
            await spend.refund()
        raise DomainError(
            ErrorKind.ABORTED,
            "the certificate changed while it was being renewed; retry",
            "CONCURRENT_CHANGE",
            metadata={"device_id": device_id},
        )

    async def _renewal_outcome(
        self, request: RequestKey, done: CompletedRequest
    ) -> cert_pb2.Certificate:
        """A retry of a renewal that succeeded: the certificate it issued, while that is still
        the device's current, usable one; else REQUEST_SUPERSEDED (nothing is renewed)."""
        record = await self.store.get_by_device(done.device_id)
        now = self.clock.now()
        if record is None or record.created_at > done.created_at:
            raise superseded(request.request_id, "the device was deleted", device_id=done.device_id)
        if done.serial_number is not None and record.serial_number != done.serial_number:
            raise superseded(
                request.request_id,
                "the certificate it issued was replaced by a later one",
                device_id=done.device_id,
            )
        status = record.status_at(now)
        if status in ("revoked", "expired"):
            raise superseded(
                request.request_id,
                f"the certificate it issued was {status}",
                device_id=done.device_id,
            )
        return record.to_pb(now)

    def _renewal_key(self, source: RenewalSource, csr_pem: str | None) -> PublicKey:
        if csr_pem is not None:
            key = csr_public_key(csr_pem, source.uuid_subdomain, source.certificate_type)
            if source.status == "revoked" and _same_key(key, source.public_key_sha256):
                raise failed_precondition(
                    "the certificate was revoked; its key is never signed again, send a CSR "
                    "for a new key",
                    "REVOKED_KEY_REUSED",
                    device_id=source.device_id,
                )
            return key
        if source.status == "revoked":
            raise failed_precondition(
                "the certificate was revoked; renew it with a CSR for a new key",
                "CERTIFICATE_REVOKED",
                device_id=source.device_id,
            )
        try:
            return load_public_key(source.public_key_pem)
        except PublicKeyError:
            log.error("stored public key unusable", device_id=source.device_id)
            raise internal_error() from None

    async def revoke(
        self, device_id: str, reason: str, request: RequestKey | None = None
    ) -> cert_pb2.Certificate:
        """Revoke the current certificate; revoking a revoked one returns it unchanged.

        A retry (same AIP-155 request id) returns the certificate the first attempt revoked
        while it is still the device's current one; once the device has a newer certificate
        (renewed with a new key, or deleted and provisioned again) it is REQUEST_SUPERSEDED
        and revokes nothing: the first attempt never saw that certificate."""
        now = self.clock.now()
        if request is not None:
            done = await self._recorded(request, "revoke", device_id)
            if done is not None:
                current = await self.store.get_by_device(device_id)
                if (
                    current is None
                    or current.created_at > done.created_at
                    or current.serial_number != done.serial_number
                ):
                    raise superseded(
                        request.request_id,
                        "the device's certificate was replaced",
                        device_id=device_id,
                    )
                return current.to_pb(now)
        record, invalidation = await self.store.revoke(
            device_id, reason, now, (request.request_id, request.fingerprint) if request else None
        )
        if record is None:
            raise _not_found(device_id=device_id)
        if invalidation is not None:
            # Revoked, with the request recorded in the same statement: nothing from here on
            # may fail the call (the caller must not hear that nothing was done).
            await self.cache.changed(record.device_id, record.uuid_subdomain, invalidation)
            log.info("certificate revoked", device_id=device_id, reason=reason)
        elif request is not None:
            await self.store.record_request(
                request.request_id,
                "revoke",
                request.fingerprint,
                device_id,
                now,
                record.serial_number,
            )
        return record.to_pb(now)

    async def delete(self, device_id: str, request: RequestKey | None = None) -> None:
        """Delete the device and queue the revocation of its API keys, then try to deliver
        that revocation at once (the relay retries it if key_service does not answer). A
        retry of a deletion that succeeded (same AIP-155 request id) succeeds again."""
        now = self.clock.now()
        if request is not None and await self._recorded(request, "delete", device_id):
            return
        deleted = await self.store.delete_device(
            device_id,
            now,
            self.outbox.lease_until(now),
            (request.request_id, request.fingerprint) if request else None,
        )
        if deleted is None:
            # A concurrent attempt of the same request may have deleted it first.
            if request is not None and await self._recorded(request, "delete", device_id):
                return
            raise _not_found(device_id=device_id)
        fqdn, event, invalidation = deleted
        await self.cache.changed(device_id, fqdn, invalidation)
        log.info("device deleted", device_id=device_id, uuid_subdomain=fqdn)
        await self.outbox.try_deliver(event)

    async def _recorded(
        self, request: RequestKey, method: str, device_id: str
    ) -> CompletedRequest | None:
        """`method` done under this request id (recently, on this device), or None;
        INVALID_ARGUMENT when the id was used for another request."""
        done = await self.store.completed_request(request.request_id, method)
        if done is None or not recent(done.created_at, self.clock.now()):
            return None
        request.matches(done.request_hash)
        return done if done.device_id == device_id else None


def _moved_on(record: CertificateRecord, now: datetime) -> str | None:
    """How a provisioned certificate has changed since (a retry of its provision must not
    hand it out again), or None: still as the provision left it."""
    status = record.status_at(now)
    if status in ("revoked", "expired"):
        return f"the certificate it issued was {status}"
    if record.renewal_count > 0:
        return "the certificate it issued was renewed"
    return None


def _count(operation: str, error: BaseException | None) -> None:
    """myl_certificate_operations_total: ok, or the refusal's reason (a fixed vocabulary)."""
    if error is None:
        outcome = "ok"
    elif isinstance(error, DomainError):
        outcome = error.reason
    else:
        outcome = "INTERNAL"
    CERTIFICATE_OPERATIONS.labels(operation, outcome).inc()


def _seconds(now: datetime) -> int:
    return int(now.timestamp())


def _same_key(key: PublicKey, public_key_sha256: str) -> bool:
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest() == public_key_sha256


def _not_found(**what: str) -> DomainError:
    return not_found("certificate", "CERTIFICATE_NOT_FOUND", **what)
