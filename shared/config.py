"""Typed configuration from the environment.

Every setting has a seed name (`DB_HOST`, `REDIS_PORT`, ...) and a per-service
override with the service's prefix (`CERT_SERVICE_DB_HOST` beats `DB_HOST` for
cert_service). A value that does not parse stops start-up with a `ConfigError`
naming the variable, its value and what was expected.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from shared.logging import configure_logging
from shared.tls import InternalTls

# No internal TLS: the default of a ServerConfig built in code, INTERNAL_TLS=off otherwise.
PLAINTEXT = InternalTls(enabled=False)


class ConfigError(Exception):
    """A configuration value is missing or malformed."""

    def __init__(self, name: str, value: str | None, expected: str) -> None:
        self.name = name
        self.value = value
        shown = "<unset>" if value is None else repr(value)
        super().__init__(f"invalid configuration {name}={shown}: expected {expected}")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class EnvReader:
    """Reads typed values, preferring `<PREFIX>_<NAME>` over `<NAME>`."""

    def __init__(self, prefix: str, environ: Mapping[str, str] | None = None) -> None:
        self.prefix = prefix
        self.environ = os.environ if environ is None else environ

    def lookup(self, name: str) -> tuple[str, str | None]:
        """The variable that applies (prefixed or not), and its value."""
        scoped = f"{self.prefix}_{name}" if self.prefix else name
        if scoped in self.environ:
            return scoped, self.environ[scoped]
        return name, self.environ.get(name)

    def text(self, name: str, default: str) -> str:
        _, value = self.lookup(name)
        return default if value is None else value

    def integer(
        self, name: str, default: int, *, minimum: int = 0, maximum: int = 2**31 - 1
    ) -> int:
        key, value = self.lookup(name)
        if value is None or value == "":
            return default
        try:
            parsed = int(value)
        except ValueError:
            raise ConfigError(key, value, "an integer") from None
        if not minimum <= parsed <= maximum:
            raise ConfigError(key, value, f"an integer from {minimum} to {maximum}")
        return parsed

    def number(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        key, value = self.lookup(name)
        if value is None or value == "":
            return default
        try:
            parsed = float(value)
        except ValueError:
            raise ConfigError(key, value, "a number") from None
        if not parsed >= minimum or parsed != parsed or parsed == float("inf"):
            raise ConfigError(key, value, f"a finite number of at least {minimum}")
        return parsed

    def flag(self, name: str, default: bool) -> bool:
        key, value = self.lookup(name)
        if value is None or value == "":
            return default
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(key, value, "one of true/false/1/0/yes/no/on/off")

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        key, value = self.lookup(name)
        if value is None or value == "":
            return default
        if value not in choices:
            raise ConfigError(key, value, "one of " + ", ".join(choices))
        return value

    def port(self, name: str, default: int) -> int:
        return self.integer(name, default, minimum=0, maximum=65535)

    def path(self, name: str, default: Path) -> Path:
        _, value = self.lookup(name)
        return default if value is None or value == "" else Path(value)


CLIENT_CHECK_INTERVAL_MS = 50
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


@dataclass(frozen=True)
class DatabaseConfig:
    host: str = "127.0.0.1"
    port: int = 5432
    name: str = "myl"
    user: str = "postgres"
    password: str = ""
    sslmode: str = "prefer"
    pool_min: int = 2
    pool_max: int = 20
    idle_timeout: float = 30.0
    connect_timeout: float = 2.0
    # A request-path statement the server has not answered within this is cut; if a fresh
    # connection fails too, the database is unreachable until a probe connects (shared/db.py).
    operation_timeout: float = 0.5
    # A write whose caller was never told of it (its process died first) is undone by any
    # replica once its marker is this old, checked every `unconfirmed_sweep_interval`
    # (shared/outcomes.py). Longer than any caller's deadline plus a commit.
    unconfirmed_grace: float = 30.0
    unconfirmed_sweep_interval: float = 5.0

    @classmethod
    def from_env(cls, env: EnvReader, *, production: bool) -> DatabaseConfig:
        pool_max = env.integer("DB_POOL_MAX", 20, minimum=1, maximum=1000)
        operation_timeout = env.number("DB_OPERATION_TIMEOUT", 0.5, minimum=0.05)
        return cls(
            host=env.text("DB_HOST", "127.0.0.1"),
            port=env.port("DB_PORT", 5432),
            name=env.text("DB_NAME", "myl"),
            user=env.text("DB_USER", "postgres"),
            password=env.text("DB_PASSWORD", ""),
            # TLS to the database in production, opportunistic elsewhere.
            sslmode=env.choice("DB_SSLMODE", "verify-full" if production else "prefer", SSL_MODES),
            pool_min=env.integer("DB_POOL_MIN", min(2, pool_max), minimum=0, maximum=pool_max),
            pool_max=pool_max,
            idle_timeout=env.number("DB_IDLE_TIMEOUT", 30.0, minimum=1.0),
            connect_timeout=env.number("DB_CONNECT_TIMEOUT", 2.0, minimum=0.1),
            operation_timeout=operation_timeout,
            # The sweep must leave alone the writes that can still be confirmed.
            unconfirmed_grace=env.number(
                "DB_UNCONFIRMED_GRACE", 30.0, minimum=max(1.0, 2 * operation_timeout)
            ),
            unconfirmed_sweep_interval=env.number(
                "DB_UNCONFIRMED_SWEEP_INTERVAL", 5.0, minimum=0.1
            ),
        )

    def conninfo(self) -> str:
        from psycopg.conninfo import make_conninfo

        return make_conninfo(
            host=self.host,
            port=self.port,
            dbname=self.name,
            user=self.user,
            password=self.password or None,
            sslmode=self.sslmode,
            connect_timeout=max(1, round(self.connect_timeout)),
            application_name="myl",
            # A server running a statement for a client that has gone (the watchdog in
            # shared/db.py cut it) ends it within this many milliseconds, wherever it waits.
            options=f"-c client_connection_check_interval={CLIENT_CHECK_INTERVAL_MS}",
        )

    def describe(self) -> str:
        """Where the database is, without the password."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.name}"


@dataclass(frozen=True)
class RedisConfig:
    host: str = "127.0.0.1"
    port: int = 6379
    # The service's Redis ACL user (REDIS_USERNAME; empty: the default user) and its password.
    username: str = ""
    password: str = ""
    db: int = 0
    # A cache answer slower than this is treated as a miss.
    socket_timeout: float = 0.25
    # Consecutive failures that open the circuit, and how long it stays open before one
    # probe (for the services: before the guard tries to apply the invalidation log again).
    breaker_threshold: int = 3
    breaker_reset: float = 0.5
    # Every replica applies the durable invalidation log this often (shared/invalidation.py).
    invalidation_interval: float = 1.0
    enabled: bool = True
    # A Redis Cluster's seed nodes (REDIS_CLUSTER_NODES=host:port,host:port); when given,
    # REDIS_HOST/REDIS_PORT/REDIS_DB are not used.
    cluster_nodes: tuple[tuple[str, int], ...] = ()

    @classmethod
    def from_env(cls, env: EnvReader) -> RedisConfig:
        return cls(
            host=env.text("REDIS_HOST", "127.0.0.1"),
            port=env.port("REDIS_PORT", 6379),
            username=env.text("REDIS_USERNAME", ""),
            password=env.text("REDIS_PASSWORD", ""),
            db=env.integer("REDIS_DB", 0, maximum=15),
            socket_timeout=env.number("REDIS_TIMEOUT", 0.25, minimum=0.001),
            breaker_threshold=env.integer("REDIS_BREAKER_THRESHOLD", 3, minimum=1),
            breaker_reset=env.number("REDIS_BREAKER_RESET", 0.5, minimum=0.01),
            invalidation_interval=env.number("REDIS_INVALIDATION_INTERVAL", 1.0, minimum=0.01),
            enabled=env.flag("REDIS_ENABLED", True),
            cluster_nodes=_cluster_nodes(env),
        )


def _cluster_nodes(env: EnvReader) -> tuple[tuple[str, int], ...]:
    raw = env.text("REDIS_CLUSTER_NODES", "")
    nodes = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                "REDIS_CLUSTER_NODES", raw, "comma-separated host:port pairs of cluster nodes"
            )
        nodes.append((host, int(port)))
    return tuple(nodes)


@dataclass(frozen=True)
class ServerConfig:
    """What every gRPC service process needs."""

    service: str
    host: str
    port: int
    environment: str
    log_level: str
    log_format: str
    metrics_port: int
    shutdown_grace: float
    database: DatabaseConfig
    redis: RedisConfig
    # The process's identity on the internal mutual TLS (shared/tls.py).
    tls: InternalTls = PLAINTEXT
    # After SIGTERM: seconds of serving while health says NOT_SERVING (so that the gateway's
    # health checks move new requests elsewhere), before new RPCs are refused.
    drain_delay: float = 1.5

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def from_env(
        cls,
        service: str,
        default_port: int,
        default_metrics_port: int,
        environ: Mapping[str, str] | None = None,
    ) -> ServerConfig:
        env = EnvReader(service.upper(), environ)
        environment = env.choice(
            "ENVIRONMENT", "development", ("development", "test", "production")
        )
        return cls(
            service=service,
            host=env.text("HOST", "127.0.0.1"),
            port=env.port("PORT", default_port),
            environment=environment,
            log_level=env.choice(
                "LOG_LEVEL", "info", ("debug", "info", "warning", "error", "critical")
            ),
            log_format=env.choice("LOG_FORMAT", "json", ("json", "console")),
            metrics_port=env.port("METRICS_PORT", default_metrics_port),
            shutdown_grace=env.number("SHUTDOWN_GRACE", 10.0),
            drain_delay=env.number("SHUTDOWN_DRAIN_DELAY", 1.5),
            database=DatabaseConfig.from_env(env, production=environment == "production"),
            redis=RedisConfig.from_env(env),
            tls=internal_tls_from_env(env, production=environment == "production"),
        )


def internal_tls_from_env(env: EnvReader, *, production: bool) -> InternalTls:
    """`INTERNAL_TLS` (on unless set off) and the identity's three PEM files:
    `INTERNAL_TLS_CERT_FILE` (the certificate, then any intermediates), `INTERNAL_TLS_KEY_FILE`
    and `INTERNAL_TLS_CA_FILE` (the internal CA: what a peer's certificate must chain to).
    Off is for debugging on a developer's machine only: refused in production. A file that is
    not named is found by `require_internal_tls`, when a process is about to serve or call."""
    enabled = env.flag("INTERNAL_TLS", True)
    if not enabled:
        if production:
            key, value = env.lookup("INTERNAL_TLS")
            raise ConfigError(key, value, "on in production (off is for local debugging only)")
        return PLAINTEXT
    files: list[Path] = []
    unset: list[str] = []
    for name in INTERNAL_TLS_FILES:
        key, value = env.lookup(name)
        files.append(Path(value) if value else Path())
        if not value:
            unset.append(key)
    return InternalTls(True, files[0], files[1], files[2], unset=tuple(unset))


INTERNAL_TLS_FILES = ("INTERNAL_TLS_CERT_FILE", "INTERNAL_TLS_KEY_FILE", "INTERNAL_TLS_CA_FILE")


def require_internal_tls(tls: InternalTls) -> None:
    """ConfigError naming the first identity file that is not set, unless TLS is off."""
    if tls.enabled and tls.unset:
        raise ConfigError(
            tls.unset[0],
            None,
            "a PEM file of this process's internal identity (or INTERNAL_TLS=off)",
        )


class _ServiceConfig(Protocol):
    @property
    def server(self) -> ServerConfig: ...


_Config = TypeVar("_Config", bound=_ServiceConfig)


def load_for_serving(service: str, load: Callable[[], _Config]) -> _Config | None:
    """A service's settings for `serve` (`load`, then the internal identity files it needs to
    serve), with logging configured by them; None, with the reason on stderr, when they are
    unusable: the process then exits with status 2, before it touches anything."""
    try:
        config = load()
        require_internal_tls(config.server.tls)
    except ConfigError as exc:
        print(f"{service}: {exc}", file=sys.stderr)
        return None
    configure_logging(config.server.log_level, config.server.log_format, service)
    return config
