"""Time, injected: services ask a `Clock`, tests hand in a fake one.

Validity windows, expiry, renewal, access and usage times, outbox retries and
rate limits all read time from a `Clock`, never from `datetime.now()`
directly, so tests move time forward instead of sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def now_us(self) -> int:
        """The current time in microseconds since the epoch, without a datetime."""
        return time.time_ns() // 1000


def to_micros(moment: datetime) -> int:
    """Microseconds since the Unix epoch, exact."""
    return (moment - EPOCH) // _MICROSECOND


def micros_source(clock: Clock) -> Callable[[], int]:
    """`clock`'s time in integer microseconds: its `now_us` when it has one."""
    now_us: Callable[[], int] | None = getattr(clock, "now_us", None)
    if now_us is not None:
        return now_us
    return lambda: to_micros(clock.now())


def from_micros(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=micros)
