"""Throwaway PostgreSQL and Redis servers from the system's binaries.

Used by `make run` (under `.run/`) and by the test suite (under a temporary
directory). PostgreSQL refuses to run as root, so when we are root the data
directory is handed to the `postgres` user and the server runs as that user.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import random
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import redis
from redis.crc import key_slot

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))


class DevStackError(RuntimeError):
    pass


# Parallel test workers (pytest-xdist sets PYTEST_XDIST_WORKER=gw<N>) each take ports from a
# slice of their own, below the kernel's ephemeral range and with room for a cluster node's
# port + 10000 above it: a port one worker found free is then never handed to another worker
# (or to an outgoing connection) before it binds it. Elsewhere the kernel picks.
_WORKER_PORTS = range(10000, 20000)
_WORKER_SLICES = 8
_handed_out: set[int] = set()


def _worker_slice() -> range | None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw") or not worker[2:].isdigit():
        return None
    size = len(_WORKER_PORTS) // _WORKER_SLICES
    start = _WORKER_PORTS.start + (int(worker[2:]) % _WORKER_SLICES) * size
    return range(start, start + size)


def free_port(host: str = "127.0.0.1") -> int:
    ports = _worker_slice()
    if ports is not None:
        for port in random.sample(ports, len(ports)):
            if port in _handed_out:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
        _handed_out.clear()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        found: int = s.getsockname()[1]
        return found


def log_tail(path: Path, lines: int = 15) -> str:
    """The last `lines` lines of a log (empty when it cannot be read)."""
    with contextlib.suppress(OSError):
        text = path.read_text(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])
    return ""


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DevStackError(f"process {process.args!r} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise DevStackError(f"nothing listens on {host}:{port} after {timeout}s")


def _as_postgres() -> list[str]:
    if os.geteuid() != 0:
        return []
    return ["runuser", "-u", "postgres", "--"]


def _chown_to_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(path, entry.pw_uid, entry.pw_gid)


class PostgresServer:
    """A PostgreSQL cluster in `directory`, listening on 127.0.0.1:`port`.

    `secure` (what `make run` uses): every TCP connection logs in with a password
    (scram-sha-256); the superuser `postgres` only over the Unix socket, in a directory no
    other user can enter, which is how the stack itself administers the server. Without it
    (the test suite's throwaway servers) every local connection is trusted."""

    def __init__(
        self, directory: Path, port: int, *, durable: bool = True, secure: bool = False
    ) -> None:
        self.secure = secure
        self.directory = directory
        self.data = directory / "data"
        self.socket_dir = directory / "socket"
        self.port = port
        self.durable = durable
        self.host = "127.0.0.1"
        self.user = "postgres"
        self.log_path = directory / "postgres.log"
        self.process: subprocess.Popen[bytes] | None = None

    def _check_binaries(self) -> None:
        if not (PG_BIN / "postgres").exists():
            raise DevStackError(
                f"PostgreSQL server binaries not found in {PG_BIN}: install postgresql-15 "
                "(apt-get install postgresql-15) or set PG_BIN, or point DB_HOST at a server"
            )

    def init(self) -> None:
        self._check_binaries()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o755)
        if (self.data / "PG_VERSION").exists():
            return
        self.data.mkdir(mode=0o700, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        for path in (self.directory, self.data, self.socket_dir):
            _chown_to_postgres(path)
        subprocess.run(
            [
                *_as_postgres(),
                str(PG_BIN / "initdb"),
                "-D",
                str(self.data),
                "-U",
                self.user,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                *([] if self.durable else ["--no-sync"]),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def _write_hba(self) -> None:
        """pg_hba.conf for `secure`, written at every start (so a cluster made before trusts
        no longer)."""
        rules = (
            "# Written by the local stack (deploy/devstack/servers.py): passwords over TCP,\n"
            "# the superuser over the Unix socket only (its directory is mode 0700).\n"
            "local all postgres trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
            "host all all ::1/128 scram-sha-256\n"
        )
        path = self.data / "pg_hba.conf"
        path.write_text(rules)
        _chown_to_postgres(path)
        self.socket_dir.chmod(0o700)

    def start(self, timeout: float = 30.0) -> None:
        self.init()
        if self.secure:
            self._write_hba()
        options = [
            "-c", f"port={self.port}",
            "-c", "listen_addresses=127.0.0.1",
            "-c", f"unix_socket_directories={self.socket_dir}",
            "-c", "max_connections=300",
            "-c", "shared_buffers=256MB",
            "-c", "logging_collector=off",
            "-c", "log_min_messages=warning",
        ]  # fmt: skip
        if not self.durable:
            options += ["-c", "fsync=off", "-c", "synchronous_commit=off"]
            options += ["-c", "full_page_writes=off"]
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [*_as_postgres(), str(PG_BIN / "postgres"), "-D", str(self.data), *options],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        wait_for_port(self.host, self.port, timeout, self.process)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.conninfo("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def conninfo(self, dbname: str) -> str:
        """The superuser's connection (over the socket when `secure`)."""
        host = self.socket_dir if self.secure else self.host
        return f"host={host} port={self.port} user={self.user} dbname={dbname}"

    def create_database(
        self, name: str, template: str | None = None, *, owner: str | None = None
    ) -> None:
        """Create `name` unless it exists; `owner` owns it (and, since PostgreSQL 15, its
        public schema), and takes over every table and sequence in it the superuser made."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if not exists.fetchone():
                query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
                if template:
                    query = sql.SQL("{} TEMPLATE {}").format(query, sql.Identifier(template))
                conn.execute(query)
            if owner is None:
                return
            conn.execute(
                sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                    sql.Identifier(name), sql.Identifier(owner)
                )
            )
        with psycopg.connect(self.conninfo(name), autocommit=True) as conn:
            made = conn.execute(
                "SELECT c.relname, c.relkind FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') "
                "AND pg_get_userbyid(c.relowner) = %s",
                (self.user,),
            ).fetchall()
            for table, _ in made:
                conn.execute(
                    sql.SQL("ALTER TABLE {} OWNER TO {}").format(
                        sql.Identifier(table), sql.Identifier(owner)
                    )
                )

    def ensure_role(self, name: str, password: str) -> None:
        """A login role `name` whose password is `password` (stored as a SCRAM verifier)."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,))
            verb = "ALTER" if exists.fetchone() else "CREATE"
            conn.execute(
                sql.SQL(verb + " ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(name), sql.Literal(password)
                )
            )

    def drop_database(self, name: str) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def stop(self) -> None:
        stop_process_group(self.process, signal.SIGINT)
        self.process = None


class RedisServer:
    """A non-persistent redis-server on 127.0.0.1:`port`."""

    def __init__(
        self,
        directory: Path,
        port: int,
        *,
        extra_args: tuple[str, ...] = (),
        acl: RedisAcl | None = None,
    ) -> None:
        self.directory = directory
        self.port = port
        self.host = "127.0.0.1"
        self.extra_args = extra_args
        self.acl = acl
        self.log_path = directory / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def binary() -> str:
        found = shutil.which("redis-server")
        if found is None:
            raise DevStackError(
                "redis-server not found: install it (apt-get install redis-server) "
                "or point REDIS_HOST at a server"
            )
        return found

    def start(self, timeout: float = 10.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                self.binary(),
                *((str(self.acl.config_file(self.directory)),) if self.acl else ()),
                "--port",
                str(self.port),
                "--bind",
                self.host,
                "--save",
                "",
                "--appendonly",
                "no",
                # Limiter state lives only in Redis: it must never be evicted
                # (shared/monitoring.py).
                "--maxmemory-policy",
                "noeviction",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.log_path),
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for_port(self.host, self.port, timeout, self.process)

    def stop(self) -> None:
        stop_process_group(self.process)
        self.process = None


# What a service may do in Redis: read, write and run scripts on its own keys, ask INFO (its
# health sampler) and, on a Cluster, read the slot map; nothing that administers the server
# (CONFIG, FLUSHALL, KEYS, DEBUG, ...: the @dangerous category) and no other service's keys.
_SERVICE_COMMANDS: Final = (
    "-@all +@read +@write +@scripting +@connection +@transaction -@dangerous "
    "+info +cluster|slots +cluster|shards +cluster|nodes +cluster|info +readonly"
)
# Each service's keys: its own namespace and the named limits (shared.limits) both spend.
SERVICE_KEY_PATTERNS: Final = {
    "cert_service": ("myl:cert:*", "myl:limit:*"),
    "key_service": ("myl:key:*", "myl:limit:*"),
}


class RedisAcl:
    """The Redis users `make run` sets up: one per service with only its keys and commands,
    `admin` for operators and the stack itself, and no default user (a connection that has
    not authenticated can do nothing). Passwords are made at first start and kept in
    `<directory>/<user>.password` (mode 0600); the ACL file holds only their SHA-256."""

    USERS: Final = ("admin", *SERVICE_KEY_PATTERNS)

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.passwords = {user: stored_password(directory, user) for user in self.USERS}

    def rules(self) -> list[str]:
        lines = ["user default off resetkeys resetchannels -@all"]
        for user in self.USERS:
            digest = hashlib.sha256(self.passwords[user].encode()).hexdigest()
            if user == "admin":
                grants = "~* &* +@all"
            else:
                keys = " ".join(f"~{pattern}" for pattern in SERVICE_KEY_PATTERNS[user])
                grants = f"resetkeys {keys} resetchannels {_SERVICE_COMMANDS}"
            lines.append(f"user {user} on resetpass #{digest} {grants}")
        return lines

    def config_file(self, directory: Path) -> Path:
        """A redis-server config file (in `directory`, mode 0600, so no password shows in
        the process list): the ACL file, and the user a Cluster replica replicates as."""
        directory.mkdir(parents=True, exist_ok=True)
        acl_path = directory / "users.acl"
        write_private(acl_path, "\n".join(self.rules()) + "\n")
        config = directory / "acl.conf"
        write_private(
            config,
            f"aclfile {acl_path}\nmasteruser admin\nmasterauth {self.passwords['admin']}\n",
        )
        return config

    def env(self, service: str) -> dict[str, str]:
        """The variables that log `service` in as its own user."""
        prefix = service.upper()
        return {
            f"{prefix}_REDIS_USERNAME": service,
            f"{prefix}_REDIS_PASSWORD": self.passwords[service],
        }


def stored_password(directory: Path, user: str) -> str:
    """`user`'s password, made at first use and kept in `<directory>/<user>.password` (0600)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"{user}.password"
    if not path.exists():
        write_private(path, secrets.token_urlsafe(32))
    return path.read_text().strip()


def write_private(path: Path, data: str | bytes) -> None:
    """`data` in a new file at `path` that only its owner can read (mode 0600, whatever a
    file there had)."""
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data.encode() if isinstance(data, str) else data)


def _cluster_args(directory: Path, port: int) -> tuple[str, ...]:
    return (
        "--cluster-enabled", "yes",
        "--cluster-config-file", str(directory / f"node-{port}" / "nodes.conf"),
        "--cluster-node-timeout", "1000",
        "--cluster-replica-validity-factor", "0",
    )  # fmt: skip


def free_cluster_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Free ports for cluster nodes: each node also listens on its port + 10000 (the
    cluster bus), so both must be free and below 65536."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port(host)
        if port + 10000 >= 65536 or port in ports:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


class RedisClusterServers:
    """A Redis Cluster of `masters` masters, each with one replica, on loopback ports.

    Built with redis-server's own cluster mode and `redis-cli --cluster create`. A node
    timeout of one second lets a replica take over quickly when its master dies."""

    def __init__(
        self, directory: Path, ports: list[int], *, replicas: int = 1, acl: RedisAcl | None = None
    ) -> None:
        self.directory = directory
        self.replicas = replicas
        self.acl = acl
        self.nodes = [
            RedisServer(
                directory / f"node-{port}", port, extra_args=_cluster_args(directory, port), acl=acl
            )
            for port in ports
        ]

    @property
    def addresses(self) -> str:
        """`REDIS_CLUSTER_NODES` for this cluster."""
        return ",".join(f"{node.host}:{node.port}" for node in self.nodes)

    def start(self, timeout: float = 30.0) -> None:
        """Start every node and make them one new cluster. A node's `nodes.conf` from an
        earlier start is removed first: with it the node would still belong to the old
        cluster, and `--cluster create` refuses a node that is not empty."""
        for node in self.nodes:
            with contextlib.suppress(FileNotFoundError):
                (node.directory / "nodes.conf").unlink()
            node.start()
        cli = shutil.which("redis-cli")
        if cli is None:
            raise DevStackError("redis-cli not found: install redis-tools (apt-get install redis)")
        created = subprocess.run(
            [
                cli, "--cluster", "create",
                *(f"{node.host}:{node.port}" for node in self.nodes),
                "--cluster-replicas", str(self.replicas), "--cluster-yes",
                *(("--user", "admin", "--pass", self.acl.passwords["admin"]) if self.acl else ()),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )  # fmt: skip
        if created.returncode != 0:
            said = "\n".join(created.stdout.strip().splitlines()[-10:])
            raise DevStackError(
                f"redis-cli --cluster create exited with {created.returncode}:\n{said}"
            )
        self.wait_ok(timeout)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every running node says cluster_state:ok."""
        deadline = time.monotonic() + timeout
        while True:
            if all(self._ok(node) for node in self.running()):
                return
            if time.monotonic() > deadline:
                raise DevStackError(f"Redis Cluster not ok after {timeout}s")
            time.sleep(0.1)

    def running(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.process is not None]

    def _client(self, node: RedisServer) -> redis.Redis:
        user, password = ("admin", self.acl.passwords["admin"]) if self.acl else (None, None)
        return redis.Redis(
            host=node.host, port=node.port, socket_timeout=2, username=user, password=password
        )

    def _ok(self, node: RedisServer) -> bool:
        with contextlib.suppress(redis.RedisError), self._client(node) as client:
            info = client.execute_command("CLUSTER", "INFO")
            text = info.decode() if isinstance(info, bytes) else str(info)
            return "cluster_state:ok" in text
        return False

    def master_of(self, key: str) -> RedisServer:
        """The node that serves `key` now."""
        slot = key_slot(key.encode())
        for node in self.running():
            with contextlib.suppress(redis.RedisError), self._client(node) as client:
                for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                    if int(start) <= slot <= int(end):
                        port = int(primary[1])
                        return next(n for n in self.nodes if n.port == port)
        raise DevStackError(f"no node serves {key}")

    def flush(self) -> None:
        for node in self.running():
            with contextlib.suppress(redis.RedisError), self._client(node) as client:
                client.flushall()

    def stop(self) -> None:
        stop_process_groups([node.process for node in self.nodes if node.process is not None])
        for node in self.nodes:
            node.process = None


def proc_stat(pid: int | str) -> list[str] | None:
    """The fields of `/proc/<pid>/stat` after the command name: the state first ("Z" for a
    process that exited and is not yet reaped), then the parent's pid, the process group, ...
    (proc(5)'s numbering minus three); None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def spawn_logged(
    argv: Sequence[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start `argv` in a session of its own (so `stop_process_group` stops all it starts),
    its output appended to `log_path`, with no stdin; `env`: its whole environment (None:
    ours)."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def stop_process_group(
    process: subprocess.Popen[bytes] | None,
    sig: signal.Signals = signal.SIGTERM,
    timeout: float = 15.0,
) -> None:
    """Signal the process group of `process` (started with start_new_session) and
    wait for it; SIGKILL when it is not gone within `timeout` seconds."""
    stop_process_groups([process] if process is not None else [], sig, timeout)


def stop_process_groups(
    processes: Sequence[subprocess.Popen[bytes]],
    sig: signal.Signals = signal.SIGTERM,
    timeout: float = 15.0,
) -> None:
    """`stop_process_group` for several at once: all are signalled first, so their
    shutdowns (a service's drain delay, its grace) overlap instead of adding up."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
    deadline = time.monotonic() + timeout
    for process in running:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
