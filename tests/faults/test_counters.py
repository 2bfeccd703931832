"""Issue 8, points 5 and 6: counters and stops under load.

Counted against PostgreSQL: `access_count` of the device read by GetCertificate equals the OK
answers, `usage_count` of the key verified equals the VALID answers. The services flush every
`FLUSH_INTERVAL` (1 s) here.

- The counts reach the database within two flush intervals.
- A graceful stop (SIGTERM) under load fails no RPC the service had accepted and loses no count.
- A SIGKILL loses at most what was counted since the last flush: one interval's requests.
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from myl.cert.v1 import cert_pb2
from myl.key.v1 import key_pb2
from tests.faults.load import UNLIMITED, Call, Kind, Load, Target, codes, load_target
from tests.faults.stack import FLUSH_INTERVAL, SERVICES, FaultStack, ServiceName, unique

pytestmark = pytest.mark.slow

RATES: dict[Kind, float] = {"get": 60.0, "verify": 60.0, "rest": 30.0}
# A request started this long before SIGTERM had reached the service (answers take a few ms).
ACCEPTED_BEFORE = 0.1


async def access_count(stack: FaultStack, device_id: str) -> int:
    return await stack.count(
        "SELECT access_count FROM device_certificates WHERE device_id = %s", device_id
    )


async def usage_count(stack: FaultStack, api_key_id: str) -> int:
    return await stack.count(
        "SELECT usage_count FROM device_api_keys WHERE id = %s::uuid", api_key_id
    )


async def key_id_of(stack: FaultStack, api_key: str) -> str:
    reply = await stack.keys.VerifyApiKey(
        key_pb2.VerifyApiKeyRequest(api_key=api_key, dry_run=True), timeout=5
    )
    return reply.key_id


async def wait_for_counts(
    stack: FaultStack, device_id: str, key_id: str, expected: tuple[int, int], limit: float
) -> tuple[tuple[int, int], float]:
    """Poll (access_count, usage_count) until they equal `expected` or `limit` seconds pass."""
    started = time.monotonic()
    while True:
        counts = (await access_count(stack, device_id), await usage_count(stack, key_id))
        waited = time.monotonic() - started
        if counts == expected or waited > limit:
            return counts, waited
        await asyncio.sleep(0.1)


async def test_counts_reach_the_database_within_two_flush_intervals(stack: FaultStack) -> None:
    device_id = unique("counted")
    await stack.provision(device_id)
    _, api_key, key_id = await stack.device_with_key("counted-key", rate_limit=UNLIMITED)
    requests = 50
    for _ in range(requests):
        await stack.cert.GetCertificate(
            cert_pb2.GetCertificateRequest(device_id=device_id), timeout=3
        )
        assert await stack.verify(api_key) == "VERIFY_RESULT_VALID"

    counts, waited = await wait_for_counts(
        stack, device_id, key_id, (requests, requests), limit=10 * FLUSH_INTERVAL
    )
    print(
        f"\n[flush] access_count, usage_count = {counts} of {requests} each, "
        f"{waited:.2f}s after the last request (flush interval {FLUSH_INTERVAL:g}s)"
    )
    assert counts == (requests, requests)
    assert waited <= 2 * FLUSH_INTERVAL + 0.5, f"counts reached the database {waited:.1f}s late"


async def counted_target(stack: FaultStack, prefix: str) -> tuple[Target, str]:
    """A load target whose GetCertificate device has no key (GenerateApiKey reads the
    certificate too, which would count), and the verified key's id."""
    target = await load_target(stack, prefix)
    device_id = unique(f"{prefix}-read")
    await stack.provision(device_id)
    target = Target(device_id, target.verify_key, target.rest_device_id, target.rest_key)
    return target, await key_id_of(stack, target.verify_key)


# The services' SHUTDOWN_DRAIN_DELAY (their default): after SIGTERM they keep serving this long.
DRAIN_DELAY = 1.5


def failed(calls: list[Call]) -> list[Call]:
    return [call for call in calls if not call.succeeded]


async def test_sigterm_under_load_fails_no_accepted_rpc_and_loses_no_count(
    stack: FaultStack,
) -> None:
    """Both services get SIGTERM at once (a host going down), under load, and start again."""
    target, key_id = await counted_target(stack, "drain")
    async with Load(stack, target, RATES) as load:
        await asyncio.sleep(1.0)
        terminated = time.monotonic()
        statuses = await asyncio.gather(
            *(stack.stop_service(service, signal.SIGTERM) for service in SERVICES)
        )
        exited = time.monotonic()
        await asyncio.gather(*(stack.start_service(service) for service in SERVICES))
        serving = time.monotonic()
        await asyncio.sleep(0.5)
    ok_gets = sum(call.succeeded for call in load.select("get"))
    valid = sum(call.succeeded for call in load.select("verify"))
    counts, _ = await wait_for_counts(
        stack, target.device_id, key_id, (ok_gets, valid), limit=3 * FLUSH_INTERVAL
    )

    accepted = load.select(started_before=terminated - ACCEPTED_BEFORE)
    edge = load.select(started_after=terminated - ACCEPTED_BEFORE, started_before=terminated)
    later = load.select(started_after=terminated)
    later_grpc = [c for c in failed(later) if c.kind != "rest"]
    print(
        f"\n[SIGTERM both services] {len(load.calls)} calls at {load.rate():.0f}/s; exit "
        f"statuses {dict(zip(SERVICES, statuses, strict=True))} within "
        f"{exited - terminated:.2f}s, serving again {serving - terminated:.2f}s after SIGTERM\n"
        f"  accepted before SIGTERM: {len(accepted)}, failed {codes(failed(accepted))}\n"
        f"  started in the last {ACCEPTED_BEFORE:g}s before it: {len(edge)}, "
        f"failed {codes(failed(edge))}\n"
        f"  started after it: {len(later)}, failed {codes(failed(later))}\n"
        f"  access_count {counts[0]} for {ok_gets} OK GetCertificate, usage_count {counts[1]} "
        f"for {valid} VALID verifies"
    )
    assert statuses == [0, 0], f"exit statuses on SIGTERM: {statuses}"
    assert not failed(accepted), f"RPCs accepted before SIGTERM failed: {codes(failed(accepted))}"
    # While the only replicas are away, gRPC callers get the code they retry on, nothing else;
    # except that a call arriving just as a server stops accepting (the drain delay is over)
    # may be cancelled by gRPC itself before any handler saw it: never accepted, and through
    # the gateway such a reset read is retried on another replica.
    refused_from = terminated + DRAIN_DELAY - 0.1
    unexpected = [
        c
        for c in later_grpc
        if c.code != "UNAVAILABLE" and not (c.code == "CANCELLED" and c.start >= refused_from)
    ]
    assert not unexpected, [
        f"{c.kind} {c.code}, started {c.start - terminated:+.3f}s after SIGTERM" for c in unexpected
    ]
    assert counts == (ok_gets, valid), "counts lost in a graceful stop"


async def test_sigkill_loses_at_most_one_flush_interval_of_counts(stack: FaultStack) -> None:
    target, key_id = await counted_target(stack, "killed")
    async with Load(stack, target, {"get": RATES["get"], "verify": RATES["verify"]}) as load:
        await asyncio.sleep(2 * FLUSH_INTERVAL)
        killed = time.monotonic()
        await asyncio.gather(*(stack.stop_service(service, signal.SIGKILL) for service in SERVICES))
        await asyncio.gather(*(stack.start_service(service) for service in SERVICES))
        await asyncio.sleep(0.5)
    # The restarted processes write what they counted when they stop, and a graceful stop
    # loses no count (the SIGTERM test): once they have exited, the counts read are final.
    await asyncio.gather(*(stack.restart_service(service) for service in SERVICES))
    counted: dict[Kind, int] = {
        "get": await access_count(stack, target.device_id),
        "verify": await usage_count(stack, key_id),
    }
    # What one interval can hold: the answers of the last interval before the kill, with
    # half an interval more for the flush itself (it runs on a busy 2-core machine).
    window = 1.5 * FLUSH_INTERVAL
    problems = []
    served_by: dict[Kind, ServiceName] = {"get": "cert_service", "verify": "key_service"}
    for kind, service in served_by.items():
        succeeded = [call for call in load.select(kind) if call.succeeded]
        lost = len(succeeded) - counted[kind]
        last_interval = [c for c in succeeded if killed - window <= c.end <= killed]
        # Counted but never answered: the kill cut the answer off.
        cut_off = [c for c in load.select(kind, started_before=killed) if not c.succeeded]
        print(
            f"\n[SIGKILL {service}] {len(succeeded)} successful {kind} calls, "
            f"{counted[kind]} counted: {lost} lost; {len(last_interval)} answered in the last "
            f"{window:g}s before the kill"
        )
        if lost > len(last_interval):
            problems.append(f"{service} lost {lost} counts, more than one flush interval")
        if -lost > len(cut_off):
            problems.append(f"{service} counted {-lost} more than its successful calls")
    assert not problems, problems
