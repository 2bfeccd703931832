"""Ten million devices: cache-miss latency at 10M rows against 100k rows, in one run.

    python -m tests.bench.bench_scale                       (10,000,000 against 100,000)
    python -m tests.bench.bench_scale --devices 1000000     (a smaller run)

Not part of `make test` nor of `make bench` (it writes tens of GB and takes about half an hour).
What it does:

1. Starts a throwaway PostgreSQL 15 (settings for loading: no fsync, wal_level minimal, no
   autovacuum) and Redis under a temporary directory, and creates two databases, one per size,
   both migrated by cert_service's and key_service's own migrations.
2. Loads each: one certificate row in `device_certificates` and one API key in
   `device_api_keys` per device, server-side (`INSERT ... SELECT generate_series`), in the
   transaction that truncates the table, with the tables' constraints and indexes dropped
   first and built again afterwards from the definitions the migrations created (checked to be
   identical afterwards), then `VACUUM (ANALYZE)`. Rows are shaped like real ones:
   certificate_data is a real document the built-in CA wrote for a device that sent a CSR (the
   same signed chain reused, about 2.7 kB); each device has a UUID subdomain; each key a
   SHA-256 hash. The keys measured are real keys (checksum and all) whose hashes are placed at
   random rows among the others.
3. Restarts PostgreSQL with durable settings (fsync, synchronous_commit, full_page_writes on,
   wal_level replica), drops the database files from the OS page cache, and starts one
   cert_service and one key_service per database, as separate processes.
4. Measures, over gRPC with a fixed number of requests in flight, GetCertificate,
   LookupCertificate and VerifyApiKey, each request naming a device never asked for before in
   the run (drawn at random across the whole table), so every one misses Redis and reads
   PostgreSQL. Twice: *cold* (just after the restart, files out of the page cache) and *warm*
   (after pg_prewarm of what a steady server keeps in memory: every index the three reads use,
   and the heaps as far as they fit in a budget of shared_buffers; at 100k that is all, at 10M
   the 30 GB of certificates do not fit in this machine's memory).

It prints the latency table with the ratio 10M/100k, table and index sizes, load times, the
PostgreSQL settings, buffer reads per request, and Redis hits during each pass (which should be
zero). It does not pass or fail on a time. The temporary directory is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import psycopg
import redis

from deploy.devstack.servers import (
    PG_BIN,
    PostgresServer,
    RedisServer,
    _as_postgres,
    free_port,
    wait_for_port,
)
from key_service import keyformat
from myl.cert.v1 import cert_pb2, cert_pb2_grpc
from myl.key.v1 import key_pb2, key_pb2_grpc
from shared.migrations import MigrationRunner, load_migrations
from tests.bench.harness import ROOT, percentile, start_process, stop_process

ZONE = "myl.zip"
OPERATIONS = ("GetCertificate", "LookupCertificate", "VerifyApiKey")
ROUNDS = 20  # chunks per measured cell, alternating between the two sizes
TABLES = ("device_certificates", "device_api_keys")

# Settings while loading: nothing is durable, rows skip the WAL (wal_level minimal and a
# TRUNCATE in the loading transaction), no autovacuum racing the load.
LOAD_SETTINGS: Mapping[str, str] = {
    "shared_buffers": "4GB",
    "maintenance_work_mem": "2GB",
    "max_parallel_maintenance_workers": "2",
    "work_mem": "64MB",
    "max_wal_size": "16GB",
    "checkpoint_timeout": "30min",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "autovacuum": "off",
}
# Settings while measuring: durable, as in production, with I/O timing for the report.
MEASURE_SETTINGS: Mapping[str, str] = {
    "shared_buffers": "4GB",
    "effective_cache_size": "12GB",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "15min",
    "wal_level": "replica",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "autovacuum": "on",
    "track_io_timing": "on",
}
PREWARM_BUDGET = 3 * 1024**3  # bytes of shared_buffers (4GB) that warm-up may fill


# -- PostgreSQL with our settings ------------------------------------------------------------


class TunedPostgres(PostgresServer):
    """The development PostgreSQL with extra settings (given after, so they win)."""

    def __init__(self, directory: Path, port: int, settings: Mapping[str, str]) -> None:
        super().__init__(directory, port, durable=False)
        self.settings = dict(settings)

    def start(self, timeout: float = 120.0) -> None:
        self.init()
        options = [
            "-c", f"port={self.port}",
            "-c", "listen_addresses=127.0.0.1",
            "-c", f"unix_socket_directories={self.socket_dir}",
            "-c", "max_connections=300",
            "-c", "logging_collector=off",
            "-c", "log_min_messages=warning",
        ]  # fmt: skip
        for name, value in self.settings.items():
            options += ["-c", f"{name}={value}"]
        with open(self.directory / "postgres.log", "ab") as log:
            self.process = subprocess.Popen(
                [*_as_postgres(), str(PG_BIN / "postgres"), "-D", str(self.data), *options],
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        wait_for_port(self.host, self.port, timeout, self.process)
        self._wait_ready(timeout)


def evict_from_page_cache(directory: Path) -> int:
    """Drop `directory`'s files (clean after a shutdown) from the OS page cache; bytes seen."""
    seen = 0
    for path in directory.rglob("*"):
        if not path.is_file():
            continue
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                seen += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return seen


# -- what a device looks like ----------------------------------------------------------------
# Python and SQL derive the same names from a device's number, so the measurement can ask for
# device n without reading anything back.


def device_id(n: int) -> str:
    return f"device-{n:08d}"


def subdomain(n: int) -> str:
    return f"{uuid.UUID(hashlib.md5(f'sub-{n}'.encode()).hexdigest())}.{ZONE}"


SQL_DEVICE_ID = "'device-' || lpad(g::text, 8, '0')"
SQL_SUBDOMAIN = f"md5('sub-' || g)::uuid::text || '.{ZONE}'"


def certificate_document(directory: Path) -> str:
    """certificate_data of a real certificate, issued by the built-in CA from a device's CSR."""
    from cert_service.ca import LocalCertificateAuthority, create_development_ca
    from cert_service.issuance import issue_device_certificate
    from cert_service.issuer import load_csr
    from tests.fixtures.cert import make_csr

    ca_cert, ca_key = create_development_ca(directory / "ca")
    ca = LocalCertificateAuthority.from_files(ca_cert, ca_key)
    fqdn = subdomain(0)
    csr = make_csr([fqdn, f"*.{fqdn}"])
    new = issue_device_certificate(
        ca, load_csr(csr, [fqdn, f"*.{fqdn}"]), fqdn, "wildcard", 90, datetime.now(UTC), csr,
        occasion="bench",
    )  # fmt: skip
    return json.dumps(new.data)


# -- loading ------------------------------------------------------------------------------------

CERTIFICATES_INSERT = f"""
INSERT INTO device_certificates (
    device_id, uuid_subdomain, certificate_type, status, certificate_data, serial_number,
    fingerprint_sha256, issued_at, expires_at, auto_renewal, created_at, updated_at)
SELECT {SQL_DEVICE_ID}, {SQL_SUBDOMAIN}, 'wildcard', 'active', t.data, left(h.hex, 40), h.hex,
       h.issued, h.issued + interval '90 days', true, h.issued, h.issued
FROM (SELECT %(data)s::jsonb AS data) AS t,
     generate_series(1, %(n)s) AS g,
     LATERAL (SELECT encode(sha256(int8send(g)), 'hex') AS hex,
                     %(now)s - (g %% 2592000) * interval '1 second' AS issued) AS h
"""
KEYS_INSERT = f"""
INSERT INTO device_api_keys (
    id, device_id, key_hash, key_prefix, device_name, uuid_subdomain, expires_at,
    created_at, updated_at)
SELECT gen_random_uuid(), {SQL_DEVICE_ID},
       coalesce(s.key_hash, sha256(int8send(g))),
       coalesce(s.key_prefix, 'myl_' || left(md5(g::text), 8)),
       'device ' || g, {SQL_SUBDOMAIN}, %(now)s + interval '365 days',
       %(now)s - (g %% 2592000) * interval '1 second',
       %(now)s - (g %% 2592000) * interval '1 second'
FROM generate_series(1, %(n)s) AS g LEFT JOIN measured_keys AS s ON s.n = g
"""


@dataclass
class TableLoad:
    table: str
    rows: int
    insert_s: float = 0.0
    index_s: float = 0.0
    vacuum_s: float = 0.0


def schema_of(conn: psycopg.Connection[Any], table: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(constraint name and definition for primary key and unique constraints, index DDL)."""
    constraints = conn.execute(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = %s::regclass AND contype IN ('p', 'u') ORDER BY conname",
        (table,),
    ).fetchall()
    names = [name for name, _ in constraints]
    indexes = conn.execute(
        "SELECT indexdef FROM pg_indexes WHERE tablename = %s AND NOT indexname = ANY(%s) "
        "ORDER BY indexname",
        (table, names),
    ).fetchall()
    return [(n, d) for n, d in constraints], [d for (d,) in indexes]


def all_indexes(conn: psycopg.Connection[Any], table: str) -> list[tuple[str, str]]:
    rows = conn.execute(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s ORDER BY indexname",
        (table,),
    ).fetchall()
    return [(name, definition) for name, definition in rows]


def load_table(
    conninfo: str,
    result: TableLoad,
    insert: str,
    params: Mapping[str, Any],
    before: Callable[[psycopg.Connection[Any]], None] = lambda _: None,
) -> None:
    """Truncate, drop indexes, insert, build the indexes again, in one transaction; vacuum."""
    table = result.table
    with psycopg.connect(conninfo) as conn:
        conn.execute("SET maintenance_work_mem = '2GB'")
        before(conn)
        expected = all_indexes(conn, table)
        constraints, indexes = schema_of(conn, table)
        conn.execute(f"TRUNCATE {table}")
        for name, _ in constraints:
            conn.execute(f"ALTER TABLE {table} DROP CONSTRAINT {name}")
        for definition in indexes:
            name = definition.split(" INDEX ", 1)[1].split(" ON ", 1)[0]
            conn.execute(f"DROP INDEX {name}")
        started = time.perf_counter()
        conn.execute(insert, params)
        result.insert_s = time.perf_counter() - started
        started = time.perf_counter()
        for name, definition in constraints:
            conn.execute(f"ALTER TABLE {table} ADD CONSTRAINT {name} {definition}")
        for definition in indexes:
            conn.execute(definition)
        conn.commit()
        result.index_s = time.perf_counter() - started
        if all_indexes(conn, table) != expected:
            raise RuntimeError(f"{table}: indexes differ from the migrations' after loading")
    with psycopg.connect(conninfo, autocommit=True) as conn:
        started = time.perf_counter()
        conn.execute(f"VACUUM (ANALYZE) {table}")
        result.vacuum_s = time.perf_counter() - started


def load_database(conninfo: str, n: int, document: str, keys: Mapping[int, str]) -> list[TableLoad]:
    """Both tables at once (one connection each): n devices with their certificates and keys."""
    now = datetime.now(UTC).replace(microsecond=0)
    certificates, api_keys = TableLoad("device_certificates", n), TableLoad("device_api_keys", n)

    def measured_keys(conn: psycopg.Connection[Any]) -> None:
        conn.execute(
            "CREATE TEMP TABLE measured_keys (n bigint PRIMARY KEY, key_hash bytea, "
            "key_prefix text) ON COMMIT DROP"
        )
        with conn.cursor().copy("COPY measured_keys FROM STDIN") as copy:
            for number, plaintext in keys.items():
                copy.write_row(
                    (number, keyformat.hash_key(plaintext), keyformat.display_prefix(plaintext))
                )
        conn.execute("ANALYZE measured_keys")

    errors: list[BaseException] = []

    def run(target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [
        threading.Thread(
            target=run,
            args=(
                lambda: load_table(
                    conninfo,
                    certificates,
                    CERTIFICATES_INSERT,
                    {"data": document, "n": n, "now": now},
                ),
            ),
        ),
        threading.Thread(
            target=run,
            args=(
                lambda: load_table(
                    conninfo, api_keys, KEYS_INSERT, {"n": n, "now": now}, measured_keys
                ),
            ),
        ),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [certificates, api_keys]


@dataclass(frozen=True)
class Relation:
    name: str
    kind: str  # table | toast | index
    bytes: int


def relations(conninfo: str) -> list[Relation]:
    """Heap, TOAST and every index of the two tables, with their sizes."""
    found: list[Relation] = []
    with psycopg.connect(conninfo) as conn:
        for table in TABLES:
            row = conn.execute(
                "SELECT pg_relation_size(c.oid), t.relname, coalesce(pg_relation_size(t.oid), 0), "
                "ti.relname, coalesce(pg_relation_size(ti.oid), 0) "
                "FROM pg_class c LEFT JOIN pg_class t ON t.oid = c.reltoastrelid "
                "LEFT JOIN pg_index i ON i.indrelid = t.oid "
                "LEFT JOIN pg_class ti ON ti.oid = i.indexrelid WHERE c.oid = %s::regclass",
                (table,),
            ).fetchone()
            assert row is not None
            found.append(Relation(table, "table", int(row[0])))
            if row[1]:
                found.append(Relation(f"{table} (TOAST)", "toast", int(row[2])))
                found.append(Relation(f"{table} (TOAST index)", "index", int(row[4])))
            for name, size in conn.execute(
                "SELECT indexrelid::regclass::text, pg_relation_size(indexrelid) FROM pg_index "
                "WHERE indrelid = %s::regclass ORDER BY 1",
                (table,),
            ).fetchall():
                found.append(Relation(f"  {name}", "index", int(size)))
    return found


def prewarm(conninfo: str) -> list[str]:
    """What a steady server keeps in memory: the indexes the three reads use, then each heap
    (small first) while the total stays within PREWARM_BUDGET. Returns what was loaded."""
    reads = [
        "device_certificates_pkey",
        "device_certificates_subdomain_key",
        "device_api_keys_key_hash_key",
        "device_api_keys_pkey",
    ]
    loaded: list[str] = []
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
        toast = conn.execute(
            "SELECT t.oid::regclass::text, i.indexrelid::regclass::text FROM pg_class c "
            "JOIN pg_class t ON t.oid = c.reltoastrelid JOIN pg_index i ON i.indrelid = t.oid "
            "WHERE c.oid = 'device_certificates'::regclass"
        ).fetchone()
        assert toast is not None
        heaps = sorted(
            (
                (int(size), name)
                for name, size in conn.execute(
                    "SELECT oid::regclass::text, pg_relation_size(oid) FROM pg_class "
                    "WHERE oid IN ('device_certificates'::regclass, "
                    "'device_api_keys'::regclass, %s::regclass)",
                    (toast[0],),
                ).fetchall()
            )
        )
        budget = PREWARM_BUDGET
        for name in [*reads, toast[1]]:
            found = conn.execute("SELECT pg_relation_size(%s::regclass)", (name,)).fetchone()
            budget -= int(found[0]) if found else 0
            conn.execute("SELECT pg_prewarm(%s::regclass)", (name,))
            loaded.append(name)
        for heap_size, name in heaps:
            if heap_size > budget:
                continue
            budget -= heap_size
            conn.execute("SELECT pg_prewarm(%s::regclass)", (name,))
            loaded.append(name)
    return loaded


# -- measuring ------------------------------------------------------------------------------


@dataclass
class Pass:
    label: str  # e.g. "cold" / "warm"
    size: str
    operation: str
    latencies_ms: list[float] = field(repr=False)
    failures: dict[str, int]
    seconds: float
    blocks_read: int = 0  # from outside shared_buffers
    blocks_hit: int = 0
    read_ms: float = 0.0
    redis_hits: int = 0
    redis_misses: int = 0

    def p(self, pct: float) -> float:
        return percentile(sorted(self.latencies_ms), pct)


async def drive(
    address: str, operation: str, devices: Sequence[int], keys: Mapping[int, str], in_flight: int
) -> tuple[list[float], dict[str, int], float]:
    """One request per device, `in_flight` outstanding; (latencies ms, failures, seconds)."""
    latencies: list[float] = []
    failures: dict[str, int] = {}
    queue = iter(devices)
    async with grpc.aio.insecure_channel(address) as channel:
        await channel.channel_ready()
        certs = cert_pb2_grpc.CertificateServiceStub(channel)
        api_keys = key_pb2_grpc.ApiKeyServiceStub(channel)

        async def one(n: int) -> str | None:
            """None when the answer is the device's; otherwise what went wrong."""
            if operation == "GetCertificate":
                got = await certs.GetCertificate(
                    cert_pb2.GetCertificateRequest(device_id=device_id(n)), timeout=30
                )
                return None if got.certificate.device_id == device_id(n) else "WRONG_DEVICE"
            if operation == "LookupCertificate":
                found = await certs.LookupCertificate(
                    cert_pb2.LookupCertificateRequest(uuid_subdomain=subdomain(n)), timeout=30
                )
                return None if found.certificate.device_id == device_id(n) else "WRONG_DEVICE"
            verdict = await api_keys.VerifyApiKey(
                key_pb2.VerifyApiKeyRequest(api_key=keys[n]), timeout=30
            )
            if verdict.result != key_pb2.VERIFY_RESULT_VALID:
                return key_pb2.VerifyResult.Name(verdict.result)
            return None if verdict.device_id == device_id(n) else "WRONG_DEVICE"

        async def worker() -> None:
            for n in queue:
                started = time.perf_counter()
                try:
                    failure = await one(n)
                except grpc.aio.AioRpcError as exc:
                    failure = exc.code().name
                if failure is None:
                    latencies.append((time.perf_counter() - started) * 1000)
                else:
                    failures[failure] = failures.get(failure, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
    return latencies, failures, time.perf_counter() - started


def database_io(conninfo: str) -> tuple[int, int, float]:
    with psycopg.connect(conninfo) as conn:
        row = conn.execute(
            "SELECT blks_read, blks_hit, blk_read_time FROM pg_stat_database "
            "WHERE datname = current_database()"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), float(row[2])


def redis_stats(client: redis.Redis) -> tuple[int, int]:
    info = client.info("stats")
    return int(info["keyspace_hits"]), int(info["keyspace_misses"])


@dataclass
class Stack:
    """One database and the two services that own its tables."""

    size: str
    devices: int
    conninfo: str
    cert_address: str
    key_address: str
    redis_db: int
    samples: dict[tuple[str, str], list[int]]  # (pass label, operation) -> device numbers
    keys: dict[int, str]  # device number -> plaintext key, for the VerifyApiKey samples


def measure(
    stacks: Sequence[Stack], label: str, operation: str, cache: redis.Redis, in_flight: int
) -> list[Pass]:
    """`operation` on every stack, in ROUNDS alternating chunks, so that a change in the load
    that other work puts on this machine falls on both sizes alike."""
    results = {s.size: Pass(label, s.size, operation, [], {}, 0.0) for s in stacks}
    before = {s.size: database_io(s.conninfo) for s in stacks}
    for round_ in range(ROUNDS):
        for stack in stacks if round_ % 2 == 0 else list(reversed(stacks)):
            result = results[stack.size]
            devices = stack.samples[(label, operation)][round_::ROUNDS]
            address = stack.key_address if operation == "VerifyApiKey" else stack.cert_address
            cache.flushall()
            hits, misses = redis_stats(cache)
            latencies, failures, seconds = asyncio.run(
                drive(address, operation, devices, stack.keys, in_flight)
            )
            hits_after, misses_after = redis_stats(cache)
            result.latencies_ms += latencies
            result.seconds += seconds
            result.redis_hits += hits_after - hits
            result.redis_misses += misses_after - misses
            for name, count in failures.items():
                result.failures[name] = result.failures.get(name, 0) + count
    time.sleep(0.6)  # pg_stat_database is updated by backends at most every 0.5 s
    for stack in stacks:
        result = results[stack.size]
        read0, hit0, time0 = before[stack.size]
        read1, hit1, time1 = database_io(stack.conninfo)
        result.blocks_read, result.blocks_hit = read1 - read0, hit1 - hit0
        result.read_ms = time1 - time0
        asked = len(stack.samples[(label, operation)])
        print(
            f"  {label:<5}{stack.size:>5} {operation:<18} p50 {result.p(50):6.2f} ms  "
            f"p99 {result.p(99):6.2f} ms  {len(result.latencies_ms) / result.seconds:5.0f}/s  "
            f"shared_buffers misses/req {result.blocks_read / asked:5.2f} "
            f"({result.read_ms / max(1, result.blocks_read):.3f} ms each), "
            f"hits/req {result.blocks_hit / asked:5.1f}  redis hits {result.redis_hits}"
            + (f"  failures {result.failures}" if result.failures else ""),
            flush=True,
        )
    return list(results.values())


# -- report ---------------------------------------------------------------------------------


def human(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


def count_label(n: int) -> str:
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n % 1_000 == 0:
        return f"{n // 1_000}k"
    return str(n)


def print_report(passes: list[Pass], small: str, large: str, in_flight: int, requests: int) -> None:
    print(
        f"\ncache-miss latency over gRPC, {requests} requests per cell, each a different device "
        f"never asked for before (Redis flushed, {in_flight} in flight)"
    )
    header = f"{'pass':<6}{'operation':<19}"
    header += f"{small + ' p50':>11}{small + ' p99':>11}{large + ' p50':>11}{large + ' p99':>11}"
    print(header + f"{'ratio p50':>11}{'ratio p99':>11}")
    by = {(p.label, p.size, p.operation): p for p in passes}
    for label in ("cold", "warm"):
        for operation in OPERATIONS:
            a, b = by[(label, small, operation)], by[(label, large, operation)]
            print(
                f"{label:<6}{operation:<19}{a.p(50):>8.2f} ms{a.p(99):>8.2f} ms"
                f"{b.p(50):>8.2f} ms{b.p(99):>8.2f} ms"
                f"{b.p(50) / a.p(50):>11.2f}{b.p(99) / a.p(99):>11.2f}"
            )


def print_sizes(size: str, found: list[Relation], loads: list[TableLoad]) -> None:
    print(f"\n{size}: relation sizes")
    for relation in found:
        print(f"  {relation.name:<52}{human(relation.bytes):>10}")
    total = sum(r.bytes for r in found)
    indexes = sum(r.bytes for r in found if r.kind == "index")
    print(f"  {'total (indexes ' + human(indexes) + ')':<52}{human(total):>10}")
    for load in loads:
        print(
            f"  load {load.table}: {load.rows} rows, insert {load.insert_s:.0f}s, "
            f"indexes {load.index_s:.0f}s, vacuum+analyze {load.vacuum_s:.0f}s"
        )


# -- orchestration ----------------------------------------------------------------------------


def draw_samples(
    devices: int, requests: int, rng: random.Random
) -> dict[tuple[str, str], list[int]]:
    """Disjoint random device numbers (1..devices) for every (pass, operation)."""
    cells = [(label, operation) for label in ("cold", "warm") for operation in OPERATIONS]
    drawn = rng.sample(range(1, devices + 1), requests * len(cells))
    return {cell: drawn[i * requests : (i + 1) * requests] for i, cell in enumerate(cells)}


@contextlib.contextmanager
def temporary_directory() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="myl-bench-scale-"))
    directory.chmod(0o755)  # PostgreSQL runs as its own user when we are root
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def run(devices: int, baseline: int, requests: int, in_flight: int, seed: int) -> None:
    rng = random.Random(seed)
    sizes = [(count_label(baseline), baseline), (count_label(devices), devices)]
    print(
        f"machine: {os.cpu_count()} CPUs, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1024**3:.0f} GiB RAM, "  # noqa: E501
        f"{shutil.disk_usage(tempfile.gettempdir()).free / 1024**3:.0f} GB free disk",
        flush=True,
    )
    started_run = time.perf_counter()
    with temporary_directory() as directory, contextlib.ExitStack() as stops:
        port = free_port()
        postgres = TunedPostgres(directory / "pg", port, LOAD_SETTINGS)
        postgres.start()
        stops.callback(lambda: postgres.stop())
        cache_server = RedisServer(directory / "redis", free_port())
        cache_server.start()
        stops.callback(cache_server.stop)
        document = certificate_document(directory)
        print(f"certificate_data: a real document of {len(document)} bytes (chain, CSR, ...)")
        print("load settings: " + ", ".join(f"{k}={v}" for k, v in LOAD_SETTINGS.items()))

        stacks: list[Stack] = []
        loads: dict[str, list[TableLoad]] = {}
        for index, (size, count) in enumerate(sizes):
            name = f"scale_{size.lower()}"
            postgres.create_database(name)
            conninfo = postgres.conninfo(name)
            for service in ("cert_service", "key_service"):
                migrations = load_migrations(ROOT / service / "migrations")
                asyncio.run(MigrationRunner(conninfo, service, migrations).up())
            samples = draw_samples(count, requests, rng)
            keys = {
                n: keyformat.generate().plaintext
                for label in ("cold", "warm")
                for n in samples[(label, "VerifyApiKey")]
            }
            started = time.perf_counter()
            print(f"loading {size} devices ...", flush=True)
            loads[size] = load_database(conninfo, count, document, keys)
            print(f"  {size}: loaded in {time.perf_counter() - started:.0f}s", flush=True)
            stacks.append(Stack(size, count, conninfo, "", "", index, samples, keys))

        postgres.stop()
        postgres = TunedPostgres(directory / "pg", port, MEASURE_SETTINGS)
        evicted = evict_from_page_cache(directory / "pg")
        print(f"restarted with durable settings; {human(evicted)} dropped from the page cache")
        postgres.start()
        print("measure settings: " + ", ".join(f"{k}={v}" for k, v in MEASURE_SETTINGS.items()))
        sizes_by_stack = {s.size: relations(s.conninfo) for s in stacks}

        ca_dir = directory / "ca"
        for stack in stacks:
            base = {
                **{k: v for k, v in os.environ.items() if not k.startswith(("DB_", "REDIS_"))},
                "DB_HOST": postgres.host,
                "DB_PORT": str(postgres.port),
                "DB_NAME": stack.conninfo.rsplit("dbname=", 1)[1],
                "DB_USER": postgres.user,
                "DB_SSLMODE": "disable",
                "REDIS_HOST": cache_server.host,
                "REDIS_PORT": str(cache_server.port),
                "REDIS_DB": str(stack.redis_db),
                "LOG_LEVEL": "warning",
                # Plaintext, as harness.Databases.env (bench_internal_tls: the cost of TLS).
                "INTERNAL_TLS": "off",
            }
            cert_port, key_port = free_port(), free_port()
            cert_env = {
                **base,
                "CERT_SERVICE_PORT": str(cert_port),
                "CERT_SERVICE_METRICS_PORT": "0",
                "CA_CERT_FILE": str(ca_dir / "ca.crt"),
                "CA_KEY_FILE": str(ca_dir / "ca.key"),
            }
            key_env = {
                **base,
                "KEY_SERVICE_PORT": str(key_port),
                "KEY_SERVICE_METRICS_PORT": "0",
                "CERT_SERVICE_ADDRESS": f"127.0.0.1:{cert_port}",
            }
            for command, env, service_port, name in (
                (["cert_service", "serve"], cert_env, cert_port, "cert"),
                (["key_service", "serve"], key_env, key_port, "key"),
            ):
                process = start_process(
                    [sys.executable, "-m", *command],
                    env,
                    service_port,
                    log=directory / f"{name}-{stack.size}.log",
                    timeout=120,
                )
                stops.callback(stop_process, process)
            stack.cert_address = f"127.0.0.1:{cert_port}"
            stack.key_address = f"127.0.0.1:{key_port}"

        client = redis.Redis(host=cache_server.host, port=cache_server.port)
        passes: list[Pass] = []
        print("\ncold: just after the restart, database files out of the page cache")
        for operation in OPERATIONS:
            passes += measure(stacks, "cold", operation, client, in_flight)
        for stack in stacks:
            loaded = prewarm(stack.conninfo)
            print(f"prewarmed {stack.size}: {', '.join(loaded)}", flush=True)
        print("warm: indexes the reads use in shared_buffers, heaps as far as they fit")
        for operation in OPERATIONS:
            passes += measure(stacks, "warm", operation, client, in_flight)
        client.close()

        print_report(passes, stacks[0].size, stacks[1].size, in_flight, requests)
        for stack in stacks:
            print_sizes(stack.size, sizes_by_stack[stack.size], loads[stack.size])
        for p in passes:
            if p.failures:
                print(f"failures in {p.label} {p.size} {p.operation}: {p.failures}")
    print(f"\nwhole run: {time.perf_counter() - started_run:.0f}s; temporary directory removed")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=10_000_000, help="the large database")
    parser.add_argument("--baseline", type=int, default=100_000, help="the small database")
    parser.add_argument("--requests", type=int, default=4000, help="per operation and pass")
    parser.add_argument("--in-flight", type=int, default=8, help="concurrent requests")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    if args.baseline < 6 * args.requests or args.devices < args.baseline:
        parser.error("need --devices >= --baseline >= 6 * --requests")
    run(args.devices, args.baseline, args.requests, args.in_flight, args.seed)


if __name__ == "__main__":
    main()
