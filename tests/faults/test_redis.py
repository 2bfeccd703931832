"""Issue 8, points 6 and 7: Redis hung and Redis restarted.

- A hang costs the wave of requests in flight when it starts, then only the breaker's probes;
  every request still succeeds; the breaker gauge is back to 0 soon after Redis returns.
- A Redis restart (its rate-limit state gone) hands a key at most one extra burst.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from myl.key.v1 import key_pb2
from tests.faults.load import Kind, Load, codes, load_target
from tests.faults.stack import (
    REDIS_BREAKER_RESET,
    REDIS_TIMEOUT,
    SERVICES,
    FaultStack,
)

pytestmark = pytest.mark.slow

HANG = 3.0  # seconds Redis stays hung: the breaker opens, half-opens, and probes
SLOW = 0.2  # seconds: an answer slower than this paid for the hang
# The breaker opens after a few failures: requests that reached Redis before then all wait for
# the socket timeout, and then go to PostgreSQL together, which takes a moment to drain on a
# busy machine. After that, at most one probe per service per reset period may be slow.
FIRST_WAVE = REDIS_TIMEOUT + 0.75
PROBES = len(SERVICES) * (int(HANG / REDIS_BREAKER_RESET) + 1)
CLOSED_WITHIN = 5.0  # seconds after Redis returns, for myl_redis_circuit_open to read 0
GAUGE = "myl_redis_circuit_open"
# 100 requests/s: with Redis hung every one of them is served from PostgreSQL, and on a 2-core
# machine shared with other work (load average 6), 150/s already queued behind that fallback.
HANG_LOAD: dict[Kind, float] = {"get": 40, "verify": 40, "rest": 20}


async def gauges(stack: FaultStack) -> dict[str, float | None]:
    return {service: await stack.metric(service, GAUGE) for service in SERVICES}


async def test_redis_hang_costs_few_slow_requests_and_the_breaker_closes_after(
    stack: FaultStack,
) -> None:
    target = await load_target(stack, "redis-hang")
    async with Load(stack, target, HANG_LOAD) as load:
        await asyncio.sleep(1.0)
        stack.hang("redis")
        hung = time.monotonic()
        await asyncio.sleep(HANG)
        during = await gauges(stack)
        stack.resume("redis")
        resumed = time.monotonic()
        while True:
            after = await gauges(stack)
            closed_after = time.monotonic() - resumed
            if all(value == 0 for value in after.values()) or closed_after > CLOSED_WITHIN:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)

    in_hang = load.select(started_after=hung, started_before=resumed)
    slow = [c for c in in_hang if c.seconds > SLOW]
    first_wave = [c for c in slow if c.start < hung + FIRST_WAVE]
    later = [c for c in slow if c.start >= hung + FIRST_WAVE]
    failures = [c for c in load.calls if not c.succeeded]
    # A busy machine has slow answers without any fault: allow the share seen before the hang.
    before = load.select(started_after=load.started + 0.3, started_before=hung)
    background = sum(c.seconds > SLOW for c in before) / max(1, len(before))
    allowed = PROBES + round(2 * background * len(in_hang))
    print(
        f"\n[redis hang {HANG:g}s] {len(load.calls)} calls at {load.rate():.0f}/s, "
        f"{len(in_hang)} during the hang; slower than {SLOW:g}s: {len(slow)} "
        f"({100 * len(slow) / max(1, len(in_hang)):.1f}%), {len(first_wave)} in the first "
        f"{FIRST_WAVE:g}s, {len(later)} after (allowed {allowed}; {100 * background:.1f}% "
        f"slow before the hang); slowest "
        f"{max((c.seconds for c in in_hang), default=0):.3f}s; failures {codes(failures)}\n"
        f"  {GAUGE}: during the hang {during}, after {after} "
        f"({closed_after:.2f}s after Redis returned)"
    )
    # Slow / all calls by when they started: waves (probes) or a slow fallback throughout?
    buckets = [
        load.select(started_after=hung + t / 4, started_before=hung + (t + 1) / 4)
        for t in range(int(HANG * 4))
    ]
    print(
        "  slow/all per 0.25s of the hang: "
        + " ".join(f"{sum(c.seconds > SLOW for c in b)}/{len(b)}" for b in buckets)
    )
    print(
        "  slow after the first wave by kind: "
        + str(codes(c for c in later))
        + f"; their median time {sorted(c.seconds for c in later)[len(later) // 2]:.3f}s"
        if later
        else "  no slow calls after the first wave"
    )
    for call in failures[:5]:
        print(f"  failed: {call.kind} {call.code} {call.result} {call.start - hung:+.2f}s")
    assert not failures, f"requests failed: {codes(failures)}"
    assert len(later) <= allowed, f"{len(later)} requests paid for the hang after the first wave"
    assert all(value == 0 for value in after.values()), f"{GAUGE} still {after}"


RATE_LIMIT = 20  # requests per minute, and the burst


async def test_redis_restart_hands_a_rate_limited_key_at_most_one_extra_burst(
    stack: FaultStack,
) -> None:
    _, api_key, _ = await stack.device_with_key("limited", rate_limit=RATE_LIMIT)
    answers: list[tuple[float, str]] = []
    stop = asyncio.Event()

    async def verify_steadily() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                reply = await stack.keys.VerifyApiKey(
                    key_pb2.VerifyApiKeyRequest(api_key=api_key), timeout=3
                )
                answers.append((started, key_pb2.VerifyResult.Name(reply.result)))
            except grpc.aio.AioRpcError as err:
                answers.append((started, err.code().name))
            await asyncio.sleep(0.025)

    verifier = asyncio.create_task(verify_steadily())
    try:
        await asyncio.sleep(1.0)
        await stack.kill_redis()
        killed = time.monotonic()
        await asyncio.sleep(1.0)
        await stack.start_redis()
        back = time.monotonic()
        # Verify on for a while longer: the cache guard, which retries Redis every
        # REDIS_BREAKER_RESET, closes the circuit once it has applied the invalidation log,
        # and the limits are Redis's again for the rest of the window.
        await asyncio.sleep(REDIS_BREAKER_RESET + 0.5)
    finally:
        stop.set()
        await verifier

    elapsed = answers[-1][0] - answers[0][0]
    admitted = [t for t, answer in answers if answer == "VERIFY_RESULT_VALID"]
    allowed = 2 * RATE_LIMIT + RATE_LIMIT * elapsed / 60 + 1
    print(
        f"\n[rate limit across a Redis restart] limit {RATE_LIMIT}/min: {len(admitted)} of "
        f"{len(answers)} verifies admitted over {elapsed:.1f}s (allowed {allowed:.1f}); "
        f"before the kill {sum(t < killed for t in admitted)}, while Redis was away "
        f"{sum(killed <= t < back for t in admitted)}, after {sum(t >= back for t in admitted)}"
    )
    assert {answer for _, answer in answers} <= {
        "VERIFY_RESULT_VALID",
        "VERIFY_RESULT_RATE_LIMITED",
    }, sorted({answer for _, answer in answers})
    assert len(admitted) >= RATE_LIMIT, "the first burst was not admitted"
    assert len(admitted) <= allowed, f"{len(admitted)} admitted, more than {allowed:.0f}"
