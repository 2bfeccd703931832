"""Pieces the benchmark modules share: throwaway databases, server processes, h2load.

Kept free of heavy imports at module level: bench_cert's load workers are spawned processes
that import their module (and so this one) before they start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from deploy.devstack.servers import (
    PostgresServer,
    RedisServer,
    free_port,
    proc_stat,
    stop_process_group,
    wait_for_port,
)

if TYPE_CHECKING:
    import grpc

ROOT = Path(__file__).resolve().parents[2]
DATABASE = "bench"
# h2load options that make its requests gRPC calls (with `-d` a length-prefixed body).
GRPC_HEADERS = ["-H", "content-type: application/grpc", "-H", "te: trailers"]


# -- throwaway PostgreSQL and Redis ------------------------------------------------------------


@dataclass(frozen=True)
class Databases:
    directory: Path  # a temporary directory, removed afterwards; put other files here too
    postgres: PostgresServer
    redis: RedisServer

    @property
    def conninfo(self) -> str:
        return self.postgres.conninfo(DATABASE)

    def env(self) -> dict[str, str]:
        """The environment variables that point a service at these servers."""
        return {
            "DB_HOST": self.postgres.host,
            "DB_PORT": str(self.postgres.port),
            "DB_NAME": DATABASE,
            "DB_USER": self.postgres.user,
            "DB_SSLMODE": "disable",
            "REDIS_HOST": self.redis.host,
            "REDIS_PORT": str(self.redis.port),
            # Plaintext service ports, as the echo ceilings they are compared with and the
            # figures of earlier runs; bench_internal_tls measures what mutual TLS adds.
            "INTERNAL_TLS": "off",
        }

    def ca_env(self) -> dict[str, str]:
        """CA_CERT_FILE and CA_KEY_FILE of a development CA under the directory (made the
        first time: every service of a run signs with the same CA)."""
        from cert_service.ca import create_development_ca

        ca_cert, ca_key = create_development_ca(self.directory / "ca")
        return {"CA_CERT_FILE": str(ca_cert), "CA_KEY_FILE": str(ca_key)}

    def service_env(self, settings: Mapping[str, str]) -> dict[str, str]:
        """A service's environment: ours without its DB_ and REDIS_ settings (these servers
        replace them), these servers', no metrics port, warnings only; then `settings`."""
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith(("DB_", "REDIS_"))},
            **self.env(),
            "CERT_SERVICE_METRICS_PORT": "0",
            "KEY_SERVICE_METRICS_PORT": "0",
            "LOG_LEVEL": "warning",
            **settings,
        }


@contextlib.contextmanager
def throwaway_databases(
    prefix: str, *, durable: bool, migrate: Sequence[str] = ()
) -> Iterator[Databases]:
    """PostgreSQL (with a `bench` database) and Redis under a new temporary directory.

    `migrate` names the services (`cert_service`, `key_service`) whose migrations are applied.
    Both servers are stopped and the directory removed on leaving.
    """
    from shared.migrations import MigrationRunner, load_migrations

    directory = Path(tempfile.mkdtemp(prefix=prefix))
    directory.chmod(0o755)  # PostgreSQL runs as its own user when we are root
    postgres = PostgresServer(directory / "pg", free_port(), durable=durable)
    redis = RedisServer(directory / "redis", free_port())
    try:
        postgres.start()
        redis.start()
        postgres.create_database(DATABASE)
        databases = Databases(directory, postgres, redis)
        for service in migrate:
            migrations = load_migrations(ROOT / service / "migrations")
            asyncio.run(MigrationRunner(databases.conninfo, service, migrations).up())
        yield databases
    finally:
        redis.stop()
        postgres.stop()
        shutil.rmtree(directory, ignore_errors=True)


# -- server processes ---------------------------------------------------------------------------


def start_process(
    command: list[str],
    env: Mapping[str, str] | None,
    port: int,
    *,
    log: Path | None = None,
    timeout: float = 30,
) -> subprocess.Popen[bytes]:
    """Run `command` (in ROOT, in a session of its own) and wait until it listens on `port`.

    With `log`, its stdout and stderr go to that file.
    """
    output = open(log, "wb") if log else None  # noqa: SIM115
    try:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=output, stderr=output, start_new_session=True
        )
    finally:
        if output:
            output.close()
    try:
        wait_for_port("127.0.0.1", port, timeout, process)
    except BaseException:
        stop_process(process)
        raise
    return process


def start_service(
    service: str,
    env: Mapping[str, str],
    port: int,
    stops: contextlib.ExitStack,
    *,
    log: Path | None = None,
    timeout: float = 30,
) -> subprocess.Popen[bytes]:
    """`python -m <service> serve` on 127.0.0.1:`port` (see `start_process`), stopped when
    `stops` closes; returned once it answers SERVING, within `timeout` seconds."""
    from deploy.devstack.stack import wait_healthy

    process = start_process(
        [sys.executable, "-m", service, "serve"], env, port, log=log, timeout=timeout
    )
    stops.callback(stop_process, process)
    wait_healthy(f"127.0.0.1:{port}", timeout, process)
    return process


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process's group (from start_process); SIGKILL if not gone in 30 s."""
    stop_process_group(process, timeout=30)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far, from /proc."""
    fields = proc_stat(pid)
    if fields is None:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def serve_until_sigterm(server: grpc.aio.Server, port: int, grace: float | None) -> None:
    """Serve `server` (handlers added) on 127.0.0.1:`port` until SIGTERM: the echo ceilings."""
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(grace)


# -- h2load ---------------------------------------------------------------------------------------


def grpc_frame(payload: bytes) -> bytes:
    """A serialized message as a gRPC request body: uncompressed flag, 4-byte length, message."""
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


@dataclass(frozen=True)
class H2loadRun:
    command: list[str]
    stdout: str
    latencies_us: list[int]  # of the requests answered with HTTP 200, in completion order


def run_h2load(url: str, log: Path, options: Sequence[str]) -> H2loadRun:
    """Run h2load (it must succeed) and read each request's time from its --log-file."""
    command = ["h2load", *options, "--log-file", str(log), url]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    # Log lines: start time, HTTP status, duration in microseconds (tab separated).
    latencies = [
        int(fields[2])
        for fields in (line.split("\t") for line in log.read_text().splitlines())
        if len(fields) >= 3 and fields[1] == "200"
    ]
    return H2loadRun(command, done.stdout, latencies)


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """The value at `pct` percent (nearest rank) of already sorted values; NaN if none."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, round(pct / 100 * (len(sorted_values) - 1)))
    return sorted_values[index]
