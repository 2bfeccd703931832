"""What relying parties and devices read about certificates beyond the certificate itself: the
public repository (CRLs, the issuing CA certificate) and renewal information (RFC 9773).

The repository is public: the gateway routes `/pki/...` to these RPCs without asking for an
API key, and the answers are the same for everybody. HTTP caching headers go out as gRPC
initial metadata, which the gateway passes on as response headers:

* a CRL: `Cache-Control: public, max-age=<seconds until its nextUpdate>`, `Expires: nextUpdate`
  and `Last-Modified: thisUpdate`. A cache may thus keep a CRL until its nextUpdate (which is
  what a relying party does anyway); the origin is re-signed within seconds of a revocation.
* the CA certificate: `Cache-Control: public, max-age=86400`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.api import httpbody_pb2  # type: ignore[attr-defined]

from cert_service.ari import RenewalPolicy, ari_cert_id
from cert_service.ca import LocalCertificateAuthority
from cert_service.crl import CrlPublisher, parse_crl_file_name
from cert_service.storage import to_pb_timestamp
from myl.cert.v1 import cert_pb2
from shared.errors import invalid_argument, not_found

CRL_CONTENT_TYPE: Final = "application/pkix-crl"
CERT_CONTENT_TYPE: Final = "application/pkix-cert"
_CA_MAX_AGE: Final = 86_400

Headers = tuple[tuple[str, str], ...]


def _http_date(moment: datetime) -> str:
    return format_datetime(moment.astimezone(UTC), usegmt=True)


class PublicRepository:
    """CRLs and the CA certificate, as the HTTP bodies and headers the gateway serves."""

    def __init__(self, ca: LocalCertificateAuthority, publisher: CrlPublisher) -> None:
        self.ca = ca
        self.publisher = publisher
        self._ca_der = ca.certificate.public_bytes(serialization.Encoding.DER)

    async def crl(self, file_name: str, now: datetime) -> tuple[httpbody_pb2.HttpBody, Headers]:
        shard = parse_crl_file_name(file_name)
        if shard is None:
            raise invalid_argument("file_name", "must be <shard>.crl, e.g. 7.crl")
        crl = await self.publisher.current(shard)
        if crl is None:
            raise not_found(f"CRL {file_name}", "CRL_NOT_FOUND", file_name=file_name)
        max_age = max(0, int((crl.next_update - now).total_seconds()))
        headers = (
            ("cache-control", f"public, max-age={max_age}"),
            ("expires", _http_date(crl.next_update)),
            ("last-modified", _http_date(crl.this_update)),
        )
        return httpbody_pb2.HttpBody(content_type=CRL_CONTENT_TYPE, data=crl.der), headers

    def issuer_certificate(self) -> tuple[httpbody_pb2.HttpBody, Headers]:
        headers = (("cache-control", f"public, max-age={_CA_MAX_AGE}"),)
        return httpbody_pb2.HttpBody(content_type=CERT_CONTENT_TYPE, data=self._ca_der), headers


def issuer_key_id(chain_pem: str) -> bytes:
    """The authority key identifier of a chain's leaf (an ACME CA's certificate: RFC 9773's
    certificate id names the issuer by it); empty when it has none."""
    try:
        leaf = x509.load_pem_x509_certificates(chain_pem.encode("ascii"))[0]
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except (ValueError, IndexError, x509.ExtensionNotFound):
        return b""
    return aki.key_identifier or b""


def renewal_info(
    policy: RenewalPolicy,
    certificate: cert_pb2.Certificate,
    authority_key_id: bytes,
    now: datetime,
    ca_suggested: datetime | None = None,
) -> cert_pb2.GetRenewalInfoResponse:
    """The device's current certificate's window (see `cert_service.ari`)."""
    window = policy.window(
        certificate.not_before.ToDatetime(UTC),
        certificate.not_after.ToDatetime(UTC),
        revoked=certificate.status == cert_pb2.CERTIFICATE_STATUS_REVOKED,
        now=now,
        ca_suggested=ca_suggested,
    )
    return cert_pb2.GetRenewalInfoResponse(
        suggested_window=cert_pb2.RenewalWindow(
            start=to_pb_timestamp(window.start), end=to_pb_timestamp(window.end)
        ),
        explanation_url=window.explanation_url,
        serial_number=certificate.serial_number,
        cert_id=ari_cert_id(authority_key_id, certificate.serial_number),
    )
