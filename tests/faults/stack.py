"""The fault suite's stack: every part a real process the suite may stop, hang or kill.

PostgreSQL and Redis (`deploy.devstack.servers`), both services as `python -m <service> serve`
and Envoy (`deploy.devstack.gateway`), each started in a session of its own, on free loopback
ports, with an operator key made by `python -m key_service admin create-key` as `make run`
makes it.

Faults are signals sent by process id to a process the suite started and to its descendants,
never to a process found by name. Descendants, not the process group: every PostgreSQL backend
calls setsid(), so signalling the postmaster's group would hang or kill the postmaster alone
while the backends (and the connections the services hold) carry on.

Every method that waits does so without blocking the event loop, so the load the tests drive
from the same loop keeps its pace while a part stops or starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Final, Literal

import grpc
import httpx
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cert_service.ca import create_development_ca
from deploy.devstack.gateway import GatewayPorts, envoy_command, render_envoy_config
from deploy.devstack.servers import PostgresServer, RedisServer, free_port, proc_stat
from deploy.devstack.stack import OPERATOR_PERMISSIONS
from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from myl.key.v1 import key_pb2, key_pb2_grpc
from shared.migrations import MigrationRunner, load_migrations
from tests.fixtures import internal_tls

ROOT: Final = Path(__file__).resolve().parents[2]
DATABASE: Final = "myl"
# The Redis settings the services run with here (the defaults, spelled out: tests count
# against them).
REDIS_TIMEOUT: Final = 0.25
REDIS_BREAKER_RESET: Final = 2.0
# Counters are flushed every second here, so a test sees them without waiting long.
FLUSH_INTERVAL: Final = 1.0
METRICS_INTERVAL: Final = 1.0
SHUTDOWN_GRACE: Final = 5.0
# Channels reconnect quickly after a restart (gRPC's default backoff starts at 1 s and grows).
CHANNEL_OPTIONS: Final = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]

ServiceName = Literal["cert_service", "key_service"]
PartName = Literal["postgres", "redis", "cert_service", "key_service", "envoy"]
SERVICES: Final[tuple[ServiceName, ...]] = ("cert_service", "key_service")


class StackError(RuntimeError):
    pass


def unique(prefix: str) -> str:
    """A device id (or any name) no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class ServiceProcess:
    """One service (or Envoy) as an OS process in a session of its own."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], log: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = dict(env)
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 8) -> str:
        """The end of the process's output (the directory is gone after the run)."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    def signal(self, sig: signal.Signals) -> None:
        """Send `sig` to the process and everything it started."""
        signal_tree(self.process, sig)

    async def wait_exit(self, limit: float) -> int:
        """The exit status, after waiting at most `limit` seconds; then SIGKILL."""
        process = self.process
        if process is None:
            raise StackError(f"{self.name} was never started")
        deadline = time.monotonic() + limit
        while process.poll() is None:
            if time.monotonic() > deadline:
                self.signal(signal.SIGCONT)
                self.signal(signal.SIGKILL)
                await asyncio.to_thread(process.wait)
                break
            await asyncio.sleep(0.01)
        return process.returncode


def _parents() -> dict[int, int]:
    """pid -> parent pid of every live (not zombie) process, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        fields = proc_stat(entry) if entry.isdigit() else None
        if fields is not None and fields[0] != "Z":
            parents[int(entry)] = int(fields[1])
    return parents


def process_tree(root: int) -> list[int]:
    """`root` and its live descendants, parents before children."""
    parents = _parents()
    if root not in parents:
        return []
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    tree = [root]
    for pid in tree:
        tree.extend(children.get(pid, []))
    return tree


def signal_tree(process: subprocess.Popen[bytes] | None, sig: signal.Signals) -> list[int]:
    """Send `sig` to `process` and its descendants; returns the pids signalled.

    SIGKILL freezes the tree first (SIGSTOP, twice, to catch a child forked meanwhile), so no
    process of it sees another die and reacts.
    """
    if process is None or process.poll() is not None:
        return []
    if sig == signal.SIGKILL:
        signal_tree(process, signal.SIGSTOP)
    pids: list[int] = []
    for _ in range(2 if sig == signal.SIGSTOP else 1):
        pids = process_tree(process.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    return pids


def continue_until_exit(process: subprocess.Popen[bytes], limit: float) -> None:
    """SIGCONT `process` until it has exited (it may stop itself again after each one)."""
    deadline = time.monotonic() + limit
    while True:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)
        try:
            process.wait(0.1)
            return
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                raise


def _exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


async def wait_gone(pids: list[int], limit: float = 30) -> None:
    """Wait until none of `pids` exists, not even as a zombie."""
    deadline = time.monotonic() + limit
    while any(_exists(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise StackError(f"processes {pids} still running after {limit}s")
        await asyncio.sleep(0.02)


class FaultStack:
    """The whole stack on free loopback ports under one temporary directory.

    Parts: `postgres`, `redis`, `cert_service`, `key_service`, `envoy`. Faults:
    `hang(part)` / `resume(part)` (SIGSTOP / SIGCONT of its processes),
    `stop_postgres(kill=...)` / `start_postgres()`, `kill_redis()` / `start_redis()`,
    `stop_service(name, sig)` / `start_service(name)` / `restart_service(name, sig)`.
    `heal()` resumes and restarts whatever a test left stopped.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.postgres = PostgresServer(directory / "postgres", free_port(), durable=True)
        self.redis = RedisServer(directory / "redis", free_port())
        self.cert_port = free_port()
        self.key_port = free_port()
        self.metrics_ports: dict[ServiceName, int] = {
            "cert_service": free_port(),
            "key_service": free_port(),
        }
        self.gateway_port = free_port()
        self.admin_port = free_port()
        self.env: dict[str, str] = {}
        self.services: dict[ServiceName, ServiceProcess] = {}
        self.envoy: ServiceProcess | None = None
        self.operator_key = ""
        self._hung: set[PartName] = set()
        self._channels: list[grpc.aio.Channel] = []
        self.cert: cert_pb2_grpc.CertificateServiceAsyncStub
        self.keys: key_pb2_grpc.ApiKeyServiceAsyncStub
        self.http = httpx.AsyncClient(timeout=5)

    # -- addresses -------------------------------------------------------------------------------

    @property
    def conninfo(self) -> str:
        return self.postgres.conninfo(DATABASE)

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def address(self, service: ServiceName) -> str:
        port = self.cert_port if service == "cert_service" else self.key_port
        return f"127.0.0.1:{port}"

    def channel(self, address: str, service: ServiceName | None = None) -> grpc.aio.Channel:
        """A channel (closed with the stack) that reconnects within half a second, to
        `service` (by default, the one of this stack at `address`) over mutual TLS."""
        if service is None:
            service = "cert_service" if address == self.address("cert_service") else "key_service"
        channel = internal_tls.channel(address, service=service, options=CHANNEL_OPTIONS)
        self._channels.append(channel)
        return channel

    # -- start and stop --------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.gather(
            asyncio.to_thread(self.postgres.start), asyncio.to_thread(self.redis.start)
        )
        await asyncio.to_thread(self.postgres.create_database, DATABASE)
        for service in SERVICES:
            migrations = load_migrations(ROOT / service / "migrations")
            await MigrationRunner(self.conninfo, service, migrations).up()
        ca_cert, ca_key = create_development_ca(self.directory / "ca")
        self.env = {
            **os.environ,
            "DB_HOST": self.postgres.host,
            "DB_PORT": str(self.postgres.port),
            "DB_NAME": DATABASE,
            "DB_USER": self.postgres.user,
            "DB_SSLMODE": "disable",
            "REDIS_HOST": self.redis.host,
            "REDIS_PORT": str(self.redis.port),
            "REDIS_TIMEOUT": str(REDIS_TIMEOUT),
            "REDIS_BREAKER_THRESHOLD": "3",
            "REDIS_BREAKER_RESET": str(REDIS_BREAKER_RESET),
            "ENVIRONMENT": "test",
            "LOG_LEVEL": "info",
            "LOG_FORMAT": "json",
            "SHUTDOWN_GRACE": str(SHUTDOWN_GRACE),
            "CA_CERT_FILE": str(ca_cert),
            "CA_KEY_FILE": str(ca_key),
            "CERT_SERVICE_PORT": str(self.cert_port),
            "KEY_SERVICE_PORT": str(self.key_port),
            "CERT_SERVICE_METRICS_PORT": str(self.metrics_ports["cert_service"]),
            "KEY_SERVICE_METRICS_PORT": str(self.metrics_ports["key_service"]),
            "CERT_SERVICE_ADDRESS": self.address("cert_service"),
            "KEY_SERVICE_ADDRESS": self.address("key_service"),
            "CERT_SERVICE_ACCESS_FLUSH_INTERVAL": str(FLUSH_INTERVAL),
            "KEY_SERVICE_USAGE_FLUSH_INTERVAL": str(FLUSH_INTERVAL),
            # Sampled gauges (Redis, the fleet, the outbox) every second, not every 5: the
            # monitoring tests wait for them to move.
            "METRICS_INTERVAL": str(METRICS_INTERVAL),
            **internal_tls.services_env(),
        }
        for name in ("DB_PASSWORD", "REDIS_PASSWORD", "PGPASSWORD"):
            self.env.pop(name, None)
        for service in SERVICES:
            self.services[service] = ServiceProcess(
                service,
                [sys.executable, "-m", service, "serve"],
                self.env,
                self.directory / f"{service}.log",
            )
        self.cert = cert_pb2_grpc.CertificateServiceStub(self.channel(self.address("cert_service")))
        self.keys = key_pb2_grpc.ApiKeyServiceStub(self.channel(self.address("key_service")))
        operator_key = asyncio.create_task(self._create_operator_key())
        await asyncio.gather(*(self.start_service(service) for service in SERVICES))
        await self._start_envoy()
        self.operator_key = await operator_key

    async def _create_operator_key(self) -> str:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "key_service",
            "admin",
            "create-key",
            "--permissions",
            OPERATOR_PERMISSIONS,
            "--name",
            "fault suite operator",
            env=self.env,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        if process.returncode != 0:
            raise StackError(f"admin create-key failed: {err.decode(errors='replace')}")
        return next(line for line in out.decode().splitlines() if line.startswith("myl_"))

    async def _start_envoy(self) -> None:
        config_path = self.directory / "envoy.yaml"
        ports = GatewayPorts(self.gateway_port, self.admin_port, self.cert_port, self.key_port)
        config_path.write_text(
            render_envoy_config(
                ports,
                listen_address="127.0.0.1",
                access_log_path=self.directory / "envoy-access.log",
                upstream_tls=internal_tls.upstream_tls(),
            )
        )
        self.envoy = ServiceProcess(
            "envoy",
            envoy_command(config_path, concurrency=1),
            self.env,
            self.directory / "envoy.log",
        )
        self.envoy.start()
        await self.wait_gateway_healthy(30)

    async def close(self) -> None:
        for part in list(self._hung):
            self.resume(part)
        for channel in self._channels:
            await channel.close(None)
        await self.http.aclose()
        # Nothing of theirs is looked at any more: no need to wait for graceful stops.
        running = [p for p in [self.envoy, *self.services.values()] if p is not None]
        for process in running:
            if process.running:
                process.signal(signal.SIGKILL)
        for process in running:
            if process.process is not None:
                await process.wait_exit(10)
        await asyncio.to_thread(self.redis.stop)
        # Not PostgresServer.stop: after a hang, runuser may be stopped (stop_postgres).
        if self.postgres.process is not None and self.postgres.process.poll() is None:
            await self.stop_postgres()

    # -- faults ----------------------------------------------------------------------------------

    def _process_of(self, part: PartName) -> subprocess.Popen[bytes] | None:
        if part == "postgres":
            return self.postgres.process
        if part == "redis":
            return self.redis.process
        if part == "envoy":
            return self.envoy.process if self.envoy else None
        return self.services[part].process

    def hang(self, part: PartName) -> None:
        """SIGSTOP the part's processes: their sockets stay open, nothing answers."""
        process = self._process_of(part)
        if process is None or process.poll() is not None:
            raise StackError(f"{part} is not running")
        signal_tree(process, signal.SIGSTOP)
        self._hung.add(part)

    def resume(self, part: PartName) -> None:
        """SIGCONT the part's processes. (PostgreSQL's `runuser`, when we are root, may stop
        itself again on seeing that its child had stopped: harmless while PostgreSQL runs,
        and `stop_postgres` continues it until it exits.)"""
        signal_tree(self._process_of(part), signal.SIGCONT)
        self._hung.discard(part)

    async def stop_postgres(self, *, kill: bool = False) -> None:
        """Stop PostgreSQL: a fast shutdown (SIGINT), or SIGKILL of every process of it."""
        self.resume("postgres")
        process = self.postgres.process
        if process is None:
            return
        postmaster = int((self.postgres.data / "postmaster.pid").read_text().split()[0])
        if kill:
            signal_tree(process, signal.SIGSTOP)
            for pid in process_tree(process.pid):
                if pid != process.pid or pid == postmaster:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            # When we are root, `runuser` is the process we started: left alive, it reaps the
            # postmaster at once and exits (an orphan would be reaped by init, seconds later,
            # and a new postmaster takes a zombie's pid file for a live server's). runuser
            # mirrors its child's stops: if it sees the postmaster's stop before the kill has
            # landed it stops itself again, so keep continuing it until it has exited.
            await asyncio.to_thread(continue_until_exit, process, 30)
        else:
            # A fast shutdown: the postmaster stops its backends itself.
            with contextlib.suppress(ProcessLookupError):
                os.kill(postmaster, signal.SIGINT)
            # runuser may have stopped itself again after a hang's resume: continued, it
            # reaps the postmaster and exits.
            await asyncio.to_thread(continue_until_exit, process, 30)
        await wait_gone([postmaster])
        self.postgres.process = None

    async def start_postgres(self) -> None:
        """Start PostgreSQL again (crash recovery after a kill) and wait until it accepts."""
        await asyncio.to_thread(self.postgres.start)

    async def postgres_accepts(self) -> bool:
        """Whether a fresh connection to PostgreSQL succeeds now (waiting at most 1 s)."""
        try:
            conn = await psycopg.AsyncConnection.connect(self.conninfo, connect_timeout=1)
        except psycopg.OperationalError:
            return False
        await conn.close()
        return True

    async def kill_redis(self) -> None:
        """SIGKILL Redis (it keeps nothing: no RDB, no AOF)."""
        self.resume("redis")
        process = self.redis.process
        if process is None:
            return
        pids = signal_tree(process, signal.SIGKILL)
        await asyncio.to_thread(process.wait, 10)
        await wait_gone(pids)
        self.redis.process = None

    async def start_redis(self) -> None:
        """Start Redis again on the same port."""
        await asyncio.to_thread(self.redis.start)

    async def stop_service(self, service: ServiceName, sig: signal.Signals = signal.SIGTERM) -> int:
        """Send `sig` and wait for the exit; returns the exit status."""
        process = self.services[service]
        if sig != signal.SIGKILL:
            self.resume(service)
        process.signal(sig)
        self._hung.discard(service)
        return await process.wait_exit(SHUTDOWN_GRACE + 10)

    async def start_service(self, service: ServiceName) -> float:
        """Start the service and wait until its health says SERVING; returns that moment."""
        process = self.services[service]
        process.start()
        return await self.wait_serving(service)

    async def restart_service(
        self, service: ServiceName, sig: signal.Signals = signal.SIGTERM
    ) -> float:
        """Stop with `sig`, start again; returns when (monotonic) it serves again."""
        await self.stop_service(service, sig)
        return await self.start_service(service)

    async def wait_serving(self, service: ServiceName, limit: float = 30) -> float:
        """Wait until the service's health check answers SERVING; returns that moment."""
        process = self.services[service]
        deadline = time.monotonic() + limit
        async with internal_tls.channel(
            self.address(service), service=service, options=CHANNEL_OPTIONS
        ) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if not process.running:
                    status = process.process and process.process.returncode
                    raise StackError(f"{service} exited with {status}:\n{process.log_tail()}")
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.monotonic()
                if time.monotonic() > deadline:
                    raise StackError(f"{service} not serving after {limit}s:\n{process.log_tail()}")
                await asyncio.sleep(0.02)

    async def wait_gateway_healthy(self, limit: float = 15) -> None:
        """Wait until Envoy's /healthz says both services have a healthy host."""
        deadline = time.monotonic() + limit
        while True:
            if self.envoy is None or not self.envoy.running:
                raise StackError("envoy is not running")
            with contextlib.suppress(httpx.HTTPError):
                reply = await self.http.get(f"{self.gateway_url}/healthz", timeout=1)
                if reply.status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise StackError(f"gateway not healthy after {limit}s")
            await asyncio.sleep(0.05)

    async def heal(self) -> None:
        """Resume what is hung and start what is stopped: the state every test starts from."""
        for part in list(self._hung):
            self.resume(part)
        if self.postgres.process is None or self.postgres.process.poll() is not None:
            await self.start_postgres()
        if self.redis.process is None or self.redis.process.poll() is not None:
            await self.start_redis()
        for service in SERVICES:
            if not self.services[service].running:
                await self.start_service(service)
        await asyncio.gather(*(self.wait_serving(service) for service in SERVICES))
        if self.envoy is None or not self.envoy.running:
            await self._start_envoy()
        await self.wait_gateway_healthy()
        await self._wait_redis_trusted(limit=10)
        if not await self._writes_work(limit=5):
            # A service that never recovered from an earlier fault: that test has failed
            # already; the next one starts from fresh processes.
            print("\n[fault stack] services did not recover; restarting them")
            for service in SERVICES:
                await self.restart_service(service, signal.SIGKILL)
            await self.wait_gateway_healthy()
            if not await self._writes_work(limit=10):
                raise StackError("the services cannot write even after a restart")

    async def _wait_redis_trusted(self, limit: float) -> None:
        """Until every service's Redis circuit is closed: a test that starts while one is
        still open (Redis restarted by the test before, the guard's pass not yet run) sees the
        in-process fallbacks, e.g. a limit that admits one request per unseen bucket."""
        deadline = time.monotonic() + limit
        for service in SERVICES:
            while await self.metric(service, "myl_redis_circuit_open") == 1:
                if time.monotonic() > deadline:
                    raise StackError(f"{service}'s Redis circuit still open after {limit}s")
                await asyncio.sleep(0.05)

    async def _writes_work(self, limit: float) -> bool:
        """Whether both services can write (a provision, then a key), trying for `limit` s."""
        deadline = time.monotonic() + limit
        while True:
            try:
                await self.device_with_key("probe")
                return True
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    return False
            await asyncio.sleep(0.1)

    # -- what tests do through the stack --------------------------------------------------------

    async def provision(self, device_id: str) -> cert_pb2.ProvisionCertificateResponse:
        """A certificate for a new device (direct to cert_service, as an internal caller)."""
        return await self.cert.ProvisionCertificate(
            cert_pb2.ProvisionCertificateRequest(device_id=device_id), timeout=10
        )

    async def device_key(self, device_id: str, *, rate_limit: int = 0) -> tuple[str, str]:
        """A new API key for an existing device: (plaintext, key_id)."""
        reply = await self.keys.GenerateApiKey(
            key_pb2.GenerateApiKeyRequest(
                device_id=device_id, device_name="fault suite", rate_limit=rate_limit
            ),
            timeout=10,
        )
        return reply.api_key, reply.key.key_id

    async def device_with_key(self, prefix: str, *, rate_limit: int = 0) -> tuple[str, str, str]:
        """A provisioned device and a key for it: (device_id, plaintext key, key_id)."""
        device_id = unique(prefix)
        await self.provision(device_id)
        api_key, key_id = await self.device_key(device_id, rate_limit=rate_limit)
        return device_id, api_key, key_id

    async def verify(self, api_key: str, *, dry_run: bool = False) -> str:
        """VerifyApiKey's result name (VERIFY_RESULT_...)."""
        reply = await self.keys.VerifyApiKey(
            key_pb2.VerifyApiKeyRequest(api_key=api_key, dry_run=dry_run), timeout=5
        )
        return key_pb2.VerifyResult.Name(reply.result)

    async def query(self, sql: str, *params: object) -> list[tuple[object, ...]]:
        """Rows of one statement on a fresh connection (PostgreSQL must be up)."""
        async with await psycopg.AsyncConnection.connect(
            self.conninfo, autocommit=True, connect_timeout=5
        ) as conn:
            cursor = await conn.execute(sql, params)
            return await cursor.fetchall()

    async def count(self, sql: str, *params: object) -> int:
        rows = await self.query(sql, *params)
        value = rows[0][0] if rows else 0
        return int(value) if isinstance(value, int) else 0

    async def metric(self, service: ServiceName, name: str) -> float | None:
        """The value of an unlabelled metric on the service's Prometheus endpoint."""
        url = f"http://127.0.0.1:{self.metrics_ports[service]}/metrics"
        reply = await self.http.get(url, timeout=2)
        reply.raise_for_status()
        for line in reply.text.splitlines():
            if line.startswith(f"{name} ") or line.startswith(f"{name}{{"):
                return float(line.rsplit(" ", 1)[1])
        return None


def _new_directory() -> Path:
    directory = Path(tempfile.mkdtemp(prefix="myl-faults-"))
    directory.chmod(0o755)  # PostgreSQL runs as its own user when we are root
    return directory


async def start_fault_stack() -> FaultStack:
    """A started stack in a new temporary directory (PostgreSQL runs as its own user)."""
    stack = FaultStack(_new_directory())
    try:
        await stack.start()
    except BaseException:
        await stack.close()
        shutil.rmtree(stack.directory, ignore_errors=True)
        raise
    return stack


async def stop_fault_stack(stack: FaultStack, *, keep: bool = False) -> None:
    await stack.close()
    if not keep:
        _remove_in_background(stack.directory)


def _remove_in_background(directory: Path) -> None:
    """Remove `directory` without waiting: the database files take seconds on a slow disk."""
    subprocess.run(
        ["sh", "-c", 'rm -rf -- "$1" &', "sh", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
