"""Steady load against the fault stack, with every request recorded.

Open loop: each kind of request is started on its own schedule, whether or not earlier ones
have answered (up to a cap on requests in flight), so a hung dependency shows up as slow or
failed answers and not as a pause in the load. Every request becomes a `Call` (kind, start,
end, code, VerifyApiKey's result), on the monotonic clock the tests read their fault times
from, so a test asserts by counting calls in a window.

Kinds:
- `get`: GetCertificate over gRPC, straight to cert_service;
- `verify`: VerifyApiKey over gRPC, straight to key_service (not a dry run: it counts usage);
- `rest`: `GET /api/v1/devices/{id}/certificate` through the gateway with `X-API-Key`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import grpc
import httpx

from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from myl.key.v1 import key_pb2, key_pb2_grpc
from tests.faults.stack import CHANNEL_OPTIONS, FaultStack
from tests.fixtures import internal_tls

Kind = Literal["get", "verify", "rest"]
VALID = "VERIFY_RESULT_VALID"
UNLIMITED = 1_000_000  # requests per minute: key_service's largest rate limit


@dataclass(frozen=True)
class Call:
    kind: Kind
    start: float
    end: float
    # The gRPC status name ("OK", "UNAVAILABLE", ...) or the HTTP status ("200", "503"); a
    # client-side failure is named by its exception ("ConnectError", ...).
    code: str
    # VerifyApiKey's result name when it answered OK, else "".
    result: str = ""

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def succeeded(self) -> bool:
        """What the caller wanted: a certificate, or a VALID key."""
        if self.kind == "verify":
            return self.code == "OK" and self.result == VALID
        return self.code in ("OK", "200")


@dataclass(frozen=True)
class Target:
    """What the load reads: a device's certificate and keys for verify and REST."""

    device_id: str
    verify_key: str  # VerifyApiKey load uses this key
    rest_device_id: str  # REST reads this device's certificate ...
    rest_key: str  # ... with this key (the device's own)


Request = Callable[[], Awaitable[tuple[str, str]]]


class Load:
    """`async with Load(stack, target, rates):` runs the load; `calls` holds what happened."""

    def __init__(
        self,
        stack: FaultStack,
        target: Target,
        rates: Mapping[Kind, float],
        *,
        deadline: float = 3.0,
        max_in_flight: int = 200,
    ) -> None:
        self.stack = stack
        self.target = target
        self.rates = dict(rates)
        self.deadline = deadline
        self.max_in_flight = max_in_flight
        self.calls: list[Call] = []
        self.skipped = 0  # requests not started because too many were in flight
        self._in_flight: set[asyncio.Task[None]] = set()
        self._schedulers: list[asyncio.Task[None]] = []
        self._channels: list[grpc.aio.Channel] = []
        self._http: httpx.AsyncClient | None = None
        self.started = 0.0
        self.stopped = 0.0

    async def __aenter__(self) -> Load:
        cert_channel = internal_tls.channel(
            self.stack.address("cert_service"), service="cert_service", options=CHANNEL_OPTIONS
        )
        key_channel = internal_tls.channel(
            self.stack.address("key_service"), service="key_service", options=CHANNEL_OPTIONS
        )
        self._channels = [cert_channel, key_channel]
        self._cert = cert_pb2_grpc.CertificateServiceStub(cert_channel)
        self._keys = key_pb2_grpc.ApiKeyServiceStub(key_channel)
        self._http = httpx.AsyncClient(
            timeout=self.deadline, limits=httpx.Limits(max_connections=64)
        )
        requests: dict[Kind, Request] = {
            "get": self._get,
            "verify": self._verify,
            "rest": self._rest,
        }
        self.started = time.monotonic()
        for kind, rate in self.rates.items():
            if rate > 0:
                self._schedulers.append(
                    asyncio.create_task(self._schedule(kind, rate, requests[kind]))
                )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Start no more requests; wait for those in flight (they have deadlines)."""
        for task in self._schedulers:
            task.cancel()
        for task in self._schedulers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._schedulers.clear()
        if self._in_flight:
            await asyncio.wait(self._in_flight, timeout=self.deadline + 2)
        self.stopped = time.monotonic()
        for channel in self._channels:
            await channel.close(None)
        self._channels.clear()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def _schedule(self, kind: Kind, rate: float, request: Request) -> None:
        interval = 1.0 / rate
        next_at = time.monotonic()
        while True:
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(self._in_flight) >= self.max_in_flight:
                self.skipped += 1
                continue
            task = asyncio.create_task(self._record(kind, request))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _record(self, kind: Kind, request: Request) -> None:
        start = time.monotonic()
        try:
            code, result = await request()
        except grpc.aio.AioRpcError as err:
            code, result = err.code().name, ""
        except httpx.HTTPError as err:
            code, result = type(err).__name__, ""
        self.calls.append(Call(kind, start, time.monotonic(), code, result))

    async def _get(self) -> tuple[str, str]:
        await self._cert.GetCertificate(
            cert_pb2.GetCertificateRequest(device_id=self.target.device_id),
            timeout=self.deadline,
        )
        return "OK", ""

    async def _verify(self) -> tuple[str, str]:
        reply = await self._keys.VerifyApiKey(
            key_pb2.VerifyApiKeyRequest(
                api_key=self.target.verify_key, required_permissions=["ssl:read"]
            ),
            timeout=self.deadline,
        )
        return "OK", key_pb2.VerifyResult.Name(reply.result)

    async def _rest(self) -> tuple[str, str]:
        assert self._http is not None
        reply = await self._http.get(
            f"{self.stack.gateway_url}/api/v1/devices/{self.target.rest_device_id}/certificate",
            headers={"X-API-Key": self.target.rest_key},
        )
        return str(reply.status_code), ""

    # -- counting ------------------------------------------------------------------------------

    def select(
        self,
        kind: Kind | None = None,
        *,
        started_after: float = float("-inf"),
        started_before: float = float("inf"),
    ) -> list[Call]:
        """Calls of `kind` (all kinds: None) that started in the window."""
        return [
            call
            for call in self.calls
            if (kind is None or call.kind == kind) and started_after <= call.start < started_before
        ]

    def rate(self) -> float:
        """Requests started per second over the run."""
        elapsed = (self.stopped or time.monotonic()) - self.started
        return len(self.calls) / elapsed if elapsed > 0 else 0.0


def codes(calls: Iterable[Call]) -> dict[str, int]:
    """How many calls ended with each code (and result, for verifies)."""
    return dict(Counter(f"{c.kind}:{c.code}" + (f":{c.result}" if c.result else "") for c in calls))


def slowest(calls: Iterable[Call]) -> float:
    return max((call.seconds for call in calls), default=0.0)


async def load_target(stack: FaultStack, prefix: str) -> Target:
    """Two fresh devices with one key each: one read over gRPC, one through the gateway.

    The keys' rate limit is far above the load's rate, so every verify of them is VALID.
    """
    device_id, verify_key, _ = await stack.device_with_key(f"{prefix}-grpc", rate_limit=UNLIMITED)
    rest_device_id, rest_key, _ = await stack.device_with_key(
        f"{prefix}-rest", rate_limit=UNLIMITED
    )
    return Target(device_id, verify_key, rest_device_id, rest_key)
