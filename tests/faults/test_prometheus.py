"""A real Prometheus scrapes the stack with the shipped config and rules, and alerts.

The test starts Debian's `prometheus` on loopback with `deploy/prometheus/prometheus.yml`
pointed at the stack's ports, scraping every second, and `deploy/prometheus/alerts.yml` with
every `for:` shortened to two seconds (the expressions are the shipped ones). It sees the three
targets up, then stops key_service and waits for MylServiceDown to fire for it, then starts it
again and waits for the alert to clear.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator

import httpx
import pytest

from tests.faults.stack import FaultStack
from tests.fixtures.prometheus import prometheus_config, running_prometheus

pytestmark = pytest.mark.slow

SHORT_FOR = "2s"


@pytest.fixture
def prometheus(stack: FaultStack) -> Iterator[str]:
    directory = stack.directory / f"prometheus-{time.monotonic_ns()}"
    directory.mkdir()
    targets = {
        "cert_service": [f"127.0.0.1:{stack.metrics_ports['cert_service']}"],
        "key_service": [f"127.0.0.1:{stack.metrics_ports['key_service']}"],
        "gateway": [f"127.0.0.1:{stack.admin_port}"],
    }
    with running_prometheus(prometheus_config(directory, targets, rule_for=SHORT_FOR)) as url:
        yield url


async def until(check: Callable[[], Awaitable[bool]], limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while True:
        # Not yet listening, or still starting (a 503 whose body is not JSON).
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            if await check():
                return
        assert time.monotonic() < deadline, f"not within {limit}s: {what}"
        await asyncio.sleep(0.25)


@pytest.mark.timeout(180)  # waits for scrapes and for an alert's `for:` period
async def test_prometheus_scrapes_the_stack_and_alerts_when_a_service_stops(
    stack: FaultStack, prometheus: str
) -> None:
    http = stack.http

    async def targets_up() -> bool:
        reply = await http.get(f"{prometheus}/api/v1/targets")
        active = reply.json()["data"]["activeTargets"]
        health = {target["labels"]["job"]: target["health"] for target in active}
        return health == {"cert_service": "up", "key_service": "up", "gateway": "up"}

    async def key_service_down_firing() -> bool:
        reply = await http.get(f"{prometheus}/api/v1/alerts")
        return any(
            alert["labels"]["alertname"] == "MylServiceDown"
            and alert["labels"]["job"] == "key_service"
            and alert["state"] == "firing"
            for alert in reply.json()["data"]["alerts"]
        )

    async def ingested(query: str) -> bool:
        reply = await http.get(f"{prometheus}/api/v1/query", params={"query": query})
        return bool(reply.json()["data"]["result"])

    await until(targets_up, 30, "all three targets up")
    assert await ingested("myl_redis_up == 1")
    assert await ingested('envoy_server_live{job="gateway"} == 1')
    assert not await key_service_down_firing()

    await stack.stop_service("key_service")
    await until(key_service_down_firing, 30, "MylServiceDown firing for key_service")

    await stack.start_service("key_service")

    async def resolved() -> bool:
        return not await key_service_down_firing()

    await until(resolved, 30, "MylServiceDown resolved")
