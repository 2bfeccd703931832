"""Health checking, reflection, and `python -m cert_service serve` as a real process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.devstack.servers import PostgresServer, RedisServer, free_port
from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from tests.fixtures import internal_tls
from tests.fixtures.cert import RunningCertService

ROOT = Path(__file__).resolve().parents[2]


async def test_health_and_reflection(cert_service: RunningCertService) -> None:
    async with internal_tls.channel(cert_service.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "myl.cert.v1.CertificateService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service

    grpcurl = Path(sys.executable).parent / "grpcurl"
    # The server runs in this event loop: wait for grpcurl without blocking it.
    # As an operator does: with the operator's internal certificate, checking the server's.
    operator = internal_tls.identity("operator")
    process = await asyncio.create_subprocess_exec(
        str(grpcurl),
        *operator.grpcurl_flags(),
        "-servername",
        "cert-service.myl.internal",
        cert_service.address,
        "list",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    services = out.decode().split()
    assert "myl.cert.v1.CertificateService" in services
    assert "grpc.health.v1.Health" in services


def _env(**extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CA_", "CERT_SERVICE_", "DB_", "REDIS_"))
    }
    env.update(internal_tls.service_env("cert_service"), **extra)
    return env


def test_missing_ca_settings_stop_start_up_with_their_names() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cert_service", "serve"],
        env=_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "CA_CERT_FILE" in done.stderr


def test_unreadable_ca_stops_start_up(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cert_service", "serve"],
        env=_env(CA_CERT_FILE=str(tmp_path / "nope.crt"), CA_KEY_FILE=str(tmp_path / "nope.key")),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "nope.crt" in done.stderr


async def test_serve_runs_until_sigterm_and_drains(
    pg_server: PostgresServer,
    database: str,
    clean_redis: RedisServer,
    ca_files: tuple[Path, Path],
) -> None:
    port = free_port()
    env = _env(
        CA_CERT_FILE=str(ca_files[0]),
        CA_KEY_FILE=str(ca_files[1]),
        DB_HOST=pg_server.host,
        DB_PORT=str(pg_server.port),
        DB_NAME=database,
        DB_USER=pg_server.user,
        DB_SSLMODE="disable",
        REDIS_HOST=clean_redis.host,
        REDIS_PORT=str(clean_redis.port),
        CERT_SERVICE_PORT=str(port),
        CERT_SERVICE_METRICS_PORT="0",
        LOG_FORMAT="console",
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cert_service",
        "serve",
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with internal_tls.channel(f"127.0.0.1:{port}", service="cert_service") as channel:
            stub = cert_pb2_grpc.CertificateServiceStub(channel)
            reply = await stub.ProvisionCertificate(
                cert_pb2.ProvisionCertificateRequest(device_id="device-1"),
                wait_for_ready=True,
                timeout=30,
            )
            assert reply.certificate.status == cert_pb2.CERTIFICATE_STATUS_ACTIVE
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0, err.decode()
        assert "stopped" in err.decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
