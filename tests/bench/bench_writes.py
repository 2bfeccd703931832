"""Benchmark: the latency of one write at a time, ProvisionCertificate and GenerateApiKey.

One replica of each service against a durable PostgreSQL (fsync on, as in production: a
write's cost is mostly its commits), called directly over gRPC as an internal caller, one
call at a time, so the figures are a write's own latency and not a queue's. Each write
with a request_id, as a careful client sends it.

    python -m tests.bench bench_writes
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import grpc
import psycopg

from deploy.devstack.servers import free_port
from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from myl.key.v1 import key_pb2, key_pb2_grpc
from tests.bench.harness import percentile, start_service, throwaway_databases

CALLS = 200
WARM_UP = 20


def summary(label: str, seconds: list[float]) -> str:
    ordered = sorted(seconds)
    figures = "  ".join(f"p{p} {percentile(ordered, p) * 1000:6.2f} ms" for p in (50, 90, 99))
    return f"{label:<32} n={len(ordered)} {figures}"


async def wal_flushes(conninfo: str) -> tuple[int, int]:
    """How many times PostgreSQL has flushed its WAL to disk so far (a synchronous commit
    waits for one; concurrent ones share it), and how many transactions committed."""
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT (SELECT wal_sync FROM pg_stat_wal), (SELECT xact_commit FROM "
            "pg_stat_database WHERE datname = current_database())"
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def measure(cert_address: str, key_address: str, conninfo: str) -> None:
    async with (
        grpc.aio.insecure_channel(cert_address) as cert_channel,
        grpc.aio.insecure_channel(key_address) as key_channel,
    ):
        certs = cert_pb2_grpc.CertificateServiceStub(cert_channel)
        keys = key_pb2_grpc.ApiKeyServiceStub(key_channel)
        run = uuid.uuid4().hex[:8]
        provisions: list[float] = []
        generates: list[float] = []
        devices = [f"bench-{run}-{index}" for index in range(WARM_UP + CALLS)]
        flushes = [await wal_flushes(conninfo)]
        for index, device in enumerate(devices):
            started = time.perf_counter()
            await certs.ProvisionCertificate(
                cert_pb2.ProvisionCertificateRequest(
                    device_id=device, request_id=str(uuid.uuid4())
                ),
                timeout=10,
            )
            if index >= WARM_UP:
                provisions.append(time.perf_counter() - started)
        flushes.append(await wal_flushes(conninfo))
        for index, device in enumerate(devices):
            started = time.perf_counter()
            await keys.GenerateApiKey(
                key_pb2.GenerateApiKeyRequest(
                    device_id=device, device_name="bench", request_id=str(uuid.uuid4())
                ),
                timeout=10,
            )
            if index >= WARM_UP:
                generates.append(time.perf_counter() - started)
        flushes.append(await wal_flushes(conninfo))
    calls = len(devices)
    for index, (label, seconds) in enumerate(
        (("ProvisionCertificate (key made)", provisions), ("GenerateApiKey", generates))
    ):
        (syncs, commits), (later_syncs, later_commits) = flushes[index], flushes[index + 1]
        print(
            summary(label, seconds),
            f" WAL flushes/call {(later_syncs - syncs) / calls:.2f}"
            f"  commits/call {(later_commits - commits) / calls:.2f}",
        )


def main() -> None:
    with (
        throwaway_databases(
            "myl-bench-writes-", durable=True, migrate=["cert_service", "key_service"]
        ) as databases,
        contextlib.ExitStack() as running,
    ):
        directory = databases.directory
        cert_port, key_port = free_port(), free_port()
        env = databases.service_env({
            **databases.ca_env(),
            "CERT_SERVICE_PORT": str(cert_port), "KEY_SERVICE_PORT": str(key_port),
            "CERT_SERVICE_ADDRESS": f"127.0.0.1:{cert_port}",
        })  # fmt: skip
        for service, port in (("cert_service", cert_port), ("key_service", key_port)):
            start_service(service, env, port, running, log=directory / f"{service}.log")
        asyncio.run(measure(f"127.0.0.1:{cert_port}", f"127.0.0.1:{key_port}", databases.conninfo))


if __name__ == "__main__":
    main()
