"""How a device certificate comes to be: signed now by the built-in CA, or ordered from an ACME CA.

`CertificateIssuer` is what the certificate operations (`cert_service.certificates`) and the
lifecycle worker call; `create_app` builds one of its two implementations (`CERT_ISSUER`):

* `SigningIssuer` (the built-in CA): a provision or renewal signs in the request (one
  signature, before a database connection is taken) and stores an ACTIVE certificate; the
  lifecycle's auto-renewal signs each certificate of a batch on the batch's connection, with
  its rows locked, and stores them in the same transaction.
* `OrderingIssuer` (ACME): nothing is signed here. A provision stores a PENDING row with the CSR
  the order is finalized with; a renewal queues an order on the row (which stays as it is until
  the order completes). The ACME worker (`cert_service.acme_worker`) completes the orders in the
  background and makes the row ACTIVE; the issuer wakes it itself once what it queued has
  committed (a stored provision, or the lifecycle batch's transaction), so a new order does not
  wait for the worker's next poll. The certificate logic never asks which issuer it has.

Both write the row themselves (`renew`, `reissue`): the signing one replaces the certificate,
the ordering one queues an order, and each returns the row as it left it. The caller then
answers from that row, whichever issuer wrote it.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization
from prometheus_client import Counter
from psycopg import AsyncConnection
from psycopg.rows import TupleRow

from cert_service.acme import csr_names_problem, device_csr
from cert_service.issuer import (
    IssuedCertificate,
    Issuer,
    PublicKey,
    PublicKeyError,
    load_public_key,
    spki_der,
)
from cert_service.names import certificate_names
from cert_service.storage import (
    CertificateRecord,
    CertificateStore,
    IssuanceQueue,
    NewCertificate,
    RenewalSource,
)
from shared.errors import failed_precondition, invalid_argument
from shared.idempotency import RequestKey, in_progress
from shared.logging import get_logger

log = get_logger(__name__)

ISSUED = Counter("myl_certificates_issued_total", "Certificates signed, by occasion", ["occasion"])

CSR_UNCHANGED: Any = object()
"""Pass as `csr_pem` when renewing with the stored key: certificate_data keeps its CSR."""

Changed = Callable[[str, str, int], Awaitable[None]]
"""Told of every row an issuer changed: (device_id, uuid_subdomain, logged invalidation id);
fences the row's cache entries (`cert_service.certcache.CertificateCache.changed`)."""


@dataclass(frozen=True)
class Issued:
    """A provision's certificate: signed, or (`order_csr` set) pending until the CA's order
    for that CSR completes; `certificate` then holds the key and names, no chain or serial."""

    certificate: NewCertificate
    order_csr: str | None = None

    @property
    def pending(self) -> bool:
        return self.order_csr is not None


StoreProvision = Callable[[Issued], Awaitable[CertificateRecord | None]]
"""Stores a provision's row with the certificate `issue` made (the operations' batched
INSERT): the row as stored, or None when none was (the device or the name is taken)."""


@dataclass(frozen=True)
class RenewedBatch:
    """What one lifecycle batch did: certificates signed (to store), orders queued, and the
    devices that cannot be renewed (their auto-renewal is switched off)."""

    signed: list[tuple[str, NewCertificate]]
    queued: int
    broken: list[str]


class CertificateIssuer(Protocol):
    """Where the certificates of the operations come from (see the module docstring)."""

    async def issue(
        self,
        public_key: PublicKey,
        private_key_pem: str,
        fqdn: str,
        certificate_type: str,
        validity_days: int,
        csr_pem: str | None,
        now: datetime,
        store: StoreProvision,
    ) -> tuple[Issued, CertificateRecord | None]:
        """A provision's certificate for `public_key` (`private_key_pem`: the key the service
        generated for it, else ""; `csr_pem`: the device's CSR, else None), stored with
        `store`; returns it and what `store` returned. INVALID_ARGUMENT when the CA would
        refuse the CSR (nothing is stored then)."""
        ...

    async def reissue(
        self,
        record: CertificateRecord,
        validity_days: int,
        public_key: PublicKey,
        private_key_pem: str,
        request_id: uuid.UUID,
        now: datetime,
    ) -> CertificateRecord | None:
        """A provision's retry with a fresh generated key: a certificate for it in place of
        the one the earlier attempt left in `record` (its key reached nobody), valid no
        longer. The row as left, or None when it changed since `record` was read (or
        REQUEST_IN_PROGRESS: another retry or a change came first)."""
        ...

    async def renew(
        self,
        source: RenewalSource,
        public_key: PublicKey,
        csr_pem: str | None,
        request: RequestKey | None,
        now: datetime,
    ) -> CertificateRecord | None:
        """Renew the device's certificate for `public_key` (that of `csr_pem`, or the stored
        one); the row as left, or None when it changed since `source` was read. The request
        id, if any, is recorded with it; `RequestTaken` when another attempt's was first."""
        ...

    async def renew_batch(
        self, conn: AsyncConnection[TupleRow], sources: Sequence[RenewalSource], now: datetime
    ) -> RenewedBatch:
        """The lifecycle's renewals of one locked batch, on the batch's connection."""
        ...

    async def renewal_time(self, device_id: str, serial_number: str) -> datetime | None:
        """The renewal moment the CA suggested for this certificate (ARI), if any."""
        ...

    def ca_chain_pem(self) -> str:
        """The CA chain clients trust device certificates by; FAILED_PRECONDITION when each
        certificate carries its own."""
        ...


def issue_device_certificate(
    issuer: Issuer,
    public_key: PublicKey,
    fqdn: str,
    certificate_type: str,
    validity_days: int,
    now: datetime,
    csr_pem: str | None,
    *,
    occasion: str,
    not_after: datetime | None = None,
) -> NewCertificate:
    """Sign a certificate for the device name valid from `now` for `validity_days`, or until
    `not_after` when given (a replacement is never valid for longer than what it replaces).

    CPU work (one signature, ~0.1 ms with the built-in P-256 CA): callers run it without holding
    a database connection. `csr_pem` is recorded in certificate_data (None: the service made
    the key; `CSR_UNCHANGED`: keep what is recorded). `occasion` labels the issue counter
    (provision, renew, auto_renew).
    """
    issued = issuer.issue(
        public_key,
        certificate_names(fqdn, certificate_type == "wildcard"),
        now,
        not_after if not_after is not None else now + timedelta(days=validity_days),
    )
    return new_certificate(issued, validity_days, csr_pem, occasion=occasion)


def new_certificate(
    issued: IssuedCertificate, validity_days: int, csr_pem: str | None, *, occasion: str
) -> NewCertificate:
    """What device_certificates stores of `issued` (see `issue_device_certificate`)."""
    data: dict[str, Any] = {
        "chain_pem": issued.chain_pem,
        "serial_number": issued.serial_hex,
        "fingerprint_sha256": issued.fingerprint_sha256,
        "public_key_sha256": issued.public_key_sha256,
        "public_key_pem": issued.public_key_pem,
        "issuer": issued.issuer,
        "dns_names": issued.dns_names,
        "not_before": issued.not_before.isoformat(),
        "not_after": issued.not_after.isoformat(),
        "validity_days": validity_days,
    }
    if issued.crl_shard is not None:
        # Read by the database (migration 0005): the row's crl_shard column and the
        # revocation log take them from here.
        data["crl_shard"] = issued.crl_shard
        data["issuer_key_id"] = issued.issuer_key_id
    if csr_pem is not CSR_UNCHANGED:
        data["csr_pem"] = csr_pem
    ISSUED.labels(occasion).inc()
    return NewCertificate(
        serial_number=issued.serial_hex,
        fingerprint_sha256=issued.fingerprint_sha256,
        not_before=issued.not_before,
        not_after=issued.not_after,
        data=data,
    )


def _request_pair(request: RequestKey | None) -> tuple[uuid.UUID, bytes] | None:
    return (request.request_id, request.fingerprint) if request else None


class _RowIssuer:
    """What both issuers do with a row they wrote: its cache entries are fenced before the
    caller answers from it, so no reader is served the certificate it replaced."""

    def __init__(self, store: CertificateStore, changed: Changed) -> None:
        self.store = store
        self.changed = changed

    async def _wrote(
        self, written: tuple[CertificateRecord, int] | None
    ) -> CertificateRecord | None:
        """The row as written (None: nothing was, the row changed since it was read), once
        `changed` has been told of its logged invalidation."""
        if written is None:
            return None
        record, invalidation = written
        await self.changed(record.device_id, record.uuid_subdomain, invalidation)
        return record


class SigningIssuer(_RowIssuer):
    """CERT_ISSUER=local: the built-in CA signs in the request."""

    def __init__(
        self, ca: Issuer, store: CertificateStore, changed: Changed, default_validity_days: int
    ) -> None:
        super().__init__(store, changed)
        self.ca = ca
        self.default_validity_days = default_validity_days

    async def issue(
        self,
        public_key: PublicKey,
        private_key_pem: str,
        fqdn: str,
        certificate_type: str,
        validity_days: int,
        csr_pem: str | None,
        now: datetime,
        store: StoreProvision,
    ) -> tuple[Issued, CertificateRecord | None]:
        issued = Issued(
            issue_device_certificate(
                self.ca,
                public_key,
                fqdn,
                certificate_type,
                validity_days,
                now,
                csr_pem,
                occasion="provision",
            )
        )
        return issued, await store(issued)

    async def reissue(
        self,
        record: CertificateRecord,
        validity_days: int,
        public_key: PublicKey,
        private_key_pem: str,
        request_id: uuid.UUID,
        now: datetime,
    ) -> CertificateRecord | None:
        new = issue_device_certificate(
            self.ca,
            public_key,
            record.uuid_subdomain,
            record.certificate_type,
            validity_days,
            now,
            None,  # the service generated the key: there is no CSR
            occasion="provision",
            not_after=record.expires_at,
        )
        superseded = await self._wrote(
            await self.store.supersede_provision(
                record.device_id, request_id, record.serial_number, new, now
            )
        )
        if superseded is None:
            # Another retry replaced it first, or it was renewed or revoked meanwhile: the
            # retry of this one sees which.
            raise in_progress(request_id)
        log.info(
            "provision retried: certificate superseded",
            device_id=superseded.device_id,
            serial=superseded.serial_number,
        )
        return superseded

    async def renew(
        self,
        source: RenewalSource,
        public_key: PublicKey,
        csr_pem: str | None,
        request: RequestKey | None,
        now: datetime,
    ) -> CertificateRecord | None:
        new = issue_device_certificate(
            self.ca,
            public_key,
            source.uuid_subdomain,
            source.certificate_type,
            source.validity_days or self.default_validity_days,
            now,
            CSR_UNCHANGED if csr_pem is None else csr_pem,
            occasion="renew",
        )
        record = await self._wrote(
            await self.store.replace_certificate(source, new, now, _request_pair(request))
        )
        if record is not None:
            log.info("certificate renewed", device_id=source.device_id, serial=new.serial_number)
        return record

    async def renew_batch(
        self, conn: AsyncConnection[TupleRow], sources: Sequence[RenewalSource], now: datetime
    ) -> RenewedBatch:
        """Re-sign each stored public key, for the validity it was provisioned with."""
        signed: list[tuple[str, NewCertificate]] = []
        broken: list[str] = []
        for source in sources:
            try:
                new = issue_device_certificate(
                    self.ca,
                    load_public_key(source.public_key_pem),
                    source.uuid_subdomain,
                    source.certificate_type,
                    source.validity_days or self.default_validity_days,
                    now,
                    CSR_UNCHANGED,
                    occasion="auto_renew",
                )
            except (PublicKeyError, ValueError):
                log.error(
                    "cannot re-sign stored key; auto-renewal switched off",
                    device_id=source.device_id,
                    exc_info=True,
                )
                broken.append(source.device_id)
                continue
            signed.append((source.device_id, new))
        return RenewedBatch(signed, 0, broken)

    async def renewal_time(self, device_id: str, serial_number: str) -> datetime | None:
        return None  # the built-in CA suggests nothing beyond RENEW_AT_FRACTION

    def ca_chain_pem(self) -> str:
        return self.ca.ca_chain_pem()


class OrderingIssuer(_RowIssuer):
    """CERT_ISSUER=acme: orders are queued on the rows, and the worker completes them."""

    def __init__(
        self,
        queue: IssuanceQueue,
        store: CertificateStore,
        changed: Changed,
        wake: Callable[[], None],
    ) -> None:
        super().__init__(store, changed)
        self.queue = queue
        self.wake = wake

    async def _wrote(
        self, written: tuple[CertificateRecord, int] | None
    ) -> CertificateRecord | None:
        """A row with an order queued on it also wakes the worker that completes orders."""
        record = await super()._wrote(written)
        if record is not None:
            self.wake()
        return record

    @staticmethod
    def _check_names(csr_pem: str, fqdn: str, certificate_type: str) -> list[str]:
        """The certificate's names, which a device's CSR must name exactly
        (INVALID_ARGUMENT on csr_pem when it does not)."""
        names = certificate_names(fqdn, certificate_type == "wildcard")
        problem = csr_names_problem(csr_pem, names)
        if problem is not None:
            raise invalid_argument("csr_pem", problem)
        return names

    async def issue(
        self,
        public_key: PublicKey,
        private_key_pem: str,
        fqdn: str,
        certificate_type: str,
        validity_days: int,
        csr_pem: str | None,
        now: datetime,
        store: StoreProvision,
    ) -> tuple[Issued, CertificateRecord | None]:
        """A PENDING row's certificate: no chain or serial yet, the key and the CSR the order
        is finalized with recorded: the device's (which must name exactly the certificate's
        names) or one made with the key generated for it. The row stored is the order
        queued: the worker is woken then, to claim it at once."""
        if private_key_pem:
            names = certificate_names(fqdn, certificate_type == "wildcard")
            order_csr = device_csr(private_key_pem, names)
        else:
            assert csr_pem is not None
            names = self._check_names(csr_pem, fqdn, certificate_type)
            order_csr = csr_pem
        data = {
            "public_key_sha256": hashlib.sha256(spki_der(public_key)).hexdigest(),
            "public_key_pem": public_key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ).decode("ascii"),
            "dns_names": names,
            "validity_days": validity_days,
            "csr_pem": order_csr,
        }
        issued = Issued(NewCertificate("", "", now, now, data), order_csr)
        record = await store(issued)
        if record is not None:
            self.wake()
        return issued, record

    async def reissue(
        self,
        record: CertificateRecord,
        validity_days: int,
        public_key: PublicKey,
        private_key_pem: str,
        request_id: uuid.UUID,
        now: datetime,
    ) -> CertificateRecord | None:
        names = certificate_names(record.uuid_subdomain, record.certificate_type == "wildcard")
        return await self._wrote(
            await self.queue.request(
                record.device_id,
                device_csr(private_key_pem, names),
                "provision",
                now,
                record.serial_number,
            )
        )

    async def renew(
        self,
        source: RenewalSource,
        public_key: PublicKey,
        csr_pem: str | None,
        request: RequestKey | None,
        now: datetime,
    ) -> CertificateRecord | None:
        """Queue an order for the new CSR, or the stored one."""
        if csr_pem is not None:
            self._check_names(csr_pem, source.uuid_subdomain, source.certificate_type)
        order_csr = csr_pem or source.csr_pem
        if order_csr is None:
            raise failed_precondition(
                "no CSR is stored for this certificate (the service generated its key, which "
                "it never keeps): renew with a CSR",
                "CSR_REQUIRED",
                device_id=source.device_id,
            )
        record = await self._wrote(
            await self.queue.request(
                source.device_id, order_csr, "renew", now, source.serial_number
            )
        )
        if record is None:
            return None
        log.info("certificate renewal queued", device_id=source.device_id)
        if request is not None:
            await self.store.record_request(
                request.request_id, "renew", request.fingerprint, source.device_id, now
            )
        return record

    async def renew_batch(
        self, conn: AsyncConnection[TupleRow], sources: Sequence[RenewalSource], now: datetime
    ) -> RenewedBatch:
        """Queue an order with the stored CSR for each; a device without one cannot be
        renewed (its key was generated here and never stored)."""
        done, broken = await self.queue.queue_renewals(
            conn, [source.device_id for source in sources], now
        )
        for device in broken:
            log.error("no CSR stored to renew with; auto-renewal switched off", device_id=device)
        if done:
            # The orders are there for the worker to claim once the batch has committed.
            self.queue.db.on_committed(conn, self._wake_committed)
        return RenewedBatch([], len(done), broken)

    async def _wake_committed(self, conn: AsyncConnection[TupleRow]) -> bool:
        """`Database.on_committed`'s hook: wake the worker; never fails the write."""
        self.wake()
        return True

    async def renewal_time(self, device_id: str, serial_number: str) -> datetime | None:
        return await self.queue.renewal_time(device_id, serial_number)

    def ca_chain_pem(self) -> str:
        raise failed_precondition(
            "certificates come from an ACME CA: each certificate_chain_pem carries the CA's chain",
            "CA_CHAIN_WITH_CERTIFICATE",
        )
