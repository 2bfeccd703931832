"""The ACME issuer's pure parts: Retry-After, the CSR rule, the settings."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cert_service.acme import csr_names_problem, device_csr, parse_retry_after
from cert_service.config import CertServiceConfig
from cert_service.dns01 import challenge_name
from shared.config import ConfigError, ServerConfig
from tests.fixtures.cert import make_csr

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("Mon, 30 Nov 2026 12:01:30 GMT", 90.0),
        ("Mon, 30 Nov 2026 11:00:00 GMT", 0.0),  # in the past: now
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_is_read_as_seconds_or_an_http_date(
    header: str | None, seconds: float | None
) -> None:
    assert parse_retry_after(header, NOW) == seconds


def test_challenge_names_drop_the_wildcard_label() -> None:
    assert challenge_name("*.a.myl.zip") == "_acme-challenge.a.myl.zip"
    assert challenge_name("a.myl.zip.") == "_acme-challenge.a.myl.zip"


def test_a_device_csr_must_name_exactly_the_certificates_names() -> None:
    names = ["a.myl.zip", "*.a.myl.zip"]
    assert csr_names_problem(make_csr(names), names) is None
    assert csr_names_problem(make_csr(["A.MYL.ZIP", "*.a.myl.zip"]), names) is None
    for wrong in ([], ["a.myl.zip"], [*names, "b.myl.zip"]):
        problem = csr_names_problem(make_csr(wrong), names)
        assert problem is not None
        assert "*.a.myl.zip" in problem


def test_the_generated_keys_csr_names_the_certificate_and_carries_its_key() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    csr = device_csr(pem, ["a.myl.zip", "*.a.myl.zip"])
    assert csr_names_problem(csr, ["*.a.myl.zip", "a.myl.zip"]) is None
    assert x509.load_pem_x509_csr(csr.encode()).public_key() == key.public_key()


def _config(tmp_path: Path, **env: str) -> CertServiceConfig:
    environ = {
        "CERT_ISSUER": "acme",
        "ACME_DIRECTORY_URL": "https://127.0.0.1:14000/dir",
        "ACME_ACCOUNT_KEY_FILE": str(tmp_path / "account.key"),
        "DNS_UPDATE_SERVER": "127.0.0.1:5353",
        "DNS_TSIG_KEY_NAME": "myl-update.",
        "DNS_TSIG_SECRET": "c2VjcmV0",
        **env,
    }
    server = ServerConfig.from_env("cert_service", 0, 0, {})
    return CertServiceConfig.from_env(environ, server=server)


def test_acme_settings_are_read_and_need_no_local_ca(tmp_path: Path) -> None:
    config = _config(tmp_path, ACME_ORDERS="50", ACME_ORDER_PERIOD="604800")
    assert config.issuer == "acme"
    assert config.acme is not None
    assert config.dns is not None
    assert (config.acme.orders, config.acme.order_period) == (50, 604_800.0)
    assert (config.dns.server, config.dns.port, config.dns.zone) == ("127.0.0.1", 5353, "myl.zip")
    assert "c2VjcmV0" not in repr(config.dns)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"ACME_DIRECTORY_URL": "http://ca.example/dir"}, "ACME_DIRECTORY_URL"),
        ({"ACME_DIRECTORY_URL": ""}, "ACME_DIRECTORY_URL"),
        ({"ACME_ACCOUNT_KEY_FILE": ""}, "ACME_ACCOUNT_KEY_FILE"),
        ({"ACME_EAB_KID": "kid-1"}, "ACME_EAB_HMAC_KEY"),
        ({"ACME_EAB_HMAC_KEY": "abc"}, "ACME_EAB_KID"),
        ({"DNS_UPDATE_SERVER": ""}, "DNS_UPDATE_SERVER"),
        ({"DNS_UPDATE_SERVER": "host:99999"}, "DNS_UPDATE_SERVER"),
        ({"DNS_TSIG_SECRET": ""}, "DNS_TSIG_SECRET"),
        ({"DNS_CHECK_SERVERS": "a:1,b:x"}, "DNS_CHECK_SERVERS"),
        ({"CERT_ISSUER": "letsencrypt"}, "CERT_ISSUER"),
    ],
)
def test_bad_acme_settings_name_the_setting(
    tmp_path: Path, env: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        _config(tmp_path, **env)
    assert named in str(caught.value)
