"""ACME server benchmark: newOrder to a valid order with its certificate, as a device's client
sees it, one order at a time and 32 at once.

    python -m tests.bench.bench_acme_server [--single N] [--rounds N]

A durable PostgreSQL and Redis, and `python -m cert_service serve` (built-in CA) as a separate
process with its ACME server on. Each order is one device's (so no per-name limit interferes):
the devices are provisioned and their accounts registered with EAB beforehand. The client is
certbot's `acme` library (what certbot itself runs), talking to the ACME port directly (the
gateway adds one local hop). Latency is per order, from newOrder to the downloaded chain
(newOrder, the authorization reads, finalize, the certificate download: poll_and_finalize's
requests without the library's fixed one-second sleep before its first poll); throughput is
orders over wall time at concurrency 32.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

from tests.bench.harness import percentile, start_service, throwaway_databases

CONCURRENCY = 32


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench_acme_server")
    parser.add_argument("--single", type=int, default=20, help="orders one at a time")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of 32 concurrent orders")
    args = parser.parse_args(argv)

    from acme import client as acme_client
    from acme import messages
    from cryptography.hazmat.primitives.asymmetric import ec
    from josepy import jwa, jwk

    from deploy.devstack.servers import free_port
    from tests.fixtures.cert import make_csr

    devices = args.single + CONCURRENCY * args.rounds
    with (
        throwaway_databases(
            "myl-bench-acme-server-", durable=True, migrate=["cert_service"]
        ) as dbs,
        contextlib.ExitStack() as stops,
    ):
        directory: Path = dbs.directory
        port, acme_port = free_port(), free_port()
        env = dbs.service_env(
            {
                **dbs.ca_env(),
                "CERT_SERVICE_PORT": str(port),
                "CERT_SERVICE_ACME_SERVER_PORT": str(acme_port),
            }
        )
        log = directory / "cert_service.log"
        start_service("cert_service", env, port, stops, log=log, timeout=60)
        directory_url = f"http://127.0.0.1:{acme_port}/acme/directory"
        credentials = asyncio.run(_enroll(f"127.0.0.1:{port}", devices))

        def account(device: str) -> acme_client.ClientV2:
            key = jwk.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
            net = acme_client.ClientNetwork(key, alg=jwa.ES256, user_agent="myl-bench")
            acme_directory = acme_client.ClientV2.get_directory(directory_url, net)
            client = acme_client.ClientV2(acme_directory, net)
            kid, hmac_key = credentials[device]
            binding = messages.ExternalAccountBinding.from_data(
                account_public_key=key.public_key(),
                kid=kid,
                hmac_key=hmac_key,
                directory=acme_directory,
            )
            client.new_account(
                messages.NewRegistration.from_data(
                    terms_of_service_agreed=True, external_account_binding=binding
                )
            )
            return client

        def order(item: tuple[str, acme_client.ClientV2]) -> float:
            device, client = item
            name = f"{device}.myl.zip"
            csr = make_csr([name, f"*.{name}"], common_name=name).encode()
            started = time.perf_counter()
            # poll_and_finalize's steps without its fixed one-second sleep before the first
            # poll (the library's, not the server's): the authorizations (valid already),
            # finalize (valid at once with the built-in CA), the chain.
            orderr = client.new_order(csr)
            client.poll_authorizations(orderr, datetime.now() + timedelta(seconds=60))
            finalized = client.begin_finalization(orderr)
            assert finalized.body.status == messages.STATUS_VALID, finalized.body
            chain = client._post_as_get(finalized.body.certificate).text
            assert chain
            return time.perf_counter() - started

        with ThreadPoolExecutor(CONCURRENCY) as pool:
            names = sorted(credentials)
            clients = list(zip(names, pool.map(account, names), strict=True))
            single = sorted(order(item) for item in clients[: args.single])
            started = time.perf_counter()
            concurrent = sorted(pool.map(order, clients[args.single :]))
            elapsed = time.perf_counter() - started

    print(
        f"ACME newOrder -> valid with the chain (acme library, built-in CA), one at a time "
        f"(n={len(single)}): p50 {percentile(single, 50) * 1000:.1f} ms, "
        f"p99 {percentile(single, 99) * 1000:.1f} ms",
        flush=True,
    )
    print(
        f"ACME newOrder -> valid with the chain, {CONCURRENCY} at once (n={len(concurrent)}): "
        f"p50 {percentile(concurrent, 50) * 1000:.1f} ms, "
        f"p99 {percentile(concurrent, 99) * 1000:.1f} ms; "
        f"{len(concurrent) / elapsed:.1f} orders per second",
        flush=True,
    )
    return 0


async def _enroll(address: str, devices: int) -> dict[str, tuple[str, str]]:
    """Provision the devices and ask for their EAB credentials (as an internal caller)."""
    import grpc

    from myl.cert.v1 import cert_pb2, cert_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = cert_pb2_grpc.CertificateServiceStub(channel)

        room = asyncio.Semaphore(8)

        async def one(index: int) -> tuple[str, tuple[str, str]]:
            device = f"bench-acme-{index}"
            request = cert_pb2.ProvisionCertificateRequest(
                device_id=device, uuid_subdomain=device, request_id=str(uuid.uuid4())
            )
            async with room:
                for attempt in range(5):
                    # A busy machine may leave a commit's outcome unknown: the retry with the
                    # same request id learns it (AIP-155).
                    try:
                        await stub.ProvisionCertificate(request, timeout=30)
                        break
                    except grpc.aio.AioRpcError as error:
                        if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == 4:
                            raise
                        await asyncio.sleep(0.5)
                reply = await stub.CreateAcmeEabCredentials(
                    cert_pb2.CreateAcmeEabCredentialsRequest(device_id=device), timeout=30
                )
            return device, (reply.kid, reply.hmac_key)

        return dict(await asyncio.gather(*(one(i) for i in range(devices))))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
