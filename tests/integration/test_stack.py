"""`make run` (python -m deploy.devstack.stack), the real command, as a new user meets it."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy.devstack.servers import free_port
from tests.fixtures.makerun import MakeRun, readme_blocks, stack_ports
from tests.fixtures.prometheus import prometheus_config, running_prometheus

# Each test here starts (or shares) a whole `make run`: 10-30 s on a quiet machine.
pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]


def stack_env(run_dir: Path, ports: dict[str, int]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DB_HOST", "REDIS_HOST")}
    env.update({name: str(port) for name, port in ports.items()})
    env["MYL_RUN_DIR"] = str(run_dir)
    return env


@pytest.fixture
def ports() -> dict[str, int]:
    names = [
        "DB_PORT", "REDIS_PORT", "CERT_SERVICE_PORT", "KEY_SERVICE_PORT", "GATEWAY_PORT",
        "ENVOY_ADMIN_PORT", "CERT_SERVICE_METRICS_PORT", "KEY_SERVICE_METRICS_PORT",
        "DEVICE_TLS_PORT", "EDGE_TRUST_METRICS_PORT",
    ]  # fmt: skip
    return {name: free_port() for name in names}


@pytest.mark.slow
@pytest.mark.xdist_group("make-run")
def test_a_second_make_run_refuses_and_leaves_the_first_intact(
    shared_stack: SharedStack, tmp_path: Path
) -> None:
    first = shared_stack.get()
    recorded = first.recorded()
    envoy_yaml = first.run_dir / "envoy.yaml"
    before = (envoy_yaml.read_bytes(), envoy_yaml.stat().st_mtime_ns)
    started = time.monotonic()
    second = subprocess.run(
        [sys.executable, "-m", "deploy.devstack.stack"],
        cwd=ROOT,
        env=first.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 1
    assert "already running" in second.stderr, second.stderr
    assert "ready" not in second.stdout
    assert time.monotonic() - started < 10
    assert (envoy_yaml.read_bytes(), envoy_yaml.stat().st_mtime_ns) == before
    healthz = f"http://127.0.0.1:{first.ports['GATEWAY_PORT']}/healthz"
    with urllib.request.urlopen(healthz, timeout=5) as reply:
        assert reply.status == 200

    # Another run directory, the same ports: refused before anything starts.
    elsewhere = tmp_path / "elsewhere"
    third = subprocess.run(
        [sys.executable, "-m", "deploy.devstack.stack"],
        cwd=ROOT,
        env={**first.env, "MYL_RUN_DIR": str(elsewhere)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert third.returncode == 1
    assert "already in use" in third.stderr, third.stderr
    assert not (elsewhere / "postgres").exists()

    # What the stack keeps there is its owner's only.
    assert first.run_dir.stat().st_mode & 0o066 == 0
    for secret in ("admin.key", "ca/pin"):
        assert (first.run_dir / secret).stat().st_mode & 0o777 == 0o600
    # The development CA's key is in its SoftHSM2 token, not in a file.
    assert (first.run_dir / "ca" / "tokens").stat().st_mode & 0o777 == 0o700
    assert not (first.run_dir / "ca" / "ca.key").exists()
    # The first stack is still whole (whoever stops it next sees it stop cleanly on Ctrl-C:
    # SharedStack's teardown, or the stopping test that takes it over).
    assert first.process is not None
    assert first.process.poll() is None, first.output()
    assert sorted(MakeRun.still_running(recorded)) == sorted(recorded)


def test_a_port_in_use_is_named(tmp_path: Path, ports: dict[str, int]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports["GATEWAY_PORT"]))
        taken.listen()
        run = subprocess.run(
            [sys.executable, "-m", "deploy.devstack.stack"],
            cwd=ROOT,
            env=stack_env(tmp_path / "run", ports),
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert run.returncode == 1
    assert f"port {ports['GATEWAY_PORT']} (GATEWAY_PORT) is already in use" in run.stderr
    assert not (tmp_path / "run" / "postgres").exists()


# -- A new user's `make run`, in each documented shape: the README's walk-throughs pasted as
#    written, a real Prometheus with the shipped rules, stopping, and starting again.

README = ROOT / "README.md"


@pytest.fixture
def make_runs() -> Iterator[Callable[..., MakeRun]]:
    started: list[MakeRun] = []

    def make(ports: dict[str, int], **settings: str) -> MakeRun:
        stack = MakeRun(ports, **settings)
        started.append(stack)
        return stack

    yield make
    for stack in started:
        stack.close()


class SharedStack:
    """One default `make run` for the tests that leave it running (per worker, started at
    the first `get()`): a start costs several seconds of CPU. A test that stops or kills it
    `take()`s it instead: it is then that test's, and the next `get()` starts another.
    Whatever is still shared at the end must stop cleanly on Ctrl-C. Its users come one
    after another in this module, the one that takes it right after them: even idle, a
    stack takes a fifth of a core."""

    def __init__(self) -> None:
        self.stack: MakeRun | None = None

    def get(self) -> MakeRun:
        if self.stack is None:
            self.stack = MakeRun(stack_ports())
            self.stack.start()
        # Nobody stops a shared stack: if it ended, that is the failure.
        assert self.stack.process is not None
        assert self.stack.process.poll() is None, self.stack.output()
        return self.stack

    def take(self) -> MakeRun:
        stack = self.get()
        self.stack = None
        return stack

    def close(self) -> None:
        if self.stack is None:
            return
        stack, self.stack = self.stack, None
        try:
            assert stack.process is not None
            assert stack.process.poll() is None, stack.output()
            stack.signal_group(signal.SIGINT)
            assert stack.wait() == 0, stack.output()
        finally:
            stack.close()


@pytest.fixture(scope="module")
def shared_stack() -> Iterator[SharedStack]:
    shared = SharedStack()
    try:
        yield shared
    finally:
        shared.close()


def _until(check: Callable[[], bool], limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while True:
        # Prometheus not yet listening, or a query of data not yet ingested.
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError):
            if check():
                return
        assert time.monotonic() < deadline, f"not within {limit}s: {what}"
        time.sleep(0.25)


def _replica_ports(port: int, replicas: int) -> list[str]:
    return [f"127.0.0.1:{port + 100 * index}" for index in range(replicas)]


@contextlib.contextmanager
def prometheus_of(stack: MakeRun, replicas: int = 1) -> Iterator[Callable[[], dict[str, set[str]]]]:
    """A real Prometheus with the shipped configuration and the shipped rules, scraping the
    stack from now on (while a walk-through runs, its start overlaps it); yields `no_alert`,
    which waits until each target is up, every replica's sampled gauges are in and every
    rule group has been evaluated since it was called, asserts that no alert is pending or
    firing, and returns the job names that export each `myl_` metric."""
    ports = stack.ports
    targets = {
        "cert_service": _replica_ports(ports["CERT_SERVICE_METRICS_PORT"], replicas),
        "key_service": _replica_ports(ports["KEY_SERVICE_METRICS_PORT"], replicas),
        "gateway": [f"127.0.0.1:{ports['ENVOY_ADMIN_PORT']}"],
    }
    directory = stack.home / "prometheus"
    directory.mkdir()
    with (
        running_prometheus(prometheus_config(directory, targets)) as url,
        httpx.Client(base_url=url, timeout=5) as http,
    ):

        def query(expr: str) -> list[dict[str, Any]]:
            reply = http.get("/api/v1/query", params={"query": expr})
            result: list[dict[str, Any]] = reply.json()["data"]["result"]
            return result

        def all_up() -> bool:
            active = http.get("/api/v1/targets").json()["data"]["activeTargets"]
            return len(active) == 2 * replicas + 1 and all(t["health"] == "up" for t in active)

        def no_alert() -> dict[str, set[str]]:
            _until(all_up, 60, "every target up")
            # Every replica has sampled its gauges (Redis for both, the fleet for cert_service).
            _until(lambda: len(query("myl_redis_up")) == 2 * replicas, 60, "myl_redis_up")
            _until(
                lambda: len(query("myl_fleet_sample_timestamp_seconds > 0")) == replicas,
                60,
                "the fleet gauges",
            )
            since = time.time()

            def evaluated() -> bool:
                groups = http.get("/api/v1/rules").json()["data"]["groups"]
                return bool(groups) and all(
                    datetime.fromisoformat(g["lastEvaluation"]).timestamp() > since + 1
                    for g in groups
                )

            _until(evaluated, 30, "every rule group evaluated")
            alerts = http.get("/api/v1/alerts").json()["data"]["alerts"]
            assert alerts == [], alerts
            exporters: dict[str, set[str]] = {}
            for series in query('{__name__=~"myl_.+"}'):
                exporters.setdefault(series["metric"]["__name__"], set()).add(
                    series["metric"]["job"]
                )
            return exporters

        yield no_alert


CERT_SERVICE_ONLY = (
    "myl_outbox_",
    "myl_certificates_",
    "myl_ca_certificate_",
    "myl_fleet_sample",
    "myl_certificate_operations",
)


@pytest.mark.slow
@pytest.mark.xdist_group("make-run")
def test_readme_walk_throughs_run_as_written_and_no_alert_fires(shared_stack: SharedStack) -> None:
    stack = shared_stack.get()
    # A healthy start warns of nothing (a fresh process opening its Redis breaker until it
    # applied the invalidation log is information).
    for service in ("cert_service", "key_service"):
        log = (stack.run_dir / f"{service}.log").read_text()
        assert '"level": "warning"' not in log, log

    rest = readme_blocks(README, "## Walk-through (REST with curl)")
    grpc = readme_blocks(README, "## The same with grpcurl")
    assert len(rest) == 2
    assert len(grpc) == 1
    keys_shown = 'echo "KEYS $DEVICE_KEY $GRPC_KEY"\n'
    with prometheus_of(stack) as no_alert:
        output, failed = stack.run_script("\n".join([*rest, *grpc, keys_shown]))
        exporters = no_alert()
    # Only what the README shows failing fails: the revoked certificate does not verify,
    # and grpcurl's call with the revoked key exits non-zero.
    assert [command.split()[:2] for command in failed] == [
        ["openssl", "verify"],
        ["$GRPCURL", "-plaintext"],
    ], output
    assert "Traceback" not in output, output
    assert '"status":"API_KEY_STATUS_REVOKED"' in output, output  # step 4
    assert "HTTP/1.1 401 Unauthorized" in output  # step 5
    assert "error 23 at 0 depth lookup: certificate revoked" in output  # step 7
    serial = re.search(r"serial=([0-9A-F]+)$", output, re.MULTILINE)
    assert serial is not None, output
    assert f'"serialNumber":"{serial[1].lower()}"' in output  # the same digits
    assert f"Serial Number: {serial[1]}" in output
    assert '"status": "API_KEY_STATUS_REVOKED"' in output  # grpcurl's revoke
    assert "Code: Unauthenticated\n  Message: API key revoked" in output
    assert '"content_type": "application/pkix-crl"' in output  # GetCrl
    assert '"action": "AUDIT_ACTION_REVOKE"' in output  # straight to key_service, mutual TLS
    assert "\nrefused\n" in output  # ... and not without the operator's certificate
    # The device key was shown once, and written nowhere.
    keys = output.rsplit("KEYS ", 1)[1].split()
    assert len(keys) == 2, output
    assert all(key.startswith("myl_") for key in keys), output
    for path in stack.home.rglob("*"):
        if path.is_file() and not path.is_symlink() and "postgres" not in path.parts:
            text = path.read_text(errors="replace")
            assert not any(key in text for key in keys), path

    assert "myl_ca_certificate_not_after_timestamp_seconds" in exporters
    for name, jobs in exporters.items():
        if name.startswith(CERT_SERVICE_ONLY):
            assert jobs == {"cert_service"}, (name, jobs)


@pytest.mark.slow
@pytest.mark.xdist_group("make-run")
def test_readme_device_walk_through_runs_as_written(shared_stack: SharedStack) -> None:
    """A device with its certificate on the device port (mutual TLS), as the README shows:
    its own certificate read, another device's and a key-only method refused, and its
    certificate refused in the handshake once it revoked it."""
    stack = shared_stack.get()
    (block,) = readme_blocks(README, "## Devices with their certificate (mutual TLS)")
    admin = "ADMIN_KEY=$(cat .run/admin.key)\n"
    output, failed = stack.run_script(admin + block, timeout=60)
    # Only the last call fails: the revoked certificate, refused in the handshake.
    assert [command.split()[:2] for command in failed] == [["curl", "-sS"]], output
    assert '"uuidSubdomain":"sensor-1.myl.zip"' in output, output
    assert '"reason":"DEVICE_MISMATCH"' in output, output
    assert "it needs device:write" in output, output
    assert '"status":"CERTIFICATE_STATUS_REVOKED"' in output, output
    # TLS 1.3 checks the client's certificate after the client's side of the handshake:
    # curl reads the gateway's alert, or finds the connection closed while it sends.
    assert "certificate revoked" in output or "Broken pipe" in output, output


@pytest.mark.slow
@pytest.mark.xdist_group("make-run")
def test_readme_acme_client_walk_through_runs_as_written(shared_stack: SharedStack) -> None:
    """A device's own ACME clients against `make run`'s ACME server, as the README shows:
    certbot and lego enroll with EAB, obtain, renew and revoke; both chains verify."""
    if shutil.which("lego") is None:
        pytest.skip("lego is not installed (deploy/system-deps.sh)")
    stack = shared_stack.get()
    (block,) = readme_blocks(README, "## Devices with their own ACME client (certbot, lego)")
    output, failed = stack.run_script(block, timeout=120)
    assert failed == [], output
    assert output.count(": OK") == 2, output  # both openssl verify
    assert "'status': 'CERTIFICATE_STATUS_REVOKED'" in output, output
    assert "'certificateType': 'CERTIFICATE_TYPE_SINGLE'" in output, output


@pytest.mark.slow
@pytest.mark.xdist_group("make-run")
def test_stopping_survives_more_signals_and_a_stack_starts_again_and_stops_when_a_part_dies(
    request: pytest.FixtureRequest, shared_stack: SharedStack
) -> None:
    stack = shared_stack.take()
    request.addfinalizer(stack.close)
    recorded = stack.recorded()
    assert set(recorded) == {
        "PostgreSQL", "Redis", "cert_service", "key_service", "edge_trust", "envoy",
    }  # fmt: skip

    # Ctrl-C, Ctrl-C again while it stops, then SIGTERM to the whole process group.
    stack.signal_group(signal.SIGINT)
    while "stopping" not in stack.current():
        time.sleep(0.05)
    stack.signal_group(signal.SIGINT)
    stack.signal_group(signal.SIGTERM)
    assert stack.wait() == 0, stack.output()
    assert "already stopping" in stack.current()
    assert "Traceback" not in stack.output()
    assert stack.still_running(recorded) == []

    # Started again after a stop (after `make run` itself was killed: the ACME walk-through's
    # test); a process of the stack dies: reported at once with the end of its log, and the
    # stack stops rather than answering 503.
    stack.start()
    recorded = stack.recorded()
    pid = recorded["key_service"][0]
    os.kill(pid, signal.SIGKILL)
    assert stack.wait() == 1, stack.output()
    output = stack.current()
    assert f"key_service (pid {pid}) was killed by SIGKILL; the end of" in output, output
    assert '"event": "serving"' in output.split("was killed by SIGKILL", 1)[1], output
    assert stack.still_running(recorded) == []


@pytest.mark.slow
def test_acme_walk_through_runs_as_written_and_a_killed_make_run_is_cleaned_up_after(
    make_runs: Callable[..., MakeRun],
) -> None:
    stack = make_runs(stack_ports(), CERT_ISSUER="acme")
    stack.start()
    (block,) = readme_blocks(ROOT / "docs" / "acme.md", "## What a device sees")
    with prometheus_of(stack) as no_alert:
        output, failed = stack.run_script(block, timeout=90)
        exporters = no_alert()
    assert failed == [], output
    assert "CERTIFICATE_STATUS_PENDING" in output, output
    assert output.rstrip().endswith("}"), output
    last = output.rstrip().rsplit("\n", 1)[-1]
    assert "CERTIFICATE_STATUS_ACTIVE" in last, output
    assert "Pebble" in last, output

    # The CA is Pebble's, not ours to watch: no expiry exported, so none can alert.
    assert "myl_ca_certificate_not_after_timestamp_seconds" not in exporters
    assert exporters["myl_certificates_pending_issuance"] == {"cert_service"}

    # `make run` itself killed: the next one stops what it left running, Knot and Pebble
    # included, and starts them again on the same ports. (Started again after a stop: the
    # stopping test.)
    recorded = stack.recorded()
    assert stack.process is not None
    os.kill(stack.process.pid, signal.SIGKILL)
    stack.wait()
    output = stack.start()
    for name in ("PostgreSQL", "Redis", "cert_service", "key_service", "Knot DNS", "Pebble"):
        assert f"stopping {name} (pid {recorded[name][0]}), left running" in output, output
    assert stack.still_running(recorded) == []


@pytest.mark.slow
def test_replicas_on_a_redis_cluster_alert_nothing_and_stop_with_nothing_left(
    make_runs: Callable[..., MakeRun],
) -> None:
    """The replicas-on-a-cluster shape. That it starts again after a stop is the cluster's
    own business (its nodes' state from the first start must not be in the way), tested
    where the cluster is made: tests/integration/test_redis_cluster.py."""
    ports = stack_ports(replicas=True, cluster=True)
    stack = make_runs(ports, CERT_SERVICE_REPLICAS="2", KEY_SERVICE_REPLICAS="2", REDIS_CLUSTER="1")
    with prometheus_of(stack, replicas=2) as no_alert:
        banner = stack.start()
        for name in ("CERT_SERVICE_PORT", "KEY_SERVICE_PORT"):
            both = f"127.0.0.1:{ports[name]}, 127.0.0.1:{ports[name] + 100}"
            assert both in banner, banner
        no_alert()

    recorded = stack.recorded()
    stack.signal_group(signal.SIGINT)
    assert stack.wait() == 0, stack.output()
    assert stack.still_running(recorded) == []


def test_a_busy_redis_cluster_port_or_its_cluster_bus_is_named(tmp_path: Path) -> None:
    ports = stack_ports(cluster=True)
    bus = ports["REDIS_CLUSTER_PORT"] + 2 + 10000
    env = {**stack_env(tmp_path / "run", ports), "REDIS_CLUSTER": "1"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", bus))
        taken.listen()
        run = subprocess.run(
            [sys.executable, "-m", "deploy.devstack.stack"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert run.returncode == 1
    expected = f"port {bus} (REDIS_CLUSTER_PORT + 10002 (cluster bus)) is already in use"
    assert expected in run.stderr, run.stderr
    assert "set REDIS_CLUSTER_PORT to another port" in run.stderr
    assert not (tmp_path / "run" / "postgres").exists()
