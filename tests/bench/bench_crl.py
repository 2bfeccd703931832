"""CRL benchmark: how long after RevokeCertificate returns a CRL lists the certificate, alone
and in a burst of concurrent revocations, and how large a CRL shard is at 10 million
certificates with 1 % revoked.

    python -m tests.bench.bench_crl [--rounds N] [--burst N] [--replicas N] [--shards N]

Delay: a durable PostgreSQL, `python -m cert_service serve` as separate processes (one or
more replicas, each running its CRL publisher with the default CRL_INTERVAL of 1 s), and a
client that provisions, revokes through one replica, then polls GetCrl for the shard named in
the certificate every 20 ms until the serial is listed. The delay is measured from the moment
RevokeCertificate returned.

Burst: `--burst` devices are provisioned, then all revoked at once, spread over the replicas
(a call a replica sheds with UNAVAILABLE is retried after 50 ms, as a client would); a poller
reads every shard that still misses a serial, all at once, every 20 ms. Reported: when the last
serial appeared, counted from the first revocation sent and from the last one returned, and
each serial's delay from its own RevokeCertificate's return. Every serial must appear: the
benchmark fails if one is still missing after a minute.

Size: 10,000,000 certificates with 1 % revoked is 100,000 unexpired revoked certificates, spread
evenly over CRL_SHARDS shards by the serial; one shard's CRL is signed with that many entries
(159-bit serials, reason codes) by the service's own `sign_crl` and its DER length measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.bench.harness import start_service, throwaway_databases

CERTIFICATES = 10_000_000
REVOKED_FRACTION = 0.01


def crl_size(shards: int) -> tuple[int, int]:
    """(entries per shard, DER bytes of that shard's CRL)."""
    from cert_service.ca import LocalCertificateAuthority, PkiLocations, create_development_ca
    from cert_service.crl import sign_crl
    from cert_service.randomness import serial_number
    from cert_service.storage import RevokedEntry

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


def _shard_file(certificate_chain_pem: str) -> tuple[int, str]:
    """(serial, CRL file name) of the leaf in a chain."""
    from cryptography import x509

    leaf = x509.load_pem_x509_certificates(certificate_chain_pem.encode())[0]
    points = leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    full_name = next(iter(points)).full_name
    assert full_name is not None
    return leaf.serial_number, str(full_name[0].value).rsplit("/", 1)[1]


async def measure_burst(addresses: list[str], count: int) -> tuple[float, float, list[float], int]:
    """(first revocation sent -> all listed, last returned -> all listed, per-serial delays,
    revocations retried after UNAVAILABLE)."""
    import grpc
    from cryptography import x509

    from myl.cert.v1 import cert_pb2, cert_pb2_grpc

    channels = [grpc.aio.insecure_channel(address) for address in addresses]
    stubs = [cert_pb2_grpc.CertificateServiceStub(channel) for channel in channels]
    try:
        provisioning = asyncio.Semaphore(64)

        async def provision(i: int) -> tuple[str, int, str]:
            async with provisioning:
                reply = await stubs[i % len(stubs)].ProvisionCertificate(
                    cert_pb2.ProvisionCertificateRequest(device_id=f"bench-burst-{i}")
                )
            return (f"bench-burst-{i}", *_shard_file(reply.certificate.certificate_chain_pem))

        devices = await asyncio.gather(*(provision(i) for i in range(count)))
        returned: dict[int, float] = {}
        seen: dict[int, float] = {}
        retries = 0

        async def revoke(i: int, device: str, serial: int) -> None:
            nonlocal retries
            request = cert_pb2.RevokeCertificateRequest(
                device_id=device, reason=cert_pb2.REVOCATION_REASON_KEY_COMPROMISE
            )
            while True:
                try:
                    await stubs[i % len(stubs)].RevokeCertificate(request)
                    break
                except grpc.aio.AioRpcError as exc:
                    # A replica sheds what its pool cannot take within DB_OPERATION_TIMEOUT;
                    # UNAVAILABLE means not applied, and a client retries it.
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    retries += 1
                    await asyncio.sleep(0.05)
            returned[serial] = time.perf_counter()

        async def poll() -> None:
            waiting: dict[str, set[int]] = {}
            for _, serial, file_name in devices:
                waiting.setdefault(file_name, set()).add(serial)
            deadline = time.perf_counter() + 60
            while waiting:
                if time.perf_counter() > deadline:
                    missing = sum(len(serials) for serials in waiting.values())
                    raise AssertionError(f"{missing} revoked serials not listed after a minute")
                names = list(waiting)
                bodies = await asyncio.gather(
                    *(
                        stubs[n % len(stubs)].GetCrl(cert_pb2.GetCrlRequest(file_name=name))
                        for n, name in enumerate(names)
                    ),
                    return_exceptions=True,
                )
                now = time.perf_counter()
                for file_name, body in zip(names, bodies, strict=True):
                    if isinstance(body, BaseException):  # shed: read it again next round
                        if not isinstance(body, grpc.aio.AioRpcError):
                            raise body
                        continue
                    crl = x509.load_der_x509_crl(body.data)
                    listed = {entry.serial_number for entry in crl}
                    for serial in waiting[file_name] & listed:
                        seen[serial] = now
                    waiting[file_name] -= listed
                    if not waiting[file_name]:
                        del waiting[file_name]
                await asyncio.sleep(0.02)

        first_sent = time.perf_counter()
        polling = asyncio.create_task(poll())
        await asyncio.gather(
            *(revoke(i, device, serial) for i, (device, serial, _) in enumerate(devices))
        )
        await polling
    finally:
        for channel in channels:
            await channel.close(None)
    last_seen = max(seen.values())
    delays = sorted(max(0.0, seen[serial] - returned[serial]) for serial in seen)
    return last_seen - first_sent, last_seen - max(returned.values()), delays, retries


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench_crl")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--shards", type=int, default=128)
    args = parser.parse_args(argv)

    from deploy.devstack.servers import free_port

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
        ports = [free_port() for _ in range(args.replicas)]
        for index, port in enumerate(ports):
            env = databases.service_env(
                {
                    **databases.ca_env(),
                    "CERT_SERVICE_PORT": str(port),
                    "CRL_SHARDS": str(args.shards),
                    "PKI_BASE_URL": "http://pki.myl.zip",
                }
            )
            log = databases.directory / f"cert_service-{index}.log"
            start_service("cert_service", env, port, stops, log=log, timeout=60)
        time.sleep(3)  # the first pass signs every shard's first CRL
        delays = asyncio.run(measure_delay(f"127.0.0.1:{ports[0]}", args.rounds))
        delays.sort()
        print(
            f"revoke -> listed in the CRL ({args.replicas} replicas, CRL_INTERVAL 1 s, "
            f"n={len(delays)}): min {delays[0]:.2f} s, median {statistics.median(delays):.2f} s, "
            f"max {delays[-1]:.2f} s",
            flush=True,
        )
        if args.burst:
            addresses = [f"127.0.0.1:{port}" for port in ports]
            from_first, from_last, each, retries = asyncio.run(measure_burst(addresses, args.burst))
            print(
                f"{args.burst} revocations at once ({args.replicas} replicas, {args.shards} "
                f"shards, CRL_INTERVAL 1 s): all {len(each)} listed {from_first:.2f} s after "
                f"the first was sent, {from_last:.2f} s after the last returned; per serial "
                f"from its RevokeCertificate's return: median {statistics.median(each):.2f} s, "
                f"p99 {each[int(len(each) * 0.99) - 1]:.2f} s, max {each[-1]:.2f} s "
                f"({retries} calls retried after UNAVAILABLE)",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
