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

The difference of the p50s is what the gateway adds, ext_authz included; their ratio (through
Envoy over direct) is the hop ratio. The three are measured in turns, `ROUNDS` rounds of a
tenth of the requests each, so that a shared machine's load, which comes and goes, falls on
all three alike: the ratios printed are the median of the rounds' ratios, at p50 and at p99.

Then a device's own way in, mutual TLS on the device listener (no key, no ext_authz), against
the same services in the same run. h2load cannot present a client certificate, so these three
are measured with one client for all, a Python gRPC channel (grpcio, one call at a time, the
first tenth left out):

4. direct gRPC to cert_service;
5. gRPC through Envoy with the API key (ext_authz);
6. gRPC through Envoy over mutual TLS with the device's certificate, on one connection: its
   handshake happened once (requests on an open or resumed TLS session pay none).

And mutual-TLS handshakes per second on Envoy's one worker, counted by Envoy: full ones
(`openssl s_time -new`, two clients at once so that the worker, not a client, is the limit),
and resumed ones (`-reuse`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

from cert_service.edge_trust import MISSING_SHARDS, EdgeTrustWriter
from deploy.devstack.gateway import (
    DeviceTls,
    GatewayCertificate,
    GatewayPorts,
    create_gateway_certificate,
    envoy_command,
    render_envoy_config,
)
from deploy.devstack.servers import free_port
from deploy.devstack.stack import OPERATOR_PERMISSIONS, wait_gateway_healthy
from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from tests.bench.harness import (
    GRPC_HEADERS,
    ROOT,
    grpc_frame,
    percentile,
    run_h2load,
    start_process,
    start_service,
    stop_process,
    throwaway_databases,
)

DEVICE = "bench-device"
GET_PATH = "/myl.cert.v1.CertificateService/GetCertificate"


ROUNDS = 10
# The three ways to GetCertificate that h2load measures (compare.py reads these rows).
DIRECT, VIA_GRPC, VIA_REST = (
    "direct gRPC to cert_service", "gRPC through Envoy", "REST through Envoy (HTTP/1.1)"
)  # fmt: skip


def h2load(url: str, log: Path, extra: Sequence[str], requests: int) -> tuple[int, list[float]]:
    """(requests answered 200, their durations in ms less the first tenth) of one h2load run
    of `requests`, one at a time on one new connection, with the options `extra`."""
    log.unlink(missing_ok=True)  # h2load appends to its log file
    run = run_h2load(url, log, ["-n", str(requests), "-c", "1", "-m", "1", *extra])
    # h2load logs requests in completion order; the first tenth warms
    # connections and caches and is left out of the percentiles.
    durations = [us / 1000 for us in run.latencies_us]  # milliseconds
    return len(durations), durations[len(durations) // 10 :] if len(durations) >= 10 else durations


def percentiles(durations: list[float]) -> dict[str, float]:
    measured = sorted(durations)
    return {pct: percentile(measured, float(pct[1:])) for pct in ("p50", "p90", "p99")}


def in_turns(
    runs: dict[str, Callable[[int], tuple[int, list[float]]]], requests: int, rounds: int
) -> tuple[dict[str, dict[str, float]], list[dict[str, dict[str, float]]]]:
    """Each of `runs` (a name: an h2load of n requests) in turn, `rounds` times, `requests` in
    all each: (each one's ok count and percentiles over all rounds, each round's
    percentiles)."""
    per_round: list[dict[str, dict[str, float]]] = []
    ok = dict.fromkeys(runs, 0)
    durations: dict[str, list[float]] = {name: [] for name in runs}
    for index in range(rounds):
        chunk = requests // rounds + (index < requests % rounds)
        this_round = {}
        for name, run in runs.items():
            answered, measured = run(chunk)
            ok[name] += answered
            durations[name] += measured
            this_round[name] = percentiles(measured)
        per_round.append(this_round)
    overall = {name: {"ok": float(ok[name]), **percentiles(durations[name])} for name in runs}
    return overall, per_round


def sequential_calls(call: Callable[[], object], requests: int) -> dict[str, float]:
    """`call()` `requests` times, one at a time: p50/p99 in milliseconds (first tenth out)."""
    durations = []
    for _ in range(requests):
        started = time.perf_counter()
        call()
        durations.append((time.perf_counter() - started) * 1000)
    measured = sorted(durations[len(durations) // 10 :])
    return {
        "ok": float(len(durations)),
        "p50": percentile(measured, 50),
        "p90": percentile(measured, 90),
        "p99": percentile(measured, 99),
    }


def write_trust(cert_port: int, trust: Path) -> None:
    """The device listener's CA and CRLs, once every shard has one (cert_service signs them
    within seconds of its start)."""

    async def write() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{cert_port}") as channel:
            stub = cert_pb2_grpc.CertificateServiceStub(channel)
            writer = EdgeTrustWriter(stub, trust, shards=128, zone="myl.zip")
            deadline = time.monotonic() + 60
            while True:
                await writer.run_once()
                if writer.written is not None and MISSING_SHARDS._value.get() == 0:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError("cert_service signed no CRL for every shard in 60 s")
                await asyncio.sleep(0.5)

    asyncio.run(write())


def _handshake_counts(admin_port: int, device_port: int) -> tuple[int, int]:
    """Envoy's (handshakes, resumed sessions) on the device listener so far."""
    prefix = f"listener.127.0.0.1_{device_port}.ssl."
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats", timeout=5) as reply:
        stats = dict(
            line.split(": ", 1) for line in reply.read().decode().splitlines() if ": " in line
        )
    return int(stats[prefix + "handshake"]), int(stats[prefix + "session_reused"])


def handshakes_per_second(
    admin_port: int,
    device_port: int,
    server: GatewayCertificate,
    cert: Path,
    key: Path,
    *,
    reuse: bool,
    clients: int = 2,
) -> tuple[float, float]:
    """(handshakes, of them resumed) per second that Envoy completed on the device listener
    while `clients` `openssl s_time` ran at once for 5 s. s_time resumes TLS 1.2 sessions
    only (it reads no TLS 1.3 ticket), so the resumed run speaks TLS 1.2."""
    command = [
        "openssl", "s_time", "-connect", f"127.0.0.1:{device_port}", "-CAfile", str(server.ca),
        "-cert", str(cert), "-key", str(key), "-time", "5",
        *(("-reuse", "-tls1_2") if reuse else ("-new",)),
    ]  # fmt: skip
    handshakes, resumed = _handshake_counts(admin_port, device_port)
    started = time.monotonic()
    runs = [
        subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(clients)
    ]
    for run in runs:
        run.wait(timeout=60)
    elapsed = time.monotonic() - started
    after, resumed_after = _handshake_counts(admin_port, device_port)
    return (after - handshakes) / elapsed, (resumed_after - resumed) / elapsed


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
        cert_port, key_port = free_port(), free_port()
        ports = GatewayPorts(free_port(), free_port(), cert_port, key_port)
        env = databases.service_env({
            **databases.ca_env(),
            "CERT_SERVICE_PORT": str(cert_port), "KEY_SERVICE_PORT": str(key_port),
            "CERT_SERVICE_ADDRESS": f"127.0.0.1:{cert_port}",
            "KEY_SERVICE_ADDRESS": f"127.0.0.1:{key_port}",
        })  # fmt: skip
        for service, port in (("cert_service", cert_port), ("key_service", key_port)):
            start_service(service, env, port, stops)
        trust = directory / "edge-trust"
        write_trust(cert_port, trust)
        server = create_gateway_certificate(directory / "gateway")
        device_port = free_port()
        config = directory / "envoy.yaml"
        config.write_text(
            render_envoy_config(
                ports,
                listen_address="127.0.0.1",
                access_log_path=directory / "access.log",
                device_tls=DeviceTls(device_port, server.cert, server.key, trust),
            )
        )
        envoy = start_process(
            envoy_command(config, concurrency=1), None, ports.listen_port,
            log=directory / "envoy.log",
        )  # fmt: skip
        stops.callback(stop_process, envoy)
        wait_gateway_healthy(ports.listen_port, 30, envoy)

        with grpc.insecure_channel(f"127.0.0.1:{cert_port}") as channel:
            provisioned = cert_pb2_grpc.CertificateServiceStub(channel).ProvisionCertificate(
                cert_pb2.ProvisionCertificateRequest(device_id=DEVICE)
            )
        device_cert, device_key = directory / "device.crt", directory / "device.key"
        device_cert.write_text(provisioned.certificate.certificate_chain_pem)
        device_key.write_text(provisioned.private_key_pem)
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
        results, rounds = in_turns(
            {
                DIRECT: functools.partial(
                    h2load, f"http://127.0.0.1:{cert_port}{GET_PATH}", directory / "direct.log",
                    [*GRPC_HEADERS, "-d", str(body)],
                ),
                VIA_GRPC: functools.partial(
                    h2load, f"http://127.0.0.1:{ports.listen_port}{GET_PATH}",
                    directory / "gw-grpc.log",
                    [*GRPC_HEADERS, "-H", f"x-api-key: {key}", "-d", str(body)],
                ),
                VIA_REST: functools.partial(
                    h2load,
                    f"http://127.0.0.1:{ports.listen_port}/api/v1/devices/{DEVICE}/certificate",
                    directory / "gw-rest.log", ["--h1", "-H", f"x-api-key: {key}"],
                ),
            },
            n,
            ROUNDS,
        )  # fmt: skip
        print(
            f"GetCertificate, {n} sequential requests each (h2load -c 1 -m 1), cache hit,"
            f" in {ROUNDS} rounds of the three in turn"
        )
        print(f"{'path':<32} {'ok':>6} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}")
        for name, r in results.items():
            print(f"{name:<32} {r['ok']:>6.0f} {r['p50']:>8.3f} {r['p90']:>8.3f} {r['p99']:>8.3f}")
        base = results[DIRECT]["p50"]
        for name in (VIA_GRPC, VIA_REST):
            print(f"gateway adds at p50 ({name}): {results[name]['p50'] - base:.3f} ms")
        for name in (VIA_GRPC, VIA_REST):
            ratios = {
                pct: statistics.median(r[name][pct] / r[DIRECT][pct] for r in rounds)
                for pct in ("p50", "p99")
            }
            print(
                f"hop ratio ({name} / direct, median of {ROUNDS} rounds):"
                f" p50 {ratios['p50']:.2f}, p99 {ratios['p99']:.2f}"
            )

        request = cert_pb2.GetCertificateRequest(device_id=DEVICE)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=server.ca.read_bytes(),
            private_key=device_key.read_bytes(),
            certificate_chain=device_cert.read_bytes(),
        )
        with (
            grpc.insecure_channel(f"127.0.0.1:{cert_port}") as direct,
            grpc.insecure_channel(f"127.0.0.1:{ports.listen_port}") as keyed,
            grpc.secure_channel(f"127.0.0.1:{device_port}", credentials) as mutual,
        ):
            calls = {
                "direct gRPC to cert_service": (direct, ()),
                "gRPC via Envoy, API key": (keyed, (("x-api-key", key),)),
                "gRPC via Envoy, device mTLS": (mutual, ()),
            }
            same: dict[str, dict[str, float]] = {}
            for name, (channel, metadata) in calls.items():
                get = channel.unary_unary(
                    GET_PATH,
                    request_serializer=cert_pb2.GetCertificateRequest.SerializeToString,
                    response_deserializer=cert_pb2.GetCertificateResponse.FromString,
                )
                assert get(request, metadata=metadata).certificate.device_id == DEVICE
                same[name] = sequential_calls(functools.partial(get, request, metadata=metadata), n)
        print()
        print(f"GetCertificate, {n} sequential calls each from one Python gRPC client")
        print(f"{'path':<32} {'ok':>6} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}")
        for name, r in same.items():
            print(f"{name:<32} {r['ok']:>6.0f} {r['p50']:>8.3f} {r['p90']:>8.3f} {r['p99']:>8.3f}")
        direct_row = same["direct gRPC to cert_service"]
        for name in ("gRPC via Envoy, API key", "gRPC via Envoy, device mTLS"):
            print(
                f"gateway adds ({name}): p50 {same[name]['p50'] - direct_row['p50']:.3f} ms,"
                f" p99 {same[name]['p99'] - direct_row['p99']:.3f} ms"
            )
        tls = (ports.admin_port, device_port, server, device_cert, device_key)
        full, _ = handshakes_per_second(*tls, reuse=False)
        total, resumed = handshakes_per_second(*tls, reuse=True)
        print(
            f"device mTLS handshakes on one Envoy worker: {full:.0f}/s full (TLS 1.3, ECDHE"
            f" P-256, ECDSA; chain, zone and CRL checked); {total:.0f}/s of which {resumed:.0f}/s"
            " resumed (TLS 1.2 session resumption)"
        )
        return 0


if __name__ == "__main__":
    sys.exit(main())
