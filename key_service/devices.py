"""Does a device exist with an active certificate? cert_service knows.

key_service never reads cert_service's tables: it asks
`myl.cert.v1.CertificateService/GetCertificate` with a short deadline.

`CERT_SERVICE_ADDRESS` may name several replicas (`ipv4:host:port,host:port`, or a DNS name
with several addresses). The channel spreads calls over every replica that is up
(`round_robin`; gRPC's default would send all of them to the first), and a call answered
UNAVAILABLE (a replica that died under it, or is stopping) is tried again, on the next
replica, within the same deadline. GetCertificate only reads, so a second attempt can never
do anything twice; a write added here would have to carry the caller's request_id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Protocol

import grpc
import structlog

from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from shared.errors import failed_precondition, invalid_argument, not_found, unavailable
from shared.logging import get_logger
from shared.tls import CERT_SERVICE, InternalChannel, InternalTls

log = get_logger(__name__)

_SERVICE_CONFIG: Final = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{"service": "myl.cert.v1.CertificateService", "method": "GetCertificate"}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.02s",
                    "maxBackoff": "0.2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)
_CHANNEL_OPTIONS: Final = [
    ("grpc.service_config", _SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
    # A replica that comes back is used again within a fraction of a second.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass(frozen=True)
class DeviceCertificate:
    device_id: str
    uuid_subdomain: str


class DeviceDirectory(Protocol):
    async def active_certificate(self, device_id: str, now: datetime) -> DeviceCertificate:
        """The device's certificate if it is active.

        Raises NOT_FOUND (no such device), FAILED_PRECONDITION (certificate not
        active) or UNAVAILABLE (cert_service cannot be reached).
        """
        ...

    async def close(self) -> None: ...


class CertServiceDirectory:
    """DeviceDirectory over cert_service's gRPC contract."""

    def __init__(self, address: str, timeout: float, tls: InternalTls) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = InternalChannel(address, tls, CERT_SERVICE, options=_CHANNEL_OPTIONS)
        self._stub_channel = self._channel.get()
        self._stub = cert_pb2_grpc.CertificateServiceStub(self._stub_channel)

    def _current_stub(self) -> cert_pb2_grpc.CertificateServiceAsyncStub:
        """The stub on the channel that carries this process's current certificate."""
        channel = self._channel.get()
        if channel is not self._stub_channel:
            self._stub_channel = channel
            self._stub = cert_pb2_grpc.CertificateServiceStub(channel)
        return self._stub

    async def active_certificate(self, device_id: str, now: datetime) -> DeviceCertificate:
        request_id = structlog.contextvars.get_contextvars().get("request_id")
        metadata = (("x-request-id", str(request_id)),) if request_id else None
        try:
            response = await self._current_stub().GetCertificate(
                cert_pb2.GetCertificateRequest(device_id=device_id),
                timeout=self.timeout,
                metadata=metadata,
            )
        except grpc.aio.AioRpcError as err:
            code = err.code()
            if code == grpc.StatusCode.NOT_FOUND:
                raise not_found(
                    "device certificate", "DEVICE_NOT_FOUND", device_id=device_id
                ) from None
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise invalid_argument("device_id", "refused by cert_service") from None
            log.warning("cert_service call failed", code=code.name, address=self.address)
            raise unavailable(
                "cannot ask cert_service about the device", "CERT_SERVICE_UNAVAILABLE"
            ) from None
        certificate = response.certificate
        if certificate.status != cert_pb2.CERTIFICATE_STATUS_ACTIVE:
            raise failed_precondition(
                "the device's certificate is not active",
                "CERTIFICATE_NOT_ACTIVE",
                device_id=device_id,
                status=cert_pb2.CertificateStatus.Name(certificate.status),
            )
        if certificate.HasField("not_after") and certificate.not_after.ToDatetime(UTC) <= now:
            raise failed_precondition(
                "the device's certificate has expired",
                "CERTIFICATE_NOT_ACTIVE",
                device_id=device_id,
                status="CERTIFICATE_STATUS_EXPIRED",
            )
        return DeviceCertificate(device_id, certificate.uuid_subdomain)

    async def close(self) -> None:
        await self._channel.close()
