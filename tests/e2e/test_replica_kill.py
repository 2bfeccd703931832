"""Two replicas of each service behind the real gateway: SIGKILL one of each under steady load
and count what the clients saw.

The load is what devices do all day (reads: GetCertificate over REST and over gRPC, each one
checked by ext_authz). Envoy retries a read on the other replica when one dies mid-call,
retries the Check, and ejects the dead replica at its first refused connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from deploy.devstack.gateway import GatewayPorts, envoy_command, render_envoy_config
from deploy.devstack.servers import PostgresServer, RedisServer, free_port, wait_for_port
from deploy.devstack.stack import OPERATOR_PERMISSIONS, wait_healthy
from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from shared.limits import DEFAULT_LIMITS, LimitName
from tests.fixtures import internal_tls
from tests.fixtures.wait import access_log_through

ROOT = Path(__file__).resolve().parents[2]


class Processes:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.directory / f"{name}.log", "wb") as log:
            process = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True
            )
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.started):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for process in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(15)


@pytest.fixture
def replicated_stack(
    pg_server: PostgresServer,
    template_db: str,
    redis_server: RedisServer,
    ca_files: tuple[Path, Path],
    tmp_path: Path,
) -> Iterator[tuple[str, str, dict[str, subprocess.Popen[bytes]]]]:
    """cert_service x2, key_service x2 and Envoy; yields (gateway url, operator key, replicas)."""
    database = f"r_{os.getpid()}_{free_port()}"
    pg_server.create_database(database, template=template_db)
    processes = Processes(tmp_path)
    cert_ports, key_ports = [free_port(), free_port()], [free_port(), free_port()]
    env = {
        **os.environ,
        "DB_HOST": pg_server.host, "DB_PORT": str(pg_server.port), "DB_NAME": database,
        "DB_USER": pg_server.user, "DB_SSLMODE": "disable",
        "REDIS_HOST": redis_server.host, "REDIS_PORT": str(redis_server.port),
        "CA_CERT_FILE": str(ca_files[0]), "CA_KEY_FILE": str(ca_files[1]),
        "CERT_SERVICE_ADDRESS": "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in cert_ports),
        "KEY_SERVICE_ADDRESS": "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in key_ports),
        "METRICS_PORT": "0", "LOG_LEVEL": "warning", "SHUTDOWN_DRAIN_DELAY": "0",
        **internal_tls.services_env(),
    }  # fmt: skip
    replicas: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for service, ports in (("cert_service", cert_ports), ("key_service", key_ports)):
            for index, port in enumerate(ports):
                replica_env = {**env, f"{service.upper()}_PORT": str(port)}
                argv = [sys.executable, "-m", service, "serve"]
                replicas[f"{service}-{index}"] = processes.start(
                    f"{service}-{index}", argv, replica_env
                )
        for name, process in replicas.items():
            kind, number = name.rsplit("-", 1)
            port = (cert_ports if kind == "cert_service" else key_ports)[int(number)]
            caller = internal_tls.identity("operator")
            wait_healthy(f"127.0.0.1:{port}", 30, process, caller=caller, service=kind)
        created = subprocess.run(
            [sys.executable, "-m", "key_service", "admin", "create-key",
             "--permissions", OPERATOR_PERMISSIONS, "--name", "replica test",
             "--rate-limit", "1000000"],
            cwd=ROOT, env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        operator_key = created.stdout.strip().splitlines()[-1]
        gateway_ports = GatewayPorts(
            free_port(), free_port(), cert_ports[0], key_ports[0],
            cert_replica_ports=(cert_ports[1],), key_replica_ports=(key_ports[1],),
        )  # fmt: skip
        config = tmp_path / "envoy.yaml"
        config.write_text(
            render_envoy_config(
                gateway_ports,
                listen_address="127.0.0.1",
                access_log_path=tmp_path / "access.log",
                upstream_tls=internal_tls.upstream_tls(),
            )
        )
        command = envoy_command(config, concurrency=1, access_log_flush_ms=100)
        envoy = processes.start("envoy", command, dict(os.environ))
        wait_for_port("127.0.0.1", gateway_ports.listen_port, 30, envoy)
        url = f"http://127.0.0.1:{gateway_ports.listen_port}"
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/healthz").status_code != 200:
            assert time.monotonic() < deadline, "gateway never healthy"
            time.sleep(0.2)
        yield url, operator_key, replicas
    finally:
        processes.stop_all()
        pg_server.drop_database(database)


async def test_killing_one_replica_of_each_service_fails_no_request(
    replicated_stack: tuple[str, str, dict[str, subprocess.Popen[bytes]]], tmp_path: Path
) -> None:
    url, operator_key, replicas = replicated_stack
    headers = {"X-API-Key": operator_key}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as rest:
        provisioned = await rest.post("/api/v1/ssl/provision", json={"deviceId": "steady"})
        assert provisioned.status_code == 200, provisioned.text
    outcomes: Counter[str] = Counter()
    stop = asyncio.Event()

    async def rest_reads(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            reply = await client.get("/api/v1/devices/steady/certificate")
            outcomes[f"rest:{reply.status_code}"] += 1
            await asyncio.sleep(0.01)

    async def grpc_reads(stub: cert_pb2_grpc.CertificateServiceAsyncStub) -> None:
        request = cert_pb2.GetCertificateRequest(device_id="steady")
        metadata = (("x-api-key", operator_key),)
        while not stop.is_set():
            try:
                await stub.GetCertificate(request, metadata=metadata, timeout=10)
                outcomes["grpc:OK"] += 1
            except grpc.aio.AioRpcError as exc:
                outcomes[f"grpc:{exc.code().name}"] += 1
            await asyncio.sleep(0.01)

    grpc_address = url.removeprefix("http://")
    async with (
        httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as client,
        grpc.aio.insecure_channel(grpc_address) as channel,
    ):
        stub = cert_pb2_grpc.CertificateServiceStub(channel)
        workers = [asyncio.create_task(rest_reads(client)) for _ in range(4)]
        workers += [asyncio.create_task(grpc_reads(stub)) for _ in range(4)]
        await asyncio.sleep(1.5)
        before = sum(outcomes.values())
        for name in ("cert_service-0", "key_service-1"):
            os.killpg(replicas[name].pid, signal.SIGKILL)
        await asyncio.sleep(4)  # through ejection and the health checks' verdict
        stop.set()
        await asyncio.gather(*workers)
    total = sum(outcomes.values())
    log = await access_log_through(url, tmp_path / "access.log")
    failed = [line for line in log.splitlines() if '"5' in line]
    print(f"\n[replica kill] {total} requests ({total - before} after the kill): {dict(outcomes)}")
    assert total - before > 100
    assert set(outcomes) == {"rest:200", "grpc:OK"}, (outcomes, failed)


async def test_killing_a_cert_service_replica_fails_no_api_key_write(
    replicated_stack: tuple[str, str, dict[str, subprocess.Popen[bytes]]],
) -> None:
    """Every GenerateApiKey makes key_service ask cert_service whether the device exists. When
    the cert_service replica it asked dies under the call, key_service asks the other one:
    a write that never reached the killed replica does not fail."""
    url, operator_key, replicas = replicated_stack
    headers = {"X-API-Key": operator_key}
    # Each device may have so many new keys a day (NewApiKeysPerDevice, 20): 48 devices give
    # the four writers room for 960 calls, and a writer that used its devices' room stops.
    devices = [f"writer-{index}" for index in range(48)]
    room = DEFAULT_LIMITS[LimitName.NEW_API_KEYS_PER_DEVICE].burst * len(devices) // 4
    outcomes: Counter[str] = Counter()
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as client:
        provisions = await asyncio.gather(
            *(client.post("/api/v1/ssl/provision", json={"deviceId": d}) for d in devices)
        )
        for provisioned in provisions:
            assert provisioned.status_code == 200, provisioned.text

        async def generate(worker: int) -> None:
            sent = 0
            while not stop.is_set() and sent < room:
                device = devices[(worker + 4 * sent) % len(devices)]
                sent += 1
                reply = await client.post(
                    "/api/v1/device/generate-key",
                    json={"deviceId": device, "deviceName": "writer"},
                )
                outcomes[str(reply.status_code)] += 1
                if reply.status_code != 200:
                    outcomes[reply.text] += 1
                await asyncio.sleep(0.02)

        workers = [asyncio.create_task(generate(worker)) for worker in range(4)]
        await asyncio.sleep(1.0)
        before = sum(outcomes.values())
        os.killpg(replicas["cert_service-0"].pid, signal.SIGKILL)
        await asyncio.sleep(3)
        stop.set()
        await asyncio.gather(*workers)
    total = outcomes["200"] + sum(v for k, v in outcomes.items() if k.isdigit() and k != "200")
    print(f"\n[cert_service kill under writes] {total} GenerateApiKey: {dict(outcomes)}")
    assert total - before > 20
    assert set(outcomes) == {"200"}, outcomes
