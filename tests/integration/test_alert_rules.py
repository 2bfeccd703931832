"""The alert rules and the example Prometheus config: valid, unit-tested, and about metrics
that exist. `promtool` comes with Debian's `prometheus` package (deploy/system-deps.sh)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

import cert_service.acme_worker  # registers its metrics
import cert_service.edge_trust  # the writer beside the gateway
import cert_service.metrics
import key_service.metrics
import shared.metrics

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
    # Exported once known (never as a placeholder 0).
    names.add(cert_service.metrics.CA_EXPIRY.name)
    return names


def _metric_names(module: object) -> set[str]:
    """The metric names a module defines (prometheus_client drops `_total` from a
    counter's name)."""
    names = {
        str(getattr(value, "_name", None) or getattr(value, "name", ""))
        for value in vars(module).values()
        if hasattr(value, "collect")
    }
    return names - {""}


def test_every_alert_is_unit_tested_firing_for_each_service_it_watches() -> None:
    """alerts_test.yml makes each alert of alerts.yml fire, at each of its severities, and
    an alert about a metric both services export fires in a test for each of them."""
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())
    fired = {
        (check["alertname"], alert["exp_labels"]["severity"], alert["exp_labels"].get("job"))
        for test in tests["tests"]
        for check in test.get("alert_rule_test", [])
        for alert in check.get("exp_alerts") or []
    }
    shared_metrics = _metric_names(shared.metrics) | {"up"}
    key_metrics = _metric_names(key_service.metrics)
    assert "myl_rpc" in shared_metrics
    for group in rules["groups"]:
        for rule in group["rules"]:
            name, severity = rule["alert"], rule["labels"]["severity"]
            used = {
                metric.removesuffix("_total")
                for metric in re.findall(r"\b(myl_[a-z_]+|up)\b", rule["expr"])
            }
            jobs = {"gateway"} if 'job="gateway"' in rule["expr"] else {"cert_service"}
            if used <= shared_metrics and jobs != {"gateway"}:
                jobs = {"cert_service", "key_service"}
            elif used <= key_metrics | shared_metrics and jobs != {"gateway"}:
                jobs = {"key_service"}
            for job in jobs:
                assert (name, severity, job) in fired, f"{name} ({severity}) never fires for {job}"
    # And on what a healthy stack exports, none does.
    healthy = next(t for t in tests["tests"] if t["name"].startswith("a healthy stack"))
    quiet = {c["alertname"] for c in healthy["alert_rule_test"] if not c.get("exp_alerts")}
    assert quiet == {rule["alert"] for group in rules["groups"] for rule in group["rules"]}


def _exported_by(service: str) -> set[str]:
    """The metric names a freshly started service process exports before any call."""
    code = (
        f"import {service}.app, {service}.__main__\n"
        "from prometheus_client import REGISTRY\n"
        "print('\\n'.join(s.name for m in REGISTRY.collect() for s in m.samples))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return {name for name in done.stdout.split() if name.startswith("myl_")}


def test_each_service_exports_only_metrics_it_fills() -> None:
    cert_only = _metric_names(cert_service.metrics) | {"myl_outbox_deliveries", "myl_acme"}
    key_exports = _exported_by("key_service")
    assert "myl_redis_circuit_open" in key_exports
    assert not {n for n in key_exports if any(n.startswith(c) for c in cert_only)}
    assert not {n for n in key_exports if n.startswith(("myl_certificate", "myl_crl"))}
    cert_exports = _exported_by("cert_service")
    assert "myl_outbox_lag_seconds" in cert_exports
    key_only = _metric_names(key_service.metrics)
    assert "myl_gateway_decisions" in key_only
    assert not {n for n in cert_exports if n.startswith(tuple(key_only))}
    # The CA's expiry only once read from the CA (never a 0 that says "expired in 1970").
    assert "myl_ca_certificate_not_after_timestamp_seconds" not in cert_exports


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
