"""`make run` (python -m shared.stack), the real command, run twice."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.devstack import free_port, stop_process_group

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
    ]  # fmt: skip
    return {name: free_port() for name in names}


@pytest.fixture
def running_stack(tmp_path: Path, ports: dict[str, int]) -> Iterator[Path]:
    # Not under tmp_path: as root, PostgreSQL runs as `postgres`, which cannot pass
    # through pytest's private temporary directory.
    base = Path(tempfile.mkdtemp(prefix="myl-stack-"))
    base.chmod(0o755)
    run_dir = base / "run"
    log_path = tmp_path / "first.log"
    with open(log_path, "wb") as log:
        first = subprocess.Popen(
            [sys.executable, "-m", "shared.stack"],
            cwd=ROOT,
            env=stack_env(run_dir, ports),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while "Ctrl-C stops everything" not in log_path.read_text():
            assert first.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        yield run_dir
        # The first stack is still whole: it stops cleanly on Ctrl-C.
        os.killpg(first.pid, signal.SIGINT)
        assert first.wait(60) == 0, log_path.read_text()
    finally:
        stop_process_group(first, signal.SIGINT)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_a_second_make_run_refuses_and_leaves_the_first_intact(
    running_stack: Path, tmp_path: Path, ports: dict[str, int]
) -> None:
    envoy_yaml = running_stack / "envoy.yaml"
    before = (envoy_yaml.read_bytes(), envoy_yaml.stat().st_mtime_ns)
    started = time.monotonic()
    second = subprocess.run(
        [sys.executable, "-m", "shared.stack"],
        cwd=ROOT,
        env=stack_env(running_stack, ports),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 1
    assert "already running" in second.stderr, second.stderr
    assert "ready" not in second.stdout
    assert time.monotonic() - started < 10
    assert (envoy_yaml.read_bytes(), envoy_yaml.stat().st_mtime_ns) == before
    healthz = f"http://127.0.0.1:{ports['GATEWAY_PORT']}/healthz"
    with urllib.request.urlopen(healthz, timeout=5) as reply:
        assert reply.status == 200

    # Another run directory, the same ports: refused before anything starts.
    elsewhere = tmp_path / "elsewhere"
    third = subprocess.run(
        [sys.executable, "-m", "shared.stack"],
        cwd=ROOT,
        env=stack_env(elsewhere, ports),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert third.returncode == 1
    assert "already in use" in third.stderr, third.stderr
    assert not (elsewhere / "postgres").exists()

    # What the stack keeps there is its owner's only.
    assert running_stack.stat().st_mode & 0o066 == 0
    for secret in ("admin.key", "ca/ca.key"):
        assert (running_stack / secret).stat().st_mode & 0o777 == 0o600


def test_a_port_in_use_is_named(tmp_path: Path, ports: dict[str, int]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports["GATEWAY_PORT"]))
        taken.listen()
        run = subprocess.run(
            [sys.executable, "-m", "shared.stack"],
            cwd=ROOT,
            env=stack_env(tmp_path / "run", ports),
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert run.returncode == 1
    assert f"port {ports['GATEWAY_PORT']} (GATEWAY_PORT) is already in use" in run.stderr
    assert not (tmp_path / "run" / "postgres").exists()
