"""ACME benchmark: time from ProvisionCertificate to ACTIVE against Pebble, and the orders per
second one cert_service process sustains.

    python -m tests.bench.bench_acme [--batch N] [--concurrency N]

A durable PostgreSQL and Redis, real Knot DNS (the zone, TSIG-signed RFC 2136 updates) and
real Pebble (no validation sleep, nonce rejection off, authorization reuse off, so every order
validates two names through Knot), and `python -m cert_service serve` with CERT_ISSUER=acme
as a separate process. A client provisions devices one at a time (the latency of an order
alone), then a batch of WILDCARD devices at once, and polls GetCertificate every 20 ms for
each until it is ACTIVE. Latency is per device, from the moment its ProvisionCertificate
returned (PENDING) to the first read that showed it ACTIVE; throughput is the batch size over
the time from the first provision to the last ACTIVE.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from pathlib import Path

from tests.bench.harness import percentile, start_service, throwaway_databases


async def run_batch(address: str, batch: int, prefix: str) -> tuple[list[float], float]:
    import grpc

    from myl.cert.v1 import cert_pb2, cert_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = cert_pb2_grpc.CertificateServiceStub(channel)

        async def one(index: int) -> float:
            device = f"{prefix}-{index}"
            await stub.ProvisionCertificate(
                cert_pb2.ProvisionCertificateRequest(device_id=device, uuid_subdomain=device),
                timeout=30,
            )
            provisioned = time.perf_counter()
            while True:
                reply = await stub.GetCertificate(
                    cert_pb2.GetCertificateRequest(device_id=device), timeout=10
                )
                if reply.certificate.status == cert_pb2.CERTIFICATE_STATUS_ACTIVE:
                    return time.perf_counter() - provisioned
                if time.perf_counter() - provisioned > 300:
                    raise RuntimeError(f"{device} not ACTIVE after 300 s: {reply.certificate}")
                await asyncio.sleep(0.02)

        started = time.perf_counter()
        latencies = await asyncio.gather(*(one(i) for i in range(batch)))
        return sorted(latencies), time.perf_counter() - started


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench_acme")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--single", type=int, default=20, help="provisions one at a time")
    args = parser.parse_args(argv)

    from deploy.devstack.acme import KnotServer, PebbleServer, TsigKey, generate_account_key
    from deploy.devstack.servers import free_port

    with (
        throwaway_databases("myl-bench-acme-", durable=True, migrate=["cert_service"]) as dbs,
        contextlib.ExitStack() as stops,
    ):
        directory: Path = dbs.directory
        knot = KnotServer(directory / "knot", free_port(), zone="myl.zip", tsig=TsigKey.generate())
        knot.start()
        stops.callback(knot.stop)
        pebble = PebbleServer(
            directory / "pebble",
            free_port(),
            free_port(),
            knot.port,
            extra_env={"PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"},
        )
        pebble.start()
        stops.callback(pebble.stop)
        account_key = directory / "account.key"
        generate_account_key(account_key)
        port = free_port()
        env = dbs.service_env(
            {
                **knot.env(),
                **pebble.env(),
                "CERT_ISSUER": "acme",
                "ACME_ACCOUNT_KEY_FILE": str(account_key),
                "ACME_CONCURRENCY": str(args.concurrency),
                "ACME_ORDERS": "100000",
                "CERT_SERVICE_PORT": str(port),
            }
        )
        start_service(
            "cert_service", env, port, stops, log=directory / "cert_service.log", timeout=60
        )
        address = f"127.0.0.1:{port}"
        try:
            asyncio.run(run_batch(address, 2, "warm-up"))  # registers the account
            single: list[float] = []
            for index in range(args.single):
                one, _ = asyncio.run(run_batch(address, 1, f"bench-single-{index}"))
                single += one
            single.sort()
            latencies, elapsed = asyncio.run(run_batch(address, args.batch, "bench-acme"))
        except Exception:
            log = (directory / "cert_service.log").read_text(errors="replace")
            print("\n".join(log.splitlines()[-40:]), file=sys.stderr)
            raise

    print(
        f"provision -> ACTIVE against Pebble, one at a time (n={len(single)}): "
        f"p50 {percentile(single, 50):.2f} s, p99 {percentile(single, 99):.2f} s",
        flush=True,
    )
    print(
        f"provision -> ACTIVE against Pebble (WILDCARD: 2 DNS-01 validations through Knot, "
        f"batch of {args.batch} at once, ACME_CONCURRENCY={args.concurrency}): "
        f"p50 {percentile(latencies, 50):.2f} s, p99 {percentile(latencies, 99):.2f} s, "
        f"max {latencies[-1]:.2f} s",
        flush=True,
    )
    print(
        f"orders completed by one process: {args.batch / elapsed:.1f} per second "
        f"({args.batch} in {elapsed:.1f} s)",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
