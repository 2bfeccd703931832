"""Delivers device events from `device_events_outbox` to key_service, at least once.

A deleted device's row and its 'device_deleted' event are written in one statement. The event
is then delivered by calling `myl.key.v1.ApiKeyService/RevokeDeviceApiKeys(device_id,
reason="device deleted")`; the row is removed only after that call succeeded. Revoking keys is
idempotent, so delivering twice is harmless, and losing a delivery is impossible.

* DeleteDevice tries to deliver at once (the event is created already leased to it).
* A background relay claims due events with `FOR UPDATE SKIP LOCKED` and a lease (the row's
  `next_attempt_at` moves past the call's deadline), so several replicas share the queue without
  delivering one event concurrently, and a crashed relay's events are picked up after the lease.
* A failed call schedules the next attempt with exponential backoff, from `OUTBOX_RETRY_MIN` up
  to `OUTBOX_RETRY_MAX` seconds; events are never dropped.

The key_service address is fixed at construction (`KEY_SERVICE_ADDRESS`); the connection is
made when a call is made, so key_service may start after cert_service.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

import grpc
from prometheus_client import Counter

from cert_service.storage import CertificateStore, OutboxEvent
from myl.key.v1 import key_pb2, key_pb2_grpc
from shared.clock import Clock
from shared.logging import get_logger
from shared.tasks import run_periodically
from shared.tls import KEY_SERVICE, InternalChannel, InternalTls

log = get_logger(__name__)

DELIVERIES = Counter(
    "myl_outbox_deliveries_total", "Device event deliveries to key_service", ["result"]
)
_DELIVERED = DELIVERIES.labels("delivered")
_FAILED = DELIVERIES.labels("failed")
REVOKE_REASON: Final = "device deleted"
_BATCH: Final = 50
# A channel that failed is replaced (see `_drop_channel`), so retries follow the outbox's own
# backoff; these keep a surviving channel's reconnects short as well.
_CHANNEL_OPTIONS: Final = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 250),
    # gRPC shares subchannels between a process's channels: without this, a fresh channel
    # inherits the old one's connection back-off and fails for seconds after key_service
    # is back.
    ("grpc.use_local_subchannel_pool", 1),
]


@dataclass(frozen=True)
class RelayResult:
    delivered: int
    failed: int


class OutboxRelay:
    def __init__(
        self,
        store: CertificateStore,
        clock: Clock,
        address: str,
        *,
        timeout: float,
        interval: float,
        retry_min: float,
        retry_max: float,
        tls: InternalTls,
    ) -> None:
        self.store = store
        self.clock = clock
        self.address = address
        self.timeout = timeout
        self.interval = interval
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.tls = tls
        # Calls on a channel that is replaced (`_drop_channel`) keep it until their deadline.
        self._channel = InternalChannel(
            address, tls, KEY_SERVICE, options=_CHANNEL_OPTIONS, linger=timeout
        )
        self._stub: key_pb2_grpc.ApiKeyServiceAsyncStub | None = None
        self._stub_channel: grpc.aio.Channel | None = None

    def lease_until(self, now: datetime) -> datetime:
        """How long a claimed event is reserved for the relay that claimed it."""
        return now + timedelta(seconds=self.timeout * 2 + 5)

    def backoff(self, attempts: int) -> float:
        """Seconds before attempt `attempts + 1`."""
        exponent = max(0, min(attempts - 1, 30))
        return float(min(self.retry_max, self.retry_min * float(2**exponent)))

    def _get_stub(self) -> key_pb2_grpc.ApiKeyServiceAsyncStub:
        channel = self._channel.get()
        if self._stub is None or channel is not self._stub_channel:
            self._stub = key_pb2_grpc.ApiKeyServiceStub(channel)
            self._stub_channel = channel
        return self._stub

    def _drop_channel(self) -> None:
        """Forget the channel; the next call connects afresh (no reconnect backoff).

        The old channel is closed only after the deadline of any call still on it: closing
        it at once would cancel deliveries of the same batch in mid-flight."""
        self._channel.reset()

    async def deliver(self, event: OutboxEvent) -> bool:
        """One attempt at an event this relay holds the lease of; True when delivered."""
        request = key_pb2.RevokeDeviceApiKeysRequest(
            device_id=event.device_id, reason=REVOKE_REASON
        )
        try:
            reply = await self._get_stub().RevokeDeviceApiKeys(request, timeout=self.timeout)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this relay is being stopped
            error = "CANCELLED: the call's channel was closed"  # not us: try again later
        except grpc.aio.AioRpcError as exc:
            error = f"{exc.code().name}: {exc.details()}"
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                self._drop_channel()
        except (grpc.RpcError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        else:
            await self.store.complete_event(event)
            _DELIVERED.inc()
            log.info(
                "device keys revoked",
                device_id=event.device_id,
                revoked=reply.revoked_count,
                attempts=event.attempts,
            )
            return True
        delay = self.backoff(event.attempts)
        await self.store.retry_event(event, self.clock.now() + timedelta(seconds=delay), error)
        _FAILED.inc()
        log.warning(
            "device event not delivered; will retry",
            device_id=event.device_id,
            attempts=event.attempts,
            retry_in=delay,
            error=error,
        )
        return False

    async def run_once(self) -> RelayResult:
        """Deliver every due event (in batches); returns what happened."""
        delivered = failed = 0
        while True:
            now = self.clock.now()
            events = await self.store.claim_events(now, self.lease_until(now), _BATCH)
            if not events:
                break
            results = await asyncio.gather(*(self.deliver(event) for event in events))
            delivered += sum(results)
            failed += len(results) - sum(results)
            if len(events) < _BATCH or not any(results):
                break
        return RelayResult(delivered, failed)

    async def run(self) -> None:
        """Poll every `interval` seconds until cancelled; nothing else ends it (a pass that
        fails in any way is logged and the next one follows)."""
        await run_periodically("outbox relay", self.run_once, self.interval)

    async def try_deliver(self, event: OutboxEvent) -> bool:
        """`deliver`, for callers that must not fail: an error leaves the event to the relay,
        which retries it once the lease ran out."""
        try:
            return await self.deliver(event)
        except Exception:
            log.warning("device event delivery failed", device_id=event.device_id, exc_info=True)
            return False

    async def close(self) -> None:
        await self._channel.close(drain=True)
