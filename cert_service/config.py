"""cert_service settings: the shared server settings plus `CERT_SERVICE_*` ones.

Every name below may be given with the `CERT_SERVICE_` prefix (which wins) or
without it; `make run` sets the unprefixed `CA_CERT_FILE` and `CA_KEY_URI` (with
`CA_KEY_PIN_FILE`) to a development CA whose key is in a SoftHSM2 token under `.run/hsm`,
or `CA_CERT_FILE` and `CA_KEY_FILE` to one under `.run/ca` where SoftHSM2 is not installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from cert_service.acme import AcmeSettings
from cert_service.ca import DEVICE_POLICY_OID, CaSubject, PkiLocations
from cert_service.dns01 import DnsSettings
from cert_service.hsm import Pkcs11Uri
from cert_service.names import new_uuid_subdomain
from shared.config import ConfigError, EnvReader, ServerConfig
from shared.limits import LimitSet, limits_from_env

SERVICE = "cert_service"
DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9464
MAX_VALIDITY_DAYS = 825


@dataclass(frozen=True)
class CertServiceConfig:
    server: ServerConfig
    ca_cert_file: Path
    # The CA key: a PEM file (CA_KEY_FILE), or a key in a PKCS#11 token (CA_KEY_URI, an RFC
    # 7512 URI; cert_service.hsm) with its PIN (CA_KEY_PIN_FILE, CA_KEY_PIN or the URI's
    # pin-source). Exactly one of the two is set for the builtin issuer.
    ca_key_file: Path
    ca_key_uri: Pkcs11Uri | None = None
    ca_key_pin: str = field(default="", repr=False)
    dns_zone: str = "myl.zip"
    cert_validity_days: int = 90
    # Renew once this fraction of a certificate's lifetime has passed.
    renew_at_fraction: float = 0.6667
    cache_ttl: float = 3600.0
    negative_cache_ttl: float = 30.0
    # Seconds between flushes of buffered access counters; 0 flushes only on shutdown.
    access_flush_interval: float = 5.0
    # Seconds between lifecycle passes; 0 disables the background loop.
    lifecycle_interval: float = 60.0
    lifecycle_batch_size: int = 100
    key_service_address: str = "127.0.0.1:50052"
    # Deadline of one RevokeDeviceApiKeys call.
    key_service_timeout: float = 2.0
    # Outbox relay: poll period, and the first and longest delay between retries.
    outbox_interval: float = 0.25
    outbox_retry_min: float = 0.5
    # Capped low: a delete's cascade must reach key_service within seconds of its return.
    outbox_retry_max: float = 0.5
    # Public URLs and CRL sharding written into every certificate (PKI_BASE_URL, CRL_SHARDS,
    # CERTIFICATE_POLICY_OID).
    pki: PkiLocations = field(default_factory=PkiLocations)
    # Seconds from a CRL's thisUpdate to its nextUpdate; a shard is re-signed when half of it
    # has passed, and within CRL_INTERVAL of a revocation in it.
    crl_validity: float = 86_400.0
    crl_interval: float = 1.0
    # ARI: explanation URL for urgent windows, and the mass re-issue cut-off (certificates
    # issued before it are due now).
    ari_explanation_url: str = "http://127.0.0.1:8080/pki/renewal"
    reissue_issued_before: datetime | None = None
    # Provisioning and registration limits: built-in defaults, LIMITS_FILE overrides.
    limits: LimitSet = field(default_factory=LimitSet.builtin)
    # How often pool and Redis gauges (and cert_service's fleet gauges) are sampled.
    metrics_interval: float = 5.0
    # CERT_ISSUER: "builtin" (the CA of CA_CERT_FILE/CA_KEY_FILE signs at once) or "acme"
    # (an ACME CA, asynchronously; `acme` and `dns` are then set).
    issuer: str = "builtin"
    acme: AcmeSettings | None = None
    dns: DnsSettings | None = None
    acme_poll_interval: float = 0.5
    # The RFC 8555 server devices use (cert_service.acme_server), behind the gateway at /acme/:
    # its HTTP port (ACME_SERVER_PORT; unset: not served, 0: any free port) and the terms of
    # service its directory names.
    acme_server_port: int | None = None
    acme_terms_url: str = "http://127.0.0.1:8080/acme/terms"
    # What the ACME server's EAB keys derive from (ACME_EAB_SECRET_FILE): by default the CA key
    # file or the ACME account key; required when the CA key is in a token (CA_KEY_URI), which
    # nothing can read.
    acme_eab_secret_file: Path | None = None

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, server: ServerConfig | None = None
    ) -> CertServiceConfig:
        """Read every setting; `server` replaces the shared server settings when given."""
        if server is None:
            server = ServerConfig.from_env(SERVICE, DEFAULT_PORT, DEFAULT_METRICS_PORT, environ)
        env = EnvReader("CERT_SERVICE", environ)
        zone = env.text("DNS_ZONE", "myl.zip")
        try:
            new_uuid_subdomain(zone)
        except ValueError:
            raise ConfigError(_name(env, "DNS_ZONE"), zone, "a DNS name such as myl.zip") from None
        fraction = env.number("RENEW_AT_FRACTION", 0.6667, minimum=0.0)
        if not 0.0 < fraction < 1.0:
            raise ConfigError(
                _name(env, "RENEW_AT_FRACTION"), str(fraction), "a number between 0 and 1"
            )
        retry_min = env.number("OUTBOX_RETRY_MIN", 0.5, minimum=0.01)
        pki = _pki_locations(env)
        crl_validity = env.number("CRL_VALIDITY", 86_400.0, minimum=60.0)
        if crl_validity > 10 * 86_400:
            # CA/Browser Forum BR 4.9.7: nextUpdate at most 10 days after thisUpdate.
            raise ConfigError(_name(env, "CRL_VALIDITY"), str(crl_validity), "at most 864000")
        explanation = env.text("ARI_EXPLANATION_URL", "") or f"{pki.base_url}/pki/renewal"
        issuer = env.choice("CERT_ISSUER", "builtin", ("builtin", "acme"))
        acme = _acme_settings(env) if issuer == "acme" else None
        dns = _dns_settings(env, zone.lower().removesuffix(".")) if issuer == "acme" else None
        ca_key_uri: Pkcs11Uri | None = None
        ca_key_pin = ""
        if issuer == "acme":
            ca_cert_file, ca_key_file = Path(), Path()
        else:
            ca_cert_file = _required_path(env, "CA_CERT_FILE", "the CA certificate (PEM)")
            ca_key_uri = _ca_key_uri(env)
            if ca_key_uri is None:
                ca_key_file = _required_path(
                    env, "CA_KEY_FILE", "the CA private key (PEM), or CA_KEY_URI for a token,"
                )
            else:
                ca_key_file = Path()
                ca_key_pin = _ca_key_pin(env, ca_key_uri)
        return cls(
            server=server,
            ca_cert_file=ca_cert_file,
            ca_key_file=ca_key_file,
            ca_key_uri=ca_key_uri,
            ca_key_pin=ca_key_pin,
            issuer=issuer,
            acme=acme,
            dns=dns,
            acme_poll_interval=env.number("ACME_POLL_INTERVAL", 0.5, minimum=0.01),
            dns_zone=zone.lower().removesuffix("."),
            cert_validity_days=env.integer(
                "CERT_VALIDITY_DAYS", 90, minimum=1, maximum=MAX_VALIDITY_DAYS
            ),
            renew_at_fraction=fraction,
            cache_ttl=env.number("CACHE_TTL", 3600.0, minimum=1.0),
            negative_cache_ttl=env.number("NEGATIVE_CACHE_TTL", 30.0, minimum=0.0),
            access_flush_interval=env.number("ACCESS_FLUSH_INTERVAL", 5.0),
            lifecycle_interval=env.number("LIFECYCLE_INTERVAL", 60.0),
            lifecycle_batch_size=env.integer(
                "LIFECYCLE_BATCH_SIZE", 100, minimum=1, maximum=10_000
            ),
            key_service_address=env.text("KEY_SERVICE_ADDRESS", "127.0.0.1:50052"),
            key_service_timeout=env.number("KEY_SERVICE_TIMEOUT", 2.0, minimum=0.05),
            outbox_interval=env.number("OUTBOX_INTERVAL", 0.25, minimum=0.01),
            outbox_retry_min=retry_min,
            outbox_retry_max=env.number("OUTBOX_RETRY_MAX", 0.5, minimum=retry_min),
            pki=pki,
            crl_validity=crl_validity,
            crl_interval=env.number("CRL_INTERVAL", 1.0, minimum=0.0),
            ari_explanation_url=explanation,
            reissue_issued_before=_optional_time(env, "REISSUE_ISSUED_BEFORE"),
            limits=limits_from_env(env),
            metrics_interval=env.number("METRICS_INTERVAL", 5.0, minimum=0.01),
            acme_server_port=(
                env.port("ACME_SERVER_PORT", 0) if env.text("ACME_SERVER_PORT", "") else None
            ),
            acme_terms_url=env.text("ACME_TERMS_URL", "") or f"{pki.base_url}/acme/terms",
            acme_eab_secret_file=_eab_secret_file(env, ca_key_uri),
        )


def _acme_settings(env: EnvReader) -> AcmeSettings:
    directory = env.text("ACME_DIRECTORY_URL", "")
    if not directory.startswith("https://"):
        raise ConfigError(
            _name(env, "ACME_DIRECTORY_URL"),
            directory or None,
            "the https:// URL of the ACME directory (CERT_ISSUER=acme), e.g. "
            "https://acme-v02.api.letsencrypt.org/directory",
        )
    key_file = _required_path(env, "ACME_ACCOUNT_KEY_FILE", "the ACME account key (PEM)")
    kid, hmac_key = env.text("ACME_EAB_KID", ""), env.text("ACME_EAB_HMAC_KEY", "")
    if bool(kid) != bool(hmac_key):
        raise ConfigError(
            _name(env, "ACME_EAB_HMAC_KEY" if kid else "ACME_EAB_KID"),
            None,
            "both ACME_EAB_KID and ACME_EAB_HMAC_KEY (External Account Binding), or neither",
        )
    retry_min = env.number("ACME_RETRY_MIN", 2.0, minimum=0.01)
    return AcmeSettings(
        directory_url=directory,
        account_key_file=key_file,
        contact=env.text("ACME_CONTACT", ""),
        eab_kid=kid,
        eab_hmac_key=hmac_key,
        ca_bundle=env.text("ACME_CA_BUNDLE", ""),
        network_timeout=env.number("ACME_NETWORK_TIMEOUT", 10.0, minimum=0.1),
        order_timeout=env.number("ACME_ORDER_TIMEOUT", 120.0, minimum=1.0),
        concurrency=env.integer("ACME_CONCURRENCY", 4, minimum=1, maximum=64),
        lease=env.number("ACME_LEASE", 20.0, minimum=1.0),
        retry_min=retry_min,
        retry_max=env.number("ACME_RETRY_MAX", 900.0, minimum=retry_min),
        orders=env.integer("ACME_ORDERS", 300, minimum=1, maximum=10_000_000),
        order_period=env.number("ACME_ORDER_PERIOD", 10_800.0, minimum=1.0),
    )


def _dns_settings(env: EnvReader, zone: str) -> DnsSettings:
    server = env.text("DNS_UPDATE_SERVER", "")
    host_port = _host_port(server, 53)
    if host_port is None:
        raise ConfigError(
            _name(env, "DNS_UPDATE_SERVER"),
            server or None,
            "host:port of the zone's authoritative server accepting RFC 2136 updates",
        )
    key_name = env.text("DNS_TSIG_KEY_NAME", "")
    secret = env.text("DNS_TSIG_SECRET", "")
    if not key_name or not secret:
        raise ConfigError(
            _name(env, "DNS_TSIG_SECRET" if key_name else "DNS_TSIG_KEY_NAME"),
            None,
            "the TSIG key name and its base64 secret (DNS_TSIG_KEY_NAME, DNS_TSIG_SECRET)",
        )
    checks: list[tuple[str, int]] = []
    for item in filter(None, (x.strip() for x in env.text("DNS_CHECK_SERVERS", "").split(","))):
        parsed = _host_port(item, 53)
        if parsed is None:
            raise ConfigError(_name(env, "DNS_CHECK_SERVERS"), item, "host:port[,host:port...]")
        checks.append(parsed)
    algorithm = env.choice(
        "DNS_TSIG_ALGORITHM", "hmac-sha256", ("hmac-sha256", "hmac-sha384", "hmac-sha512")
    )
    return DnsSettings(
        zone=zone,
        server=host_port[0],
        port=host_port[1],
        key_name=key_name,
        secret=secret,
        algorithm=algorithm,
        check_servers=tuple(checks),
        timeout=env.number("DNS_TIMEOUT", 3.0, minimum=0.1),
        propagation_timeout=env.number("DNS_PROPAGATION_TIMEOUT", 30.0, minimum=0.1),
    )


def _host_port(value: str, default_port: int) -> tuple[str, int] | None:
    host, _, port = value.rpartition(":") if ":" in value else (value, "", str(default_port))
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


def _name(env: EnvReader, name: str) -> str:
    scoped = f"{env.prefix}_{name}"
    return scoped if scoped in env.environ else name


def _required_path(env: EnvReader, name: str, what: str) -> Path:
    value = env.text(name, "")
    if not value:
        raise ConfigError(
            name,
            None,
            f"the path of {what} in {name} (or CERT_SERVICE_{name}); `make run` creates a "
            "development CA under .run/ca",
        )
    return Path(value)


def _ca_key_uri(env: EnvReader) -> Pkcs11Uri | None:
    text = env.text("CA_KEY_URI", "")
    if not text:
        return None
    try:
        uri = Pkcs11Uri.parse(text)
    except ValueError as exc:
        # Never echo a URI that carries a PIN.
        shown = None if "pin-value" in text else text
        raise ConfigError(
            _name(env, "CA_KEY_URI"), shown, f"an RFC 7512 pkcs11: URI with {exc}"
        ) from None
    if env.text("CA_KEY_FILE", ""):
        raise ConfigError(
            _name(env, "CA_KEY_FILE"),
            env.text("CA_KEY_FILE", ""),
            "unset: CA_KEY_URI names the CA key (in a token), CA_KEY_FILE a key in a file",
        )
    return uri


def _eab_secret_file(env: EnvReader, ca_key_uri: Pkcs11Uri | None) -> Path | None:
    path = env.path("ACME_EAB_SECRET_FILE", Path())
    if path != Path():
        return path
    if ca_key_uri is not None and env.text("ACME_SERVER_PORT", ""):
        raise ConfigError(
            _name(env, "ACME_EAB_SECRET_FILE"),
            None,
            "a file holding a random secret for the ACME server's EAB keys (ACME_SERVER_PORT "
            "is set, and the CA key, in a token under CA_KEY_URI, cannot be that secret)",
        )
    return None


def _ca_key_pin(env: EnvReader, uri: Pkcs11Uri) -> str:
    """The token's PIN: the URI's pin-source, else CA_KEY_PIN_FILE, else CA_KEY_PIN. A file
    holds the PIN alone; one trailing newline is not part of it."""
    pin_file = uri.pin_source or env.path("CA_KEY_PIN_FILE", Path())
    name = "CA_KEY_URI" if uri.pin_source else "CA_KEY_PIN_FILE"
    if pin_file != Path():
        try:
            pin = pin_file.read_text().removesuffix("\n")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
            raise ConfigError(
                _name(env, name), str(pin_file), f"a readable file holding the PIN ({reason})"
            ) from None
    else:
        pin = env.text("CA_KEY_PIN", "")
    if not pin:
        raise ConfigError(
            _name(env, "CA_KEY_PIN_FILE"),
            None,
            "the token's PIN for CA_KEY_URI: a file named by CA_KEY_PIN_FILE or the URI's "
            "pin-source, or CA_KEY_PIN",
        )
    return pin


def _pki_locations(env: EnvReader) -> PkiLocations:
    base_url = env.text("PKI_BASE_URL", "http://127.0.0.1:8080").rstrip("/")
    shards = env.integer("CRL_SHARDS", 128, minimum=1, maximum=100_000)
    policy = env.text("CERTIFICATE_POLICY_OID", DEVICE_POLICY_OID.dotted_string)
    try:
        x509.ObjectIdentifier(policy)
    except ValueError:
        raise ConfigError(
            _name(env, "CERTIFICATE_POLICY_OID"), policy, "a dotted OID such as 1.3.6.1.4.1.1.1"
        ) from None
    try:
        return PkiLocations(base_url, shards, policy)
    except ValueError:
        raise ConfigError(
            _name(env, "PKI_BASE_URL"), base_url, "an http:// URL such as http://pki.myl.zip"
        ) from None


def _optional_time(env: EnvReader, name: str) -> datetime | None:
    value = env.text(name, "")
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise ConfigError(_name(env, name), value, "an ISO 8601 time with offset") from None
    if parsed > datetime.now(UTC):
        # A cut-off in the future would re-issue each new certificate again at every pass.
        raise ConfigError(_name(env, name), value, "a time that is not in the future")
    return parsed.astimezone(UTC)


def ca_subject_from_env(environ: Mapping[str, str] | None = None) -> CaSubject:
    """The subject of a CA the project creates (`make run`'s development CA): `CA_COUNTRY`,
    `CA_ORGANIZATION`, `CA_COMMON_NAME` (each may carry the `CERT_SERVICE_` prefix)."""
    env = EnvReader("CERT_SERVICE", environ)
    default = CaSubject()
    values = {
        "CA_COUNTRY": env.text("CA_COUNTRY", default.country),
        "CA_ORGANIZATION": env.text("CA_ORGANIZATION", default.organization),
        "CA_COMMON_NAME": env.text("CA_COMMON_NAME", default.common_name),
    }
    try:
        return CaSubject(values["CA_COUNTRY"], values["CA_ORGANIZATION"], values["CA_COMMON_NAME"])
    except ValueError as exc:
        field = str(exc).split(" ", 1)[0]
        name = {"country": "CA_COUNTRY", "organization": "CA_ORGANIZATION"}.get(
            field, "CA_COMMON_NAME"
        )
        raise ConfigError(_name(env, name), values[name], str(exc)) from None
