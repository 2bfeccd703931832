"""Benchmark: what one replica of each service and one gateway use, for resource requests.

The Kubernetes manifests (deploy/kubernetes/, docs/kubernetes.md "Sizing") take their CPU and
memory requests and their autoscaling targets from these numbers. One cert_service, one
key_service and one Envoy (concurrency 2, the manifests' setting) run against a throwaway
PostgreSQL and Redis, with the production path in front: gRPC GetCertificate through the
gateway with an API key, so every call costs key_service an `Authorization/Check` and
cert_service a GetCertificate (both cache hits after the first). Printed:

- each process's resident memory idle (after start-up) and its peak (VmHWM) after the runs;
- at saturation (h2load, 8 connections x 16 streams): requests per second and the cores each
  process used (CPU seconds over wall seconds, all threads);
- at a fixed rate (FIXED_RATE r/s): the cores each process used, the figure a request of
  `FIXED_RATE` r/s per replica costs;
- Redis: every key the runs left, with its `MEMORY USAGE` (key, value and Redis's overhead),
  for the per-million-devices figure (one more key, with the default rate limit, is verified
  once so that its rate-limit bucket is there too: the hot key's bucket empties at once);
- CRLs: the DER size of a shard's CRL per revoked certificate, and how long signing a shard of
  1,000 and of 25,000 entries takes (`sign_crl`, the built-in CA's P-256 key).

    python -m tests.bench bench_footprint
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import redis

from cert_service.ca import LocalCertificateAuthority
from cert_service.crl import sign_crl
from cert_service.storage.crls import RevokedEntry
from deploy.devstack.gateway import GatewayPorts, envoy_command, render_envoy_config
from deploy.devstack.servers import free_port
from deploy.devstack.stack import wait_gateway_healthy
from myl.cert.v1 import cert_pb2
from myl.key.v1 import key_pb2, key_pb2_grpc
from tests.bench.bench_replicas import HOT_RATE_LIMIT, seed
from tests.bench.bench_verify import grpc_body
from tests.bench.harness import (
    GRPC_HEADERS,
    cpu_seconds,
    run_h2load,
    start_process,
    start_service,
    stop_process,
    throwaway_databases,
)

GET_PATH = "/myl.cert.v1.CertificateService/GetCertificate"
SECONDS = 8
CLIENTS, STREAMS = 8, 16
FIXED_RATE = 200  # requests per second, spread over 4 clients
ENVOY_CONCURRENCY = 2


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of /proc/<pid>/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def measured_run(
    processes: dict[str, subprocess.Popen[bytes]],
    url: str,
    api_key: str,
    body: Path,
    log: Path,
    rate: int | None,
) -> dict[str, Any]:
    """One h2load run; the cores each process used while it ran."""
    options = [*GRPC_HEADERS, "-H", f"x-api-key: {api_key}", "-d", str(body), "-t", "1"]
    if rate is None:
        options += ["-c", str(CLIENTS), "-m", str(STREAMS), "-D", str(SECONDS)]
    else:
        options += ["-c", "4", "-m", "1", "-D", str(SECONDS), "--rps", str(rate // 4)]
    before = {name: cpu_seconds(p.pid) for name, p in processes.items()}
    start = time.monotonic()
    run = run_h2load(url, log, options)
    wall = time.monotonic() - start
    cores = {name: (cpu_seconds(p.pid) - before[name]) / wall for name, p in processes.items()}
    succeeded = 0
    for line in run.stdout.splitlines():
        if line.startswith("requests:"):
            succeeded = int(line.split("succeeded,")[0].split(",")[-1].split()[0])
    return {"rps": succeeded / wall, "cores": cores, "ok": len(run.latencies_us)}


def redis_keys(client: redis.Redis) -> list[tuple[str, int]]:
    """Every key with its MEMORY USAGE, ids replaced by `*` so that kinds group."""
    found = []
    for key in client.scan_iter(count=1000):
        usage = client.memory_usage(key, samples=0) or 0
        text = key.decode(errors="replace") if isinstance(key, bytes) else str(key)
        found.append((re.sub(r"[0-9a-f]{8,}|myl_[A-Za-z0-9]+|bench", "*", text), int(usage)))
    return sorted(found)


async def verify_a_plain_key(key_address: str) -> None:
    """A key with the default rate limit, verified once: its bucket stays for a while."""
    async with grpc.aio.insecure_channel(key_address) as channel:
        keys = key_pb2_grpc.ApiKeyServiceStub(channel)
        reply = await keys.GenerateApiKey(key_pb2.GenerateApiKeyRequest(device_id="bench"))
        await keys.VerifyApiKey(key_pb2.VerifyApiKeyRequest(api_key=reply.api_key))


def crl_costs(ca: LocalCertificateAuthority) -> dict[int, tuple[int, float]]:
    """Entries -> (DER bytes, seconds to sign) of one shard's CRL; half the entries carry a
    reason code, serials are 16 random bytes like the CA's."""
    now = datetime.now(UTC)
    costs = {}
    for count in (0, 1000, 25_000):
        entries = [
            RevokedEntry(secrets.token_hex(16), now, "key_compromise" if i % 2 else "unspecified")
            for i in range(count)
        ]
        start = time.perf_counter()
        der = sign_crl(ca, 0, 1, now, now + timedelta(days=1), entries)
        costs[count] = (len(der), time.perf_counter() - start)
    return costs


def main() -> None:
    migrate = ["cert_service", "key_service"]
    with (
        throwaway_databases("myl-bench-footprint-", durable=False, migrate=migrate) as databases,
        contextlib.ExitStack() as stops,
    ):
        directory = databases.directory
        cert_port, key_port = free_port(), free_port()
        ports = GatewayPorts(free_port(), free_port(), cert_port, key_port)
        ca = databases.ca_env()
        env = databases.service_env({
            **ca,
            "CERT_SERVICE_PORT": str(cert_port), "KEY_SERVICE_PORT": str(key_port),
            "CERT_SERVICE_ADDRESS": f"127.0.0.1:{cert_port}",
            "KEY_SERVICE_ADDRESS": f"127.0.0.1:{key_port}",
            "CERT_SERVICE_METRICS_PORT": str(free_port()),
            "KEY_SERVICE_METRICS_PORT": str(free_port()),
            "KEY_SERVICE_MAX_RATE_LIMIT": str(HOT_RATE_LIMIT),
        })  # fmt: skip
        processes: dict[str, subprocess.Popen[bytes]] = {}
        for service, port in (("cert_service", cert_port), ("key_service", key_port)):
            log = directory / f"{service}.log"
            processes[service] = start_service(service, env, port, stops, log=log)
        config = directory / "envoy.yaml"
        config.write_text(
            render_envoy_config(ports, listen_address="127.0.0.1", access_log_path="/dev/null")
        )
        envoy = start_process(
            envoy_command(config, concurrency=ENVOY_CONCURRENCY), None, ports.listen_port,
            log=directory / "envoy.log",
        )  # fmt: skip
        stops.callback(stop_process, envoy)
        wait_gateway_healthy(ports.listen_port, 30, envoy)
        processes["envoy"] = envoy
        api_key = asyncio.run(seed(f"127.0.0.1:{cert_port}", f"127.0.0.1:{key_port}"))
        time.sleep(2)
        idle = {name: rss_kib(p.pid) for name, p in processes.items()}
        body = grpc_body(directory / "get.bin", cert_pb2.GetCertificateRequest(device_id="bench"))
        url = f"http://127.0.0.1:{ports.listen_port}{GET_PATH}"
        saturated = measured_run(processes, url, api_key, body, directory / "sat.log", None)
        fixed = measured_run(processes, url, api_key, body, directory / "fixed.log", FIXED_RATE)
        peak = {name: rss_kib(p.pid, "VmHWM") for name, p in processes.items()}
        asyncio.run(verify_a_plain_key(f"127.0.0.1:{key_port}"))
        crls = crl_costs(
            LocalCertificateAuthority.from_files(Path(ca["CA_CERT_FILE"]), Path(ca["CA_KEY_FILE"]))
        )
        with redis.Redis(host=databases.redis.host, port=databases.redis.port) as client:
            keys = redis_keys(client)
            used = client.info("memory")["used_memory"]
    print(f"\nGetCertificate over gRPC through the gateway with an API key, {SECONDS} s a run")
    print(f"saturation ({CLIENTS} connections x {STREAMS} streams): {saturated['rps']:,.0f} r/s")
    print(f"fixed rate: {fixed['rps']:,.0f} r/s")
    header = f"{'RSS idle':>10} {'RSS peak':>10} {'cores sat.':>11} {'cores fixed':>12}"
    print(f"{'process':14} {header}")
    for name in processes:
        print(
            f"{name:14} {idle[name] / 1024:>7.1f} MiB {peak[name] / 1024:>7.1f} MiB "
            f"{saturated['cores'][name]:>11.2f} {fixed['cores'][name]:>12.3f}"
        )
    print(f"\nRedis used_memory {used:,} bytes; keys left by the runs (MEMORY USAGE, bytes):")
    for key, usage in keys:
        print(f"  {usage:>6}  {key}")
    empty = crls[0][0]
    print("\nCRL of one shard (DER):")
    for count, (size, seconds) in crls.items():
        per_entry = f", {(size - empty) / count:.1f} bytes an entry" if count else ""
        print(
            f"  {count:>6} entries: {size:>9,} bytes{per_entry}, signed in {seconds * 1000:.1f} ms"
        )


if __name__ == "__main__":
    main()
