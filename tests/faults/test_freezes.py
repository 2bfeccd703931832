"""PostgreSQL frozen at random moments under write load: no answer lies about its write.

Provisions, GenerateApiKey, RotateApiKey and RevokeCertificate run open-loop (each with a
request_id) while
PostgreSQL (the postmaster and every backend) is frozen with SIGSTOP for 1.0-1.2 s at random
moments, `CYCLES` times. Statements and COMMITs in flight at a freeze complete when it ends,
after their callers were answered. Once PostgreSQL answers again and the platform has had
`RESOLUTION` seconds, the test counts, among the calls that were not answered OK:

- ghost provisions: the device has a certificate (a plain retry would be refused);
- keys nobody holds: a key the failed call created is live;
- locked-out rotations: the rotated key stopped (or will stop) working, and its successor
  reached nobody;
- revocations applied although the answer said nothing was (a revocation answered
  OUTCOME_UNKNOWN may be applied: it is never undone, and a retry says so),

and checks that the freezes did hit requests in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf import duration_pb2

from myl.cert.v1 import cert_pb2
from myl.key.v1 import key_pb2
from tests.faults.stack import FaultStack, unique
from tests.fixtures.cert import error_reason

pytestmark = pytest.mark.slow

CYCLES = 8
FREEZE = (1.0, 1.2)  # seconds each freeze lasts
BETWEEN = (0.4, 1.2)  # seconds of normal service between freezes
RATE = 20  # calls per second of each kind (80 writes/s)
IN_FLIGHT = 60  # per kind, at most
CALLER_DEADLINE = 5.0
RESOLUTION = 5.0  # seconds the platform has to resolve what it could not know
ROTATING_DEVICES = 120


@dataclass
class Outcome:
    kind: str
    start: float
    end: float = 0.0
    code: str = ""
    reason: str = ""
    request_id: str = ""
    device_id: str = ""
    key_id: str = ""  # the rotated key

    @property
    def ok(self) -> bool:
        return self.code == "OK"


@dataclass
class Record:
    outcomes: list[Outcome] = field(default_factory=list)
    freezes: list[tuple[float, float]] = field(default_factory=list)


async def run(outcome: Outcome, call: Awaitable[object], record: Record) -> object | None:
    record.outcomes.append(outcome)
    reply: object | None = None
    try:
        reply = await call
        outcome.code = "OK"
    except grpc.aio.AioRpcError as error:
        outcome.code = error.code().name
        outcome.reason = error_reason(error)
    outcome.end = time.monotonic()
    return reply


async def open_loop(
    rate: float, stop: asyncio.Event, start: Callable[[int], Awaitable[None]]
) -> None:
    """`start(n)` `rate` times a second, whether or not earlier ones have answered."""
    tasks: set[asyncio.Task[None]] = set()
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(n: int) -> None:
        async with gate:
            await start(n)

    n = 0
    began = time.monotonic()
    while not stop.is_set():
        n += 1
        task = asyncio.create_task(one(n))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, began + n / rate - time.monotonic()))
    await asyncio.gather(*tasks)


@pytest.mark.timeout(180)  # a 30 s scenario of freezes under load
async def test_random_freezes_under_write_load_leave_no_write_nobody_knows_of(
    stack: FaultStack,
) -> None:
    prefix = unique("frozen")
    record = Record()
    stop = asyncio.Event()
    # Devices whose keys are rotated: one rotation at a time per device, each rotating the
    # key the last successful rotation handed out.
    current: dict[str, str] = {}
    for index in range(ROTATING_DEVICES):
        device, _, key_id = await stack.device_with_key(f"{prefix}-rot{index}")
        current[device] = key_id
    idle = asyncio.Queue[str]()
    for device in current:
        idle.put_nowait(device)
    key_devices = [f"{prefix}-key{index}" for index in range(40)]
    revoked_devices = [f"{prefix}-rev{index}" for index in range(RATE * 30)]
    for device in key_devices + revoked_devices:
        await stack.provision(device)

    async def provision(n: int) -> None:
        request_id = str(uuid.uuid4())
        device = f"{prefix}-new{n}"
        outcome = Outcome("provision", time.monotonic(), request_id=request_id, device_id=device)
        await run(
            outcome,
            stack.cert.ProvisionCertificate(
                cert_pb2.ProvisionCertificateRequest(device_id=device, request_id=request_id),
                timeout=CALLER_DEADLINE,
            ),
            record,
        )

    async def generate(n: int) -> None:
        request_id = str(uuid.uuid4())
        device = key_devices[n % len(key_devices)]
        outcome = Outcome("generate", time.monotonic(), request_id=request_id, device_id=device)
        await run(
            outcome,
            stack.keys.GenerateApiKey(
                key_pb2.GenerateApiKeyRequest(
                    device_id=device, device_name="freeze", request_id=request_id
                ),
                timeout=CALLER_DEADLINE,
            ),
            record,
        )

    async def rotate(n: int) -> None:
        try:
            device = idle.get_nowait()
        except asyncio.QueueEmpty:
            return
        request_id = str(uuid.uuid4())
        key_id = current[device]
        outcome = Outcome(
            "rotate", time.monotonic(), request_id=request_id, device_id=device, key_id=key_id
        )
        reply = await run(
            outcome,
            stack.keys.RotateApiKey(
                key_pb2.RotateApiKeyRequest(
                    key_id=key_id,
                    grace_period=duration_pb2.Duration(seconds=0),
                    request_id=request_id,
                ),
                timeout=CALLER_DEADLINE,
            ),
            record,
        )
        if isinstance(reply, key_pb2.RotateApiKeyResponse):
            current[device] = reply.key.key_id
            idle.put_nowait(device)
        # A failed rotation's device is left out: its key's state is counted at the end.

    async def revoke(n: int) -> None:
        request_id = str(uuid.uuid4())
        device = revoked_devices[n % len(revoked_devices)]
        outcome = Outcome("revoke", time.monotonic(), request_id=request_id, device_id=device)
        await run(
            outcome,
            stack.cert.RevokeCertificate(
                cert_pb2.RevokeCertificateRequest(device_id=device, request_id=request_id),
                timeout=CALLER_DEADLINE,
            ),
            record,
        )

    async def freezes() -> None:
        rng = random.Random()
        for _ in range(CYCLES):
            await asyncio.sleep(rng.uniform(*BETWEEN))
            frozen_at = time.monotonic()
            stack.hang("postgres")
            try:
                await asyncio.sleep(rng.uniform(*FREEZE))
            finally:
                stack.resume("postgres")
            record.freezes.append((frozen_at, time.monotonic()))
        await asyncio.sleep(rng.uniform(*BETWEEN))
        stop.set()

    await asyncio.gather(
        open_loop(RATE, stop, provision),
        open_loop(RATE, stop, generate),
        open_loop(RATE, stop, rotate),
        open_loop(RATE, stop, revoke),
        freezes(),
    )
    await asyncio.sleep(RESOLUTION)

    failed = [o for o in record.outcomes if not o.ok]
    hit = [
        o
        for o in record.outcomes
        if any(start < o.end and o.start < end for start, end in record.freezes)
    ]
    ghosts = await stack.count(
        "SELECT count(*) FROM device_certificates WHERE device_id = ANY(%s)",
        [o.device_id for o in failed if o.kind == "provision"],
    )
    unheld = await stack.count(
        "SELECT count(*) FROM device_api_keys WHERE request_id = ANY(%s::uuid[]) "
        "AND (revoked_at IS NULL OR revoked_at > now())",
        [o.request_id for o in failed if o.kind in ("generate", "rotate")],
    )
    locked_out = await stack.count(
        "SELECT count(*) FROM device_api_keys WHERE id = ANY(%s::uuid[]) "
        "AND revoked_at IS NOT NULL",
        [o.key_id for o in failed if o.kind == "rotate"],
    )
    # Only an answer that said the outcome was unknown may leave a revocation applied.
    false_revocations = await stack.count(
        "SELECT count(*) FROM device_certificates WHERE device_id = ANY(%s) AND status = 'revoked'",
        [o.device_id for o in failed if o.kind == "revoke" and o.reason != "OUTCOME_UNKNOWN"],
    )
    undone_keys = await stack.count(
        "SELECT count(*) FROM api_key_audit_events WHERE device_id LIKE %s "
        "AND action = 'revoke' AND reason LIKE '%%OUTCOME_UNKNOWN%%'",
        f"{prefix}%",
    )
    codes = Counter(
        f"{o.kind}:{o.code}{':' + o.reason if o.reason else ''}" for o in record.outcomes
    )
    print(
        f"\n[freezes] {len(record.freezes)} freezes, {len(record.outcomes)} writes, "
        f"{len(hit)} in flight at a freeze, {len(failed)} not OK: {dict(sorted(codes.items()))}"
        f"\n[freezes] ghost provisions {ghosts}, keys nobody holds {unheld}, "
        f"locked-out rotations {locked_out}, revocations said not applied but applied "
        f"{false_revocations}; keys undone by the platform {undone_keys}"
    )
    assert len(record.freezes) == CYCLES
    assert [o for o in hit if not o.ok], "the freezes hit no request in flight"
    assert (ghosts, unheld, locked_out, false_revocations) == (0, 0, 0, 0)
