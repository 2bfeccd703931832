"""Benchmark: throughput of 1 and 2 replicas of each service on this machine, in one run.

Each replica is its own process (one core at most: grpc.aio on one event loop). For N
replicas, N h2load processes run at once, each against its own replica, and the throughputs
are added: what the gateway would get by balancing over them, without the gateway's own CPU
in the way. The echo ceiling is measured the same way (N echo servers that parse the request
and answer a constant), so the figures show how much of the machine the services use. All
requests are cache hits: VerifyApiKey of one key with a rate limit that never refuses, and
GetCertificate of one device.

    python -m tests.bench bench_replicas
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from deploy.devstack.servers import free_port
from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from myl.key.v1 import key_pb2, key_pb2_grpc
from tests.bench.bench_verify import VERIFY_PATH, grpc_body, h2load
from tests.bench.harness import start_process, start_service, stop_process, throwaway_databases

GET_PATH = "/myl.cert.v1.CertificateService/GetCertificate"
SECONDS = 8
CLIENTS, STREAMS = 8, 16
HOT_RATE_LIMIT = 60_000_000


def start_replicas(
    service: str, count: int, env: dict[str, str], directory: Path, stops: contextlib.ExitStack
) -> list[tuple[int, subprocess.Popen[bytes]]]:
    started = []
    for index in range(count):
        port = free_port()
        replica_env = {**env, f"{service.upper()}_PORT": str(port)}
        log = directory / f"{service}-{index}.log"
        started.append((port, start_service(service, replica_env, port, stops, log=log)))
    return started


def parallel_h2load(ports: list[int], body: Path, path: str, directory: Path) -> dict[str, Any]:
    """One h2load per port, all at once; their throughputs added."""

    def one(port: int) -> dict[str, Any]:
        log = directory / f"h2load-{port}.log"
        return h2load(port, body, log, seconds=SECONDS, clients=CLIENTS, streams=STREAMS, path=path)

    with ThreadPoolExecutor(len(ports)) as pool:
        runs = list(pool.map(one, ports))
    return {
        "rps": sum(run["rps"] for run in runs),
        "p50_ms": max(run["p50_ms"] for run in runs),
        "p99_ms": max(run["p99_ms"] for run in runs),
    }


async def seed(cert_address: str, key_address: str) -> str:
    """One device and one key that is never rate limited; returns the key."""
    async with grpc.aio.insecure_channel(cert_address) as channel:
        stub = cert_pb2_grpc.CertificateServiceStub(channel)
        try:
            await stub.ProvisionCertificate(cert_pb2.ProvisionCertificateRequest(device_id="bench"))
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:  # seeded by the previous round
                raise
    async with grpc.aio.insecure_channel(key_address) as channel:
        keys = key_pb2_grpc.ApiKeyServiceStub(channel)
        reply = await keys.GenerateApiKey(
            key_pb2.GenerateApiKeyRequest(device_id="bench", rate_limit=HOT_RATE_LIMIT)
        )
    return reply.api_key


def main() -> None:
    report: dict[str, dict[int, dict[str, Any]]] = {"echo": {}, "verify": {}, "get": {}}
    with (
        throwaway_databases(
            "myl-bench-replicas-", durable=False, migrate=["cert_service", "key_service"]
        ) as databases,
        contextlib.ExitStack() as stops,
    ):
        directory = databases.directory
        env = databases.service_env(
            {**databases.ca_env(), "KEY_SERVICE_MAX_RATE_LIMIT": str(HOT_RATE_LIMIT)}
        )
        for replicas in (1, 2):
            with contextlib.ExitStack() as running:
                certs = start_replicas("cert_service", replicas, env, directory, running)
                env["CERT_SERVICE_ADDRESS"] = f"127.0.0.1:{certs[0][0]}"
                keys = start_replicas("key_service", replicas, env, directory, running)
                echoes = []
                for _ in range(replicas):
                    port = free_port()
                    command = [
                        sys.executable,
                        "-m",
                        "tests.bench.bench_verify",
                        "--echo",
                        str(port),
                    ]
                    echo = start_process(command, dict(os.environ), port)
                    running.callback(stop_process, echo)
                    echoes.append((port, echo))
                api_key = asyncio.run(seed(f"127.0.0.1:{certs[0][0]}", f"127.0.0.1:{keys[0][0]}"))
                verify_body = grpc_body(
                    directory / "verify.bin", key_pb2.VerifyApiKeyRequest(api_key=api_key)
                )
                get_body = grpc_body(
                    directory / "get.bin", cert_pb2.GetCertificateRequest(device_id="bench")
                )
                echo_ports = [port for port, _ in echoes]
                report["echo"][replicas] = parallel_h2load(
                    echo_ports, verify_body, VERIFY_PATH, directory
                )
                key_ports = [port for port, _ in keys]
                report["verify"][replicas] = parallel_h2load(
                    key_ports, verify_body, VERIFY_PATH, directory
                )
                cert_ports = [port for port, _ in certs]
                report["get"][replicas] = parallel_h2load(cert_ports, get_body, GET_PATH, directory)
        stops.close()
    cores = os.cpu_count()
    print(f"\nthroughput of 1 and 2 replicas on {cores} cores (h2load -c{CLIENTS} -m{STREAMS},")
    print(f"{SECONDS} s after a 2 s warm-up, one h2load per replica, cache hits):")
    print(f"{'':32} {'1 replica':>14} {'2 replicas':>14} {'gain':>7}")
    for name, label in (
        ("echo", "echo ceiling (grpc.aio)"),
        ("verify", "VerifyApiKey"),
        ("get", "GetCertificate"),
    ):
        one, two = report[name][1], report[name][2]
        print(
            f"{label:32} {one['rps']:>10,.0f} r/s {two['rps']:>10,.0f} r/s "
            f"{two['rps'] / one['rps']:>6.2f}x"
        )
        print(f"{'':32} p99 {one['p99_ms']:>6.1f} ms  p99 {two['p99_ms']:>6.1f} ms")


if __name__ == "__main__":
    main()
