"""The device CA and its CRLs, kept in a directory the gateway's device TLS listener watches.

The gateway admits a device by its certificate (mutual TLS, `deploy/envoy/device_tls.yaml.tmpl`)
and checks revocation itself, from CRLs it holds: this writer keeps them current. Every
`interval` seconds it reads the CA certificate and every shard's CRL from cert_service (the
public repository RPCs, `GetIssuerCertificate` and `GetCrl`) and, when anything changed,
rewrites the directory: `ca.pem`, `crls.pem` (every shard, PEM) and `device_ca.yaml`, a
file-based SDS Secret naming both plus the zone the device names must be under. Each file is
written beside its final name and renamed into place; a rename in the directory is what
Envoy's `watched_directory` reacts to, so every worker of that Envoy takes the new CRLs for
its next handshake, without a restart.

Where it runs: beside each Envoy, sharing the directory with it. `make run` starts one
(`python -m cert_service.edge_trust`); on Kubernetes it is a sidecar of each gateway pod with
an `emptyDir` volume shared with the Envoy container, so every replica refreshes on its own
and none depends on another's disk.

Bound: a revocation is in its shard's CRL within one publisher pass (`CRL_INTERVAL`, see
`cert_service.crl`), in this directory within one `interval` plus a read, and in Envoy within
milliseconds of the rename: with `interval` = 1 s, within `CRL_INTERVAL` + 2 s.

Under the ACME issuer (EDGE_TRUST_CA_FILE): the device certificates chain to a public CA, whose
CRLs Envoy could use only if that CA published them where the writer can read them (Pebble
publishes none), and a CRL Envoy holds must be signed by the certificate's issuer, so the
platform cannot publish one for them. The writer then publishes that CA's certificates (the
file: its roots, and intermediates if wanted) and no CRL; the zone's names are matched as
ever, and cert_service admits a certificate caller only with the device's current, ACTIVE
certificate, by the serial Envoy passes on (`cert_service.service`): revocation bites on the
next request, refused with 403 rather than in the handshake.

Failing closed: a CRL that cannot be refreshed stays as it was; once past its nextUpdate,
Envoy (BoringSSL) refuses every certificate of its shard ("CRL has expired"), and a shard
without any CRL refuses its certificates too ("unable to get certificate CRL"). The writer
exports the earliest nextUpdate Envoy holds (`myl_edge_crl_next_update_timestamp_seconds`);
the alert MylEdgeCrlExpired fires when it is in the past.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client import Counter, Gauge, start_http_server

from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from shared.config import ConfigError, EnvReader, internal_tls_from_env, require_internal_tls
from shared.logging import configure_logging, get_logger
from shared.tasks import run_periodically
from shared.tls import CERT_SERVICE, InternalChannel, InternalTls

log = get_logger(__name__)

SECRET_NAME: Final = "device_ca"
TRUST_FILE: Final = "device_ca.yaml"
CA_FILE: Final = "ca.pem"
CRLS_FILE: Final = "crls.pem"

NEXT_UPDATE = Gauge(
    "myl_edge_crl_next_update_timestamp_seconds",
    "Earliest nextUpdate of the CRLs the gateway's device listener holds (Unix time); past it,"
    " the gateway refuses the certificates of that shard",
)
REFRESHED = Gauge(
    "myl_edge_crl_refreshed_timestamp_seconds",
    "When the edge trust writer last read every CRL from cert_service (Unix time)",
)
WRITES = Counter("myl_edge_crl_writes_total", "Times the gateway's device trust files changed")
MISSING_SHARDS = Gauge(
    "myl_edge_crl_missing_shards",
    "CRL shards cert_service has not signed yet: the gateway refuses their certificates",
)


@dataclass(frozen=True)
class Trust:
    """What the device listener trusts: the CA (PEM) and each shard's CRL (DER); no CRLs
    when the edge checks no revocation (a public CA's certificates, see the module)."""

    ca_pem: bytes
    crls: tuple[bytes, ...]


def _replace(directory: Path, name: str, data: bytes) -> None:
    """Write `name` beside its place and rename it there (what the watch sees)."""
    temporary = directory / f".{name}.new"
    temporary.write_bytes(data)
    os.replace(temporary, directory / name)


def secret_yaml(directory: Path, zone: str, *, crls: bool = True) -> str:
    """The SDS file: one Secret with the CA, the CRLs (unless `crls` is False) and the names
    a device may have."""
    validation: dict[str, object] = {"trusted_ca": {"filename": str(directory / CA_FILE)}}
    if crls:
        validation["crl"] = {"filename": str(directory / CRLS_FILE)}
        # The CA signs device certificates only; the CRLs cover those leaves.
        validation["only_verify_leaf_cert_crl"] = True
    validation["match_typed_subject_alt_names"] = [
        {"san_type": "DNS", "matcher": {"suffix": "." + zone}}
    ]
    secret = {
        "resources": [
            {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
                "name": SECRET_NAME,
                "validation_context": validation,
            }
        ]
    }
    return json.dumps(secret, indent=2) + "\n"  # JSON is YAML


def write_trust(directory: Path, trust: Trust, zone: str) -> None:
    """Write the CA, the CRLs and the Secret naming them into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    _replace(directory, CA_FILE, trust.ca_pem)
    if trust.crls:
        pem = b"".join(
            x509.load_der_x509_crl(der).public_bytes(serialization.Encoding.PEM)
            for der in trust.crls
        )
        _replace(directory, CRLS_FILE, pem)
    _replace(directory, TRUST_FILE, secret_yaml(directory, zone, crls=bool(trust.crls)).encode())


def earliest_next_update(crls: Sequence[bytes]) -> float | None:
    updates = [x509.load_der_x509_crl(der).next_update_utc for der in crls]
    known = [u.timestamp() for u in updates if u is not None]
    return min(known) if known else None


class EdgeTrustWriter:
    """Reads the CA and the CRLs from cert_service; rewrites the directory when they change.

    With `public_ca_pem` (the ACME issuer's CA certificates) it publishes those and no CRL,
    and reads nothing from cert_service (see the module).
    """

    def __init__(
        self,
        stub: cert_pb2_grpc.CertificateServiceAsyncStub,
        directory: Path,
        *,
        shards: int,
        zone: str,
        interval: float = 1.0,
        timeout: float = 5.0,
        public_ca_pem: bytes | None = None,
    ) -> None:
        self.stub = stub
        self.public_ca_pem = public_ca_pem
        self.directory = directory
        self.shards = shards
        self.zone = zone
        self.interval = interval
        self.timeout = timeout
        self.written: Trust | None = None

    async def _crl(self, shard: int) -> bytes | None:
        try:
            body = await self.stub.GetCrl(
                cert_pb2.GetCrlRequest(file_name=f"{shard}.crl"), timeout=self.timeout
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        data: bytes = body.data
        return data

    async def read(self) -> Trust:
        if self.public_ca_pem is not None:
            return Trust(self.public_ca_pem, ())
        issuer = await self.stub.GetIssuerCertificate(
            cert_pb2.GetIssuerCertificateRequest(), timeout=self.timeout
        )
        ca_pem = x509.load_der_x509_certificate(issuer.data).public_bytes(
            serialization.Encoding.PEM
        )
        crls = await asyncio.gather(*(self._crl(shard) for shard in range(self.shards)))
        MISSING_SHARDS.set(sum(1 for crl in crls if crl is None))
        return Trust(ca_pem, tuple(crl for crl in crls if crl is not None))

    async def run_once(self) -> bool:
        """One refresh; True when the files changed."""
        trust = await self.read()
        REFRESHED.set_to_current_time()
        if not trust.crls and self.public_ca_pem is None:
            # Nothing signed yet (a first start): an empty CRL file would be refused by
            # Envoy; the files wait for the publisher's first pass.
            log.warning("no CRL signed yet", shards=self.shards)
            return False
        if trust == self.written:
            return False
        await asyncio.to_thread(write_trust, self.directory, trust, self.zone)
        self.written = trust
        WRITES.inc()
        # No CRL held (a public CA's certificates): none can expire, so none alerts.
        next_update = earliest_next_update(trust.crls) if trust.crls else math.inf
        if next_update is not None:
            NEXT_UPDATE.set(next_update)
        log.info("edge trust written", crls=len(trust.crls), directory=str(self.directory))
        return True

    async def run(self) -> None:
        """A refresh every `interval` seconds until cancelled; a failed one is logged and the
        files stay as they were."""
        await run_periodically("edge trust", self.run_once, self.interval)


async def _serve(address: str, tls: InternalTls, **settings: Any) -> None:
    # Its own internal identity (`edge_trust`), allowed GetCrl and GetIssuerCertificate.
    channel = InternalChannel(address, tls, CERT_SERVICE)
    writer = EdgeTrustWriter(
        cast("cert_pb2_grpc.CertificateServiceAsyncStub", _FollowingStub(channel)), **settings
    )
    try:
        await writer.run()
    finally:
        await channel.close()


class _FollowingStub:
    """The two calls the writer makes, each on the channel of the current certificate."""

    def __init__(self, channel: InternalChannel) -> None:
        self._channel = channel

    def __getattr__(self, name: str) -> Any:
        return getattr(cert_pb2_grpc.CertificateServiceStub(self._channel.get()), name)


def _public_ca(path: Path) -> bytes:
    """The certificates in `path` (PEM), or ConfigError naming EDGE_TRUST_CA_FILE."""
    try:
        certificates = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as error:
        expected = f"a file of PEM certificates ({error})"
        raise ConfigError("EDGE_TRUST_CA_FILE", str(path), expected) from None
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def main() -> int:
    """`python -m cert_service.edge_trust`: the writer beside a gateway, configured from the
    environment: EDGE_TRUST_DIR (required), CERT_SERVICE_ADDRESS (127.0.0.1:50051),
    CRL_SHARDS (128, as cert_service), DNS_ZONE (myl.zip), EDGE_TRUST_INTERVAL (1 s),
    EDGE_TRUST_METRICS_PORT (9466; 0: none) on HOST (127.0.0.1; as the services, a pod sets
    0.0.0.0 so Prometheus reaches it); under CERT_ISSUER=acme, EDGE_TRUST_CA_FILE: the public
    CA's certificates (PEM) the device certificates chain to, published with no CRL; and its
    internal TLS identity (`EDGE_TRUST_INTERNAL_TLS_CERT_FILE`, `..._KEY_FILE`, `..._CA_FILE`;
    shared.config)."""
    env = EnvReader("EDGE_TRUST", dict(os.environ))
    configure_logging()
    try:
        text = env.text("EDGE_TRUST_DIR", "")
        if not text:
            raise ConfigError("EDGE_TRUST_DIR", None, "the directory the gateway watches")
        directory = Path(text).resolve()
        address = env.text("CERT_SERVICE_ADDRESS", "127.0.0.1:50051")
        shards = env.integer("CRL_SHARDS", 128, minimum=1, maximum=100_000)
        zone = env.text("DNS_ZONE", "myl.zip").lower().rstrip(".")
        interval = env.number("EDGE_TRUST_INTERVAL", 1.0, minimum=0.05)
        metrics_port = env.port("EDGE_TRUST_METRICS_PORT", 9466)
        metrics_host = env.text("HOST", "127.0.0.1")
        ca_file = env.text("EDGE_TRUST_CA_FILE", "")
        public_ca_pem = _public_ca(Path(ca_file)) if ca_file else None
        production = env.text("ENVIRONMENT", "development") == "production"
        tls = internal_tls_from_env(env, production=production)
        require_internal_tls(tls)
    except ConfigError as error:
        print(f"edge trust: {error}", file=sys.stderr)
        return 2
    if metrics_port:
        start_http_server(metrics_port, addr=metrics_host)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            _serve(
                address,
                tls,
                directory=directory,
                shards=shards,
                zone=zone,
                interval=interval,
                public_ca_pem=public_ca_pem,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
