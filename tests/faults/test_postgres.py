"""Issue 8, points 2 and 3: PostgreSQL down, hung, killed.

Point 2: a provision whose caller gave up leaves nothing behind (rows counted against OK
answers), and a retry with the same `request_id` gets a working certificate.
Point 3: while PostgreSQL is down every RPC that needs it answers UNAVAILABLE within 1 s, cached
reads go on, and writes work again within 2 s of PostgreSQL accepting connections.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from google.protobuf.message import Message

from myl.cert.v1 import cert_pb2
from myl.key.v1 import key_pb2
from tests.faults.stack import FaultStack, unique

pytestmark = pytest.mark.slow

ABANDONED = 20  # provisions whose callers give up during one outage
CALLER_DEADLINE = 0.5  # seconds those callers wait
REQUEST_ID = "request_id"  # the AIP-155 field of mutating requests

M = TypeVar("M", bound=Message)
R = TypeVar("R")


async def code_of(call: Awaitable[object]) -> str:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code().name
    return "OK"


async def timed(call: Awaitable[object]) -> tuple[str, float]:
    started = time.monotonic()
    code = await code_of(call)
    return code, time.monotonic() - started


async def wait_until_provision_works(stack: FaultStack, prefix: str, limit: float) -> float:
    """Provision fresh devices until one succeeds; returns the seconds that took."""
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        code = await code_of(
            stack.cert.ProvisionCertificate(
                cert_pb2.ProvisionCertificateRequest(device_id=f"{prefix}-probe-{attempt}"),
                timeout=2,
            )
        )
        if code == "OK":
            return time.monotonic() - started
        assert time.monotonic() - started < limit, f"no provision succeeded in {limit}s ({code})"
        await asyncio.sleep(0.05)


async def take_postgres_away(stack: FaultStack, fault: Literal["sigstop", "sigkill"]) -> None:
    if fault == "sigstop":
        stack.hang("postgres")
    else:
        await stack.stop_postgres(kill=True)


async def bring_postgres_back(stack: FaultStack, fault: Literal["sigstop", "sigkill"]) -> None:
    if fault == "sigstop":
        stack.resume("postgres")
    else:
        await stack.start_postgres()


@pytest.mark.parametrize("fault", ["sigstop", "sigkill"])
async def test_provisions_abandoned_during_postgres_outage_leave_no_rows(
    stack: FaultStack, fault: Literal["sigstop", "sigkill"]
) -> None:
    prefix = unique(f"gone-{fault}")
    devices = [f"{prefix}-{i}" for i in range(ABANDONED)]

    async def abandoned(index: int, device_id: str) -> str:
        await asyncio.sleep(index * 0.05)  # spread over a second of the outage
        return await code_of(
            stack.cert.ProvisionCertificate(
                cert_pb2.ProvisionCertificateRequest(device_id=device_id),
                timeout=CALLER_DEADLINE,
            )
        )

    await take_postgres_away(stack, fault)
    try:
        answers = await asyncio.gather(*(abandoned(i, d) for i, d in enumerate(devices)))
    finally:
        await bring_postgres_back(stack, fault)
    # Whatever was held for those callers has had every chance to commit by now: a later
    # provision has gone through, and another second has passed.
    recovery = await wait_until_provision_works(stack, prefix, limit=15)
    await asyncio.sleep(1.0)

    rows = await stack.count(
        "SELECT count(*) FROM device_certificates WHERE device_id = ANY(%s)", devices
    )
    ok = answers.count("OK")
    print(
        f"\n[abandoned provisions/{fault}] answers {dict(Counter(answers))}; rows {rows}; "
        f"first provision after recovery took {recovery:.2f}s"
    )
    assert rows == ok, f"{rows} rows for {ok} OK answers: {rows - ok} callers never saw theirs"


def message_with_request_id(message: M, request_id: str) -> M:
    setattr(message, REQUEST_ID, request_id)
    return message


async def retry_until_ok(call: Callable[[], Awaitable[R]], first: str) -> R:
    """Retry while the answer is retryable, for at most 10 s: UNAVAILABLE, or ABORTED while
    the abandoned first attempt still holds its request_id (shared/idempotency.py)."""
    started = time.monotonic()
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as err:
            refused = (err.code(), err.details())
        # ALREADY_EXISTS, say, is what the request_id is there to prevent.
        assert refused[0] in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED), (
            first,
            *refused,
        )
        assert time.monotonic() - started < 10, "retries kept failing"
        await asyncio.sleep(0.1)


def check_provisioned(reply: cert_pb2.ProvisionCertificateResponse, device_id: str) -> None:
    """The certificate names the device's subdomain and the returned key is its key."""
    subdomain = f"{device_id}.myl.zip"
    certificate = reply.certificate
    assert certificate.device_id == device_id
    assert list(certificate.dns_names) == [subdomain, f"*.{subdomain}"]
    issued = x509.load_pem_x509_certificates(certificate.certificate_chain_pem.encode())[0]
    names = issued.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [subdomain, f"*.{subdomain}"]
    key = load_pem_private_key(reply.private_key_pem.encode(), password=None)
    assert key.public_key() == issued.public_key()


async def test_retries_with_the_same_request_id_get_working_results(stack: FaultStack) -> None:
    """A provision and a key generation whose callers gave up during a PostgreSQL hang,
    retried with the same request_id: OK with a working certificate (not ALREADY_EXISTS), and
    exactly one working key per request_id."""
    for request_type in (cert_pb2.ProvisionCertificateRequest, key_pb2.GenerateApiKeyRequest):
        if REQUEST_ID not in request_type.DESCRIPTOR.fields_by_name:
            pytest.skip(f"{request_type.__name__} has no request_id field yet (AIP-155)")
    device_id = unique("retried")
    provision = message_with_request_id(
        cert_pb2.ProvisionCertificateRequest(
            device_id=device_id, uuid_subdomain=f"{device_id}.myl.zip"
        ),
        str(uuid.uuid4()),
    )
    key_device = unique("retried-key")
    await stack.provision(key_device)
    generate = message_with_request_id(
        key_pb2.GenerateApiKeyRequest(device_id=key_device), str(uuid.uuid4())
    )

    stack.hang("postgres")
    try:
        first = await asyncio.gather(
            code_of(stack.cert.ProvisionCertificate(provision, timeout=CALLER_DEADLINE)),
            code_of(stack.keys.GenerateApiKey(generate, timeout=CALLER_DEADLINE)),
        )
    finally:
        stack.resume("postgres")
    await asyncio.sleep(1.0)  # anything held for the first attempts could commit now

    provisioned = await retry_until_ok(
        lambda: stack.cert.ProvisionCertificate(provision, timeout=3), first[0]
    )
    check_provisioned(provisioned, device_id)
    # The caller never saw that answer either: once more, the same request.
    again = await stack.cert.ProvisionCertificate(provision, timeout=3)
    check_provisioned(again, device_id)
    current = await stack.cert.GetCertificate(
        cert_pb2.GetCertificateRequest(device_id=device_id), timeout=3
    )
    assert current.certificate.serial_number == again.certificate.serial_number

    generated = await retry_until_ok(
        lambda: stack.keys.GenerateApiKey(generate, timeout=3), first[1]
    )
    assert await stack.verify(generated.api_key, dry_run=True) == "VERIFY_RESULT_VALID"
    regenerated = await stack.keys.GenerateApiKey(generate, timeout=3)
    results = [
        await stack.verify(reply.api_key, dry_run=True) for reply in (generated, regenerated)
    ]
    active = await stack.count(
        "SELECT count(*) FROM device_api_keys WHERE device_id = %s AND revoked_at IS NULL",
        key_device,
    )
    print(
        f"\n[request_id retries] first attempts {first}; provision retried twice: OK, "
        f"serials {provisioned.certificate.serial_number[:8]}.., "
        f"{again.certificate.serial_number[:8]}..; key retried twice: {results}, "
        f"{active} unrevoked key(s) for the device"
    )
    assert results == ["VERIFY_RESULT_REVOKED", "VERIFY_RESULT_VALID"], (
        "exactly one key of one request_id works: the last one handed out"
    )
    assert active == 1


OUTAGE = 3.0  # seconds PostgreSQL stays down
ANSWER_WITHIN = 1.0  # seconds every RPC that needs it may take to say UNAVAILABLE
WRITES_BACK_WITHIN = 2.0  # seconds after PostgreSQL accepts connections


@pytest.mark.parametrize("fault", ["stopped", "hung"])
async def test_postgres_outage_is_answered_fast_with_unavailable_and_writes_recover(
    stack: FaultStack, fault: str
) -> None:
    """PostgreSQL stopped (connections refused) or hung (SIGSTOP: nothing answers, TCP stays
    up): every RPC that needs it is UNAVAILABLE within a second, cached reads go on, and
    writes work again within two seconds of PostgreSQL accepting connections."""
    cached_device, _, key_id = await stack.device_with_key("outage")
    await stack.cert.GetCertificate(cert_pb2.GetCertificateRequest(device_id=cached_device))
    unseen = unique("never-seen")
    needs_database: dict[str, Callable[[int], Awaitable[object]]] = {
        "ProvisionCertificate": lambda n: stack.cert.ProvisionCertificate(
            cert_pb2.ProvisionCertificateRequest(device_id=f"{unseen}-new-{n}"), timeout=3
        ),
        "GenerateApiKey": lambda n: stack.keys.GenerateApiKey(
            key_pb2.GenerateApiKeyRequest(device_id=cached_device), timeout=3
        ),
        "GetCertificate (miss)": lambda n: stack.cert.GetCertificate(
            cert_pb2.GetCertificateRequest(device_id=f"{unseen}-{n}"), timeout=3
        ),
        "RevokeApiKey": lambda n: stack.keys.RevokeApiKey(
            key_pb2.RevokeApiKeyRequest(key_id=key_id, reason="fault suite"), timeout=3
        ),
    }

    if fault == "hung":
        stack.hang("postgres")
    else:
        await stack.stop_postgres()
    down_at = time.monotonic()
    answers: dict[str, list[tuple[str, float]]] = {name: [] for name in needs_database}
    cached: list[tuple[str, float]] = []
    round_number = 0
    while time.monotonic() - down_at < OUTAGE:
        round_number += 1
        names = list(needs_database)
        results = await asyncio.gather(
            *(timed(needs_database[name](round_number)) for name in names),
            timed(
                stack.cert.GetCertificate(
                    cert_pb2.GetCertificateRequest(device_id=cached_device), timeout=3
                )
            ),
        )
        for name, result in zip(names, results, strict=False):
            answers[name].append(result)
        cached.append(results[-1])
        await asyncio.sleep(0.1)

    # Back up: note when a raw connection first succeeds, and when each service first writes.
    accepted: list[float] = []
    first_write: dict[str, list[float]] = {"ProvisionCertificate": [], "GenerateApiKey": []}
    if fault == "hung":
        stack.resume("postgres")
        restart = asyncio.create_task(asyncio.sleep(0))
    else:
        restart = asyncio.create_task(stack.start_postgres())

    async def probe_connections() -> None:
        while True:
            if await stack.postgres_accepts():
                accepted.append(time.monotonic())
                return
            await asyncio.sleep(0.02)

    async def one_write(name: str, n: int) -> None:
        call = (
            stack.cert.ProvisionCertificate(
                cert_pb2.ProvisionCertificateRequest(device_id=f"{unseen}-back-{n}"), timeout=3
            )
            if name == "ProvisionCertificate"
            else stack.keys.GenerateApiKey(
                key_pb2.GenerateApiKeyRequest(device_id=cached_device), timeout=3
            )
        )
        if await code_of(call) == "OK":
            first_write[name].append(time.monotonic())

    probe = asyncio.create_task(probe_connections())
    writes: list[asyncio.Task[None]] = []
    started = time.monotonic()
    while not all(first_write.values()) and time.monotonic() - started < 30:
        writes.extend(asyncio.create_task(one_write(name, len(writes))) for name in first_write)
        await asyncio.sleep(0.05)
    await restart
    await probe
    await asyncio.gather(*writes)
    writes_back = {
        name: (min(times) - accepted[0] if times else float("inf"))
        for name, times in first_write.items()
    }

    report = {
        name: (dict(Counter(code for code, _ in results)), max(s for _, s in results))
        for name, results in answers.items()
    }
    print(f"\n[postgres {fault} {OUTAGE:g}s] {round_number} rounds")
    for name, (codes, slowest) in report.items():
        print(f"  {name}: {codes}, slowest {slowest:.3f}s")
    print(
        f"  GetCertificate (cached): {dict(Counter(c for c, _ in cached))}, "
        f"slowest {max(s for _, s in cached):.3f}s"
    )
    for name, seconds in writes_back.items():
        print(f"  first {name} OK {seconds:+.2f}s after PostgreSQL accepted connections")

    problems = [
        f"{name}: {codes}, slowest {slowest:.3f}s"
        for name, (codes, slowest) in report.items()
        if set(codes) != {"UNAVAILABLE"} or slowest >= ANSWER_WITHIN
    ]
    assert not problems, "RPCs that need PostgreSQL, while it was down:\n" + "\n".join(problems)
    assert {code for code, _ in cached} == {"OK"}, "cached reads failed during the outage"
    late = {name: f"{s:.2f}s" for name, s in writes_back.items() if s > WRITES_BACK_WITHIN}
    assert not late, f"writes came back late after PostgreSQL accepted connections: {late}"
