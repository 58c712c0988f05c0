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

from tuneloop.serving.metrics import RESIDENT_WEIGHT_BYTES, SERVING_RUNTIME, render
from tuneloop.store.jobs import JobStore
from tuneloop.store.manifest import Manifest
from tuneloop.store.registry import Registry
from tuneloop.store.storage import Storage

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
_NAME = re.compile(r"\b(tuneloop_[a-z_]+?)(?:_total|_bucket|_sum|_count)?\b")
STATS = [{"model": "m", "by_version": {"v1": {"online_accuracy": 0.9, "feedback": 10}}, "by_label": {"a": 1}}]


@pytest.fixture(scope="module")
def exported_text(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("store")
    storage = Storage(str(root))
    registry = Registry(storage)
    (root / "weights").mkdir()
    (root / "weights/config.json").write_text("{}")
    for _ in range(2):  # a rollout under way: its series too
        registry.publish("m", str(root / "weights"), Manifest(version="pending", model="m", parent=None,
                                                              base_model="b", task="text-classification",
                                                              labels=["a", "b"]))
    registry.promote("m", "v1")
    registry.start_rollout("m", "v2", "canary", 5.0)
    for version in ("v1", "v2"):  # as the replicas holding both report them
        RESIDENT_WEIGHT_BYTES.labels("m", version).set(4e6)
        SERVING_RUNTIME.labels("m", version, "onnx-int8", "batches").set(1)
    return render(JobStore(storage), lambda: {"m": 1}, registry, ["m"], lambda: STATS).decode()


@pytest.fixture(scope="module")
def exported(exported_text) -> set[str]:
    return {family.name for family in text_string_to_metric_families(exported_text)}


def _names(expr: str) -> set[str]:
    return set(_NAME.findall(expr))


def test_every_dashboard_panel_queries_exported_metrics(exported):
    dashboard = json.loads((DEPLOY / "grafana/tuneloop.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    for expr in exprs:
        assert _names(expr), expr
        assert _names(expr) <= exported, f"{expr} names {_names(expr) - exported}, which tuneloop does not export"


def test_a_rollout_shows_each_versions_share_and_its_events(exported_text):
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(exported_text) for s in f.samples}
    assert samples[("tuneloop_traffic_share", (("model", "m"), ("role", "production"), ("version", "v1")))] == 0.95
    assert samples[("tuneloop_traffic_share", (("model", "m"), ("role", "canary"), ("version", "v2")))] == 0.05
    assert samples[("tuneloop_rollout_events_total", (("by", "operator"), ("event", "rollout"), ("model", "m")))] == 1
    assert samples[("tuneloop_rollout_alert", (("model", "m"), ("version", "v2")))] == 0


def test_alert_rules_are_well_formed_and_name_exported_metrics(exported):
    doc = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    rules = [r for group in doc["groups"] for r in group["rules"]]
    assert {r["alert"] for r in rules} >= {"TuneloopOverloaded", "TuneloopErrorRate", "TuneloopP99LatencyHigh",
                                           "TuneloopUnavailable", "TuneloopDown",
                                           "TuneloopTrainingFailed", "TuneloopOnlineAccuracyDrop",
                                           "TuneloopRolloutRolledBack", "TuneloopRolloutStuck"}
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"} and rule["labels"]["severity"]
        assert _names(rule["expr"]) and _names(rule["expr"]) <= exported, rule["alert"]
    promtool = shutil.which("promtool")
    if promtool:  # Debian's `prometheus` package has it; CI's machine may not
        checked = subprocess.run([promtool, "check", "rules", str(DEPLOY / "prometheus/alerts.yml")],
                                 capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr


def _samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_counters_alerts_take_increase_of_start_at_zero_and_never_fall(tmp_path):
    """increase() over a series born at 1 is 0: the first failed job and the first automatic
    abort never alerted. A running job in the runs counter made it fall when the job ended."""
    storage = Storage(str(tmp_path))
    registry, jobs = Registry(storage), JobStore(storage)
    (tmp_path / "w").mkdir()
    (tmp_path / "w/config.json").write_text("{}")
    for _ in range(2):
        registry.publish("m", str(tmp_path / "w"), Manifest(version="pending", model="m", parent=None,
                                                            base_model="b", task="text-classification",
                                                            labels=["a", "b"]))
    registry.promote("m", "v1", reason="job 0123456789abcdef: passed its gate")
    registry.start_rollout("m", "v2", "canary", 5.0, "job 0123456789abcdef: passed its gate")  # "canary 5%: job ..."
    fresh = _samples(render(jobs, lambda: {"m": 1}, registry, ["m"], None).decode())
    assert fresh[("tuneloop_rollout_events_total", (("by", "job"), ("event", "rollout"), ("model", "m")))] == 1
    assert fresh[("tuneloop_rollout_events_total", (("by", "operator"), ("event", "rollout"), ("model", "m")))] == 0
    for outcome in ("succeeded", "rejected", "failed"):
        assert fresh[("tuneloop_training_runs_total", (("model", "m"), ("outcome", outcome)))] == 0
    assert fresh[("tuneloop_training_jobs_running", (("model", "m"),))] == 0
    assert fresh[("tuneloop_rollout_events_total", (("by", "automatic"), ("event", "abort"), ("model", "m")))] == 0
    assert fresh[("tuneloop_rollout_events_total", (("by", "job"), ("event", "promote"), ("model", "m")))] == 1

    job = jobs.create("m", "feedback")
    running = _samples(render(jobs, lambda: {"m": 1}, registry, ["m"], None).decode())
    assert running[("tuneloop_training_jobs_running", (("model", "m"),))] == 1
    assert ("tuneloop_training_runs_total", (("model", "m"), ("outcome", "running"))) not in running
    jobs.save(job.model_copy(update={"state": "failed", "error": "boom"}))
    done = _samples(render(jobs, lambda: {"m": 1}, registry, ["m"], None).decode())
    assert done[("tuneloop_training_runs_total", (("model", "m"), ("outcome", "failed")))] == 1
    assert done[("tuneloop_training_jobs_running", (("model", "m"),))] == 0
    # Marked lost, then finished by its still-running process; then its record cut: counted once, as first seen.
    jobs.save(job.model_copy(update={"state": "succeeded"}))
    assert jobs.stored(job.job_id).state == "succeeded" and jobs.stored(job.job_id).counted_as == "failed"
    written = (tmp_path / f"jobs/{job.job_id}.json").read_text()
    (tmp_path / f"jobs/{job.job_id}.json").write_text("{")
    later = _samples(render(jobs, lambda: {"m": 1}, registry, ["m"], None).decode())
    assert later[("tuneloop_training_runs_total", (("model", "m"), ("outcome", "failed")))] == 1
    assert later[("tuneloop_training_runs_total", (("model", "m"), ("outcome", "succeeded")))] == 0
    # And after a restart of the process counting (its memory of first outcomes gone): still failed.
    from tuneloop.serving.metrics import TrainingRunsCollector

    (tmp_path / f"jobs/{job.job_id}.json").write_text(written)  # readable again, as its process wrote it
    TrainingRunsCollector._finished.clear()
    restarted = _samples(render(jobs, lambda: {"m": 1}, registry, ["m"], None).decode())
    assert restarted[("tuneloop_training_runs_total", (("model", "m"), ("outcome", "failed")))] == 1
    assert restarted[("tuneloop_training_runs_total", (("model", "m"), ("outcome", "succeeded")))] == 0


def test_a_job_store_or_serve_that_cannot_answer_leaves_the_other_series(tmp_path):
    class Unreadable(JobStore):
        def all(self):
            raise OSError("bucket throttled")

    def no_serve():
        raise RuntimeError("Serve controller unreachable")

    storage = Storage(str(tmp_path))
    text = render(Unreadable(storage), no_serve, Registry(storage), ["m"], lambda: STATS).decode()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert "tuneloop_feedback_online_accuracy" in names and "tuneloop_training_runs" not in names


@pytest.mark.parametrize("min_replicas", [0, 2])
def test_replica_counts_carry_the_configured_floor_that_the_no_replica_alert_reads(tmp_path, min_replicas):
    """TuneloopNoReplicas fired for every model allowed to scale to zero once it had."""
    storage = Storage(str(tmp_path))
    text = render(JobStore(storage), lambda: {"m": 0, "n": 3}, Registry(storage), ["m", "n"], None,
                  min_replicas=min_replicas).decode()
    samples = _samples(text)
    assert samples[("tuneloop_replicas", (("model", "m"),))] == 0
    assert samples[("tuneloop_replicas", (("model", "n"),))] == 3
    assert samples[("tuneloop_replicas_min", (("model", "m"),))] == min_replicas
    assert samples[("tuneloop_replicas_min", (("model", "n"),))] == min_replicas
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())["groups"]
    no_replicas = next(r for g in rules for r in g["rules"] if r["alert"] == "TuneloopNoReplicas")
    assert "tuneloop_replicas_min" in no_replicas["expr"]
