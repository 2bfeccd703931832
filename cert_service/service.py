"""The gRPC servicer of myl.cert.v1.CertificateService.

Each handler first checks every request field (INVALID_ARGUMENT naming the field), then who is
calling (a device key or certificate acts only on its own device), then hands the work to
`DeviceCertificates`.

A device certificate names its device (`label.zone`), not the device id a path carries: a
certificate caller may act on `device_id` when that device's certificate record has the
caller's name (names are unique among devices, and the gateway admitted only a certificate
that is on no CRL). Another device, or one that does not exist, is PERMISSION_DENIED alike, so
a certificate learns nothing about device ids that are not its own.

Under the ACME issuer the gateway cannot check revocation: the certificates chain to a public
CA, and Envoy accepts CRLs only from the CA that issued a certificate, which we do not hold (and
Pebble publishes none). So there (`edge_checks_revocation=False`) a certificate caller is
admitted only with the device's current certificate: the serial Envoy read from the handshake
(`x-myl-cert-serial`) must be the record's, and the record ACTIVE, else PERMISSION_DENIED
`CERTIFICATE_NOT_CURRENT`. The record is the one read for the name check anyway (cached, and
fenced on every write), so the check costs nothing more, and a revocation, a deletion or a
replacement bites on the next request on every replica, with nothing to refresh.
Errors are raised as `DomainError`; the shared interceptor turns them into statuses.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.api import httpbody_pb2  # type: ignore[attr-defined]
from google.protobuf.message import Message

from cert_service import validation
from cert_service.acme_server import PREFIX, AcmeServer
from cert_service.ari import RenewalPolicy
from cert_service.certificates import DeviceCertificates, ProvisionRequest
from cert_service.pki import PublicRepository, issuer_key_id, renewal_info
from cert_service.storage import to_pb_timestamp
from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from shared import idempotency, pagination, wire
from shared.clock import Clock
from shared.errors import (
    DomainError,
    ErrorKind,
    failed_precondition,
    not_found,
    permission_denied,
)
from shared.idempotency import RequestKey
from shared.identity import Caller, caller_from_metadata

SERVICE_NAME = cert_pb2.DESCRIPTOR.services_by_name["CertificateService"].full_name

Context = grpc.aio.ServicerContext[Any, Any]


class CertificateServicer(cert_pb2_grpc.CertificateServiceServicer):
    def __init__(
        self,
        certificates: DeviceCertificates,
        zone: str,
        default_validity_days: int,
        *,
        clock: Clock,
        renewal: RenewalPolicy,
        repository: PublicRepository | None = None,
        acme_server: AcmeServer | None = None,
        edge_checks_revocation: bool = True,
    ) -> None:
        self.certificates = certificates
        self.edge_checks_revocation = edge_checks_revocation
        self.zone = zone
        self.default_validity_days = default_validity_days
        self.clock = clock
        self.renewal = renewal
        self.repository = repository
        self.acme_server = acme_server

    async def ProvisionCertificate(
        self, request: cert_pb2.ProvisionCertificateRequest, context: Context
    ) -> cert_pb2.ProvisionCertificateResponse:
        device_id = validation.device_id(request.device_id)
        fqdn = validation.provision_subdomain(request.uuid_subdomain, self.zone)
        certificate_type = validation.certificate_type(request.certificate_type)
        csr_pem = validation.csr_text(request.csr_pem)
        validity_days = validation.validity_days(request.validity_days, self.default_validity_days)
        auto_renewal = request.auto_renewal if request.HasField("auto_renewal") else True
        public_key = (
            None if csr_pem is None else validation.csr_public_key(csr_pem, fqdn, certificate_type)
        )
        caller, request_key = await self._authorize_change(context, device_id, "provision", request)
        certificate, private_key_pem = await self.certificates.provision(
            ProvisionRequest(
                device_id=device_id,
                fqdn=fqdn,
                certificate_type=certificate_type,
                public_key=public_key,
                csr_pem=csr_pem,
                auto_renewal=auto_renewal,
                validity_days=validity_days,
                generated_name=not request.uuid_subdomain,
                request=request_key,
                operator_key_id=caller.key_id if caller.operator else None,
            )
        )
        return cert_pb2.ProvisionCertificateResponse(
            certificate=certificate, private_key_pem=private_key_pem
        )

    async def GetCertificate(
        self, request: cert_pb2.GetCertificateRequest, context: Context
    ) -> cert_pb2.GetCertificateResponse:
        device_id = validation.device_id(request.device_id)
        _, certificate = await self._authorize(context, device_id)
        if certificate is None:
            certificate = await self.certificates.get(device_id)
        return cert_pb2.GetCertificateResponse(certificate=certificate)

    async def LookupCertificate(
        self, request: cert_pb2.LookupCertificateRequest, context: Context
    ) -> cert_pb2.LookupCertificateResponse:
        fqdn, via_wildcard = validation.lookup_name(request.uuid_subdomain, self.zone)
        caller = caller_from_metadata(context.invocation_metadata())

        def authorize(device_id: str) -> None:
            # Another device's name is answered like a name that does not exist: a
            # device key learns nothing about names outside its device.
            if not caller.may_act_on(device_id) and caller.device_name != fqdn:
                raise not_found("certificate", "CERTIFICATE_NOT_FOUND", uuid_subdomain=fqdn)

        certificate = await self.certificates.lookup(fqdn, via_wildcard, authorize)
        if caller.device_name is not None:
            self._require_current(caller, certificate)
        return cert_pb2.LookupCertificateResponse(certificate=certificate)

    async def ListCertificates(
        self, request: cert_pb2.ListCertificatesRequest, context: Context
    ) -> cert_pb2.ListCertificatesResponse:
        page_size = pagination.page_size(request.page_size)
        status = validation.status_filter(request.status)
        expire_before = (
            wire.timestamp(request.expire_before, "expire_before")
            if request.HasField("expire_before")
            else None
        )
        fingerprint = validation.query_fingerprint(status, expire_before)
        after = validation.decode_page_token(request.page_token, fingerprint)
        caller = caller_from_metadata(context.invocation_metadata())
        if not (caller.internal or caller.operator):
            raise permission_denied(
                "listing certificates needs an operator key", "OPERATOR_REQUIRED"
            )
        page = await self.certificates.list(page_size, status, expire_before, after)
        token = (
            validation.encode_page_token(page.last.created_at, page.last.device_id, fingerprint)
            if page.last is not None
            else ""
        )
        return cert_pb2.ListCertificatesResponse(
            certificates=page.certificates, next_page_token=token
        )

    async def RenewCertificate(
        self, request: cert_pb2.RenewCertificateRequest, context: Context
    ) -> cert_pb2.RenewCertificateResponse:
        device_id = validation.device_id(request.device_id)
        csr_pem = validation.csr_text(request.csr_pem)
        _, request_key = await self._authorize_change(context, device_id, "renew", request)
        certificate = await self.certificates.renew(device_id, csr_pem, request_key)
        return cert_pb2.RenewCertificateResponse(certificate=certificate)

    async def RevokeCertificate(
        self, request: cert_pb2.RevokeCertificateRequest, context: Context
    ) -> cert_pb2.RevokeCertificateResponse:
        device_id = validation.device_id(request.device_id)
        reason = validation.revocation_reason(request.reason)
        _, request_key = await self._authorize_change(context, device_id, "revoke", request)
        certificate = await self.certificates.revoke(device_id, reason, request_key)
        return cert_pb2.RevokeCertificateResponse(certificate=certificate)

    async def DeleteDevice(
        self, request: cert_pb2.DeleteDeviceRequest, context: Context
    ) -> cert_pb2.DeleteDeviceResponse:
        device_id = validation.device_id(request.device_id)
        _, request_key = await self._authorize_change(context, device_id, "delete", request)
        await self.certificates.delete(device_id, request_key)
        return cert_pb2.DeleteDeviceResponse()

    async def GetCaChain(
        self, request: cert_pb2.GetCaChainRequest, context: Context
    ) -> cert_pb2.GetCaChainResponse:
        return cert_pb2.GetCaChainResponse(ca_chain_pem=self.certificates.ca_chain_pem())

    async def GetRenewalInfo(
        self, request: cert_pb2.GetRenewalInfoRequest, context: Context
    ) -> cert_pb2.GetRenewalInfoResponse:
        device_id = validation.device_id(request.device_id)
        _, certificate = await self._authorize(context, device_id)
        if certificate is None:
            certificate = await self.certificates.get(device_id)
        if not certificate.serial_number:  # PENDING, or revoked before it was issued
            raise failed_precondition(
                "no certificate was issued yet: there is no renewal window before one is",
                "CERTIFICATE_PENDING",
                device_id=device_id,
            )
        key_id = (
            issuer_key_id(certificate.certificate_chain_pem)
            if self.repository is None
            else self.repository.ca.key_id
        )
        suggested = await self.certificates.ca_renewal_time(device_id, certificate.serial_number)
        return renewal_info(self.renewal, certificate, key_id, self.clock.now(), suggested)

    async def CreateAcmeEabCredentials(
        self, request: cert_pb2.CreateAcmeEabCredentialsRequest, context: Context
    ) -> cert_pb2.CreateAcmeEabCredentialsResponse:
        device_id = validation.device_id(request.device_id)
        caller_from_metadata(context.invocation_metadata()).require_device(device_id)
        if self.acme_server is None:
            raise failed_precondition(
                "this deployment serves no ACME server (ACME_SERVER_PORT)", "NO_ACME_SERVER"
            )
        credentials = await self.acme_server.create_eab_credentials(device_id)
        return cert_pb2.CreateAcmeEabCredentialsResponse(
            kid=credentials.kid,
            hmac_key=credentials.hmac_key,
            expire_time=to_pb_timestamp(credentials.expires_at),
            directory_path=f"{PREFIX}/directory",
        )

    async def GetCrl(
        self, request: cert_pb2.GetCrlRequest, context: Context
    ) -> httpbody_pb2.HttpBody:
        repository = self._repository()
        body, headers = await repository.crl(request.file_name, self.clock.now())
        await context.send_initial_metadata(headers)
        return body

    async def GetIssuerCertificate(
        self, request: cert_pb2.GetIssuerCertificateRequest, context: Context
    ) -> httpbody_pb2.HttpBody:
        body, headers = self._repository().issuer_certificate()
        await context.send_initial_metadata(headers)
        return body

    async def _authorize(
        self, context: Context, device_id: str
    ) -> tuple[Caller, cert_pb2.Certificate | None]:
        """The caller, if it may act on `device_id` (else PERMISSION_DENIED), and for a
        certificate caller the device's certificate, read to decide (see the module)."""
        caller = caller_from_metadata(context.invocation_metadata())
        if caller.device_name is None:
            caller.require_device(device_id)
            return caller, None
        try:
            certificate = await self.certificates.get(device_id)
        except DomainError as error:
            if error.kind is not ErrorKind.NOT_FOUND:
                raise
            certificate = None
        if certificate is None or certificate.uuid_subdomain != caller.device_name:
            caller.require_device(device_id)  # raises: device_id is unresolved
        self._require_current(caller, certificate)
        return caller.with_device(device_id), certificate

    async def _authorize_change(
        self, context: Context, device_id: str, method: str, request: Message
    ) -> tuple[Caller, RequestKey | None]:
        """`_authorize` for a request that changes `device_id`, and the request's AIP-155 key
        (read first: a malformed request_id is INVALID_ARGUMENT whoever asks)."""
        request_key = idempotency.request_key(method, request)
        caller, _ = await self._authorize(context, device_id)
        return caller, request_key

    def _require_current(self, caller: Caller, certificate: cert_pb2.Certificate | None) -> None:
        """Where the gateway does not check revocation: PERMISSION_DENIED unless the caller's
        certificate is `certificate`, ACTIVE (see the module)."""
        if not self.edge_checks_revocation and not _is_current(certificate, caller.cert_serial):
            raise permission_denied(
                "this certificate is not the device's current one (revoked or replaced)",
                "CERTIFICATE_NOT_CURRENT",
            )

    def _repository(self) -> PublicRepository:
        if self.repository is None:
            raise not_found("public repository (the issuer publishes none)", "NO_REPOSITORY")
        return self.repository


def _is_current(certificate: cert_pb2.Certificate | None, serial: str | None) -> bool:
    """Whether `serial` (hex, as Envoy writes it) is the serial of `certificate`, ACTIVE."""
    if certificate is None or not serial:
        return False
    if certificate.status != cert_pb2.CERTIFICATE_STATUS_ACTIVE:
        return False
    try:
        return int(serial, 16) == int(certificate.serial_number, 16)
    except ValueError:
        return False
