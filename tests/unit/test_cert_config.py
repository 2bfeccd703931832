from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from cert_service.ca import CaSubject
from cert_service.config import CertServiceConfig, ca_subject_from_env
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


def test_pki_defaults_and_settings() -> None:
    config = CertServiceConfig.from_env(CA)
    assert config.pki.base_url == "http://127.0.0.1:8080"
    assert config.pki.crl_shards == 128
    assert config.pki.policy_oid == "1.3.6.1.4.1.32473.1.1"
    assert config.crl_validity == 86_400
    assert config.ari_explanation_url == "http://127.0.0.1:8080/pki/renewal"
    assert config.reissue_issued_before is None

    config = CertServiceConfig.from_env(
        {
            **CA,
            "PKI_BASE_URL": "http://pki.example.net/",
            "CRL_SHARDS": "16",
            "CERTIFICATE_POLICY_OID": "1.3.6.1.4.1.99.1",
            "REISSUE_ISSUED_BEFORE": "2025-01-01T00:00:00+01:00",
        }
    )
    assert config.pki.crl_url(3) == "http://pki.example.net/pki/crls/3.crl"
    assert config.pki.ca_issuer_url() == "http://pki.example.net/pki/ca.cer"
    assert config.ari_explanation_url == "http://pki.example.net/pki/renewal"
    assert config.reissue_issued_before == datetime(2024, 12, 31, 23, tzinfo=UTC)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PKI_BASE_URL", "https://pki.example.net"),
        ("PKI_BASE_URL", "pki.example.net"),
        ("CRL_SHARDS", "0"),
        ("CERTIFICATE_POLICY_OID", "not-an-oid"),
        ("CRL_VALIDITY", "864001"),
        ("REISSUE_ISSUED_BEFORE", "yesterday"),
        ("REISSUE_ISSUED_BEFORE", "2025-01-01T00:00:00"),
        ("REISSUE_ISSUED_BEFORE", "2999-01-01T00:00:00+00:00"),
    ],
)
def test_bad_pki_values_are_refused_with_their_name(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        CertServiceConfig.from_env({**CA, name: value})
    assert caught.value.name == name


def test_ca_subject_from_the_environment() -> None:
    assert ca_subject_from_env({}) == CaSubject("XX", "myl device identity", "myl development CA")
    subject = ca_subject_from_env(
        {"CA_COUNTRY": "de", "CA_ORGANIZATION": "Example GmbH", "CA_COMMON_NAME": "Example CA"}
    )
    assert subject.name().rfc4514_string() == "CN=Example CA,O=Example GmbH,C=DE"
    for name, value in [
        ("CA_COUNTRY", "Germany"),
        ("CA_ORGANIZATION", ""),
        ("CA_COMMON_NAME", "x" * 65),
    ]:
        with pytest.raises(ConfigError) as caught:
            ca_subject_from_env({name: value})
        assert caught.value.name == name
