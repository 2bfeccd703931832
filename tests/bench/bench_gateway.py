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
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import grpc

from cert_service.ca import create_development_ca
from deploy.devstack.gateway import GatewayPorts, envoy_command, render_envoy_config
from deploy.devstack.servers import free_port
from deploy.devstack.stack import OPERATOR_PERMISSIONS, wait_gateway_healthy, wait_healthy
from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from tests.bench.harness import (
    GRPC_HEADERS,
    ROOT,
    grpc_frame,
    percentile,
    run_h2load,
    start_process,
    stop_process,
    throwaway_databases,
)

DEVICE = "bench-device"
GET_PATH = "/myl.cert.v1.CertificateService/GetCertificate"


def h2load(url: str, log: Path, requests: int, *extra: str) -> dict[str, float]:
    run = run_h2load(url, log, ["-n", str(requests), "-c", "1", "-m", "1", *extra])
    # h2load logs requests in completion order; the first tenth warms
    # connections and caches and is left out of the percentiles.
    durations = [us / 1000 for us in run.latencies_us]  # milliseconds
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
    migrate = ["cert_service", "key_service"]
    with (
        throwaway_databases("myl-bench-gw-", durable=False, migrate=migrate) as databases,
        contextlib.ExitStack() as stops,  # stops the servers, last started first
    ):
        directory = databases.directory
        ca_cert, ca_key = create_development_ca(directory / "ca")
        cert_port, key_port = free_port(), free_port()
        ports = GatewayPorts(free_port(), free_port(), cert_port, key_port)
        env = {
            **os.environ, **databases.env(),
            "CA_CERT_FILE": str(ca_cert), "CA_KEY_FILE": str(ca_key),
            "CERT_SERVICE_PORT": str(cert_port), "KEY_SERVICE_PORT": str(key_port),
            "CERT_SERVICE_ADDRESS": f"127.0.0.1:{cert_port}",
            "KEY_SERVICE_ADDRESS": f"127.0.0.1:{key_port}",
            "METRICS_PORT": "0", "LOG_LEVEL": "warning",
        }  # fmt: skip
        for service, port in (("cert_service", cert_port), ("key_service", key_port)):
            process = start_process([sys.executable, "-m", service, "serve"], env, port)
            stops.callback(stop_process, process)
            wait_healthy(f"127.0.0.1:{port}", 30, process)
        config = directory / "envoy.yaml"
        config.write_text(
            render_envoy_config(
                ports, listen_address="127.0.0.1", access_log_path=directory / "access.log"
            )
        )
        envoy = start_process(
            envoy_command(config, concurrency=1), None, ports.listen_port,
            log=directory / "envoy.log",
        )  # fmt: skip
        stops.callback(stop_process, envoy)
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
        body.write_bytes(grpc_frame(payload))
        n = args.requests
        results = {
            "direct gRPC to cert_service": h2load(
                f"http://127.0.0.1:{cert_port}{GET_PATH}", directory / "direct.log", n,
                *GRPC_HEADERS, "-d", str(body),
            ),
            "gRPC through Envoy": h2load(
                f"http://127.0.0.1:{ports.listen_port}{GET_PATH}", directory / "gw-grpc.log", n,
                *GRPC_HEADERS, "-H", f"x-api-key: {key}", "-d", str(body),
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


if __name__ == "__main__":
    sys.exit(main())
