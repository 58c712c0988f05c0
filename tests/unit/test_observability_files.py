"""deploy/'s alert rules and Grafana dashboard name only metrics tuneloop exports, and the
rules are well-formed (promtool checks them too where it is installed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tuneloop.serving.metrics import render
from tuneloop.store.jobs import JobStore
from tuneloop.store.registry import Registry
from tuneloop.store.storage import Storage

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
_NAME = re.compile(r"\b(tuneloop_[a-z_]+?)(?:_total|_bucket|_sum|_count)?\b")
STATS = [{"model": "m", "by_version": {"v1": {"online_accuracy": 0.9}}, "by_label": {"a": 1}}]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> set[str]:
    storage = Storage(str(tmp_path_factory.mktemp("store")))
    text = render(JobStore(storage), lambda: {"m": 1}, Registry(storage), ["m"], lambda: STATS).decode()
    return {family.name for family in text_string_to_metric_families(text)}


def _names(expr: str) -> set[str]:
    return set(_NAME.findall(expr))


def test_every_dashboard_panel_queries_exported_metrics(exported):
    dashboard = json.loads((DEPLOY / "grafana/tuneloop.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    for expr in exprs:
        assert _names(expr), expr
        assert _names(expr) <= exported, f"{expr} names {_names(expr) - exported}, which tuneloop does not export"


def test_alert_rules_are_well_formed_and_name_exported_metrics(exported):
    doc = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    rules = [r for group in doc["groups"] for r in group["rules"]]
    assert {r["alert"] for r in rules} >= {"TuneloopOverloaded", "TuneloopErrorRate", "TuneloopP99LatencyHigh",
                                           "TuneloopTrainingFailed", "TuneloopOnlineAccuracyDrop"}
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"} and rule["labels"]["severity"]
        assert _names(rule["expr"]) and _names(rule["expr"]) <= exported, rule["alert"]
    promtool = shutil.which("promtool")
    if promtool:  # Debian's `prometheus` package has it; CI's machine may not
        checked = subprocess.run([promtool, "check", "rules", str(DEPLOY / "prometheus/alerts.yml")],
                                 capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
