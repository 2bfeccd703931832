"""cert_service benchmark: provisioning throughput and GetCertificate latency.

    python -m tests.bench.bench_cert            (or `make bench`)

Starts its own durable PostgreSQL (fsync and synchronous_commit on) and Redis under a temporary
directory, runs the migrations, bulk-loads 100,000 devices with COPY (real certificates signed
by a development CA), and runs `python -m cert_service serve` as a separate process. Then it
measures, each beside the no-op ceiling of this machine (a bare grpc.aio echo server driven by
the same load generator):

* provisioning throughput with durable commits, with and without a CSR;
* GetCertificate latency (p50/p90/p99) on a cache hit, and on a cache miss (the first Get of a
  device after FLUSHALL: Redis miss, PostgreSQL read, cache fill), at 1 and at 16 requests in
  flight;
* with h2load (when installed): echo and cache-hit throughput, as a cross-check that the Python
  load generator is not what limits the numbers.

It prints numbers; it does not pass or fail on a time. Options: `--devices N` (default 100000),
`--quick` (smaller counts, for a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.bench.harness import (
    GRPC_HEADERS,
    cpu_seconds,
    grpc_frame,
    serve_until_sigterm,
    start_process,
    start_service,
    stop_process,
    throwaway_databases,
)

ECHO_METHOD = "/bench.Echo/Call"
GET_METHOD = "/myl.cert.v1.CertificateService/GetCertificate"


# -- load generator (runs in worker processes) --------------------------------------------------


@dataclass(frozen=True)
class LoadSpec:
    address: str
    kind: str  # echo | get | provision | provision_csr
    keys: Sequence[str]  # device ids: cycled through for get/echo, one each for provision
    count: int
    concurrency: int
    start_at: float  # wall-clock time at which every worker starts
    csr_pem: str = ""


@dataclass
class WorkerResult:
    latencies_ns: list[int]
    errors: dict[str, int]
    started: float
    finished: float


def run_worker(spec: LoadSpec) -> WorkerResult:
    return asyncio.run(_load(spec))


async def _load(spec: LoadSpec) -> WorkerResult:
    import grpc

    from myl.cert.v1 import cert_pb2, cert_pb2_grpc

    requests: list[Any]
    async with grpc.aio.insecure_channel(spec.address) as channel:
        if spec.kind == "echo":
            method = channel.unary_unary(ECHO_METHOD, None, None)
            requests = [
                cert_pb2.GetCertificateRequest(device_id=key).SerializeToString()
                for key in spec.keys
            ]
        elif spec.kind == "get":
            method = cert_pb2_grpc.CertificateServiceStub(channel).GetCertificate
            requests = [cert_pb2.GetCertificateRequest(device_id=key) for key in spec.keys]
        else:
            method = cert_pb2_grpc.CertificateServiceStub(channel).ProvisionCertificate
            requests = [
                cert_pb2.ProvisionCertificateRequest(device_id=key, csr_pem=spec.csr_pem)
                for key in spec.keys
            ]
        await channel.channel_ready()
        latencies: list[int] = []
        errors: dict[str, int] = {}
        next_index = 0

        async def client() -> None:
            nonlocal next_index
            while next_index < spec.count:
                request = requests[next_index % len(requests)]
                next_index += 1
                started = time.perf_counter_ns()
                try:
                    await method(request, timeout=30)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                    continue
                latencies.append(time.perf_counter_ns() - started)

        await asyncio.sleep(max(0.0, spec.start_at - time.time()))
        started = time.time()
        await asyncio.gather(*(client() for _ in range(spec.concurrency)))
        return WorkerResult(latencies, errors, started, time.time())


@dataclass
class Summary:
    label: str
    requests: int
    seconds: float
    latencies_ms: list[float] = field(repr=False)
    errors: dict[str, int]

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    def line(self) -> str:
        errors = f"  errors {self.errors}" if self.errors else ""
        return (
            f"{self.label:<44} {self.rate:>8.0f}/s  p50 {self.percentile(50):6.2f} ms  "
            f"p90 {self.percentile(90):6.2f} ms  p99 {self.percentile(99):6.2f} ms  "
            f"(n={self.requests}){errors}"
        )


def run_load(
    label: str,
    address: str,
    kind: str,
    keys_per_worker: Sequence[Sequence[str]],
    count_per_worker: int,
    concurrency_per_worker: int,
    csr_pem: str = "",
    server_pid: int | None = None,
) -> Summary:
    start_at = time.time() + 2.0  # after every worker process has started
    specs = [
        LoadSpec(address, kind, keys, count_per_worker, concurrency_per_worker, start_at, csr_pem)
        for keys in keys_per_worker
    ]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=len(specs), mp_context=context) as pool:
        futures = [pool.submit(run_worker, spec) for spec in specs]
        time.sleep(max(0.0, start_at - time.time()))
        cpu_before = cpu_seconds(server_pid) if server_pid else 0.0
        results = [future.result() for future in futures]
        cpu_used = cpu_seconds(server_pid) - cpu_before if server_pid else 0.0
    latencies = [ns / 1e6 for result in results for ns in result.latencies_ns]
    errors: dict[str, int] = {}
    for result in results:
        for name, n in result.errors.items():
            errors[name] = errors.get(name, 0) + n
    seconds = max(r.finished for r in results) - min(r.started for r in results)
    summary = Summary(label, len(latencies), seconds, latencies, errors)
    cpu = ""
    if server_pid and latencies:
        cpu = (
            f"  server CPU {cpu_used / len(latencies) * 1e6:.0f} us/call, "
            f"{cpu_used / seconds * 100:.0f}% of a core"
        )
    print(summary.line() + cpu, flush=True)
    return summary


# -- echo server (a separate process) ------------------------------------------------------------


async def _serve_echo(port: int) -> None:
    import grpc

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(echo)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Echo", {"Call": handler}),)
    )
    await serve_until_sigterm(server, port, 0)


# -- bulk load ------------------------------------------------------------------------------------


def bulk_load(args: tuple[str, str, str, int, int]) -> int:
    """COPY devices `start`..`stop` (exclusive) with real certificates into the database."""
    conninfo, ca_cert, ca_key, start, stop = args
    import psycopg

    from cert_service.ca import LocalCertificateAuthority
    from cert_service.issuance import issue_device_certificate
    from cert_service.issuer import generate_private_key

    ca = LocalCertificateAuthority.from_files(Path(ca_cert), Path(ca_key))
    public_key, _ = generate_private_key()
    now = datetime.now(UTC).replace(microsecond=0)
    columns = (
        "device_id, uuid_subdomain, certificate_type, status, certificate_data, serial_number, "
        "fingerprint_sha256, issued_at, expires_at, auto_renewal, created_at, updated_at"
    )
    with psycopg.connect(conninfo) as conn, conn.cursor() as cur:
        with cur.copy(f"COPY device_certificates ({columns}) FROM STDIN") as copy:
            for i in range(start, stop):
                device_id = f"bulk-{i:06d}"
                fqdn = f"{device_id}.myl.zip"
                new = issue_device_certificate(
                    ca, public_key, fqdn, "wildcard", 90, now, None, occasion="bulk"
                )
                created = now - timedelta(seconds=stop - i)
                copy.write_row(
                    (
                        device_id,
                        fqdn,
                        "wildcard",
                        "active",
                        json.dumps(new.data),
                        new.serial_number,
                        new.fingerprint_sha256,
                        new.not_before,
                        new.not_after,
                        True,
                        created,
                        created,
                    )
                )
        conn.commit()
    return stop - start


# -- orchestration --------------------------------------------------------------------------------


def h2load(label: str, port: int, method: str, body: bytes, n: int, streams: int) -> None:
    binary = shutil.which("h2load")
    if binary is None:
        print(f"{label:<44} (h2load not installed)")
        return
    with tempfile.NamedTemporaryFile(suffix=".bin") as file:
        file.write(grpc_frame(body))
        file.flush()
        command = [binary, "-n", str(n), "-c", "1", "-m", str(streams), *GRPC_HEADERS]
        command += ["-d", file.name, f"http://127.0.0.1:{port}{method}"]
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            check=False,
        )
    rate = re.search(r"finished in [^,]+, ([\d.]+) req/s", done.stdout)
    request_time = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", done.stdout)
    ok = re.search(r"(\d+) succeeded", done.stdout)
    if rate is None or request_time is None:
        print(f"{label:<44} h2load failed: {done.stdout[-300:]} {done.stderr[-300:]}")
        return
    print(
        f"{label:<44} {float(rate.group(1)):>8.0f}/s  min {request_time.group(1)}  "
        f"max {request_time.group(2)}  mean {request_time.group(3)}  "
        f"(n={n}, {ok.group(1) if ok else '?'} ok, {streams} streams)",
        flush=True,
    )


def run(devices: int, quick: bool) -> None:
    import psycopg
    import redis

    from cert_service.ca import create_development_ca
    from deploy.devstack.servers import free_port
    from tests.fixtures.cert import make_csr

    scale = 0.2 if quick else 1.0
    workers = 2
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}", flush=True)
    with (
        throwaway_databases("myl-bench-cert-", durable=True, migrate=["cert_service"]) as databases,
        contextlib.ExitStack() as stops,  # stops the servers, last started first
    ):
        directory, conninfo = databases.directory, databases.conninfo
        with psycopg.connect(conninfo) as conn:
            settings = conn.execute(
                "SELECT name, setting FROM pg_settings "
                "WHERE name IN ('fsync', 'synchronous_commit', 'server_version')"
            ).fetchall()
        print("postgres: " + ", ".join(f"{k}={v}" for k, v in settings), flush=True)
        ca_cert, ca_key = create_development_ca(directory / "ca")

        started = time.perf_counter()
        chunk = -(-devices // workers)
        ranges = [(i, min(devices, i + chunk)) for i in range(0, devices, chunk)]
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            loaded = sum(
                pool.map(
                    bulk_load,
                    [(conninfo, str(ca_cert), str(ca_key), a, b) for a, b in ranges],
                )
            )
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE device_certificates")
            size = conn.execute(
                "SELECT pg_size_pretty(pg_total_relation_size('device_certificates'))"
            ).fetchone()
        print(
            f"bulk load: {loaded} devices with real certificates via COPY in "
            f"{time.perf_counter() - started:.1f}s (table {size[0] if size else '?'})",
            flush=True,
        )

        echo_port, cert_port = free_port(), free_port()
        env = databases.service_env({**databases.ca_env(), "CERT_SERVICE_PORT": str(cert_port)})
        service = start_service(
            "cert_service", env, cert_port, stops, log=directory / "cert_service.log", timeout=60
        )
        echo = start_process(
            [sys.executable, "-m", "tests.bench.bench_cert", "echo-server", str(echo_port)],
            None,
            echo_port,
        )
        stops.callback(stop_process, echo)
        cert_address = f"127.0.0.1:{cert_port}"
        echo_address = f"127.0.0.1:{echo_port}"

        def phase(
            label: str,
            target: subprocess.Popen[bytes],
            kind: str,
            keys: Sequence[str],
            total: int,
            in_flight: int,
            csr_pem: str = "",
        ) -> Summary:
            """`total` calls with `in_flight` outstanding, from one load process per 16."""
            parts = max(1, min(workers, in_flight // 16))
            return run_load(
                label,
                echo_address if target is echo else cert_address,
                kind,
                [list(keys[i::parts]) for i in range(parts)],
                total // parts,
                in_flight // parts,
                csr_pem,
                server_pid=target.pid,
            )

        # -- provisioning -----------------------------------------------------------------
        print("\nprovisioning, durable commits, 64 in flight", flush=True)
        n = int(4000 * scale)
        phase("warm-up", service, "provision", [f"w-{i}" for i in range(600)], 600, 32)
        phase(
            "echo ceiling (same load generator)", echo, "echo", [f"e-{i}" for i in range(64)], n, 64
        )
        phase("ProvisionCertificate, key generated", service, "provision",
              [f"p-{i}" for i in range(n)], n, 64)  # fmt: skip
        phase("ProvisionCertificate, with a CSR", service, "provision_csr",
              [f"c-{i}" for i in range(n)], n, 64, csr_pem=make_csr())  # fmt: skip

        # -- GetCertificate ---------------------------------------------------------------
        flush = redis.Redis(host=databases.redis.host, port=databases.redis.port)
        hit_keys = [f"bulk-{i:06d}" for i in range(0, devices, max(1, devices // 5000))]
        for in_flight, count in ((1, int(5000 * scale)), (16, int(20000 * scale))):
            print(f"\nGetCertificate, {in_flight} in flight, {devices} devices", flush=True)
            phase("echo ceiling (same load generator)", echo, "echo", hit_keys, count, in_flight)
            flush.flushall()
            phase("warm the cache", service, "get", hit_keys, len(hit_keys), 16)
            phase("cache hit", service, "get", hit_keys, count, in_flight)
            flush.flushall()
            step = max(1, devices // count)
            miss_keys = [f"bulk-{i:06d}" for i in range(1, devices, step)][:count]
            phase("cache miss (first Get after FLUSHALL)", service, "get", miss_keys,
                  len(miss_keys), in_flight)  # fmt: skip

        print("\nh2load cross-check (1 connection, 16 streams)", flush=True)
        from myl.cert.v1 import cert_pb2

        body = cert_pb2.GetCertificateRequest(device_id=hit_keys[0]).SerializeToString()
        h2load("echo ceiling", echo_port, ECHO_METHOD, body, int(20000 * scale), 16)
        h2load("GetCertificate, cache hit", cert_port, GET_METHOD, body, int(20000 * scale), 16)
        flush.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench_cert")
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true")
    if argv[:1] == ["echo-server"]:
        asyncio.run(_serve_echo(int(argv[1])))
        return 0
    args = parser.parse_args(argv)
    run(args.devices, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
