"""The alert rules and the example Prometheus config: valid, unit-tested, and about metrics
that exist. `promtool` comes with Debian's `prometheus` package (deploy/system-deps.sh)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

import shared.metrics  # noqa: F401  (registers every metric)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "myl-device-identity.json"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is missing: install Debian's prometheus package (make system-deps)")
    return subprocess.run(
        [binary, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60, check=False
    )


def test_rules_and_config_are_valid() -> None:
    for args in (("check", "rules", "alerts.yml"), ("check", "config", "prometheus.yml")):
        result = promtool(*args)
        assert result.returncode == 0, result.stdout + result.stderr


def test_rules_fire_as_their_unit_tests_say() -> None:
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def _exported_names() -> set[str]:
    names: set[str] = set()
    for metric in REGISTRY.collect():
        names.update(sample.name for sample in metric.samples)
        names.add(metric.name)
    return names


def test_alerts_and_dashboard_name_only_metrics_the_services_export() -> None:
    exported = _exported_names()
    texts = [(PROMETHEUS / "alerts.yml").read_text()]
    dashboard = json.loads(DASHBOARD.read_text())
    texts += [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    used = {name for text in texts for name in re.findall(r"\bmyl_[a-z_]+", text)}
    assert used, "no metric found"
    suffixes = ("_bucket", "_count", "_sum", "_total")
    missing = {
        name
        for name in used
        if name not in exported and not any(name.removesuffix(s) in exported for s in suffixes)
    }
    assert not missing, f"not exported by any service: {sorted(missing)}"
