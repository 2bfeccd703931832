"""The clock every time-dependent part of cert_service is handed.

Validity windows, expiry, renewal, access times and outbox retries all read
time from a `Clock`, never from `datetime.now()` directly, so tests can move
time forward instead of sleeping.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...


class SystemClock:
    """The real wall clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)
