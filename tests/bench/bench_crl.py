"""CRL benchmark: how long after RevokeCertificate returns a CRL lists the certificate, and how
large a CRL shard is at 10 million certificates with 1 % revoked.

    python -m tests.bench.bench_crl [--rounds N] [--replicas N]

Delay: a durable PostgreSQL, `python -m cert_service serve` as separate processes (one or
more replicas, each running its CRL publisher with the default CRL_INTERVAL of 1 s), and a
client that provisions, revokes through one replica, then polls GetCrl for the shard named in
the certificate every 20 ms until the serial is listed. The delay is measured from the moment
RevokeCertificate returned.

Size: 10,000,000 certificates with 1 % revoked is 100,000 unexpired revoked certificates, spread
evenly over CRL_SHARDS shards by the serial; one shard's CRL is signed with that many entries
(159-bit serials, reason codes) by the service's own `sign_crl` and its DER length measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.bench.harness import start_process, stop_process, throwaway_databases

CERTIFICATES = 10_000_000
REVOKED_FRACTION = 0.01


def crl_size(shards: int) -> tuple[int, int]:
    """(entries per shard, DER bytes of that shard's CRL)."""
    from cert_service.ca import LocalCertificateAuthority, PkiLocations, create_development_ca
    from cert_service.crl import RevokedEntry, sign_crl
    from cert_service.randomness import serial_number

    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(temporary)
        ca = LocalCertificateAuthority.from_files(
            *create_development_ca(directory / "ca"),
            locations=PkiLocations("http://pki.myl.zip", shards),
        )
        per_shard = -(-int(CERTIFICATES * REVOKED_FRACTION) // shards)
        now = datetime.now(UTC).replace(microsecond=0)
        reasons = ["key_compromise", "superseded", "cessation_of_operation", "unspecified"]
        entries = [
            RevokedEntry(
                format(serial_number(), "x"), now - timedelta(minutes=i), reasons[i % len(reasons)]
            )
            for i in range(per_shard)
        ]
        der = sign_crl(ca, 0, 123456, now, now + timedelta(days=1), entries)
        return per_shard, len(der)


async def measure_delay(address: str, rounds: int) -> list[float]:
    import grpc
    from cryptography import x509

    from myl.cert.v1 import cert_pb2, cert_pb2_grpc

    delays: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = cert_pb2_grpc.CertificateServiceStub(channel)
        for i in range(rounds):
            device = f"bench-crl-{i}"
            reply = await stub.ProvisionCertificate(
                cert_pb2.ProvisionCertificateRequest(device_id=device)
            )
            leaf = x509.load_pem_x509_certificates(
                reply.certificate.certificate_chain_pem.encode()
            )[0]
            points = leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
            full_name = next(iter(points)).full_name
            assert full_name is not None
            file_name = str(full_name[0].value).rsplit("/", 1)[1]
            await stub.RevokeCertificate(
                cert_pb2.RevokeCertificateRequest(
                    device_id=device, reason=cert_pb2.REVOCATION_REASON_KEY_COMPROMISE
                )
            )
            revoked_at = time.perf_counter()
            while True:
                body = await stub.GetCrl(cert_pb2.GetCrlRequest(file_name=file_name))
                crl = x509.load_der_x509_crl(body.data)
                if crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None:
                    delays.append(time.perf_counter() - revoked_at)
                    break
                await asyncio.sleep(0.02)
            # Revocations arrive at random moments of the publisher's cycle.
            await asyncio.sleep(0.137 * (i % 7))
    return delays


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench_crl")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--shards", type=int, default=128)
    args = parser.parse_args(argv)

    from cert_service.ca import create_development_ca
    from shared.devstack import free_port
    from shared.stack import wait_healthy

    per_shard, size = crl_size(args.shards)
    print(
        f"CRL size: {CERTIFICATES:,} certificates, {REVOKED_FRACTION:.0%} revoked, "
        f"{args.shards} shards: {per_shard} entries per shard, {size:,} bytes DER "
        f"({size / per_shard:.1f} bytes per entry), {size * args.shards / 1e6:.1f} MB for all",
        flush=True,
    )

    with (
        throwaway_databases("myl-bench-crl-", durable=True, migrate=["cert_service"]) as databases,
        contextlib.ExitStack() as stops,
    ):
        ca_cert, ca_key = create_development_ca(databases.directory / "ca")
        ports = [free_port() for _ in range(args.replicas)]
        for index, port in enumerate(ports):
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith(("DB_", "REDIS_"))},
                **databases.env(),
                "CERT_SERVICE_PORT": str(port),
                "CERT_SERVICE_METRICS_PORT": "0",
                "CA_CERT_FILE": str(ca_cert),
                "CA_KEY_FILE": str(ca_key),
                "CRL_SHARDS": str(args.shards),
                "PKI_BASE_URL": "http://pki.myl.zip",
                "LOG_LEVEL": "warning",
            }
            process = start_process(
                [sys.executable, "-m", "cert_service", "serve"],
                env,
                port,
                log=databases.directory / f"cert_service-{index}.log",
                timeout=60,
            )
            stops.callback(stop_process, process)
            wait_healthy(f"127.0.0.1:{port}", 60, process)
        time.sleep(3)  # the first pass signs every shard's first CRL
        delays = asyncio.run(measure_delay(f"127.0.0.1:{ports[0]}", args.rounds))
    delays.sort()
    print(
        f"revoke -> listed in the CRL ({args.replicas} replicas, CRL_INTERVAL 1 s, "
        f"n={len(delays)}): min {delays[0]:.2f} s, median {statistics.median(delays):.2f} s, "
        f"max {delays[-1]:.2f} s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
