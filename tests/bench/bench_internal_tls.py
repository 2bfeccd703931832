"""Benchmark: what mutual TLS on a service port costs a direct GetCertificate.

Run with `python -m tests.bench.bench_internal_tls` (part of `make bench`). It prints numbers
and asserts nothing about time.

PostgreSQL, Redis and two cert_service processes on the same database: one with its internal
identity (mutual TLS, the default), one with `INTERNAL_TLS=off` (plaintext). One client
process (grpc, synchronous) sends the same GetCertificate (a cache hit) one at a time over a
kept connection to each, in alternating rounds so that both see the same machine; then it
opens new connections (handshake and first call) to each. The difference of the p50s is what
TLS and the caller table add per call; the second figure is what a new connection pays.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import grpc

from cert_service.ca import create_development_ca
from deploy.devstack.internal_ca import InternalCa
from deploy.devstack.servers import free_port
from deploy.devstack.stack import wait_healthy
from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from shared.tls import CERT_SERVICE, OPERATOR, server_name
from tests.bench.harness import percentile, start_process, stop_process, throwaway_databases

DEVICE = "bench-device"


def _channel(port: int, credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
    address = f"127.0.0.1:{port}"
    if credentials is None:
        return grpc.insecure_channel(address)
    override = ("grpc.ssl_target_name_override", server_name(CERT_SERVICE))
    return grpc.secure_channel(address, credentials, options=[override])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--connections", type=int, default=200)
    args = parser.parse_args()
    with (
        throwaway_databases("myl-bench-itls-", durable=False, migrate=["cert_service"]) as dbs,
        contextlib.ExitStack() as stops,
    ):
        directory = dbs.directory
        ca_cert, ca_key = create_development_ca(directory / "ca")
        internal = InternalCa(directory / "internal-ca")
        identities = internal.ensure((CERT_SERVICE, OPERATOR))
        operator = identities[OPERATOR]
        credentials = grpc.ssl_channel_credentials(
            operator.ca_file.read_bytes(),
            operator.key_file.read_bytes(),
            operator.cert_file.read_bytes(),
        )
        base = {
            **os.environ, **dbs.env(),
            "CA_CERT_FILE": str(ca_cert), "CA_KEY_FILE": str(ca_key),
            "METRICS_PORT": "0", "LOG_LEVEL": "warning",
        }  # fmt: skip
        ports = {"mutual TLS": free_port(), "plaintext": free_port()}
        settings = {
            "mutual TLS": {"INTERNAL_TLS": "on", **identities[CERT_SERVICE].env()},
            "plaintext": {"INTERNAL_TLS": "off"},
        }
        secure = {"mutual TLS": credentials, "plaintext": None}
        for name, port in ports.items():
            env = {**base, **settings[name], "CERT_SERVICE_PORT": str(port)}
            process = start_process([sys.executable, "-m", "cert_service", "serve"], env, port)
            stops.callback(stop_process, process)
            caller = operator if secure[name] is not None else None
            wait_healthy(f"127.0.0.1:{port}", 30, process, caller=caller, service=CERT_SERVICE)

        request = cert_pb2.GetCertificateRequest(device_id=DEVICE)
        channels = {name: _channel(port, secure[name]) for name, port in ports.items()}
        stubs = {name: cert_pb2_grpc.CertificateServiceStub(c) for name, c in channels.items()}
        stubs["plaintext"].ProvisionCertificate(
            cert_pb2.ProvisionCertificateRequest(device_id=DEVICE)
        )
        calls: dict[str, list[float]] = {name: [] for name in ports}
        rounds = 20
        for _ in range(rounds):
            for name, stub in stubs.items():
                for _ in range(args.requests // rounds):
                    start = time.perf_counter()
                    stub.GetCertificate(request)
                    calls[name].append((time.perf_counter() - start) * 1000)
        for channel in channels.values():
            channel.close()
        fresh: dict[str, list[float]] = {name: [] for name in ports}
        for _ in range(args.connections):
            for name, port in ports.items():
                start = time.perf_counter()
                with _channel(port, secure[name]) as channel:
                    cert_pb2_grpc.CertificateServiceStub(channel).GetCertificate(request)
                fresh[name].append((time.perf_counter() - start) * 1000)

        print(
            f"GetCertificate direct to cert_service (cache hit), {args.requests} sequential "
            "calls on one connection each, and new connections (handshake + first call)"
        )
        print(f"{'port':<12} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'new conn p50 ms':>16}")
        for name in ports:
            kept = sorted(calls[name][len(calls[name]) // 10 :])
            new = sorted(fresh[name])
            print(
                f"{name:<12} {percentile(kept, 50):>8.3f} {percentile(kept, 90):>8.3f} "
                f"{percentile(kept, 99):>8.3f} {percentile(new, 50):>16.3f}"
            )
        added = percentile(sorted(calls["mutual TLS"]), 50) - percentile(
            sorted(calls["plaintext"]), 50
        )
        print(f"mutual TLS adds at p50: {added:.3f} ms per call on a kept connection")
        return 0


if __name__ == "__main__":
    sys.exit(main())
