"""A real Envoy gateway in front of the in-process cert_service and key_service."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from deploy.devstack.gateway import (
    KEY_CHECK_TIMEOUT,
    GatewayPorts,
    envoy_command,
    render_envoy_config,
)
from deploy.devstack.servers import free_port
from tests.fixtures import internal_tls
from tests.fixtures.key import RunningKeyService


@dataclass
class Gateway:
    port: int
    admin_port: int
    config_path: Path
    access_log: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.port}"


async def _wait_healthy(gateway: Gateway, limit: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit
    async with httpx.AsyncClient() as client:
        while True:
            if gateway.process.poll() is not None:
                raise RuntimeError(f"envoy exited with {gateway.process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{gateway.url}/healthz", timeout=1)).status_code == 200:
                    return
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError("gateway not healthy in time")
            await asyncio.sleep(0.1)


def _start_envoy(config_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            envoy_command(config_path, concurrency=1, access_log_flush_ms=100),
            stdout=log,
            stderr=log,
            start_new_session=True,
        )


@pytest.fixture
def key_check_timeout() -> float:
    """Seconds the gateway waits for key_service's check: the product's setting, which a
    test module overrides only when its subject is not how fast the check answers."""
    return KEY_CHECK_TIMEOUT


@pytest.fixture
async def gateway(
    cert_service: object,
    key_service: RunningKeyService,
    tmp_path: Path,
    key_check_timeout: float,
) -> AsyncIterator[Gateway]:
    cert_port = int(str(getattr(cert_service, "address")).rsplit(":", 1)[1])  # noqa: B009
    key_port = int(key_service.address.rsplit(":", 1)[1])
    # A cert_service started with ACME_SERVER_PORT serves /acme/ too.
    acme = getattr(getattr(cert_service, "app", None), "acme_http", None)
    ports = GatewayPorts(
        free_port(),
        free_port(),
        cert_port,
        key_port,
        acme_ports=(acme.port,) if acme is not None else (),
    )
    config_path = tmp_path / "envoy.yaml"
    access_log = tmp_path / "access.log"
    config_path.write_text(
        render_envoy_config(
            ports,
            listen_address="127.0.0.1",
            access_log_path=access_log,
            upstream_tls=internal_tls.upstream_tls(),
            key_check_timeout=key_check_timeout,
        )
    )
    process = _start_envoy(config_path, tmp_path / "envoy.log")
    running = Gateway(ports.listen_port, ports.admin_port, config_path, access_log, process)
    try:
        await _wait_healthy(running)
        yield running
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        await asyncio.to_thread(process.wait, 10)
