"""Benchmark: what the gateway adds to GetCertificate.

Run with `python -m tests.bench.bench_gateway` (part of `make bench`). It
prints numbers and asserts nothing about time.

One run starts PostgreSQL, Redis, cert_service, key_service and Envoy as
separate processes, provisions one device, creates an operator key, then
sends the same GetCertificate with h2load, one request at a time (latency, not
throughput), three ways:

1. direct gRPC to cert_service (no key, no gateway);
2. native gRPC through Envoy (ext_authz asks key_service, then cert_service);
3. REST `GET /api/v1/devices/{id}/certificate` through Envoy over HTTP/1.1
   (transcoded, then as 2).

The difference of the p50s is what the gateway adds, ext_authz included.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc

from cert_service.issuer import create_development_ca
from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from shared.devstack import PostgresServer, RedisServer, _stop, free_port, wait_for_port
from shared.gateway import GatewayPorts, envoy_command, render_envoy_config
from shared.stack import OPERATOR_PERMISSIONS, wait_gateway_healthy, wait_healthy

ROOT = Path(__file__).resolve().parents[2]
DEVICE = "bench-device"
GET_PATH = "/myl.cert.v1.CertificateService/GetCertificate"


def percentile(values: list[float], pct: float) -> float:
    index = min(len(values) - 1, round(pct / 100 * (len(values) - 1)))
    return values[index]


def h2load(url: str, log: Path, requests: int, *extra: str) -> dict[str, float]:
    command = ["h2load", "-n", str(requests), "-c", "1", "-m", "1", "--log-file", str(log)]
    subprocess.run([*command, *extra, url], check=True, capture_output=True)
    # h2load logs requests in completion order; the first tenth warms
    # connections and caches and is left out of the percentiles.
    durations = [
        int(fields[2]) / 1000  # microseconds -> milliseconds
        for fields in (line.split("\t") for line in log.read_text().splitlines())
        if len(fields) >= 3 and fields[1] == "200"
    ]
    measured = sorted(durations[len(durations) // 10 :]) if len(durations) >= 10 else durations
    return {
        "ok": float(len(durations)),
        "p50": percentile(measured, 50),
        "p90": percentile(measured, 90),
        "p99": percentile(measured, 99),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="myl-bench-gw-"))
    directory.chmod(0o755)
    pg = PostgresServer(directory / "pg", free_port(), durable=False)
    redis = RedisServer(directory / "redis", free_port())
    processes: list[subprocess.Popen[bytes]] = []
    try:
        pg.start()
        redis.start()
        pg.create_database("bench")
        ca_cert, ca_key = create_development_ca(directory / "ca")
        cert_port, key_port = free_port(), free_port()
        ports = GatewayPorts(free_port(), free_port(), cert_port, key_port)
        env = {
            **os.environ,
            "DB_HOST": pg.host, "DB_PORT": str(pg.port), "DB_NAME": "bench",
            "DB_SSLMODE": "disable", "REDIS_HOST": redis.host, "REDIS_PORT": str(redis.port),
            "CA_CERT_FILE": str(ca_cert), "CA_KEY_FILE": str(ca_key),
            "CERT_SERVICE_PORT": str(cert_port), "KEY_SERVICE_PORT": str(key_port),
            "CERT_SERVICE_ADDRESS": f"127.0.0.1:{cert_port}",
            "KEY_SERVICE_ADDRESS": f"127.0.0.1:{key_port}",
            "METRICS_PORT": "0", "LOG_LEVEL": "warning",
        }  # fmt: skip
        for service in ("cert_service", "key_service"):
            subprocess.run(
                [sys.executable, "-m", service, "migrate", "up"], env=env, cwd=ROOT, check=True
            )
        for service, port in (("cert_service", cert_port), ("key_service", key_port)):
            process = subprocess.Popen(
                [sys.executable, "-m", service, "serve"], env=env, cwd=ROOT,
                start_new_session=True,
            )  # fmt: skip
            processes.append(process)
            wait_healthy(f"127.0.0.1:{port}", 30, process)
        config = directory / "envoy.yaml"
        config.write_text(
            render_envoy_config(
                ports, listen_address="127.0.0.1", access_log_path=directory / "access.log"
            )
        )
        with open(directory / "envoy.log", "wb") as log:
            envoy = subprocess.Popen(
                envoy_command(config, concurrency=1), stdout=log, stderr=log,
                start_new_session=True,
            )  # fmt: skip
        processes.append(envoy)
        wait_for_port("127.0.0.1", ports.listen_port, 30, envoy)
        wait_gateway_healthy(ports.listen_port, 30, envoy)

        with grpc.insecure_channel(f"127.0.0.1:{cert_port}") as channel:
            cert_pb2_grpc.CertificateServiceStub(channel).ProvisionCertificate(
                cert_pb2.ProvisionCertificateRequest(device_id=DEVICE)
            )
        created = subprocess.run(
            [sys.executable, "-m", "key_service", "admin", "create-key",
             "--permissions", OPERATOR_PERMISSIONS, "--rate-limit", "1000000"],
            env=env, cwd=ROOT, check=True, capture_output=True, text=True,
        )  # fmt: skip
        key = next(line for line in created.stdout.split() if line.startswith("myl_"))

        # h2load counts HTTP 200; a gRPC refusal is also 200, so prove the key works.
        with grpc.insecure_channel(f"127.0.0.1:{ports.listen_port}") as channel:
            cert_pb2_grpc.CertificateServiceStub(channel).GetCertificate(
                cert_pb2.GetCertificateRequest(device_id=DEVICE), metadata=(("x-api-key", key),)
            )
        payload = cert_pb2.GetCertificateRequest(device_id=DEVICE).SerializeToString()
        body = directory / "get.bin"
        body.write_bytes(b"\x00" + struct.pack(">I", len(payload)) + payload)
        grpc_headers = ["-H", "content-type: application/grpc", "-H", "te: trailers"]
        n = args.requests
        results = {
            "direct gRPC to cert_service": h2load(
                f"http://127.0.0.1:{cert_port}{GET_PATH}", directory / "direct.log", n,
                *grpc_headers, "-d", str(body),
            ),
            "gRPC through Envoy": h2load(
                f"http://127.0.0.1:{ports.listen_port}{GET_PATH}", directory / "gw-grpc.log", n,
                *grpc_headers, "-H", f"x-api-key: {key}", "-d", str(body),
            ),
            "REST through Envoy (HTTP/1.1)": h2load(
                f"http://127.0.0.1:{ports.listen_port}/api/v1/devices/{DEVICE}/certificate",
                directory / "gw-rest.log", n, "--h1", "-H", f"x-api-key: {key}",
            ),
        }  # fmt: skip
        print(f"GetCertificate, {n} sequential requests each (h2load -c 1 -m 1), cache hit")
        print(f"{'path':<32} {'ok':>6} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}")
        for name, r in results.items():
            print(f"{name:<32} {r['ok']:>6.0f} {r['p50']:>8.3f} {r['p90']:>8.3f} {r['p99']:>8.3f}")
        base = results["direct gRPC to cert_service"]["p50"]
        for name in ("gRPC through Envoy", "REST through Envoy (HTTP/1.1)"):
            print(f"gateway adds at p50 ({name}): {results[name]['p50'] - base:.3f} ms")
        return 0
    finally:
        for process in reversed(processes):
            _stop(process, signal.SIGTERM)
        redis.stop()
        pg.stop()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
