"""GCRA math on a fake timeline (microseconds)."""

from __future__ import annotations

from key_service.ratelimit import Decision, LocalLimiter, per_minute, step_decision
from shared.limits import gcra_step

T0 = 1_700_000_000_000_000


def gcra(tat: int | None, now: int, limit: int, apply: bool) -> tuple[int | None, Decision]:
    """One step of a key's limit from `tat` (None: a fresh key), as `LocalLimiter.check`
    takes it: the TAT to store (None: leave it) and the decision."""
    key_limit = per_minute(limit)
    step = gcra_step(tat, now, key_limit.interval_us, key_limit.tolerance_us, 1)
    return (step.new_tat_us if step.allowed and apply else None), step_decision(step, now, apply)


def run(limit: int, times: list[int], apply: bool = True) -> list[bool]:
    tat: int | None = None
    admitted = []
    for now in times:
        new_tat, decision = gcra(tat, now, limit, apply)
        if new_tat is not None:
            tat = new_tat
        admitted.append(decision.allowed)
    return admitted


def test_burst_equals_the_limit_then_one_per_interval() -> None:
    limit = 10
    interval = per_minute(limit).interval_us
    assert interval == 6_000_000
    assert run(limit, [T0] * 12) == [True] * 10 + [False] * 2
    times = [T0] * 10 + [T0 + interval - 1, T0 + interval, T0 + interval]
    assert run(limit, times) == [True] * 10 + [False, True, False]


def test_decision_numbers() -> None:
    tat, first = gcra(None, T0, 60, True)
    assert (first.allowed, first.remaining, first.reset_us, first.retry_after_us) == (
        True,
        59,
        1_000_000,
        0,
    )
    for _ in range(59):
        tat, _ = gcra(tat, T0, 60, True)
    stored, refused = gcra(tat, T0, 60, True)
    assert stored is None
    assert (refused.allowed, refused.remaining) == (False, 0)
    assert refused.retry_after_us == 1_000_000
    assert refused.reset_us == 60_000_000
    # Half a minute later half the burst is back.
    _, later = gcra(tat, T0 + 30_000_000, 60, False)
    assert later.allowed
    assert later.remaining == 30


def test_dry_run_changes_nothing() -> None:
    stored, decision = gcra(None, T0, 5, False)
    assert stored is None
    assert decision.allowed
    assert decision.remaining == 5
    assert decision.reset_us == 0
    assert run(5, [T0] * 20, apply=False) == [True] * 20


def test_exactly_the_limit_is_admitted_for_any_limit() -> None:
    for limit in (1, 3, 7, 13, 999):
        assert run(limit, [T0] * (limit + 2)) == [True] * limit + [False] * 2
    assert per_minute(7).interval_us == 8_571_428
    assert per_minute(60_000_000).interval_us == 1
    assert per_minute(100_000_000).interval_us == 1


def test_local_limiter_keeps_state_per_key_and_evicts_recovered_ones() -> None:
    limiter = LocalLimiter(max_keys=2)
    assert limiter.check(b"a", 1, T0, True).allowed
    assert not limiter.check(b"a", 1, T0, True).allowed
    assert limiter.check(b"b", 1, T0, True).allowed
    assert len(limiter) == 2
    # A third key at a time when "a" and "b" have recovered evicts them.
    assert limiter.check(b"c", 1, T0 + 60_000_000, True).allowed
    assert len(limiter) == 1
    # Full and nothing recovered: the table is cleared rather than grown.
    limiter.check(b"d", 1, T0 + 60_000_000, True)
    limiter.check(b"e", 1, T0 + 60_000_000, True)
    assert len(limiter) <= 2


def test_local_limiter_seeds_an_unseen_key_with_its_burst_spent() -> None:
    # Redis may hold this key's spent burst (a hang) or have lost it (a restart); the
    # fallback cannot tell, so it admits one second of its rate (here one request) and then
    # only the steady rate.
    limiter = LocalLimiter()
    assert [limiter.check(b"k", 20, T0, True).allowed for _ in range(5)] == [True] + [False] * 4
    interval = per_minute(20).interval_us
    assert limiter.check(b"k", 20, T0 + interval, True).allowed
    assert not limiter.check(b"k", 20, T0 + interval, True).allowed
    # A minute of the steady rate after the first request: 20 more, never a burst.
    admitted = sum(
        limiter.check(b"k", 20, T0 + interval + step * 100_000, True).allowed
        for step in range(1, 601)
    )
    assert admitted == 20


def test_local_limiter_keeps_a_second_of_rate_for_fast_keys() -> None:
    limiter = LocalLimiter()
    limit = 1_000_000  # per minute: 16,666 a second
    admitted = sum(limiter.check(b"fast", limit, T0, True).allowed for _ in range(20_000))
    assert admitted == limit // 60
