"""Benchmark: where the gateway's Check spends its CPU, stage by stage.

Run with `python -m tests.bench.bench_check_stages` (part of `make bench`). It prints numbers
and asserts nothing about time.

key_service runs as its own process under cProfile (`python -m cProfile -m key_service`)
against a throwaway PostgreSQL and Redis holding one key; h2load sends it `REQUESTS` Check
calls shaped like the ones Envoy sends for a gRPC GetCertificate (bench_verify's body), all
cache hits. After a graceful stop the profile is read and each stage's CPU is printed per
call: the whole process (from /proc, unprofiled and profiled runs), the Check handler, and
inside it route resolution, the permission lookup, the key's verification (local record and
the Redis limit script), the REST body checks and the response. What is left of the process's
CPU outside Check is the gRPC server itself (HTTP/2, (de)serialization, the asyncio loop).

cProfile's own cost inflates every figure (compare the profiled and unprofiled totals); the
shares are what to read.
"""

from __future__ import annotations

import os
import pstats
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

from deploy.devstack.servers import free_port
from key_service import keyformat
from tests.bench.bench_verify import CHECK_PATH, HOT_RATE_LIMIT, check_body, h2load
from tests.bench.harness import cpu_seconds, start_process, stop_process, throwaway_databases

REQUESTS = 20_000

# (label, module file suffix, function name): a stage is the cumulative time of its function.
STAGES = (
    ("Check handler (all of it)", "key_service/authz.py", "Check"),
    ("  route resolution", "key_service/authz.py", "_route"),
    ("  permission lookup", "key_service/authz.py", "required_permissions"),
    ("  client address", "key_service/authz.py", "client_address"),
    ("  key verification", "key_service/verify.py", "verify"),
    ("    Redis limit script", "key_service/scriptclient.py", "run"),
    ("  REST body/query checks", "shared/httprules.py", "check_rest_request"),
)


def one_key(conninfo: str) -> str:
    """A key that may call GetCertificate, with a limit nothing reaches."""
    key = keyformat.generate()
    now = datetime.now(UTC)
    with psycopg.connect(conninfo) as conn:
        conn.execute(
            "INSERT INTO device_api_keys (id, device_id, key_hash, key_prefix, permissions, "
            "rate_limit, expires_at, created_at, updated_at) "
            "VALUES (%s, 'bench-device', %s, %s, %s, %s, %s, %s, %s)",
            (
                uuid.uuid4(), key.key_hash, key.display_prefix,
                ["ssl:read", "device:read", "api:access"], HOT_RATE_LIMIT,
                now + timedelta(days=1), now, now,
            ),
        )  # fmt: skip
    return key.plaintext


def stage_seconds(profile: Path) -> dict[str, float]:
    stats = pstats.Stats(str(profile))
    table = stats.stats  # type: ignore[attr-defined]
    found: dict[str, float] = {}
    for label, suffix, function in STAGES:
        found[label] = sum(
            cumulative
            for (filename, _, name), (_, _, _, cumulative, _) in table.items()
            if name == function and filename.endswith(suffix)
        )
    found["total"] = stats.total_tt  # type: ignore[attr-defined]
    return found


def run(directory: Path, env: dict[str, str], body: Path, *, profile: Path | None) -> float:
    """CPU seconds per call of a key_service process over REQUESTS Checks (after a warm-up)."""
    port = free_port()
    command = [sys.executable]
    if profile is not None:
        command += ["-m", "cProfile", "-o", str(profile)]
    command += ["-m", "key_service"]
    process = start_process(command, {**env, "KEY_SERVICE_PORT": str(port)}, port)
    try:
        options = dict(seconds=0, clients=4, streams=32, path=CHECK_PATH)
        h2load(port, body, directory / "warm.log", requests=2_000, **options)  # type: ignore[arg-type]
        before = cpu_seconds(process.pid)
        done = h2load(port, body, directory / "run.log", requests=REQUESTS, **options)  # type: ignore[arg-type]
        used = cpu_seconds(process.pid) - before
        if done["succeeded"] != REQUESTS:
            raise RuntimeError(f"{done['succeeded']} of {REQUESTS} Checks succeeded")
    finally:
        stop_process(process)  # graceful: cProfile writes its file on the way out
    return used / REQUESTS


def main() -> None:
    with throwaway_databases("myl-bench-", durable=False, migrate=["key_service"]) as databases:
        directory = databases.directory
        api_key = one_key(databases.conninfo)
        body = check_body(directory / "check.bin", api_key)
        env = {
            **os.environ, **databases.env(), "KEY_SERVICE_METRICS_PORT": "0",
            "KEY_SERVICE_LOG_LEVEL": "warning", "KEY_SERVICE_MAX_RATE_LIMIT": str(HOT_RATE_LIMIT),
            "KEY_SERVICE_USAGE_FLUSH_INTERVAL": "5",
        }  # fmt: skip
        plain = run(directory, env, body, profile=None)
        profile = directory / "check.prof"
        started = time.perf_counter()
        profiled = run(directory, env, body, profile=profile)
        took = time.perf_counter() - started
        stages = stage_seconds(profile)
    # The profile covers the warm-up and start-up too; per call, count every Check it saw.
    calls = REQUESTS + 2_000
    print(f"Check, {REQUESTS} cache hits from h2load (4 connections x 32 streams), one process")
    print(f"{'stage':<34} {'us/call':>9} {'of Check':>8}")
    print(f"{'process CPU, unprofiled':<34} {plain * 1e6:>9.1f}")
    print(f"{'process CPU, profiled':<34} {profiled * 1e6:>9.1f}  (profiled run {took:.1f}s)")
    stages.pop("total")  # start-up included: not a per-call figure
    check = stages[STAGES[0][0]]
    for label, seconds in stages.items():
        print(f"{label:<34} {seconds / calls * 1e6:>9.1f} {seconds / check * 100:>6.0f}%")
    outside = profiled - check / calls
    print(f"{'gRPC server outside Check':<34} {outside * 1e6:>9.1f}  (profiled process - Check)")


if __name__ == "__main__":
    main()
