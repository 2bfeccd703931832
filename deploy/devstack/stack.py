"""`make run`: the whole local stack in the foreground.

PostgreSQL and Redis run from the system's binaries under `.run/` unless
`DB_HOST` / `REDIS_HOST` point at servers of your own. Then: migrations, a
development CA, cert_service, key_service, the Envoy gateway, a bootstrap
operator key in `.run/admin.key`. Ctrl-C (or SIGTERM) stops everything in
reverse order, services first with a graceful drain, and leaves no process: a
further signal while stopping does not interrupt that. `make run` watches every
process it started; when one exits it prints the end of that one's log and stops
the whole stack (a half stack answering 503 would only hide the cause). If
`make run` itself is killed, the next one in the same run directory stops what it
left running (`.run/stack.pids`) before it checks the ports.

One stack per run directory: a second `make run` while one runs (it holds an
exclusive lock on `.run/stack.lock`) refuses at once, names the running one's
pid, and exits 1 without touching anything, including its `.run/envoy.yaml`.
Before starting anything it also checks that every port it will listen on is
free, and names the one that is not. `.run/` cannot be listed by others, and the
bootstrap operator key in it is mode 0600, as are the development CA's token PIN and token
store (the CA key is generated inside a SoftHSM2 token; a file `ca.key`, also 0600, only
where SoftHSM2 is not installed).

With `CERT_ISSUER=acme` and no `ACME_DIRECTORY_URL` of its own, cert_service gets a
local ACME world (`deploy.devstack.acme`): Knot DNS, authoritative for the device zone and
taking TSIG-signed updates, and Pebble, Let's Encrypt's test CA, validating DNS-01 against
that Knot. Their settings go to cert_service only (the TSIG secret and the EAB key are
nobody else's business). Default `make run` starts neither.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.devstack.acme import (
    KnotServer,
    PebbleServer,
    TsigKey,
    generate_account_key,
    generate_eab,
)
from deploy.devstack.gateway import (
    TRUST_FILE,
    DeviceTls,
    GatewayPorts,
    UpstreamTls,
    create_gateway_certificate,
    envoy_command,
    identity_sds,
    render_envoy_config,
)
from deploy.devstack.internal_ca import SDS_FILE, Identity, InternalCa, Renewer
from deploy.devstack.servers import (
    SERVICE_KEY_PATTERNS,
    DevStackError,
    PostgresServer,
    RedisAcl,
    RedisClusterServers,
    RedisServer,
    log_tail,
    proc_stat,
    spawn_logged,
    stop_process_groups,
    stored_password,
    wait_for_port,
)
from shared.config import ConfigError, EnvReader
from shared.tls import EDGE_TRUST, GATEWAY, IDENTITIES, OPERATOR, server_name

ROOT = Path(__file__).resolve().parents[2]
# A Redis Cluster node also listens on its port + 10000, the cluster bus.
CLUSTER_BUS_OFFSET = 10000
# The role the migrations run as and that owns the tables; each service has a role of its own.
DB_OWNER = "myl_owner"
RUN = Path(os.environ.get("MYL_RUN_DIR", ROOT / ".run"))
OPERATOR_PERMISSIONS = "admin,api:access,ssl:read,ssl:write,device:read,device:write"


def say(message: str) -> None:
    print(f"[stack] {message}", flush=True)


def wait_healthy(
    address: str,
    timeout: float,
    process: subprocess.Popen[bytes],
    *,
    caller: Identity | None = None,
    service: str = "",
) -> None:
    """Wait until the service at `address` says SERVING; asked as `caller` (an internal
    identity) of a server that proves it is `service`, or in plaintext without one."""
    deadline = time.monotonic() + timeout
    if caller is None:
        opened = grpc.insecure_channel(address)
    else:
        credentials = grpc.ssl_channel_credentials(
            caller.ca_file.read_bytes(), caller.key_file.read_bytes(), caller.cert_file.read_bytes()
        )
        override = ("grpc.ssl_target_name_override", server_name(service))
        opened = grpc.secure_channel(address, credentials, options=[override])
    with opened as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.poll() is not None:
                raise DevStackError(f"{process.args!r} exited with {process.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise DevStackError(f"{address} not healthy after {timeout}s")
            time.sleep(0.1)


def wait_gateway_healthy(port: int, timeout: float, process: subprocess.Popen[bytes]) -> None:
    """Wait until Envoy's /healthz says both services have a healthy host."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{port}/healthz"
    while True:
        if process.poll() is not None:
            raise DevStackError(f"envoy exited with {process.returncode}")
        with (
            contextlib.suppress(urllib.error.URLError, OSError),
            urllib.request.urlopen(url, timeout=1) as reply,
        ):
            if reply.status == 200:
                return
        if time.monotonic() > deadline:
            raise DevStackError(f"gateway {url} not healthy after {timeout}s")
        time.sleep(0.2)


def _replica_ports(env: dict[str, str], prefix: str, port: int) -> list[int]:
    """`<prefix>_REPLICAS` processes (default 1; one per core in production)."""
    count = EnvReader(prefix, env).integer("REPLICAS", 1, minimum=1, maximum=16)
    return [port + 100 * index for index in range(count)]


def _acme_port(cert_port: int) -> int:
    """A cert_service replica's ACME server port: its gRPC port + 500 (50551 by default)."""
    return cert_port + 500


def _target(ports: list[int]) -> str:
    """A gRPC target naming every replica (`ipv4:` takes a comma-separated list)."""
    if len(ports) == 1:
        return f"127.0.0.1:{ports[0]}"
    return "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)


def take_run_lock(run: Path) -> IO[str]:
    """Hold `run/stack.lock` for this process's lifetime, or fail naming the holder."""
    lock = open(run / "stack.lock", "a+")  # noqa: SIM115 (held until the process exits)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise DevStackError(
            f"another `make run` is already running from {run} (pid {holder}); "
            "stop it first (Ctrl-C in its terminal), or set MYL_RUN_DIR and other ports"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def require_free_ports(ports: dict[str, int], *, udp: Collection[str] = ()) -> None:
    """DevStackError naming the first port something already listens on; the ports
    named in `udp` (a DNS server's) are checked for UDP as well as TCP."""
    probes = [(name, port, socket.SOCK_STREAM) for name, port in ports.items()]
    probes += [(name, ports[name], socket.SOCK_DGRAM) for name in udp if name in ports]
    for name, port, kind in probes:
        if port == 0:
            continue
        with socket.socket(socket.AF_INET, kind) as probe:
            # As the servers do: connections of a stack that just stopped (TIME_WAIT)
            # do not make the port busy, a listener does.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                protocol = "UDP port" if kind == socket.SOCK_DGRAM else "port"
                variable = name.split()[0]  # "REDIS_CLUSTER_PORT + 10000" is set by the first
                raise DevStackError(
                    f"{protocol} {port} ({name}) is already in use on 127.0.0.1: stop what "
                    f"listens there or set {variable} to another port"
                ) from None


PIDS_FILE = "stack.pids"


@dataclass(frozen=True)
class Child:
    """A process `make run` started, leading its own process group, and watches."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    stop_signal: signal.Signals = signal.SIGTERM

    def describe_exit(self) -> str:
        code = self.process.returncode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited ({code})"
        tail = "\n".join(f"  {line}" for line in log_tail(self.log).splitlines())
        return f"{self.name} (pid {self.process.pid}) {how}; the end of {self.log}:\n{tail}"


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid`: with the pid, it names one process for good."""
    fields = proc_stat(pid)
    return fields[19] if fields is not None else None


def record_children(run: Path, children: list[Child]) -> None:
    """`run/stack.pids`: what this stack runs, for the next one to stop if this one is
    killed before it could (stop_leftovers)."""
    lines = [
        f"{c.process.pid} {_start_time(c.process.pid) or '-'} {c.stop_signal.name} {c.name}\n"
        for c in children
    ]
    fresh = run / f"{PIDS_FILE}.new"
    fresh.write_text("".join(lines))
    fresh.replace(run / PIDS_FILE)


def _stop_group(pgid: int, sig: signal.Signals, timeout: float) -> bool:
    """Signal a process group we did not start and wait until it is gone; SIGKILL after
    `timeout`. False when even that did not end it."""
    for signum, wait in ((sig, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signum)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _group_running(pgid):
                return True
            time.sleep(0.05)
    return False


def _group_running(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs. One that has exited but is not yet
    reaped (its parent, `make run`, was killed: init reaps it when it gets to it, two
    seconds later on some machines) holds no port or file any more and counts as gone."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    for entry in os.listdir("/proc"):
        fields = proc_stat(entry) if entry.isdigit() else None
        if fields is not None and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


def stop_leftovers(run: Path, timeout: float = 15.0) -> None:
    """Stop what an earlier `make run` of this run directory left running: it was killed
    (SIGKILL, a crash) before it could stop its children, which hold their ports. Called
    with the run lock held, so no live `make run` owns them; a pid the system has since
    given to another process is left alone (its start time differs)."""
    path = run / PIDS_FILE
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return
    for line in reversed(lines):
        pid_text, started, sig_name, name = line.split(" ", 3)
        pid = int(pid_text)
        if started == "-" or _start_time(pid) != started:
            continue
        say(f"stopping {name} (pid {pid}), left running by a `make run` that was killed")
        if not _stop_group(pid, signal.Signals[sig_name], timeout):
            raise DevStackError(f"{name} (pid {pid}) does not stop: kill it, then start again")
    path.unlink()


class Stack:
    def __init__(self) -> None:
        self.env = dict(os.environ)
        # What stops what was started, in the order of starting: a function, or a process
        # this stack spawned (the processes started one after another stop together).
        self.stops: list[Callable[[], None] | subprocess.Popen[bytes]] = []
        # What `migrate up` runs as: the owner role, granting each service's role its tables.
        self.migration_env: dict[str, str] = {}
        reader = EnvReader("", self.env)
        self.cert_port = EnvReader("CERT_SERVICE", self.env).port("PORT", 50051)
        self.key_port = EnvReader("KEY_SERVICE", self.env).port("PORT", 50052)
        self.gateway_port = reader.port("GATEWAY_PORT", 8080)
        # Certificates name CRLs and the CA certificate under the local gateway.
        self.env.setdefault("PKI_BASE_URL", f"http://127.0.0.1:{self.gateway_port}")
        self.admin_port = reader.port("ENVOY_ADMIN_PORT", 9901)
        # Devices with their certificate (mutual TLS). Under CERT_ISSUER=acme the gateway
        # trusts the ACME CA's roots (the local Pebble's, or EDGE_TRUST_CA_FILE for a CA of
        # one's own) and cert_service checks revocation (cert_service.edge_trust).
        self.device_port = reader.port("DEVICE_TLS_PORT", 8443)
        self.trust_metrics_port = reader.port("EDGE_TRUST_METRICS_PORT", 9466)
        # Replica i of a service listens on its port + 100 * i (metrics likewise).
        self.cert_ports = _replica_ports(self.env, "CERT_SERVICE", self.cert_port)
        self.key_ports = _replica_ports(self.env, "KEY_SERVICE", self.key_port)
        # CERT_ISSUER=acme without a CA of its own: a local Knot and Pebble (start_acme).
        cert = EnvReader("CERT_SERVICE", self.env)
        self.local_acme = cert.text("CERT_ISSUER", "builtin") == "acme" and not cert.text(
            "ACME_DIRECTORY_URL", ""
        )
        acme = cert.text("CERT_ISSUER", "builtin") == "acme"
        self.edge_trust_ca_file = (
            str(RUN / "acme" / "pebble-root.pem")
            if self.local_acme
            else reader.text("EDGE_TRUST_CA_FILE", "")
            if acme
            else ""
        )
        self.device_tls = bool(self.device_port) and (not acme or bool(self.edge_trust_ca_file))
        self.knot_port = reader.port("KNOT_PORT", 15353)
        self.pebble_port = reader.port("PEBBLE_PORT", 14000)
        self.pebble_management_port = reader.port("PEBBLE_MANAGEMENT_PORT", 15000)
        # Settings for cert_service processes only (start_acme fills it).
        self.cert_env: dict[str, str] = {}
        # Local Redis Cluster nodes (REDIS_CLUSTER=1 without REDIS_CLUSTER_NODES).
        self.cluster_ports: list[int] = []
        if reader.flag("REDIS_CLUSTER", False) and not self.env.get("REDIS_CLUSTER_NODES"):
            base = reader.port("REDIS_CLUSTER_PORT", 7000)
            if base + 5 + CLUSTER_BUS_OFFSET > 65535:
                highest = 65535 - 5 - CLUSTER_BUS_OFFSET
                raise ConfigError(
                    "REDIS_CLUSTER_PORT",
                    str(base),
                    f"a port up to {highest} (six nodes from it, each with its cluster bus "
                    f"on its port + {CLUSTER_BUS_OFFSET})",
                )
            self.cluster_ports = [base + n for n in range(6)]
        # What this stack started and watches (every one leads its own process group).
        self.children: list[Child] = []
        # Mutual TLS on the service ports, with identities from RUN/internal-ca (shared/tls.py).
        self.internal_ca: InternalCa | None = None
        self.internal_tls = reader.flag("INTERNAL_TLS", True)

    def ports(self) -> dict[str, int]:
        """Every port this stack will listen on, by the variable that sets it."""
        ports = {"GATEWAY_PORT": self.gateway_port, "ENVOY_ADMIN_PORT": self.admin_port}
        if self.device_tls:
            ports["DEVICE_TLS_PORT"] = self.device_port
            if self.trust_metrics_port:
                ports["EDGE_TRUST_METRICS_PORT"] = self.trust_metrics_port
        for prefix, service_ports, metrics_default in (
            ("CERT_SERVICE", self.cert_ports, 9464),
            ("KEY_SERVICE", self.key_ports, 9465),
        ):
            metrics = EnvReader(prefix, self.env).port("METRICS_PORT", metrics_default)
            for index, port in enumerate(service_ports):
                suffix = f" + {100 * index}" if index else ""
                ports[f"{prefix}_PORT{suffix}"] = port
                if metrics:
                    ports[f"{prefix}_METRICS_PORT{suffix}"] = metrics + 100 * index
        if not self.env.get("DB_HOST"):
            ports["DB_PORT"] = EnvReader("", self.env).port("DB_PORT", 5432)
        for index, port in enumerate(self.cluster_ports):
            name = "REDIS_CLUSTER_PORT" + (f" + {index}" if index else "")
            ports[name] = port
        for index, port in enumerate(self.cluster_ports):
            bus = f"REDIS_CLUSTER_PORT + {index + CLUSTER_BUS_OFFSET} (cluster bus)"
            ports[bus] = port + CLUSTER_BUS_OFFSET
        if not self.cluster_ports and not self.env.get("REDIS_HOST"):
            ports["REDIS_PORT"] = EnvReader("", self.env).port("REDIS_PORT", 6379)
        if self.local_acme:
            ports["KNOT_PORT"] = self.knot_port
            ports["PEBBLE_PORT"] = self.pebble_port
            ports["PEBBLE_MANAGEMENT_PORT"] = self.pebble_management_port
        return ports

    def udp_ports(self) -> list[str]:
        """The names in ports() that also listen on UDP."""
        return ["KNOT_PORT"] if self.local_acme else []

    def watch(
        self,
        name: str,
        process: subprocess.Popen[bytes] | None,
        log: Path,
        stop_signal: signal.Signals = signal.SIGTERM,
    ) -> None:
        """Watch a started process: main() reports it at once if it exits."""
        if process is not None:
            self.children.append(Child(name, process, log, stop_signal))
            record_children(RUN, self.children)

    def exited(self) -> Child | None:
        """The first watched process that is no longer running."""
        return next((c for c in self.children if c.process.poll() is not None), None)

    def start_databases(self) -> None:
        if not self.env.get("DB_HOST"):
            port = EnvReader("", self.env).port("DB_PORT", 5432)
            postgres = PostgresServer(RUN / "postgres", port, durable=True, secure=True)
            say(f"PostgreSQL on 127.0.0.1:{port} (data in {postgres.directory})")
            self.stops.append(postgres.stop)
            postgres.start()
            self.watch("PostgreSQL", postgres.process, postgres.log_path, signal.SIGINT)
            self.database_roles(postgres)
            self.env.update(DB_HOST="127.0.0.1", DB_PORT=str(port))
            self.env.setdefault("DB_SSLMODE", "disable")
        if self.cluster_ports:
            ports = self.cluster_ports
            acl = RedisAcl(RUN / "redis-users")
            cluster = RedisClusterServers(RUN / "redis-cluster", ports, acl=acl)
            say(
                f"Redis Cluster (3 masters, 3 replicas) on 127.0.0.1:{ports[0]}-{ports[-1]}, "
                f"cluster bus on {ports[0] + CLUSTER_BUS_OFFSET}-{ports[-1] + CLUSTER_BUS_OFFSET}"
            )
            self.stops.append(cluster.stop)
            try:
                cluster.start()
            finally:
                for node in cluster.nodes:
                    self.watch(f"Redis Cluster node {node.port}", node.process, node.log_path)
            self.env["REDIS_CLUSTER_NODES"] = cluster.addresses
            self.redis_users(acl)
        elif not self.env.get("REDIS_HOST"):
            port = EnvReader("", self.env).port("REDIS_PORT", 6379)
            acl = RedisAcl(RUN / "redis-users")
            redis = RedisServer(RUN / "redis", port, acl=acl)
            say(f"Redis on 127.0.0.1:{port}")
            self.stops.append(redis.stop)
            redis.start()
            self.watch("Redis", redis.process, redis.log_path)
            self.env.update(REDIS_HOST="127.0.0.1", REDIS_PORT=str(port))
            self.redis_users(acl)

    def database_roles(self, postgres: PostgresServer) -> None:
        """The migrations' owner and one role per service, each with its own password
        (`RUN/postgres-users/<role>.password`); the database belongs to the owner, and each
        service's migrations grant its role only its own tables (privileges.toml)."""
        users = RUN / "postgres-users"
        owner = stored_password(users, DB_OWNER)
        postgres.ensure_role(DB_OWNER, owner)
        postgres.create_database(self.env.get("DB_NAME", "myl"), owner=DB_OWNER)
        for service in SERVICE_KEY_PATTERNS:
            prefix = service.upper()
            postgres.ensure_role(service, stored_password(users, service))
            self.env[f"{prefix}_DB_USER"] = service
            self.env[f"{prefix}_DB_PASSWORD"] = stored_password(users, service)
            self.migration_env |= {
                f"{prefix}_DB_USER": DB_OWNER,
                f"{prefix}_DB_PASSWORD": owner,
                f"{prefix}_DB_SERVICE_ROLE": service,
            }
        say(
            f"  database roles: {DB_OWNER} (migrations), cert_service, key_service; as an "
            f"operator: PGPASSWORD=$(cat {users / DB_OWNER}.password) psql -h 127.0.0.1 "
            f"-p {postgres.port} -U {DB_OWNER} {self.env.get('DB_NAME', 'myl')}"
        )

    def redis_users(self, acl: RedisAcl) -> None:
        """Each service logs in to the local Redis as its own user (`RedisAcl`)."""
        for service in SERVICE_KEY_PATTERNS:
            self.env.update(acl.env(service))
        say(
            f"  Redis users: one per service, no default user; as an operator: "
            f"redis-cli --user admin --pass $(cat {acl.directory / 'admin.password'})"
        )

    def start_python(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """A command of ours (`python -m ...`) started in the background; `output` waits
        for it. Most of such a command's time is the interpreter starting: two started at
        once take little more than one."""
        return subprocess.Popen(
            [sys.executable, *args],
            env={**self.env, **(env or {})},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    @staticmethod
    def output(process: subprocess.Popen[str]) -> str:
        """What `process` printed; DevStackError with its errors when it failed."""
        out, err = process.communicate()
        if process.returncode != 0:
            argv = process.args if isinstance(process.args, list) else [process.args]
            command = " ".join(str(arg) for arg in argv[1:])
            raise DevStackError(f"{command} failed:\n{err.strip()}")
        return out

    def migrate(self) -> None:
        """Both services' migrations at once: each runner holds its service's lock and
        touches only its own tables."""
        running = [
            self.start_python("-m", service, "migrate", "up", env=self.migration_env)
            for service in ("cert_service", "key_service")
        ]
        for process in running:
            for line in self.output(process).splitlines():
                say(line)

    def development_ca(self) -> None:
        """The development CA under RUN/ca, unless CA_CERT_FILE names a CA of the user's.

        Its key is generated in a SoftHSM2 token (`deploy.devstack.softhsm`) where SoftHSM2 is
        installed, and is a file (`ca.key`) where it is not. An existing CA is kept as it is,
        a file key included: its certificates are out there.
        """
        if self.env.get("CA_CERT_FILE") or self.env.get("CERT_SERVICE_CA_CERT_FILE"):
            return
        from cert_service.ca import create_development_ca
        from cert_service.config import ca_subject_from_env
        from deploy.devstack.softhsm import create_token_ca, softhsm_module

        subject = ca_subject_from_env(self.env)
        directory = RUN / "ca"
        module = softhsm_module()
        if module is None or (directory / "ca.key").exists():
            cert, key = create_development_ca(directory, subject)
            self.env.update(CA_CERT_FILE=str(cert), CA_KEY_FILE=str(key))
            say(f"development CA: {cert}, its key in the file {key}")
            if module is None:
                say("  (install SoftHSM2, Debian's softhsm2, for a CA whose key is in a token)")
            else:
                say(f"  (delete {directory} for a new CA whose key is in a SoftHSM2 token)")
        else:
            token_ca = create_token_ca(directory, subject, module)
            self.env.update(token_ca.env())
            # The ACME server's EAB keys derive from a secret the service can read, which the
            # token's key is not.
            secret = directory / "eab.secret"
            if not secret.exists():
                fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as file:
                    file.write(secrets.token_hex(32))
            self.env.setdefault("ACME_EAB_SECRET_FILE", str(secret))
            cert = token_ca.cert_path
            say(f"development CA: {cert}, its key in a SoftHSM2 token: {token_ca.uri}")
        from cryptography import x509

        existing = x509.load_pem_x509_certificate(cert.read_bytes()).subject
        if existing != subject.name():
            # An existing CA is never replaced silently: its certificates are out there.
            say(
                f"  its subject is {existing.rfc4514_string()}, not "
                f"{subject.name().rfc4514_string()} (CA_COUNTRY, CA_ORGANIZATION, "
                f"CA_COMMON_NAME); delete {directory} to create a new one"
            )

    def internal_identities(self) -> None:
        """The internal CA under RUN/internal-ca (made at the first start, kept), a fresh
        identity for every process, and a thread that renews each at half its lifetime:
        the services and Envoy take the new files without a restart."""
        if not self.internal_tls:
            say("internal TLS is off (INTERNAL_TLS=off): the service ports answer anyone")
            return
        ca = InternalCa(RUN / "internal-ca", sds=identity_sds)
        for name in IDENTITIES:
            ca.issue(name)
        self.internal_ca = ca
        self.env.update(ca.services_env())
        renewer = Renewer(ca)
        renewer.start()
        self.stops.append(renewer.stop)
        say(
            f"internal CA: {ca.cert_file} (identities in {ca.directory}, valid "
            f"{ca.validity}, renewed at half-life)"
        )

    def operator_identity(self) -> Identity | None:
        return None if self.internal_ca is None else self.internal_ca.identity(OPERATOR)

    def start_acme(self) -> None:
        """Knot and Pebble for CERT_ISSUER=acme, under RUN/knot and RUN/pebble.

        A new TSIG key and EAB key at every start (both servers rewrite their config, and
        Pebble forgets its accounts anyway); the account key `RUN/acme/account.key` is
        kept. Pebble issues for 90 days, like Let's Encrypt, rather than its own default of
        five years. `PEBBLE_*` variables of the environment reach Pebble, and beat the
        `PEBBLE_VA_NOSLEEP=1` set here.
        """
        if not self.local_acme:
            return
        zone = EnvReader("CERT_SERVICE", self.env).text("DNS_ZONE", "myl.zip")
        knot = KnotServer(RUN / "knot", self.knot_port, zone, tsig=TsigKey.generate())
        say(f"Knot DNS on 127.0.0.1:{knot.port}, zone {knot.zone} (log {knot.log_path})")
        self.stops.append(knot.stop)
        knot.start()
        self.watch("Knot DNS", knot.process, knot.log_path)
        pebble = PebbleServer(
            RUN / "pebble",
            self.pebble_port,
            self.pebble_management_port,
            knot.port,
            eab=generate_eab(),
            extra_env={k: v for k, v in self.env.items() if k.startswith("PEBBLE_")},
            certificate_validity=timedelta(days=90),
        )
        say(
            f"Pebble (test ACME CA) on {pebble.directory_url}, management on "
            f"{pebble.management_url} (log {pebble.log_path})"
        )
        self.stops.append(pebble.stop)
        pebble.start()
        self.watch("Pebble", pebble.process, pebble.log_path)
        acme = RUN / "acme"
        acme.mkdir(mode=0o700, exist_ok=True)
        account_key = generate_account_key(acme / "account.key")
        root = acme / "pebble-root.pem"
        root.write_text(pebble.root_pem())
        self.cert_env = {
            **knot.env(),
            **pebble.env(),
            "ACME_ACCOUNT_KEY_FILE": str(account_key),
        }
        say(f"Pebble's issuing root (new at every start, trusted by nothing else): {root}")
        say(f"  check a chain: openssl verify -CAfile {root} -untrusted chain.pem chain.pem")

    def spawn(
        self, name: str, argv: list[str], extra_env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log_path = RUN / f"{name}.log"
        process = spawn_logged(argv, log_path, {**self.env, **(extra_env or {})}, cwd=ROOT)
        self.stops.append(process)
        self.watch(name, process, log_path)
        say(f"{name} started (pid {process.pid}, log {log_path})")
        return process

    def start_services(self) -> None:
        # Each service reaches the other's replicas as one gRPC target (the first that
        # answers); the gateway balances over all of them.
        self.env.setdefault("CERT_SERVICE_ADDRESS", _target(self.cert_ports))
        self.env.setdefault("KEY_SERVICE_ADDRESS", _target(self.key_ports))
        # No drain delay: the stack stops its gateway with its services (and stops whole when
        # a part dies), so no gateway is left to move traffic away while a service waits.
        self.env.setdefault("SHUTDOWN_DRAIN_DELAY", "0")
        started = []
        for service, ports, metrics in (
            ("cert_service", self.cert_ports, 9464),
            ("key_service", self.key_ports, 9465),
        ):
            prefix = service.upper()
            metrics = EnvReader(prefix, self.env).port("METRICS_PORT", metrics)
            for index, port in enumerate(ports):
                name = service if len(ports) == 1 else f"{service}-{index}"
                replica = {f"{prefix}_PORT": str(port)}
                if service == "cert_service":
                    replica.update(self.cert_env)
                    # Its ACME server (`/acme/` on the gateway), beside its gRPC port.
                    replica["CERT_SERVICE_ACME_SERVER_PORT"] = str(_acme_port(port))
                if metrics:
                    replica[f"{prefix}_METRICS_PORT"] = str(metrics + 100 * index)
                process = self.spawn(
                    name, [sys.executable, "-m", service, "serve"], extra_env=replica
                )
                started.append((service, port, process))
        operator = self.operator_identity()
        for service, port, process in started:
            wait_healthy(f"127.0.0.1:{port}", 30, process, caller=operator, service=service)

    def start_edge_trust(self) -> DeviceTls | None:
        """The device listener's certificate and trust files: the edge trust writer (beside
        Envoy, as on Kubernetes) keeps the CA and CRLs current in `.run/edge-trust`."""
        if not self.device_tls:
            return None
        gateway = create_gateway_certificate(RUN / "gateway")
        trust = RUN / "edge-trust"
        # Its own internal identity: GetCrl and GetIssuerCertificate, nothing else.
        identity = {}
        if self.internal_ca is not None:
            identity = self.internal_ca.identity(EDGE_TRUST).env("EDGE_TRUST")
        writer = self.spawn(
            "edge_trust",
            [sys.executable, "-m", "cert_service.edge_trust"],
            extra_env={
                "EDGE_TRUST_DIR": str(trust),
                "CERT_SERVICE_ADDRESS": _target(self.cert_ports),
                "EDGE_TRUST_METRICS_PORT": str(self.trust_metrics_port),
                "EDGE_TRUST_CA_FILE": self.edge_trust_ca_file,
                **identity,
            },
        )
        deadline = time.monotonic() + 30
        while not (trust / TRUST_FILE).exists():
            if writer.poll() is not None:
                raise DevStackError(f"edge_trust exited with {writer.returncode}")
            if time.monotonic() > deadline:
                raise DevStackError(
                    "edge_trust wrote no trust files in 30 s (see .run/edge_trust.log)"
                )
            time.sleep(0.1)
        return DeviceTls(self.device_port, gateway.cert, gateway.key, trust)

    def start_gateway(self) -> None:
        device_tls = self.start_edge_trust()
        ports = GatewayPorts(
            self.gateway_port,
            self.admin_port,
            self.cert_ports[0],
            self.key_ports[0],
            cert_replica_ports=tuple(self.cert_ports[1:]),
            key_replica_ports=tuple(self.key_ports[1:]),
            acme_ports=tuple(_acme_port(port) for port in self.cert_ports),
        )
        config_path = RUN / "envoy.yaml"
        upstream_tls = None
        if self.internal_ca is not None:
            directory = self.internal_ca.identity(GATEWAY).directory
            upstream_tls = UpstreamTls(directory, directory / SDS_FILE)
        config_path.write_text(
            render_envoy_config(
                ports,
                listen_address=self.env.get("GATEWAY_HOST", "127.0.0.1"),
                access_log_path=RUN / "envoy-access.log",
                device_tls=device_tls,
                upstream_tls=upstream_tls,
            )
        )
        envoy = self.spawn("envoy", envoy_command(config_path, concurrency=2))
        wait_for_port("127.0.0.1", self.gateway_port, 30, envoy)
        wait_gateway_healthy(self.gateway_port, 30, envoy)

    def start_bootstrap_key(self) -> subprocess.Popen[str] | None:
        """The first start's operator key, made (in the database, once migrated) while the
        rest starts; `bootstrap_key` stores it. None when it exists already."""
        if (RUN / "admin.key").exists():
            return None
        return self.start_python(
            "-m",
            "key_service",
            "admin",
            "create-key",
            "--permissions",
            OPERATOR_PERMISSIONS,
            "--name",
            "bootstrap operator",
        )

    def bootstrap_key(self, making: subprocess.Popen[str] | None) -> Path:
        path = RUN / "admin.key"
        if making is None:
            return path
        out = self.output(making)
        key = next(line.strip() for line in out.splitlines() if line.startswith("myl_"))
        path.write_text(key + "\n")
        path.chmod(0o600)
        return path

    def stop(self) -> None:
        """Stop everything in the reverse order of starting; the gateway and the services
        together (signalled at once, so their drain delays overlap: with the gateway gone
        nothing is routed to them any more)."""
        together: list[subprocess.Popen[bytes]] = []
        for stop in [*reversed(self.stops), None]:
            if isinstance(stop, subprocess.Popen):
                together.append(stop)
                continue
            if together:
                with contextlib.suppress(Exception):
                    stop_process_groups(together)
                together = []
            if stop is not None:
                with contextlib.suppress(Exception):
                    stop()
        self.stops.clear()
        if all(child.process.poll() is not None for child in self.children):
            with contextlib.suppress(FileNotFoundError):
                (RUN / PIDS_FILE).unlink()


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[Callable[[], None]]:
    """The first SIGINT, SIGTERM or SIGHUP raises KeyboardInterrupt, which stops the stack;
    any later one (a second Ctrl-C, SIGTERM to the process group) is only acknowledged, so
    the stop always finishes and leaves nothing running. Yields a function that marks the
    stop as begun for any other reason (a child exited, an error)."""
    stopping = False

    def handler(signum: int, frame: object) -> None:
        nonlocal stopping
        if stopping:
            with contextlib.suppress(OSError):
                say(f"{signal.Signals(signum).name}: already stopping, finishing that first")
            return
        stopping = True
        raise KeyboardInterrupt

    def begin() -> None:
        nonlocal stopping
        stopping = True

    # SIGINT too: a shell may start us with it ignored (a background job).
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield begin
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _addresses(ports: list[int]) -> str:
    return ", ".join(f"127.0.0.1:{port}" for port in ports)


def say_ready(stack: Stack, key_path: Path) -> None:
    """The banner: every address the stack serves on, replicas included."""
    say("ready:")
    say(f"  gateway (REST + gRPC)  http://127.0.0.1:{stack.gateway_port}")
    if stack.device_tls:
        say(f"  devices (mutual TLS)   https://127.0.0.1:{stack.device_port}")
    say(f"  envoy admin            http://127.0.0.1:{stack.admin_port}")
    say(f"  cert_service (gRPC)    {_addresses(stack.cert_ports)}")
    say(f"  key_service (gRPC)     {_addresses(stack.key_ports)}")
    metrics = [port for name, port in stack.ports().items() if "_METRICS_PORT" in name]
    if metrics:
        say(f"  metrics (/metrics)     {_addresses(metrics)}")
    say(f"  operator key           {key_path}")
    operator = stack.operator_identity()
    if operator is not None:
        say(f"  operator identity      {operator.directory} (mutual TLS to the service ports:")
        say(f"    grpcurl {' '.join(operator.grpcurl_flags())} \\")
        say(f"      -servername key-service.myl.internal 127.0.0.1:{stack.key_port} list)")
    if stack.local_acme:
        say(f"  Knot DNS (updates)     127.0.0.1:{stack.knot_port}")
        say(f"  Pebble ACME directory  https://127.0.0.1:{stack.pebble_port}/dir")
        say(f"  Pebble's root          {RUN / 'acme' / 'pebble-root.pem'}")
    say("Ctrl-C stops everything; if a process of the stack exits, the whole stack stops")


def error(message: str) -> None:
    print(f"[stack] error: {message}", file=sys.stderr, flush=True)


def main() -> int:
    try:
        # Not listable by others. As root, PostgreSQL runs as `postgres` and must be able
        # to pass through to its data directory (search permission only).
        RUN.mkdir(mode=0o700, parents=True, exist_ok=True)
        RUN.chmod(0o711 if os.geteuid() == 0 else 0o700)
        lock = take_run_lock(RUN)
        stop_leftovers(RUN)
        stack = Stack()
        require_free_ports(stack.ports(), udp=stack.udp_ports())
    except (DevStackError, ConfigError, OSError) as exc:
        error(str(exc))
        return 1
    with lock, _stop_on_signals() as begin_stop:
        try:
            stack.start_databases()
            stack.migrate()
            making_key = stack.start_bootstrap_key()
            stack.development_ca()
            stack.internal_identities()
            stack.start_acme()
            stack.start_services()
            stack.start_gateway()
            say_ready(stack, stack.bootstrap_key(making_key))
            while (child := stack.exited()) is None:
                time.sleep(0.25)
            begin_stop()
            error(child.describe_exit())
            say("stopping everything")
            return 1
        except KeyboardInterrupt:
            say("stopping")
        except (DevStackError, ConfigError, OSError, subprocess.SubprocessError) as exc:
            begin_stop()
            detail = ""
            if isinstance(exc, subprocess.CalledProcessError) and exc.stderr:
                detail = "\n" + exc.stderr.decode(errors="replace").strip()
            error(f"{exc}{detail}")
            if (child := stack.exited()) is not None:
                error(child.describe_exit())
            return 1
        finally:
            begin_stop()
            stack.stop()
            say("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
