"""key_service settings: the shared server settings plus its own.

Every name is read as `KEY_SERVICE_<NAME>` first, then `<NAME>`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from shared.config import EnvReader, ServerConfig
from shared.limits import LimitSet, limits_from_env

SERVICE = "key_service"
DEFAULT_PORT = 50052
DEFAULT_METRICS_PORT = 9465


@dataclass(frozen=True)
class KeyServiceConfig:
    server: ServerConfig
    # Where cert_service answers GetCertificate, and how long to wait for it.
    cert_service_address: str = "127.0.0.1:50051"
    cert_service_timeout: float = 2.0
    # Requests per minute for a new key that names no limit.
    default_rate_limit: int = 1000
    max_rate_limit: int = 1_000_000
    default_key_ttl_days: int = 365
    max_key_ttl_days: int = 3650
    # How long a key record stays in Redis, and how long an unknown key is
    # remembered as unknown.
    cache_ttl: float = 300.0
    negative_cache_ttl: float = 10.0
    # Usage counters are flushed to PostgreSQL this often (seconds).
    usage_flush_interval: float = 5.0
    # Keys the in-process fallback limiter tracks while Redis is away.
    local_limiter_max_keys: int = 100_000
    # Provisioning and registration limits: built-in defaults, LIMITS_FILE overrides.
    limits: LimitSet = field(default_factory=LimitSet.builtin)
    # How often pool and Redis gauges (and cert_service's fleet gauges) are sampled.
    metrics_interval: float = 5.0

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, server: ServerConfig | None = None
    ) -> KeyServiceConfig:
        if server is None:
            server = ServerConfig.from_env(SERVICE, DEFAULT_PORT, DEFAULT_METRICS_PORT, environ)
        env = EnvReader("KEY_SERVICE", environ)
        max_rate_limit = env.integer("MAX_RATE_LIMIT", 1_000_000, minimum=1, maximum=60_000_000)
        max_ttl = env.integer("MAX_KEY_TTL_DAYS", 3650, minimum=1, maximum=36_500)
        return cls(
            server=server,
            cert_service_address=env.text("CERT_SERVICE_ADDRESS", "127.0.0.1:50051"),
            cert_service_timeout=env.number("CERT_SERVICE_TIMEOUT", 2.0, minimum=0.01),
            default_rate_limit=env.integer(
                "DEFAULT_RATE_LIMIT", 1000, minimum=1, maximum=max_rate_limit
            ),
            max_rate_limit=max_rate_limit,
            default_key_ttl_days=env.integer(
                "DEFAULT_KEY_TTL_DAYS", 365, minimum=1, maximum=max_ttl
            ),
            max_key_ttl_days=max_ttl,
            cache_ttl=env.number("CACHE_TTL", 300.0, minimum=0.01),
            negative_cache_ttl=env.number("NEGATIVE_CACHE_TTL", 10.0, minimum=0.01),
            usage_flush_interval=env.number("USAGE_FLUSH_INTERVAL", 5.0, minimum=0.01),
            local_limiter_max_keys=env.integer(
                "LOCAL_LIMITER_MAX_KEYS", 100_000, minimum=1, maximum=10_000_000
            ),
            limits=limits_from_env(env),
            metrics_interval=env.number("METRICS_INTERVAL", 5.0, minimum=0.01),
        )
