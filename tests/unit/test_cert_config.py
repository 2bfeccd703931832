from __future__ import annotations

from pathlib import Path

import pytest

from cert_service.config import CertServiceConfig
from shared.config import ConfigError

CA = {"CA_CERT_FILE": "/ca/ca.crt", "CA_KEY_FILE": "/ca/ca.key"}


def test_defaults() -> None:
    config = CertServiceConfig.from_env(CA)
    assert config.server.port == 50051
    assert config.server.metrics_port == 9464
    assert config.dns_zone == "myl.zip"
    assert config.ca_cert_file == Path("/ca/ca.crt")
    assert config.cert_validity_days == 90
    assert config.renew_at_fraction == 0.6667
    assert config.cache_ttl == 3600
    assert config.negative_cache_ttl == 30
    assert config.key_service_address == "127.0.0.1:50052"


def test_prefixed_names_win() -> None:
    config = CertServiceConfig.from_env(
        {
            **CA,
            "CERT_SERVICE_CA_CERT_FILE": "/other/ca.crt",
            "DNS_ZONE": "Devices.Example.",
            "CERT_SERVICE_CERT_VALIDITY_DAYS": "30",
        }
    )
    assert config.ca_cert_file == Path("/other/ca.crt")
    assert config.dns_zone == "devices.example"
    assert config.cert_validity_days == 30


@pytest.mark.parametrize("missing", ["CA_CERT_FILE", "CA_KEY_FILE"])
def test_missing_ca_files_are_named(missing: str) -> None:
    environ = {k: v for k, v in CA.items() if k != missing}
    with pytest.raises(ConfigError) as caught:
        CertServiceConfig.from_env(environ)
    assert caught.value.name == missing
    assert missing in str(caught.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RENEW_AT_FRACTION", "1.5"),
        ("RENEW_AT_FRACTION", "0"),
        ("CERT_VALIDITY_DAYS", "900"),
        ("DNS_ZONE", "bad_zone"),
        ("CACHE_TTL", "soon"),
    ],
)
def test_bad_values_are_refused_with_their_name(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        CertServiceConfig.from_env({**CA, name: value})
    assert caught.value.name == name
