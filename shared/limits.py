"""Provisioning and registration limits: GCRA in Redis, shared by every replica.

Modelled on Let's Encrypt Boulder's `ratelimits` package. A limit has a *burst* (how many
requests a fresh bucket admits at once), a *count* and a *period* (the steady rate: `count`
per `period`). Each bucket (one limit for one id: an operator key, a device name, a device,
a client address) keeps one number in Redis, its theoretical arrival time (TAT). With the
emission interval `T = period / count`, a request costing `c` is admitted at `now` when
`max(TAT, now) + c*T - burst*T <= now`, and admitting it moves the TAT to `max(TAT, now) + c*T`.
All arithmetic is in integer microseconds from the injected clock. The step is `gcra_step`
(and its Lua twin `LUA_GCRA_STEP`); key_service's per-key rate limit
(`key_service.ratelimit`) runs the same step, so there is one GCRA arithmetic.

- **Check-and-spend is one round trip**: one Lua script per bucket, all of a request's
  buckets pipelined together. Keys are `myl:limit:{<limit>:<id>}`: the hash tag is the whole
  bucket, so each script touches one slot and runs unchanged on Redis Cluster. When one bucket
  of a request refuses, the others it spent are refunded (a second round trip, on refusal only).
- **Refunds**: a spend whose operation then fails is given back (`Spend.refund`), so a
  provision refused for a taken subdomain does not use up the device name's allowance.
- **Overrides** per id come from a YAML file (`LIMITS_FILE`), in Boulder's shape::

      defaults:                      # optional: replaces a built-in default
        CertificatesPerDeviceName: {burst: 5, count: 5, period: 168h}
      overrides:
        - NewDevicesPerOperatorKey:
            burst: 5000
            count: 5000
            period: 1h
            ids: [3f0c2a4e-5d1b-4f7e-9a51-0c8f6a1e2b3d]

  Periods are Go-style durations (`90s`, `10m`, `1h`, `168h`, `1h30m`).
- **Redis away** (the shared breaker returns our default): each replica limits with the same
  algorithm in process memory (`LocalBuckets`, also key_service's per-key fallback). One
  seeding rule for every limit (`fallback_seed`): a bucket it has not seen starts with its
  burst spent but for *one second of its steady rate*, at least one request (for every
  default limit here that is one request). The replica cannot tell whether Redis lost the
  bucket (a restart, which hands out at most one fresh burst from Redis itself) or only cannot
  be reached with the burst spent there (a hang), so the fallback never hands out a second
  burst; and a limit of thousands of requests a second is not refused the moment Redis goes.
- Every refusal is RESOURCE_EXHAUSTED with RetryInfo (the time until the request would be
  admitted), ErrorInfo reason `<LIMIT>_EXCEEDED` and metadata naming the limit and the id; the
  servers add a `retry-after` header from it (the gateway passes it on as `Retry-After`).

No secret ever names a bucket: ids are key ids, device ids and names, and client addresses.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple

import redis.asyncio as aioredis
import yaml

from shared.cache import Cache
from shared.clock import Clock, micros_source
from shared.config import ConfigError, EnvReader
from shared.errors import DomainError, ErrorKind
from shared.logging import get_logger
from shared.metrics import LIMIT_DECISIONS

log = get_logger(__name__)

SECOND_US: Final = 1_000_000


class LimitName(enum.Enum):
    """Every limit, by the name operators use in the overrides file and alerts."""

    NEW_DEVICES_PER_OPERATOR_KEY = "NewDevicesPerOperatorKey"
    CERTIFICATES_PER_DEVICE_NAME = "CertificatesPerDeviceName"
    NEW_API_KEYS_PER_DEVICE = "NewApiKeysPerDevice"
    FAILED_VERIFICATIONS_PER_ADDRESS = "FailedVerificationsPerAddress"

    @property
    def reason(self) -> str:
        """The ErrorInfo reason of a refusal: `CERTIFICATES_PER_DEVICE_NAME_EXCEEDED`."""
        return f"{self.name}_EXCEEDED"


@dataclass(frozen=True)
class Limit:
    burst: int
    count: int
    period_us: int

    def __post_init__(self) -> None:
        if self.burst < 1 or self.count < 1 or self.period_us < self.count:
            raise ValueError("burst and count must be at least 1, period at least count µs")

    @property
    def interval_us(self) -> int:
        """The emission interval: one request's worth of time."""
        return self.period_us // self.count

    @property
    def tolerance_us(self) -> int:
        return self.interval_us * self.burst

    def describe(self) -> str:
        return f"{self.count} per {format_duration(self.period_us)} (burst {self.burst})"


HOUR_US: Final = 3600 * SECOND_US
DAY_US: Final = 24 * HOUR_US

# The documented defaults (README, "Limits").
DEFAULT_LIMITS: Final[Mapping[LimitName, Limit]] = {
    # A fleet roll-out of 1,000 devices an hour per operator key; more by override.
    LimitName.NEW_DEVICES_PER_OPERATOR_KEY: Limit(1000, 1000, HOUR_US),
    # Let's Encrypt's duplicate-certificate limit: 5 per device name per 7 days.
    LimitName.CERTIFICATES_PER_DEVICE_NAME: Limit(5, 5, 7 * DAY_US),
    LimitName.NEW_API_KEYS_PER_DEVICE: Limit(20, 20, DAY_US),
    # 600 failed verifications per 10 minutes (one a second) with a burst of 300 per client
    # address (IPv6: per /64). A guesser gets ~86,000 tries a day against a 256-bit key space;
    # a carrier-grade NAT where a hundred devices retry a stale key every two minutes stays
    # under it. Successful requests are never counted.
    LimitName.FAILED_VERIFICATIONS_PER_ADDRESS: Limit(300, 600, 600 * SECOND_US),
}


_DURATION: Final = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")
_UNIT_US: Final = {"h": HOUR_US, "m": 60 * SECOND_US, "s": SECOND_US, "ms": 1000}


def parse_duration(text: str) -> int:
    """A Go-style duration (`1h`, `168h`, `10m`, `1h30m`, `500ms`) in microseconds."""
    text = text.strip()
    position = 0
    total = 0.0
    for match in _DURATION.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNIT_US[match.group(2)]
        position = match.end()
    if position != len(text) or not text or total <= 0:
        raise ValueError(f"not a duration: {text!r} (expected e.g. 90s, 10m, 1h, 168h)")
    return int(total)


def format_duration(micros: int) -> str:
    for unit in ("h", "m", "s"):
        size = _UNIT_US[unit]
        if micros % size == 0:
            return f"{micros // size}{unit}"
    return f"{micros // 1000}ms"


class LimitsFileError(Exception):
    """The overrides file cannot be used; start-up stops with this message."""


@dataclass(frozen=True)
class LimitSet:
    """Each limit's default, and per-id overrides."""

    defaults: Mapping[LimitName, Limit]
    overrides: Mapping[tuple[LimitName, str], Limit]

    def limit(self, name: LimitName, ident: str) -> Limit:
        return self.overrides.get((name, ident)) or self.defaults[name]

    @classmethod
    def builtin(cls) -> LimitSet:
        return cls(dict(DEFAULT_LIMITS), {})

    @classmethod
    def load(cls, path: Path | None) -> LimitSet:
        """The built-in defaults, with the file's defaults and overrides when there is one."""
        if path is None:
            return cls.builtin()
        try:
            document = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise LimitsFileError(f"cannot read limits file {path}: {exc}") from None
        try:
            return cls.parse(document or {})
        except (ValueError, TypeError, KeyError) as exc:
            raise LimitsFileError(f"limits file {path}: {exc}") from None

    @classmethod
    def parse(cls, document: Any) -> LimitSet:
        if not isinstance(document, dict):
            raise ValueError("expected a mapping with `defaults` and/or `overrides`")
        unknown = set(document) - {"defaults", "overrides"}
        if unknown:
            raise ValueError(f"unknown sections: {', '.join(sorted(unknown))}")
        defaults = dict(DEFAULT_LIMITS)
        for name, spec in (document.get("defaults") or {}).items():
            defaults[_limit_name(name)] = _limit(spec, name, with_ids=False)
        overrides: dict[tuple[LimitName, str], Limit] = {}
        for entry in document.get("overrides") or []:
            if not isinstance(entry, dict) or len(entry) != 1:
                raise ValueError("each override is a mapping of one limit name to its settings")
            [(name, spec)] = entry.items()
            limit_name = _limit_name(name)
            limit = _limit(spec, name, with_ids=True)
            ids = spec.get("ids")
            if ids is None:
                raise ValueError(f"{name}: missing 'ids'")
            if not isinstance(ids, list) or not ids:
                raise ValueError(f"{name}: `ids` must be a non-empty list")
            for ident in ids:
                overrides[(limit_name, str(ident))] = limit
        return cls(defaults, overrides)


def _limit_name(name: object) -> LimitName:
    try:
        return LimitName(name)
    except ValueError:
        known = ", ".join(n.value for n in LimitName)
        raise ValueError(f"unknown limit {name!r} (known: {known})") from None


def _limit(spec: object, name: str, *, with_ids: bool) -> Limit:
    if not isinstance(spec, dict):
        raise ValueError(f"{name}: expected burst, count and period")
    allowed = {"burst", "count", "period"} | ({"ids"} if with_ids else set())
    extra = set(spec) - allowed
    if extra:
        raise ValueError(f"{name}: unknown settings {', '.join(sorted(extra))}")
    try:
        burst, count, period = spec["burst"], spec["count"], spec["period"]
    except KeyError as missing:
        raise ValueError(f"{name}: missing {missing}") from None
    if not isinstance(burst, int) or not isinstance(count, int):
        raise ValueError(f"{name}: burst and count must be whole numbers")
    try:
        return Limit(burst, count, parse_duration(str(period)))
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


@dataclass(frozen=True)
class Bucket:
    """One limit for one id; `cost` requests' worth."""

    name: LimitName
    ident: str
    cost: int = 1

    @property
    def key(self) -> str:
        return f"myl:limit:{{{self.name.value}:{self.ident}}}"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    remaining: int
    retry_after_us: int


class Step(NamedTuple):
    """One GCRA step, before anything is stored."""

    allowed: bool
    tat_us: int  # the TAT the step started from, never before `now`
    new_tat_us: int  # the TAT once the request is admitted
    remaining: int  # requests admitted right after this one (0 when refused)
    retry_after_us: int  # until the request would be admitted (0 when it is)


def gcra_step(
    tat_us: int | None, now_us: int, interval_us: int, tolerance_us: int, cost: int
) -> Step:
    """The one GCRA arithmetic, for every limit (the named limits here, key_service's
    per-key limit): `LUA_GCRA_STEP` is the same in Redis, and the in-process fallback
    (`LocalBuckets`) calls this."""
    tat = now_us if tat_us is None or tat_us < now_us else tat_us
    new_tat = tat + cost * interval_us
    allow_at = new_tat - tolerance_us
    if now_us < allow_at:
        return Step(False, tat, new_tat, 0, allow_at - now_us)
    return Step(True, tat, new_tat, (tolerance_us - (new_tat - now_us)) // interval_us, 0)


def gcra(
    tat_us: int | None, now_us: int, limit: Limit, cost: int, spend: bool
) -> tuple[int | None, Decision]:
    """One GCRA step: the TAT to store (None: leave it) and the decision. Mirrors the Lua."""
    step = gcra_step(tat_us, now_us, limit.interval_us, limit.tolerance_us, cost)
    decision = Decision(step.allowed, step.remaining, step.retry_after_us)
    return (step.new_tat_us if step.allowed and spend else None), decision


def refunded(tat_us: int | None, now_us: int, limit: Limit, cost: int) -> int | None:
    """The TAT after giving `cost` back (None: the bucket is full again)."""
    if tat_us is None:
        return None
    new_tat = tat_us - cost * limit.interval_us
    return new_tat if new_tat > now_us else None


# The Lua twin of `gcra_step`, for every script that limits (this module's and
# key_service.ratelimit's): one step over the TAT stored at `key`, storing the new TAT (with
# a TTL that ends when the bucket is full again) when `spend` and admitted. Returns allowed
# (1 or 0), the TAT it started from, remaining and retry_after_us, as `Step` does.
LUA_GCRA_STEP: Final = """
local function store_tat(key, tat, now)
  redis.call('SET', key, string.format('%.0f', tat),
             'PX', string.format('%.0f', math.ceil((tat - now) / 1000)))
end
local function gcra_step(key, now, interval, tolerance, cost, spend)
  local tat = tonumber(redis.call('GET', key))
  if tat == nil or tat < now then tat = now end
  local new_tat = tat + cost * interval
  local allow_at = new_tat - tolerance
  if now < allow_at then return 0, tat, 0, allow_at - now end
  if spend then store_tat(key, new_tat, now) end
  return 1, tat, math.floor((tolerance - (new_tat - now)) / interval), 0
end
"""

# KEYS[1]: the bucket. ARGV: now_us, interval_us, tolerance_us, cost, mode (spend | check |
# refund). Returns {allowed, remaining, retry_after_us}. The key expires when the bucket is full.
GCRA_SCRIPT: Final = (
    LUA_GCRA_STEP
    + """
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local cost = tonumber(ARGV[4])
local mode = ARGV[5]
if mode == 'refund' then
  local tat = tonumber(redis.call('GET', KEYS[1]))
  if tat == nil then return {1, 0, 0} end
  local back = tat - cost * interval
  if back > now then
    store_tat(KEYS[1], back, now)
  else
    redis.call('DEL', KEYS[1])
  end
  return {1, 0, 0}
end
local allowed, _, remaining, retry_after =
  gcra_step(KEYS[1], now, interval, tonumber(ARGV[3]), cost, mode == 'spend')
return {allowed, remaining, retry_after}
"""
)


def fallback_seed(limit: Limit, now_us: int) -> int:
    """The TAT an unseen bucket starts from in process (Redis away): its burst spent but for
    one second of its steady rate, at least one request (see the module docstring)."""
    allowance = max(1, min(limit.burst, limit.count * SECOND_US // limit.period_us))
    return now_us + limit.tolerance_us - allowance * limit.interval_us


class LocalBuckets:
    """GCRA in process memory, for when Redis is away: the one fallback of every limit (the
    named limits' buckets here, key_service's per-key limit keyed by key hash). Bounded in
    size; an unseen bucket starts from `fallback_seed`."""

    def __init__(self, max_buckets: int = 100_000) -> None:
        self.max_buckets = max_buckets
        self._tats: dict[str | bytes, int] = {}

    def step(self, key: str | bytes, limit: Limit, now_us: int, cost: int, spend: bool) -> Step:
        """One `gcra_step` on the bucket `key`, stored when `spend` and admitted."""
        tats = self._tats
        tat = tats.get(key)
        if tat is None:
            tat = fallback_seed(limit, now_us)
        step = gcra_step(tat, now_us, limit.interval_us, limit.tolerance_us, cost)
        if spend and step.allowed:
            if len(tats) >= self.max_buckets and key not in tats:
                self._evict(now_us)
            tats[key] = step.new_tat_us
        return step

    def spend(self, bucket: Bucket, limit: Limit, now_us: int, spend: bool = True) -> Decision:
        step = self.step(bucket.key, limit, now_us, bucket.cost, spend)
        return Decision(step.allowed, step.remaining, step.retry_after_us)

    def refund(self, bucket: Bucket, limit: Limit, now_us: int) -> None:
        back = refunded(self._tats.get(bucket.key), now_us, limit, bucket.cost)
        if back is None:
            # Full again; forgetting it would reseed it as spent, so keep it at "now".
            self._tats[bucket.key] = now_us
        else:
            self._tats[bucket.key] = back

    def _evict(self, now_us: int) -> None:
        """Drop states that have fully recovered (they equal a fresh state)."""
        for key in [k for k, tat in self._tats.items() if tat <= now_us]:
            del self._tats[key]
        if len(self._tats) >= self.max_buckets:
            self._tats.clear()

    def __len__(self) -> int:
        return len(self._tats)


class _RedisAway:
    pass


_REDIS_AWAY: Final = _RedisAway()


@dataclass
class Spend:
    """What one admitted request spent, so that a failed operation can give it back."""

    limiter: Limiter
    spent: list[tuple[Bucket, Limit, bool]]  # (bucket, its limit, spent in Redis?)
    refunded: bool = False

    async def refund(self) -> None:
        if self.refunded or not self.spent:
            return
        self.refunded = True
        await self.limiter._refund(self.spent)


def limit_exceeded(bucket: Bucket, limit: Limit, retry_after_us: int) -> DomainError:
    seconds = max(1, math.ceil(retry_after_us / SECOND_US))
    return DomainError(
        ErrorKind.RESOURCE_EXHAUSTED,
        f"limit {bucket.name.value} exceeded for {bucket.ident}: {limit.describe()}; "
        f"retry in {seconds}s",
        bucket.name.reason,
        metadata={"limit": bucket.name.value, "id": bucket.ident},
        retry_after=float(seconds),
    )


class Limiter:
    """Check-and-spend against shared buckets in Redis, in process when Redis is away."""

    def __init__(
        self, cache: Cache, limits: LimitSet, clock: Clock, local: LocalBuckets | None = None
    ) -> None:
        self.cache = cache
        self.limits = limits
        self._now_us = micros_source(clock)
        self.local = local or LocalBuckets()
        self._script = cache.register_script(GCRA_SCRIPT)

    async def spend(self, *buckets: Bucket) -> Spend:
        """Spend one request from every bucket, or none: raises the first refusal
        (RESOURCE_EXHAUSTED naming its limit) after refunding what the others spent."""
        now_us = self._now_us()
        chosen = [(bucket, self.limits.limit(bucket.name, bucket.ident)) for bucket in buckets]
        replies = await self._run([(b, lim, "spend") for b, lim in chosen], now_us)
        spent: list[tuple[Bucket, Limit, bool]] = []
        refusal: DomainError | None = None
        for (bucket, limit), reply in zip(chosen, replies, strict=True):
            in_redis = reply is not None
            if reply is None:
                decision = self.local.spend(bucket, limit, now_us)
            else:
                decision = Decision(reply[0] == 1, int(reply[1]), int(reply[2]))
            if decision.allowed:
                spent.append((bucket, limit, in_redis))
                LIMIT_DECISIONS.labels(bucket.name.value, "allowed").inc()
            else:
                LIMIT_DECISIONS.labels(bucket.name.value, "refused").inc()
                if refusal is None:
                    refusal = limit_exceeded(bucket, limit, decision.retry_after_us)
        result = Spend(self, spent)
        if refusal is not None:
            await result.refund()
            log.info("limit refused", limit=refusal.metadata["limit"], id=refusal.metadata["id"])
            raise refusal
        return result

    async def check(self, bucket: Bucket) -> Decision:
        """What a spend would get now, spending nothing."""
        now_us = self._now_us()
        limit = self.limits.limit(bucket.name, bucket.ident)
        [reply] = await self._run([(bucket, limit, "check")], now_us)
        if reply is None:
            return self.local.spend(bucket, limit, now_us, spend=False)
        return Decision(reply[0] == 1, int(reply[1]), int(reply[2]))

    async def _refund(self, spent: Sequence[tuple[Bucket, Limit, bool]]) -> None:
        now_us = self._now_us()
        remote = [(b, lim, "refund") for b, lim, in_redis in spent if in_redis]
        for bucket, limit, in_redis in spent:
            if not in_redis:
                self.local.refund(bucket, limit, now_us)
        if remote:
            await self._run(remote, now_us)

    async def _run(
        self, calls: Sequence[tuple[Bucket, Limit, str]], now_us: int
    ) -> list[list[int] | None]:
        """One round trip for every call; None for each when Redis is away."""

        def args(limit: Limit, cost: int, mode: str) -> list[Any]:
            return [now_us, limit.interval_us, limit.tolerance_us, cost, mode]

        if len(calls) == 1:
            bucket, limit, mode = calls[0]
            reply = await self._script(
                [bucket.key], args(limit, bucket.cost, mode), default=_REDIS_AWAY
            )
            return [None if isinstance(reply, _RedisAway) else list(reply)]

        async def pipelined(client: aioredis.Redis) -> list[list[int]]:
            pipe = client.pipeline(transaction=False)
            for bucket, limit, mode in calls:
                pipe.eval(GCRA_SCRIPT, 1, bucket.key, *args(limit, bucket.cost, mode))
            replies: list[list[int]] = await pipe.execute()
            return replies

        result = await self.cache.run(pipelined, None)
        if result is None:
            return [None] * len(calls)
        return [list(reply) for reply in result]


def limits_from_env(env: EnvReader) -> LimitSet:
    """`LIMITS_FILE` (YAML, see the module docstring); the built-in defaults when unset."""
    path = env.path("LIMITS_FILE", Path())
    if path == Path():
        return LimitSet.builtin()
    try:
        return LimitSet.load(path)
    except LimitsFileError as exc:
        name = (
            f"{env.prefix}_LIMITS_FILE"
            if f"{env.prefix}_LIMITS_FILE" in env.environ
            else "LIMITS_FILE"
        )
        raise ConfigError(name, str(path), f"a readable limits file ({exc})") from None
