"""Issue 8, point 1: once RevokeApiKey has returned, the key is never VALID again.

The hard case: the key's VALID record sits in Redis, Redis hangs while the key is revoked (the
cache cannot be invalidated then), and key_service restarts before Redis returns, so whatever it
meant to do about the cache only survives if it was made durable.
"""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import httpx
import pytest

from myl.key.v1 import key_pb2
from tests.faults.load import VALID
from tests.faults.stack import FaultStack
from tests.faults.test_monitoring import scrape, value
from tests.fixtures.wait import eventually

pytestmark = pytest.mark.slow


async def watch_key(
    stack: FaultStack, api_key: str, device_id: str, until: asyncio.Event
) -> list[tuple[str, str]]:
    """Verify the key over gRPC and use it through the gateway until `until` is set.

    Returns (how, answer) for every attempt: a VerifyApiKey result or gRPC code, an HTTP
    status.
    """
    answers: list[tuple[str, str]] = []
    url = f"{stack.gateway_url}/api/v1/devices/{device_id}/certificate"
    async with httpx.AsyncClient(timeout=3) as http:
        while not until.is_set():
            try:
                reply = await stack.keys.VerifyApiKey(
                    key_pb2.VerifyApiKeyRequest(api_key=api_key), timeout=3
                )
                answers.append(("grpc", key_pb2.VerifyResult.Name(reply.result)))
            except grpc.aio.AioRpcError as err:
                answers.append(("grpc", err.code().name))
            try:
                response = await http.get(url, headers={"X-API-Key": api_key})
                answers.append(("rest", str(response.status_code)))
            except httpx.HTTPError as err:
                answers.append(("rest", type(err).__name__))
            await asyncio.sleep(0.02)
    return answers


async def test_revoked_key_stays_revoked_across_redis_hang_and_key_service_restart(
    stack: FaultStack,
) -> None:
    device_id, api_key, key_id = await stack.device_with_key("revoke")
    assert await stack.verify(api_key) == VALID  # now cached in Redis as VALID

    stack.hang("redis")
    started = time.monotonic()
    revoked = await stack.keys.RevokeApiKey(
        key_pb2.RevokeApiKeyRequest(key_id=key_id, reason="fault suite"), timeout=10
    )
    revoke_seconds = time.monotonic() - started
    assert revoked.key.status == key_pb2.API_KEY_STATUS_REVOKED

    # From here on, not one VALID answer, whatever happens to Redis and key_service.
    done = asyncio.Event()
    watcher = asyncio.create_task(watch_key(stack, api_key, device_id, done))
    try:
        # SIGKILL: nothing the process held in memory survives (a graceful stop could not
        # write to the hung Redis either).
        await stack.stop_service("key_service", signal.SIGKILL)
        await stack.start_service("key_service")  # while Redis is still hung
        await asyncio.sleep(0.5)
        stack.resume("redis")
        await stack.wait_gateway_healthy()
        # Watched until the circuit has closed (key_service's cache guard has applied the log
        # to Redis) and the checks read the key from Redis again: when a stale VALID would show.

        async def circuit_closed() -> bool:
            return await stack.metric("key_service", "myl_redis_circuit_open") == 0

        async def cache_hits() -> float:
            return value(
                await scrape(stack, "key_service"),
                "myl_cache_total",
                namespace="api_key",
                result="hit",
            )

        await eventually(circuit_closed, "key_service's Redis circuit closes")
        hits = await cache_hits()

        async def cache_read_again() -> bool:
            return await cache_hits() > hits

        await eventually(cache_read_again, "key_service reads the key from Redis again")
    finally:
        done.set()
        answers = await watcher

    valid = [how for how, answer in answers if answer in (VALID, "200")]
    print(
        f"\n[revocation] revoke took {revoke_seconds:.3f}s with Redis hung; "
        f"{len(answers)} checks after it, {len(valid)} VALID/200; last answers {answers[-4:]}"
    )
    assert not valid, f"a revoked key was accepted {len(valid)} times of {len(answers)}"
    grpc_answers = [answer for how, answer in answers if how == "grpc"]
    # The check really reached key_service after Redis was back.
    assert grpc_answers[-1] == "VERIFY_RESULT_REVOKED", grpc_answers[-5:]
