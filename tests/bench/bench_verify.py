"""Benchmark: VerifyApiKey throughput and latency, beside the grpc.aio echo ceiling.

Run with `python -m tests.bench.bench_verify` (what `make bench` runs). It
prints numbers and asserts nothing about time.

Setup: a throwaway PostgreSQL and Redis (deploy.devstack.servers), key_service's
migrations, 100,000 keys loaded with COPY, and two separate server processes:
`python -m key_service` and a no-op grpc.aio server whose VerifyApiKey returns
a constant (the ceiling one Python process can reach).

- cache hit: h2load sends the same VerifyApiKey request (a key with a rate
  limit high enough to admit everything) to each server: saturation
  throughput, then latency at half of the saturation rate (`--rps`).
  The ratios to the ceiling are taken in `--rounds` rounds (3), each an echo
  run and a key_service run back to back, in alternating order, and the
  median round is printed beside every round's figures: load that comes and
  goes on a shared machine then falls on both sides of a ratio.
- gateway check: the same with Envoy's ext_authz `Check` (a CheckRequest
  shaped like the ones Envoy sends, carrying the hot key), against the echo
  server's constant `Check`.
- CPU per call: the server process's user+system CPU time (from
  /proc/<pid>/stat) over a fixed number of requests (`h2load -n`), divided by
  that number. Less sensitive than req/s to other load on a shared machine.
- cache miss: every request names a different key, so h2load (one fixed body)
  cannot do it; a multi-process grpc.aio loader sends each of the 100,000 keys
  once. The same loader is run against the echo server to show its own
  ceiling.

Afterwards the keys' usage counters (flushed on key_service's graceful stop)
are compared with the number of requests h2load saw succeed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import psycopg

from deploy.devstack.servers import free_port
from key_service import keyformat
from myl.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from myl.key.v1 import key_pb2, key_pb2_grpc
from tests.bench.harness import (
    GRPC_HEADERS,
    ROOT,
    cpu_seconds,
    grpc_frame,
    percentile,
    run_h2load,
    serve_until_sigterm,
    start_process,
    stop_process,
    throwaway_databases,
)

KEYS = 100_000
HOT_RATE_LIMIT = 60_000_000  # one request per microsecond: the hot key is never limited
VERIFY_PATH = "/myl.key.v1.ApiKeyService/VerifyApiKey"
CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check"
CPU_REQUESTS = 20_000


# -- the echo ceiling ---------------------------------------------------------


class EchoServicer(key_pb2_grpc.ApiKeyServiceServicer):
    """Parses the request and returns a constant: no I/O, no logic."""

    RESPONSE = key_pb2.VerifyApiKeyResponse(result=key_pb2.VERIFY_RESULT_VALID)

    async def VerifyApiKey(
        self, request: key_pb2.VerifyApiKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> key_pb2.VerifyApiKeyResponse:
        return self.RESPONSE


class EchoAuthorization(external_auth_pb2_grpc.AuthorizationServicer):
    """Parses the CheckRequest and returns a constant OK."""

    RESPONSE = external_auth_pb2.CheckResponse()

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> external_auth_pb2.CheckResponse:
        return self.RESPONSE


async def serve_echo(port: int) -> None:
    server = grpc.aio.server()
    key_pb2_grpc.add_ApiKeyServiceServicer_to_server(EchoServicer(), server)  # type: ignore[abstract]
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(EchoAuthorization(), server)
    await serve_until_sigterm(server, port, 1)


# -- the multi-process loader (distinct keys) --------------------------------


async def load_distinct(address: str, keys: Sequence[str], concurrency: int) -> dict[str, Any]:
    latencies: list[float] = []
    results: dict[str, int] = {}  # by VerifyResult, or the gRPC status of a failed call
    queue = iter(keys)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = key_pb2_grpc.ApiKeyServiceStub(channel)

        async def worker() -> None:
            for key in queue:
                started = time.perf_counter()
                try:
                    reply = await stub.VerifyApiKey(key_pb2.VerifyApiKeyRequest(api_key=key))
                    name = key_pb2.VerifyResult.Name(reply.result)
                except grpc.aio.AioRpcError as failed:
                    name = failed.code().name  # counted, not fatal: the rest of the run stands
                latencies.append(time.perf_counter() - started)
                results[name] = results.get(name, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"latencies": latencies, "elapsed": elapsed, "results": results}


def run_loader(address: str, keys: list[str], processes: int, concurrency: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as directory:
        children = []
        for index in range(processes):
            part = Path(directory) / f"keys-{index}.txt"
            part.write_text("\n".join(keys[index::processes]))
            out = Path(directory) / f"out-{index}.json"
            children.append(
                (
                    subprocess.Popen(
                        [sys.executable, "-m", "tests.bench.bench_verify", "--loader",
                         address, str(part), str(out), str(concurrency)],
                        cwd=ROOT,
                    ),
                    out,
                )
            )  # fmt: skip
        for child, _ in children:
            child.wait()
        parts = [json.loads(out.read_text()) for _, out in children]
    latencies = sorted(x for p in parts for x in p["latencies"])
    elapsed = max(p["elapsed"] for p in parts)
    results: dict[str, int] = {}
    for p in parts:
        for name, count in p["results"].items():
            results[name] = results.get(name, 0) + count
    return {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "results": results,
    }


# -- h2load ---------------------------------------------------------------------


def grpc_body(path: Path, request: Any) -> Path:
    path.write_bytes(grpc_frame(request.SerializeToString()))
    return path


def check_body(path: Path, api_key: str) -> Path:
    """A CheckRequest like the ones Envoy sends for a gRPC GetCertificate."""
    method = "/myl.cert.v1.CertificateService/GetCertificate"
    request = external_auth_pb2.CheckRequest()
    request.attributes.request.time.GetCurrentTime()
    request.attributes.source.address.socket_address.address = "127.0.0.1"
    request.attributes.source.address.socket_address.port_value = 51234
    http = request.attributes.request.http
    http.id, http.method, http.path = "8430151296515213715", "POST", method
    http.host, http.scheme, http.protocol, http.size = "127.0.0.1:10000", "http", "HTTP/2", 42
    http.headers.update(
        {
            ":authority": "127.0.0.1:10000", ":method": "POST", ":path": method,
            ":scheme": "http", "content-type": "application/grpc", "te": "trailers",
            "user-agent": "grpc-python/1.85.3", "x-api-key": api_key,
            "x-forwarded-proto": "http", "x-request-id": str(uuid.uuid4()),
            "x-envoy-expected-rq-timeout-ms": "15000",
        }
    )  # fmt: skip
    return grpc_body(path, request)


def h2load(
    port: int, body: Path, log: Path, *, seconds: int, clients: int, streams: int,
    rps: float | None = None, path: str = VERIFY_PATH, requests: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    options = ["-t", "1", "-c", str(clients), "-m", str(streams), *GRPC_HEADERS, "-d", str(body)]
    if requests is None:
        options += ["-D", str(seconds), "--warm-up-time", "2"]
    else:
        options += ["-n", str(requests)]
    if rps is not None:
        options += ["--rps", f"{rps:.0f}"]
    run = run_h2load(f"http://127.0.0.1:{port}{path}", log, options)
    succeeded = 0
    for line in run.stdout.splitlines():
        if line.startswith("requests:"):
            succeeded = int(line.split("succeeded,")[0].split(",")[-1].split()[0])
    durations = sorted(us / 1e6 for us in run.latencies_us)  # seconds
    return {
        "command": " ".join(run.command),
        "rps": succeeded / seconds if requests is None else float("nan"),
        "succeeded": succeeded,
        "p50_ms": percentile(durations, 50) * 1000,
        "p99_ms": percentile(durations, 99) * 1000,
    }


# -- setup ------------------------------------------------------------------------


def load_keys(conninfo: str) -> tuple[str, list[str]]:
    """100,000 keys by COPY; returns the hot key and the plaintexts of the others."""
    now = datetime.now(UTC)
    expires = now + timedelta(days=30)
    plaintexts = []
    with psycopg.connect(conninfo) as conn, conn.cursor() as cur:
        with cur.copy(
            "COPY device_api_keys (id, device_id, key_hash, key_prefix, permissions, "
            "rate_limit, expires_at, created_at, updated_at) FROM STDIN"
        ) as copy:
            for index in range(KEYS):
                key = keyformat.generate()
                plaintexts.append(key.plaintext)
                copy.write_row(
                    (
                        uuid.uuid4(), f"bench-{index % 10_000}", key.key_hash,
                        key.display_prefix, ["ssl:read", "device:read", "api:access"],
                        HOT_RATE_LIMIT if index == 0 else 1000, expires, now, now,
                    )
                )  # fmt: skip
        conn.commit()
        cur.execute("ANALYZE device_api_keys")
    return plaintexts[0], plaintexts[1:]


def median_run(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median req/s, its CPU per call the median of all the runs'."""
    ordered = sorted(runs, key=lambda run: run["rps"])
    middle = dict(ordered[len(ordered) // 2])
    middle["cpu_us"] = statistics.median(run["cpu_us"] for run in runs)
    middle["succeeded"] = sum(run["succeeded"] for run in runs)
    return middle


def main(rounds: int) -> None:
    with (
        throwaway_databases("myl-bench-", durable=False, migrate=["key_service"]) as databases,
        contextlib.ExitStack() as stops,  # stops the servers, last started first
    ):
        directory, conninfo = databases.directory, databases.conninfo
        started = time.perf_counter()
        hot_key, cold_keys = load_keys(conninfo)
        print(f"setup: {KEYS} keys loaded with COPY in {time.perf_counter() - started:.1f}s")

        key_port, echo_port = free_port(), free_port()
        env = {
            **os.environ, **databases.env(),
            "KEY_SERVICE_PORT": str(key_port), "KEY_SERVICE_METRICS_PORT": "0",
            "KEY_SERVICE_LOG_LEVEL": "warning", "KEY_SERVICE_MAX_RATE_LIMIT": str(HOT_RATE_LIMIT),
            "KEY_SERVICE_USAGE_FLUSH_INTERVAL": "5",
        }  # fmt: skip
        key_service = start_process([sys.executable, "-m", "key_service"], env, key_port)
        stops.callback(stop_process, key_service)
        echo = start_process(
            [sys.executable, "-m", "tests.bench.bench_verify", "--echo", str(echo_port)],
            env,
            echo_port,
        )
        stops.callback(stop_process, echo)

        body = grpc_body(directory / "hot.bin", key_pb2.VerifyApiKeyRequest(api_key=hot_key))
        check = asyncio.run(load_distinct(f"127.0.0.1:{key_port}", [hot_key], 1))
        assert check["results"] == {"VERIFY_RESULT_VALID": 1}, check

        seconds, clients, streams = 5, 4, 32
        check_bin = check_body(directory / "check.bin", hot_key)
        pids = {echo_port: echo.pid, key_port: key_service.pid}
        # Each pair: the echo ceiling and the real server on the same request.
        pairs = (
            ("echo", "verify_hit", body, VERIFY_PATH),
            ("echo_check", "check_hit", check_bin, CHECK_PATH),
        )
        runs = tuple(
            (name, port, data, path)
            for echo_name, hit_name, data, path in pairs
            for name, port in ((echo_name, echo_port), (hit_name, key_port))
        )
        # The ratio to the ceiling is taken per round, from an echo run and a real run
        # back to back (their order alternating), so load that comes and goes on a shared
        # machine falls on both sides of one ratio; the median round is reported.
        samples: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in runs}
        for round_number in range(rounds):
            for echo_name, hit_name, data, path in pairs:
                order = [(echo_name, echo_port), (hit_name, key_port)]
                if round_number % 2:
                    order.reverse()
                for name, port in order:
                    run = h2load(
                        port, data, directory / f"{name}-{round_number}.log",
                        seconds=seconds, clients=clients, streams=streams, path=path,
                    )  # fmt: skip
                    before = cpu_seconds(pids[port])
                    h2load(
                        port, data, directory / f"{name}-{round_number}-cpu.log",
                        seconds=seconds, clients=clients, streams=streams, path=path,
                        requests=CPU_REQUESTS,
                    )  # fmt: skip
                    run["cpu_us"] = (cpu_seconds(pids[port]) - before) / CPU_REQUESTS * 1e6
                    samples[name].append(run)
        report: dict[str, Any] = {name: median_run(found) for name, found in samples.items()}
        report["rounds"] = {
            hit_name: [
                (hit["rps"] / echo["rps"], echo["cpu_us"] / hit["cpu_us"])
                for echo, hit in zip(samples[echo_name], samples[hit_name], strict=True)
            ]
            for echo_name, hit_name, *_ in pairs
        }
        for name, port, data, path in runs:
            half = report[name]["rps"] / 2
            report[f"{name}_half"] = h2load(
                port, data, directory / f"{name}-half.log",
                seconds=seconds, clients=clients, streams=streams, rps=half / clients, path=path,
            )  # fmt: skip

        loader_processes, loader_concurrency = 2, 32
        report["loader_echo"] = run_loader(
            f"127.0.0.1:{echo_port}", cold_keys[:50_000], loader_processes, loader_concurrency
        )
        report["verify_miss"] = run_loader(
            f"127.0.0.1:{key_port}", cold_keys, loader_processes, loader_concurrency
        )
        report["verify_hit_loader"] = run_loader(
            f"127.0.0.1:{key_port}", cold_keys[:50_000], loader_processes, loader_concurrency
        )

        stop_process(key_service)  # it flushes the usage counters on a graceful stop
        with psycopg.connect(conninfo) as conn:
            row = conn.execute(
                "SELECT usage_count FROM device_api_keys WHERE key_hash = %s",
                (keyformat.hash_key(hot_key),),
            ).fetchone()
        counted = int(row[0]) if row else 0
        print_report(report, counted)


def print_report(report: dict[str, Any], counted: int) -> None:
    cpu = os.cpu_count()
    print(f"\nmachine: {cpu} CPUs, {sys.version.split()[0]}, grpcio {grpc.__version__}")
    print(f"{'run':<30}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'CPU us/call':>13}")
    rows = [
        ("echo ceiling (h2load)", "echo"),
        ("verify, cache hit (h2load)", "verify_hit"),
        ("echo Check ceiling (h2load)", "echo_check"),
        ("Check, cache hit (h2load)", "check_hit"),
        ("echo at half load", "echo_half"),
        ("verify hit at half load", "verify_hit_half"),
        ("echo Check at half load", "echo_check_half"),
        ("Check hit at half load", "check_hit_half"),
        ("echo ceiling (py loader)", "loader_echo"),
        ("verify, cache miss (loader)", "verify_miss"),
        ("verify, cache hit (loader)", "verify_hit_loader"),
    ]
    for label, name in rows:
        r = report[name]
        cpu_us = f"{r['cpu_us']:>13.0f}" if "cpu_us" in r else ""
        print(f"{label:<30}{r['rps']:>10.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{cpu_us}")
    for label, hit in (("verify", "verify_hit"), ("Check", "check_hit")):
        rounds = report["rounds"][hit]
        ratio = statistics.median(r for r, _ in rounds)
        cpu_ratio = statistics.median(c for _, c in rounds)
        print(f"{label} cache hit / echo ceiling: {ratio:.0%} (req/s), {cpu_ratio:.0%} (CPU/call)")
        each = ", ".join(f"{r:.2f}/{c:.2f}" for r, c in rounds)
        print(f"  {label} per round, req/s / CPU: {each} (median of {len(rounds)})")
    print(f"miss results: {report['verify_miss']['results']}")
    h2load_total = sum(report[n]["succeeded"] for n in ("verify_hit", "verify_hit_half"))
    print(f"hot key usage_count after graceful stop: {counted} (h2load VerifyApiKey "
          f"successes, warm-up excluded: {h2load_total}; Check and CPU runs add more)")  # fmt: skip
    print(f"h2load command: {report['verify_hit']['command']}")


def _loader_main(argv: Sequence[str]) -> None:
    address, keys_file, out_file, concurrency = argv
    keys = Path(keys_file).read_text().split("\n")
    result = asyncio.run(load_distinct(address, keys, int(concurrency)))
    Path(out_file).write_text(json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--echo", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--loader", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument(
        "--rounds", type=int, default=3, help="echo/real pairs per ratio (median reported)"
    )
    args = parser.parse_args()
    if args.echo:
        asyncio.run(serve_echo(args.echo))
    elif args.loader:
        _loader_main(args.loader)
    else:
        main(args.rounds)
