"""Every metric of the monitoring list moves when what it measures happens.

The real stack (services as processes, Envoy, PostgreSQL, Redis); each metric is read from the
services' own Prometheus endpoints (METRICS_PORT) before and after the thing it counts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from myl.cert.v1 import cert_pb2
from tests.faults.stack import SERVICES, FaultStack, ServiceName, unique

pytestmark = pytest.mark.slow

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]


async def scrape(stack: FaultStack, service: ServiceName) -> Samples:
    reply = await stack.http.get(f"http://127.0.0.1:{stack.metrics_ports[service]}/metrics")
    reply.raise_for_status()
    samples: Samples = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


async def eventually(check: Callable[[], Awaitable[bool]], limit: float = 20.0) -> None:
    """Sampled gauges move within METRICS_INTERVAL (1 s here, 5 s by default)."""
    deadline = time.monotonic() + limit
    while not await check():
        assert time.monotonic() < deadline, "the metric did not move in time"
        await asyncio.sleep(0.2)


async def test_request_path_metrics_move(stack: FaultStack) -> None:
    before = {service: await scrape(stack, service) for service in SERVICES}
    device, device_key, _ = await stack.device_with_key("monitored")
    _, slow_key, _ = await stack.device_with_key("monitored-slow", rate_limit=1)
    admin = {"X-API-Key": stack.operator_key}
    url = stack.gateway_url
    http = stack.http
    statuses = [
        (
            await http.get(
                f"{url}/api/v1/devices/{device}/certificate", headers={"X-API-Key": device_key}
            )
        ).status_code,
        (
            await http.get(
                f"{url}/api/v1/devices/{device}/certificate", headers={"X-API-Key": device_key}
            )
        ).status_code,
        (
            await http.get(
                f"{url}/api/v1/devices/{device}/certificate", headers={"X-API-Key": "myl_wrong"}
            )
        ).status_code,
        (
            await http.get(f"{url}/api/v1/ssl/certificates", headers={"X-API-Key": device_key})
        ).status_code,
        (
            await http.get(
                f"{url}/api/v1/devices/{device}/certificate", headers={"X-API-Key": slow_key}
            )
        ).status_code,
        (
            await http.get(
                f"{url}/api/v1/devices/{device}/certificate", headers={"X-API-Key": slow_key}
            )
        ).status_code,
        (
            await http.post(
                f"{url}/api/v1/devices/{device}/certificate:renew", headers=admin, json={}
            )
        ).status_code,
        (
            await http.get(f"{url}/api/v1/devices/nobody-{device}/certificate", headers=admin)
        ).status_code,
    ]
    assert statuses == [200, 200, 401, 403, 403, 429, 200, 404]

    def check(after: dict[ServiceName, Samples]) -> None:
        def moved(who: ServiceName, name: str, **labels: str) -> float:
            return value(after[who], name, **labels) - value(before[who], name, **labels)

        key: ServiceName = "key_service"
        cert: ServiceName = "cert_service"
        # Gateway decisions by result: the Check RPC itself answered OK every time.
        assert moved(key, "myl_gateway_decisions_total", result="allowed") >= 5
        assert moved(key, "myl_gateway_decisions_total", result="unauthenticated") >= 1
        assert moved(key, "myl_gateway_decisions_total", result="forbidden") >= 1
        assert moved(key, "myl_gateway_decisions_total", result="rate_limited") >= 1
        # Errors per code, from the services' own RPCs.
        assert moved(cert, "myl_rpc_total", method="GetCertificate", code="NOT_FOUND") >= 1
        assert moved(cert, "myl_rpc_total", method="GetCertificate", code="PERMISSION_DENIED") >= 1
        assert moved(cert, "myl_rpc_total", method="GetCertificate", code="OK") >= 2
        for service in SERVICES:
            # Redis latency, query latency and pool use, on both services.
            assert moved(service, "myl_redis_duration_seconds_count") > 0, service
            assert moved(service, "myl_db_query_duration_seconds_count", service=service) > 0
            assert (
                value(after[service], "myl_db_pool_connections", service=service, state="size") >= 1
            )
            assert value(after[service], "myl_redis_up", service=service) == 1
            assert value(after[service], "myl_redis_memory_used_bytes", service=service) > 0
            assert value(after[service], "myl_redis_connected_clients", service=service) >= 1
        # Cache hits and misses per cache.
        assert moved(cert, "myl_cache_total", namespace="cert", result="hit") >= 1
        assert (
            moved(cert, "myl_cache_total", result="miss")
            + moved(cert, "myl_cache_total", result="negative_hit")
            >= 1
        )
        assert moved(key, "myl_cache_total", namespace="api_key", result="hit") >= 1
        assert moved(key, "myl_cache_total", namespace="api_key", result="miss") >= 1
        # Issuance and renewal outcomes; limit decisions.
        assert (
            moved(cert, "myl_certificate_operations_total", operation="provision", outcome="ok")
            >= 2
        )
        assert moved(cert, "myl_certificate_operations_total", operation="renew", outcome="ok") == 1
        assert (
            moved(
                cert,
                "myl_limit_decisions_total",
                limit="CertificatesPerDeviceName",
                result="allowed",
            )
            >= 2
        )
        assert (
            moved(key, "myl_limit_decisions_total", limit="NewApiKeysPerDevice", result="allowed")
            >= 2
        )
        assert (
            moved(
                key,
                "myl_limit_decisions_total",
                limit="FailedVerificationsPerAddress",
                result="allowed",
            )
            >= 1
        )

    # Some move after the answers were sent (the samplers' gauges every METRICS_INTERVAL, a
    # timed flush's queries): scrape until every one has moved.
    deadline = time.monotonic() + 20
    while True:
        after = {service: await scrape(stack, service) for service in SERVICES}
        try:
            check(after)
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.2)


async def test_fleet_gauges_move(stack: FaultStack) -> None:
    samples = await scrape(stack, "cert_service")
    assert value(samples, "myl_ca_certificate_not_after_timestamp_seconds") > time.time()
    expiring_before = value(samples, "myl_certificates_expiring_soon", auto_renewal="true")
    device = unique("expiring")
    await stack.cert.ProvisionCertificate(
        cert_pb2.ProvisionCertificateRequest(device_id=device, validity_days=3), timeout=10
    )

    async def expiring_counted() -> bool:
        now = await scrape(stack, "cert_service")
        return value(now, "myl_certificates_expiring_soon", auto_renewal="true") > expiring_before

    await eventually(expiring_counted)
    # Past its renewal point, not renewed (as if the lifecycle worker had stopped).
    async with await psycopg.AsyncConnection.connect(stack.conninfo, autocommit=True) as conn:
        await conn.execute(
            "UPDATE device_certificates SET issued_at = now() - interval '10 days',"
            " expires_at = now() + interval '1 day' WHERE device_id = %s",
            (device,),
        )

    async def backlog_counted() -> bool:
        now = await scrape(stack, "cert_service")
        return value(now, "myl_certificates_renewal_backlog") >= 1

    await eventually(backlog_counted)


async def test_outbox_lag_moves_while_key_service_is_away(stack: FaultStack) -> None:
    device = unique("outboxed")
    await stack.provision(device)
    await stack.stop_service("key_service")
    await stack.cert.DeleteDevice(cert_pb2.DeleteDeviceRequest(device_id=device), timeout=10)

    async def lagging() -> bool:
        now = await scrape(stack, "cert_service")
        return (
            value(now, "myl_outbox_pending_events") >= 1
            and value(now, "myl_outbox_lag_seconds") > 1
        )

    await eventually(lagging)
    await stack.start_service("key_service")

    async def delivered() -> bool:
        now = await scrape(stack, "cert_service")
        return (
            value(now, "myl_outbox_pending_events") == 0
            and value(now, "myl_outbox_lag_seconds") == 0
        )

    await eventually(delivered)


async def test_redis_status_follows_redis(stack: FaultStack) -> None:
    async def redis_up(expected: float) -> bool:
        for service in SERVICES:
            samples = await scrape(stack, service)
            if value(samples, "myl_redis_up", service=service) != expected:
                return False
        return True

    await stack.kill_redis()
    await eventually(lambda: redis_up(0))
    await stack.start_redis()
    await eventually(lambda: redis_up(1))

    async def breakers_closed() -> bool:
        for service in SERVICES:
            if value(await scrape(stack, service), "myl_redis_circuit_open") != 0:
                return False
        return True

    await eventually(breakers_closed)  # leave the stack as settled as it was found
