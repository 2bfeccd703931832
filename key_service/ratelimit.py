"""Per-key rate limits: GCRA, atomically in Redis, in process when Redis is away.

The Generic Cell Rate Algorithm keeps one number per key, the theoretical
arrival time (TAT). A key allowed `limit` requests per minute has an emission
interval `T = 60 s / limit` (whole microseconds) and a burst of `limit`
(tolerance `limit * T`). A request at `now` is admitted when
`max(TAT, now) + T - limit * T <= now`; admitting it moves TAT to
`max(TAT, now) + T`. All arithmetic is in integer microseconds, so exactly
`limit` requests are admitted from a fresh state, however they interleave.
This is the named limits' GCRA (`shared.limits`) with burst = count = `limit` per minute:
the step itself is `shared.limits.gcra_step` here and its Lua twin `LUA_GCRA_STEP` in the
scripts, so there is one arithmetic for every limit.

In Redis one Lua script GETs the cached key record and applies GCRA to the
key's TAT in the same round trip; both keys carry the key hash as their hash
tag, so the script runs unchanged on Redis Cluster. The record starts with a
small header `usable_until_us|limit|...` so the script knows the limit and
does not count requests with an expired or revoked key.

When Redis cannot be reached, each replica limits with `LocalLimiter`, the
named limits' in-process fallback (`shared.limits.LocalBuckets`) keyed by key
hash, so the effective limit is per replica until Redis returns. It seeds a key
it has not seen by the one rule of `shared.limits.fallback_seed`: as if the key
had just used its burst but for one second's worth of its rate (at least one
request). Redis may have lost the key's state (a restart) or may only be out of
reach (a hang, with the burst already spent there), and the replica cannot tell
which. With this seeding a Redis restart hands a key at most one extra burst
(the fresh state Redis starts from) and one second of its rate, never a second
burst from the fallback; and a key allowed thousands of requests a second is
not refused the moment Redis goes away.
"""

from __future__ import annotations

import functools
from typing import Final

from shared.limits import LUA_GCRA_STEP, Limit, LocalBuckets, Step

MINUTE_US: Final = 60_000_000


class Decision:
    """The outcome of one rate-limit check; durations in microseconds."""

    __slots__ = ("allowed", "remaining", "reset_us", "retry_after_us")

    def __init__(self, allowed: bool, remaining: int, reset_us: int, retry_after_us: int) -> None:
        self.allowed = allowed
        self.remaining = remaining
        self.reset_us = reset_us
        self.retry_after_us = retry_after_us

    def __repr__(self) -> str:
        return (
            f"Decision(allowed={self.allowed}, remaining={self.remaining}, "
            f"reset_us={self.reset_us}, retry_after_us={self.retry_after_us})"
        )


@functools.lru_cache(maxsize=4096)
def per_minute(limit: int) -> Limit:
    """A key's limit as a `shared.limits.Limit`: `limit` per minute, burst `limit`. Its
    `interval_us` is the key's emission interval, 60 s / `limit` in whole microseconds and at
    least one (the count is capped at a minute's microseconds): the one Python source of it,
    which the Lua computes alike from the cached record's limit."""
    return Limit(limit, min(limit, MINUTE_US), MINUTE_US)


def step_decision(step: Step, now_us: int, apply: bool) -> Decision:
    """A key's `Decision` from one `shared.limits.gcra_step` (cost 1) at `now_us`.

    `apply=False` is a dry run: it reports what a request would get and changes nothing;
    its `remaining` and `reset_us` are those of the state as it is (the request not
    counted), one request more and one interval less than an applied request's.
    """
    if not step.allowed:
        return Decision(False, 0, step.tat_us - now_us, step.retry_after_us)
    if apply:
        return Decision(True, step.remaining, step.new_tat_us - now_us, 0)
    return Decision(True, step.remaining + 1, step.tat_us - now_us, 0)


# The Lua twin of `LocalLimiter.check`, which the integration tests run on the same inputs:
# `per_minute(limit)`'s interval and tolerance, computed here from the record's limit (it
# lives in Redis), shared.limits' LUA_GCRA_STEP over KEYS[2] (the key's TAT), and
# `step_decision`'s numbers.
_LUA_GCRA: Final = (
    LUA_GCRA_STEP
    + """
local function gcra(record, now, apply)
  local h1 = string.find(record, '|', 1, true)
  if h1 == nil then return {record} end
  local usable_until = tonumber(string.sub(record, 1, h1 - 1))
  local h2 = string.find(record, '|', h1 + 1, true)
  local limit = tonumber(string.sub(record, h1 + 1, h2 - 1))
  if now >= usable_until then return {record} end
  local interval = math.max(1, math.floor(60000000 / limit))
  local allowed, tat, remaining, retry_after =
    gcra_step(KEYS[2], now, interval, interval * limit, 1, apply == 1)
  if allowed == 0 then return {record, 0, 0, tat - now, retry_after} end
  if apply == 1 then return {record, 1, remaining, tat + interval - now, 0} end
  return {record, 1, remaining + 1, tat - now, 0}
end
"""
)

# KEYS[1]: the cached key record, KEYS[2]: the key's TAT.
# ARGV[1]: now (us), ARGV[2]: 1 to count the request, 0 for a dry run.
# Returns nil on a cache miss, {record} for a negative entry or an unusable
# key, else {record, allowed, remaining, reset_us, retry_after_us}.
VERIFY_SCRIPT: Final = (
    _LUA_GCRA
    + """
local record = redis.call('GET', KEYS[1])
if not record then return nil end
return gcra(record, tonumber(ARGV[1]), tonumber(ARGV[2]))
"""
)

# As VERIFY_SCRIPT, after a cache miss: ARGV[3] is the record read from
# PostgreSQL, stored for ARGV[4] milliseconds unless a record arrived in the
# meantime (NX): a revocation writes the revoked record, and a slower reader
# must not put the older, active one back.
POPULATE_SCRIPT: Final = (
    _LUA_GCRA
    + """
local record = ARGV[3]
if not redis.call('SET', KEYS[1], record, 'PX', ARGV[4], 'NX') then
  record = redis.call('GET', KEYS[1]) or record
end
return gcra(record, tonumber(ARGV[1]), tonumber(ARGV[2]))
"""
)


class LocalLimiter(LocalBuckets):
    """The in-process fallback (`shared.limits.LocalBuckets`), keyed by key hash."""

    def __init__(self, max_keys: int = 100_000) -> None:
        super().__init__(max_keys)

    def check(self, key: bytes, limit: int, now_us: int, apply: bool) -> Decision:
        return step_decision(self.step(key, per_minute(limit), now_us, 1, apply), now_us, apply)
