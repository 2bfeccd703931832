from __future__ import annotations

import pytest

from shared.config import ConfigError, ServerConfig


def test_defaults_follow_the_seed() -> None:
    config = ServerConfig.from_env("cert_service", 50051, 9464, {})
    assert config.address == "127.0.0.1:50051"
    assert config.database.pool_max == 20
    assert config.database.idle_timeout == 30.0
    assert config.database.connect_timeout == 2.0
    assert config.database.sslmode == "prefer"
    assert (config.redis.host, config.redis.port) == ("127.0.0.1", 6379)


def test_service_override_beats_the_shared_name() -> None:
    environ = {"DB_HOST": "db.shared", "CERT_SERVICE_DB_HOST": "db.cert", "DB_PORT": "6543"}
    cert = ServerConfig.from_env("cert_service", 50051, 0, environ)
    key = ServerConfig.from_env("key_service", 50052, 0, environ)
    assert cert.database.host == "db.cert"
    assert key.database.host == "db.shared"
    assert cert.database.port == key.database.port == 6543


def test_production_requires_tls_to_the_database() -> None:
    config = ServerConfig.from_env("key_service", 50052, 0, {"ENVIRONMENT": "production"})
    assert config.database.sslmode == "verify-full"


@pytest.mark.parametrize(
    ("environ", "name"),
    [
        ({"DB_PORT": "five"}, "DB_PORT"),
        ({"KEY_SERVICE_PORT": "70000"}, "KEY_SERVICE_PORT"),
        ({"REDIS_TIMEOUT": "-1"}, "REDIS_TIMEOUT"),
        ({"REDIS_ENABLED": "maybe"}, "REDIS_ENABLED"),
        ({"DB_SSLMODE": "sometimes"}, "DB_SSLMODE"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
        ({"DB_POOL_MAX": "0"}, "DB_POOL_MAX"),
        ({"DB_IDLE_TIMEOUT": "nan"}, "DB_IDLE_TIMEOUT"),
    ],
)
def test_bad_value_is_refused_with_its_name(environ: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ServerConfig.from_env("key_service", 50052, 0, environ)
    assert caught.value.name == name
    assert name in str(caught.value)
    assert environ[name] in str(caught.value)
